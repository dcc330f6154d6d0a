"""Mask Frozen-DETR command line: extract -> train-head -> evaluate (plus check-weights, params, env).

Each command parses its flags, calls one pipeline function, prints and exits. Errors from bad
input are printed as one clear message (exit code 2) instead of a traceback; storage errors
(disk full, permissions) name the path and exit with code 1.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import click


class StorePath(click.ParamType):
    """A feature-cache store: a local path (:class:`Path`) or any fsspec URL zarr accepts, kept as
    a string (``s3://bucket/train.zarr``; remote filesystems need their extra, e.g. ``[s3]``)."""

    name = "store"

    def convert(self, value, param, ctx):
        if isinstance(value, Path) or "://" not in str(value):
            return Path(value)
        return str(value)


STORE = StorePath()


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _user_errors():
    from pipeline.cache import CacheError
    from pipeline.config import ConfigError
    from pipeline.data import DataError

    from kernels.ops import KernelUnavailableError
    from pipeline.utils import LockError

    errors = [CacheError, ConfigError, DataError, LockError, KernelUnavailableError, ValueError, FileNotFoundError]
    try:
        from pipeline.detectors.checkpoint import CheckpointError
        from pipeline.extract import ExtractError

        errors[:0] = [CheckpointError, ExtractError]
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def friendly_errors(fn):
    """Turn expected user-input errors into ``Error: <message>`` and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _user_errors() as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(2)
        except OSError as e:  # disk full, permissions, I/O: the environment failed, not the input
            where = e.filename or "(unknown path)"
            click.echo(f"Error: cannot write {where}: {e.strerror or e}. Everything finished before this "
                       "point is intact; fix the cause and re-run the same command to resume "
                       "(train-head: add --resume).", err=True)
            sys.exit(1)

    return wrapper


def impl_option(fn):
    """``--impl auto|cuda|cpu|reference`` (env MFDETR_IMPL): the deformable-attention kernel of this run.

    A run-time choice: logged and written to the run's metrics, never part of a cache's
    fingerprint or of the config ``--resume`` compares.
    """
    from kernels.ops import ENV_VAR, IMPLS

    return click.option(
        "--impl", type=click.Choice(IMPLS), default="auto", show_default=True, envvar=ENV_VAR,
        help=f"Deformable-attention kernel (env {ENV_VAR}): auto = the compiled kernel for the device if built, "
             "else the pure-PyTorch reference; cpu / cuda = the compiled kernel (error if not built).")(fn)


def detector_options(fn):
    """The options naming the detector a command runs (the fields of ``DetectorOptions``):
    ``--detector --preset --weights --random-init --seed --precision``."""
    options = [
        click.option("--detector", default="dino-focalnet", show_default=True,
                     help="Detector registry name: dino-focalnet, hdetr-r50, hdetr-swin-l (see `cli.py detectors`)."),
        click.option("--preset", default=None,
                     help="Architecture preset (default: the detector's official release; 'golden-small' = reduced "
                          "test model; see `cli.py detectors`)."),
        click.option("--weights", type=click.Path(dir_okay=False, path_type=Path),
                     help="Official checkpoint (.pth with a 'model' dict, or a bare state_dict)."),
        click.option("--random-init", is_flag=True,
                     help="Run without weights: random detector from --seed (tests the path; all numbers are "
                          "meaningless; recorded where results are written)."),
        click.option("--seed", default=0, show_default=True, help="Seed of --random-init weights."),
        click.option("--precision", type=click.Choice(["float32", "float64"]), default="float32", show_default=True,
                     help="Detector compute precision."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _int_list(ctx, param, value):
    if value is None or value == "":
        return None
    try:
        return [int(v) for v in str(value).replace(" ", "").split(",") if v]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


def _views(ctx, param, value):
    """``--views orig,hflip,...`` -> ``["orig", "hflip", ...]`` (None when not given; checked by
    :func:`pipeline.views.parse_views`)."""
    if value is None or value == "":
        return None
    return [v.strip() for v in str(value).split(",")]


def dataset_options(online: bool = False):
    """The options naming the images a detector runs on and what of its output is kept (the dataset
    and preprocessing fields of ``ExtractOptions``): ``--coco-root --split --image-dir --image-ids
    --max-images --min-size --max-size --encoder-layers --top-k --levels --views``.

    ``extract`` takes them as they are; ``train-head`` (``online=True``) for ``--online``, where the
    same fields feed the detector in the training loop (help texts prefixed ``--online:``).
    ``--ann-file`` is each command's own (train-head's also names moved annotations of a cache).
    """
    pre = "--online: " if online else ""
    verb = "train on" if online else "extract"
    kept = "offered (as a cache would store them)" if online else "to store"
    options = [
        click.option("--coco-root", type=click.Path(file_okay=False, path_type=Path),
                     help=f"{pre}COCO root with annotations/instances_<split>.json and <split>/ images."),
        click.option("--split", help=f"{pre}Split name under --coco-root, e.g. train2017, val2017."),
        click.option("--image-dir", type=click.Path(file_okay=False, path_type=Path),
                     help=f"{pre}Image folder of --ann-file (instead of --coco-root/--split)."),
        click.option("--image-ids", callback=_int_list,
                     help=f"{pre}Comma-separated image ids to {verb} (default: all)."),
        click.option("--max-images", type=int,
                     help=f"{pre}Only the first N images (in annotation-file order of ids)."),
        click.option("--min-size", default=800, show_default=True, help=f"{pre}Test-time resize: shorter side, pixels."),
        click.option("--max-size", default=1333, show_default=True,
                     help=f"{pre}Test-time resize: cap on the longer side, pixels."),
        click.option("--encoder-layers", default="4", show_default=True, callback=_int_list,
                     help=f"{pre}Encoder layers {kept}, counted from 1 (6 = the memory the decoder reads); "
                          "comma-separated" + ("; recorded in the fingerprint, must include train.encoder_layer."
                                               if online else ".")),
        click.option("--top-k", default=100, show_default=True,
                     help=f"{pre}Queries kept per image, by best class score (<= the detector's queries: 900 DINO, "
                          "300 H-DETR)."),
        click.option("--levels", callback=_int_list, default=None,
                     help=f"{pre}Encoder levels kept, comma-separated indices (0 = finest; default all). A head "
                          "trained on them uses these levels only."),
        click.option("--views", callback=_views, default=None,
                     help=f"{pre}Augmented views per image, comma-separated (default: orig): orig, hflip, short<S>, "
                          "scale<F>, '+'-joined (hflip+short640), or lsj (a set of scale/crop/flip views). "
                          + ("Live augmentation: one view per image per epoch, drawn as from a cache extracted with "
                             "these views." if online else
                             "train-head draws one view per image per epoch. Each view costs about one image's disk "
                             "(README: Augmented views).")),
    ]

    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose):
    """Mask Frozen-DETR: instance masks from a frozen DETR detector plus a small trained mask head.

    \b
    1. extract      run the frozen detector once over a COCO-format dataset into a Zarr cache
    2. train-head   train the mask head from the cache only
    3. evaluate     COCO mask and box AP of a trained head on a cache (or of SAM on the same boxes)
    
    predict, visualize, benchmark-inference: masks on your own images, what the head sees, inference cost
    """
    _setup_logging(verbose)


# ----------------------------------------------------------------------------------- extract
@main.command()
@detector_options
@click.option("--finetuned", type=click.Path(dir_okay=False, path_type=Path),
              help="A run's head.pt (or checkpoint.pt) from train-head --online --finetune partial|full: load its "
                   "fine-tuned detector parameters over --weights (the official file the run started from), so "
                   "`evaluate --checkpoint` that head reads its own detector's features (README: Evaluating a "
                   "fine-tuned run). Recorded in the cache's fingerprint.")
@dataset_options()
@click.option("--ann-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Annotation json (instead of --coco-root/--split).")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32", "int8"]), default="float16",
              show_default=True, help="Stored feature dtype; int8 = per-row scales, about half of float16 "
              "(README: Cache size), read back as float32.")
@click.option("--keep-bits", type=int, default=None,
              help="Lossy: keep N mantissa bits of float16 (1..10) / float32 (1..23) features (numcodecs BitRound).")
@click.option("--codec", default="auto", show_default=True,
              help="Blosc codec of the feature arrays: auto (measured per array) or zstd-bitshuffle, zstd-shuffle, "
              "zstd-noshuffle, lz4-bitshuffle, lz4-shuffle, lz4-noshuffle.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1 ...")
@click.option("--workers", default=1, show_default=True,
              help="Worker processes of a dask.distributed LocalCluster (with --device cuda, worker r uses cuda:r); "
              "work units are whole images, so no two workers touch one chunk.")
@click.option("--unit-images", default=8, show_default=True,
              help="Images per dask work unit (a failed unit is retried --retries times, then reported by image id).")
@click.option("--retries", default=2, show_default=True, help="Retries of a failed dask work unit.")
@click.option("--scheduler", default=None,
              help="Submit to an existing dask cluster at this address (tcp://host:8786) instead; see README.")
@click.option("--batch-size", default=1, show_default=True,
              help="Images per detector forward. Only images of identical resized size are batched (no padding), "
              "so each image's values equal a batch-1 run's up to float rounding.")
@click.option("--decode-workers", type=int, default=None,
              help="DataLoader workers decoding images (default: 0 on CPU, up to 4 on CUDA).")
@click.option("--writer", type=click.Choice(["auto", "thread", "inline"]), default="auto", show_default=True,
              help="Write the cache from a background thread or inline after each forward; auto = the thread "
              "on an accelerator or when cores are left over from torch's threads, else inline (README: Benchmarks).")
@click.option("--skip-bad-images", is_flag=True,
              help="Record unreadable images in the store's skipped list and go on (default: stop with an error).")
@click.option("--overwrite", is_flag=True, help="Replace an existing store at --out instead of resuming it.")
@click.option("--out", required=True, type=STORE,
              help="Output .zarr store: a local path or an fsspec URL (s3://bucket/train.zarr with the [s3] extra).")
@impl_option
@friendly_errors
def extract(**kw):
    """Run the frozen detector ONCE per image and write the feature cache (resumable).

    Re-running the same command resumes: finished images are skipped, a partly written one is
    redone. A store written with other settings is refused (use --overwrite or another --out).
    """
    from pipeline.extract import ExtractOptions, run_extract

    opts = ExtractOptions(**kw)
    summary = run_extract(opts)
    if summary["random_init"]:
        click.echo("WARNING: random-init detector: the cache only serves to test the pipeline.", err=True)
    click.echo(json.dumps(summary, indent=1))


# -------------------------------------------------------------------------------- cache-info
@main.command("cache-info")
@click.argument("store", type=STORE)
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON.")
@friendly_errors
def cache_info(store, as_json):
    """What a feature cache holds: settings, counts, bytes on disk per array and per image.

    Counts: done, pending (not yet or partly written: re-run extract), skipped (with the reason).
    Per array: dtype, codecs, bytes on disk, uncompressed bytes of the rows images use, and the
    compression ratio between the two.
    """
    from pipeline.cache import FeatureCache

    info = FeatureCache.open(store).info()
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    st = info["storage"]
    click.echo(f"{info['path']}  (format {info['format_version']})")
    click.echo(f"detector {info['detector']}  checkpoint {info['checkpoint_sha256']}"
               + ("  RANDOM-INIT" if info["random_init"] else ""))
    if info.get("finetuned"):
        ft, src = info["finetuned"], info.get("finetuned_from") or {}
        click.echo(f"fine-tuned detector ({ft['finetune']}, sha256 {ft['detector_sha256'][:12]}...) from "
                   f"{src.get('checkpoint')} step {src.get('step')}")
    pre = info["preprocessing"] or {}
    click.echo(f"preprocessing {pre.get('min_size')}/{pre.get('max_size')}  top_k {st['top_k']}  "
               f"encoder layers {st['encoder_layers']}  levels {st['levels']}  widths {st['feature_widths']}")
    click.echo(f"dtype {st['dtype']}  keep_bits {st['keep_bits']}  codec {st['codec']}")
    click.echo(f"images {info['images']}: done {info['done']}, pending {info['pending']}, "
               f"skipped {len(info['skipped'])}")
    for image_id, reason in info["skipped"].items():
        click.echo(f"  skipped {image_id}: {reason}")
    click.echo(f"\n{'array':<24s} {'dtype':<8s} {'codecs':<28s} {'on disk MB':>11s} {'data MB':>9s} {'ratio':>6s}")
    for name, a in info["arrays"].items():
        ratio = f"{a['ratio']:6.2f}" if a["ratio"] is not None else "     -"
        click.echo(f"{name:<24s} {a['dtype']:<8s} {', '.join(a['codecs']) or '-':<28s} "
                   f"{a['stored_bytes'] / 1e6:11.3f} {a['data_bytes'] / 1e6:9.3f} {ratio}")
    per = f"{info['mb_per_done_image']:.3f} MB per done image" if info["mb_per_done_image"] is not None else "no image done"
    click.echo(f"\ntotal on disk {info['disk_bytes'] / 1e6:.3f} MB, {per}, compression ratio {info['ratio']}")


# ----------------------------------------------------------------------------- check-weights
@main.command("check-weights")
@click.option("--detector", default="dino-focalnet", show_default=True,
              help="Detector registry name: dino-focalnet, hdetr-r50, hdetr-swin-l.")
@click.option("--preset", default=None, help="Architecture preset (default: the detector's official release).")
@click.option("--weights", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Checkpoint file to check (.pth with a 'model' dict, or a bare state_dict).")
@friendly_errors
def check_weights(detector, preset, weights):
    """Load a checkpoint into the detector and print the key report (exit 1 on any mismatch).

    H-DETR files may carry the thop profiler's *total_params / *total_ops keys; they are ignored
    (as the official loader does) and listed under "ignored keys".
    """
    from pipeline.detectors import build_detector

    model = build_detector(detector, preset=preset)
    report = model.load_checkpoint(str(weights), strict=False)
    click.echo(report.format())
    sys.exit(0 if report.ok else 1)


# -------------------------------------------------------------------------------- train-head
@main.command("train-head")
@click.option("--cache", type=STORE, help="Training cache: a local path or an fsspec URL (or --online).")
@click.option("--val-cache", type=STORE,
              help="Validation cache, evaluated at the end (local path or fsspec URL).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path(__file__).parent / "configs" / "mfdetr_dino_focalnet_l.yaml", show_default=True,
              help="Experiment YAML (head, train and evaluate sections).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config field, e.g. --set head.box_dim=96 (repeatable).")
@click.option("--epochs", type=int, help="Shortcut for --set train.epochs=N.")
@click.option("--max-iters", type=int, help="Stop after N iterations (a short run: --max-iters 20).")
@click.option("--batch-size", type=int, help="Images per iteration (paper: 8; 2 and 4 supported).")
@click.option("--boxes", type=click.Choice(["pred", "gt"]),
              help="Train (and evaluate) on the detector's boxes or on ground-truth boxes.")
@click.option("--mask-fraction", type=float,
              help="Train on the masks of this seeded fraction (0, 1] of the cache's images (label efficiency; "
                   "shortcut for --set train.mask_fraction=F). The ids used go to <out>/mask_subset.json.")
@click.option("--num-workers", type=int,
              help="DataLoader worker processes reading the cache (each opens the store and decodes its batches; "
                   "shortcut for --set train.num_workers=N; on CUDA batches are pinned and prefetched).")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if available), cpu, cuda, cuda:1 ...")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--ann-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Training annotations, if moved since extraction (--online: the annotation json, with --image-dir).")
@click.option("--val-ann-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Validation annotations, if moved since extraction.")
@click.option("--tensorboard", is_flag=True,
              help="Also write the metrics as TensorBoard scalars to <out>/tensorboard (extra [tensorboard]).")
@click.option("--quiet", is_flag=True, help="No progress bar and only warnings in the log (metrics.jsonl is unchanged).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run directory.")
@click.option("--online", is_flag=True,
              help="Run the detector inside the training loop instead of reading --cache (the paper's online "
                   "training; README: Online training). Takes extract's detector flags (--detector ... --precision) "
                   "and dataset flags below.")
@click.option("--finetune", type=click.Choice(["none", "partial", "full"]), default="none", show_default=True,
              help="--online: none = frozen detector (inference_mode); partial = also train its Transformer "
                   "encoder + decoder; full = the whole detector (Table 11), at 1/10 of the head's lr.")
@detector_options
@dataset_options(online=True)
@impl_option
@friendly_errors
def train_head(cache, val_cache, config_path, overrides, epochs, max_iters, batch_size, boxes, mask_fraction,
               num_workers, device, resume, ann_file, val_ann_file, tensorboard, quiet, out, impl, online, finetune,
               detector, preset, weights, random_init, seed, coco_root, split, image_dir, image_ids, max_images,
               min_size, max_size, encoder_layers, top_k, levels, precision, views):
    """Train the mask head from the cache only (the detector is never built), or --online.

    Several processes: torchrun --nproc_per_node N cli.py train-head ... (gloo on CPU, nccl on
    CUDA; --batch-size is the global batch, split over the ranks; rank 0 logs and checkpoints).

    Writes <out>/config.yaml (resolved), <out>/metrics.jsonl, <out>/checkpoint.pt (latest) and
    <out>/head.pt (final). With --val-cache, also <out>/eval/metrics.json.
    """
    from pipeline.config import load_config
    from pipeline.evaluate import format_ap_table
    from pipeline.train import train

    extra = list(overrides)
    if mask_fraction is not None:
        from pipeline.subsets import check_mask_fraction

        check_mask_fraction(mask_fraction)
    for key, val in (("epochs", epochs), ("max_iters", max_iters), ("batch_size", batch_size), ("boxes", boxes),
                     ("mask_fraction", mask_fraction), ("num_workers", num_workers)):
        if val is not None:
            extra.append(f"train.{key}={val}")
    cfg = load_config(config_path, extra)
    if quiet:
        logging.getLogger().setLevel(logging.WARNING)
    source = None
    if online == (cache is not None):
        raise click.UsageError("give --cache (train from the feature cache) or --online (detector in the loop)")
    if online:
        from pipeline.distributed import local_device
        from pipeline.extract import ExtractOptions
        from pipeline.online import OnlineSource
        from pipeline.train import resolve_device

        opts = ExtractOptions(out=out, detector=detector, preset=preset, weights=weights, random_init=random_init,
                              seed=seed, coco_root=coco_root, split=split, ann_file=ann_file,
                              image_dir=image_dir, image_ids=image_ids, max_images=max_images, min_size=min_size,
                              max_size=max_size, encoder_layers=encoder_layers, top_k=top_k, dtype="float32",
                              levels=levels, device=str(local_device(resolve_device(device))), precision=precision,
                              impl=impl, views=views)
        source = OnlineSource(opts, finetune=finetune)
        ann_file = None
    elif finetune != "none" or views:
        raise click.UsageError("--finetune and --views need --online (a cache's views are chosen at extract --views)")
    result = train(cfg, cache, out, val_cache=val_cache, resume=resume, device=device, ann_file=ann_file,
                   val_ann_file=val_ann_file, impl=impl, progress=not quiet, tensorboard=tensorboard, source=source)
    if result["resumed_at"] is not None:
        click.echo(f"resumed at step {result['resumed_at']}; trained {result['steps_run']} more step(s)")
    click.echo(f"head: {result['head']} (step {result['step']})")
    if result["eval"] is not None:
        click.echo(format_ap_table(result["eval"]))


# ---------------------------------------------------------------------------------- evaluate
@main.command()
@click.option("--cache", required=True, type=STORE, help="Cache to evaluate (local path or fsspec URL).")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), help="head.pt (with --head trained; not with --sam).")
@click.option("--head", "head_kind", type=click.Choice(["trained", "baseline"]), default="trained", show_default=True,
              help="trained = the head in --checkpoint; baseline = the training-free baseline of Eq. 1-4 "
                   "(Table 1), built from --config with the cache's widths, no checkpoint.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path(__file__).parent / "configs" / "ablations" / "t1_roialign_on_quarter_on.yaml",
              show_default=True, help="Config of the --head baseline (must have no trainable parameters).")
@click.option("--boxes", type=click.Choice(["pred", "gt"]), help="Default: what the head was trained with (--sam: pred).")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if available), cpu, cuda ...")
@click.option("--ann-file", type=click.Path(dir_okay=False, path_type=Path), help="Annotations, if moved.")
@click.option("--format-only", is_flag=True, help="Write results json without ground truth (test-dev).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override evaluate.* fields, e.g. --set evaluate.top_n=50 (with --head baseline also head.*).")
@click.option("--iou-type", "iou_types", multiple=True, type=click.Choice(["segm", "bbox", "boundary"]),
              help="segm and bbox (official pycocotools) are always reported; 'boundary' adds Boundary IoU AP "
                   "from faster-coco-eval (unofficial evaluator; extra [eval]).")
@click.option("--plots", is_flag=True,
              help="Also write pr_<type>.png (precision-recall curves) and per_category_<type>.png (matplotlib).")
@click.option("--sam", "sam_kind", type=click.Choice(["sam", "hq-sam"]),
              help="Zero-training baseline: masks from SAM / HQ-SAM prompted with the same cached boxes (extra [sam]).")
@click.option("--sam-model", type=click.Choice(["vit_b", "vit_l", "vit_h"]), default="vit_b", show_default=True,
              help="SAM image encoder size (must match --sam-weights).")
@click.option("--sam-weights", type=click.Path(dir_okay=False, path_type=Path),
              help="Official SAM / HQ-SAM checkpoint file (sam_vit_b_01ec64.pth, sam_hq_vit_l.pth, ...).")
@click.option("--random-init", is_flag=True, help="--sam with random weights (tests the path; masks are meaningless).")
@click.option("--sam-image-size", default=1024, show_default=True,
              help="SAM encoder input (1024 for every weight file; smaller only with --random-init, for quick tests).")
@click.option("--image-dir", type=click.Path(file_okay=False, path_type=Path),
              help="--sam: image folder (default: <root>/<split>/ beside the cache's annotation file).")
@click.option("--max-images", type=int, help="--sam: only the first N extracted images (a quick check).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder for coco_instances_results.json and metrics.json.")
@impl_option
@friendly_errors
def evaluate(cache, checkpoint, head_kind, config_path, boxes, device, ann_file, format_only, overrides, iou_types,
             plots, sam_kind, sam_model, sam_weights, random_init, sam_image_size, image_dir, max_images, quiet, out,
             impl):
    """COCO mask (segm) and box AP of a trained head, of the training-free baseline (--head baseline),
    or of SAM / HQ-SAM on the same cached boxes (--sam).

    Writes results json and metrics.json; --iou-type boundary adds Boundary AP (unofficial
    evaluator), --plots the PR-curve and per-category AP PNGs.
    """
    from pipeline.cache import FeatureCache
    from pipeline.checkpoint import load_head
    from pipeline.config import load_config
    from pipeline.evaluate import format_ap_table
    from pipeline.inference import baseline_head, evaluate_cache
    from pipeline.train import resolve_device

    dev = resolve_device(device)
    precisions = {} if plots else None
    if sam_kind is not None:
        if checkpoint is not None or format_only or head_kind != "trained":
            raise ValueError("--sam evaluates SAM's masks: drop --checkpoint / --format-only / --head")
        from pipeline.sam_baseline import evaluate_sam

        cfg = load_config(None, list(overrides))
        metrics = evaluate_sam(cfg, cache, out, kind=sam_kind, model=sam_model, weights=sam_weights,
                               random_init=random_init, image_size=sam_image_size, boxes=boxes or "pred",
                               device=dev, ann_file=ann_file, image_dir=image_dir, progress=not quiet,
                               max_images=max_images, precision_out=precisions)
        if metrics.get("banner"):
            click.echo(f"*** {metrics['banner']} ***", err=True)
    else:
        if random_init or max_images is not None or sam_weights is not None:
            raise ValueError("--random-init, --sam-weights and --max-images go with --sam (the head's weights come "
                             "from --checkpoint; it evaluates every extracted image)")
        if head_kind == "baseline":
            if checkpoint is not None:
                raise ValueError("--head baseline has no trained weights: drop --checkpoint")
            cfg = load_config(config_path, list(overrides))
            head, fingerprint = baseline_head(cfg, cache), None
            head.to(dev)
        else:
            if checkpoint is None:
                raise ValueError("--checkpoint head.pt is required with --head trained (or pass --head baseline, "
                                 "or --sam for the SAM baseline)")
            head, _, cfg, ckpt = load_head(checkpoint, list(overrides), device=dev)
            fingerprint = ckpt["fingerprint"]
        metrics = evaluate_cache(head, cfg, cache, out, device=dev, boxes=boxes or cfg.train.boxes, ann_file=ann_file,
                                 format_only=format_only, expected_fingerprint=fingerprint, impl=impl,
                                 progress=not quiet, precision_out=precisions)
    if not format_only:
        click.echo(format_ap_table(metrics))
        if "boundary" in iou_types:
            from pipeline.batches import annotation_file
            from pipeline.faster_eval import add_boundary_ap

            fc = FeatureCache.open(cache)
            ids = [int(fc.image_ids[i]) for i in fc.done_indices()][:max_images]
            m = add_boundary_ap(out, annotation_file(fc.fingerprint, ann_file), ids, banner=metrics.get("banner"))
            metrics["boundary"] = m
            if precisions is not None:
                precisions["boundary"] = m["_precision"]
        if plots:
            from pipeline.plots import write_plots

            for p in write_plots(metrics, precisions, out):
                click.echo(f"plot: {p}")
    click.echo(f"results: {Path(out) / 'coco_instances_results.json'}")

# ----------------------------------------------------------------------------------- predict
@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Trained head.pt.")
@detector_options
@click.option("--min-size", type=int, help="Test-time resize, shorter side (default: the training cache's).")
@click.option("--max-size", type=int, help="Test-time resize, longer-side cap (default: the training cache's).")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if available), cpu, cuda ...")
@click.option("--score-threshold", default=0.5, show_default=True,
              help="Draw only instances scoring at least this (the results json keeps the top-N).")
@click.option("--top-n", type=int, help="Predictions kept per image (default: the checkpoint's evaluate.top_n).")
@click.option("--ann-file", type=click.Path(dir_okay=False, path_type=Path),
              help="COCO json whose categories name the classes (default: the one recorded at training).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@impl_option
@friendly_errors
def predict(inputs, quiet, **kw):
    """Detector + trained head on new images (files or folders; no cache needed).

    Writes <out>/coco_instances_results.json, <out>/images.json (images + categories, so
    COCO("images.json").loadRes(results) works) and one <out>/<image>.png per image with masks,
    boxes, class names and scores drawn. An image that cannot be decoded is reported and skipped.
    """
    from pipeline.predict import PredictOptions, run_predict

    if kw["random_init"]:
        from pipeline.cache import RANDOM_INIT_BANNER

        click.echo(f"*** {RANDOM_INIT_BANNER} ***", err=True)
    summary = run_predict(PredictOptions(inputs=list(inputs), progress=not quiet, **kw))
    for name, why in summary["failed"].items():
        click.echo(f"WARNING: skipped {name}: {why}", err=True)
    click.echo(json.dumps(summary, indent=1))


# --------------------------------------------------------------------------------- visualize
@main.command()
@click.option("--cache", required=True, type=click.Path(file_okay=False, path_type=Path), help="Feature cache.")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Trained head.pt.")
@click.option("--image-id", required=True, type=int, help="Dataset image id (extracted in --cache).")
@click.option("--top", default=10, show_default=True, help="Instances drawn, by final score.")
@click.option("--image-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Image folder (default: <root>/<split>/ beside the cache's annotation file).")
@click.option("--ann-file", type=click.Path(dir_okay=False, path_type=Path), help="Annotations, if moved.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if available), cpu, cuda ...")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@impl_option
@friendly_errors
def visualize(cache, checkpoint, image_id, top, image_dir, ann_file, device, out, impl):
    """Per-instance mask probability maps inside their boxes (the paper's Figures 4 and 8) as PNGs.

    Writes <out>/<id>_<rank>_<class>.png (crop | probability map | blend) per instance,
    <out>/<id>_probs.png (all maps pasted, the image's size) and <out>/<id>_instances.json.
    """
    from kernels import ops as kernel_ops
    from pipeline.checkpoint import load_head
    from pipeline.train import resolve_device
    from pipeline.visualize import visualize_image

    kernel_ops.configure(impl)
    dev = resolve_device(device)
    head, postprocess, cfg, ckpt = load_head(checkpoint, device=dev)
    res = visualize_image(head, cfg, cache, image_id, out, top=top, device=dev, ann_file=ann_file,
                          image_dir=image_dir, expected_fingerprint=ckpt["fingerprint"], postprocess=postprocess)
    if res["banner"]:
        click.echo(f"*** {res['banner']} ***", err=True)
    for inst in res["instances"]:
        click.echo(f"#{inst['rank']:<3d} {inst['name']:<20s} {inst['score']:.3f}  {inst['png']}")
    click.echo(f"all maps: {res['probs_png']}")


# ----------------------------------------------------------------------- benchmark-inference
@main.command("benchmark-inference")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@detector_options
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path),
              help="Trained head.pt (default: a random head built from --config with the detector's widths).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path(__file__).parent / "configs" / "mfdetr_dino_focalnet_l.yaml", show_default=True,
              help="Head config when no --checkpoint is given.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config field (repeatable).")
@click.option("--min-size", default=800, show_default=True, help="Test-time resize: shorter side, pixels.")
@click.option("--max-size", default=1333, show_default=True, help="Test-time resize: longer-side cap, pixels.")
@click.option("--top-k", default=100, show_default=True, help="Queries per image given to the head.")
@click.option("--num-images", default=5, show_default=True, help="Timed images (after --warmup untimed ones).")
@click.option("--warmup", default=1, show_default=True, help="Untimed warm-up images.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if available), cpu, cuda ...")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@impl_option
@friendly_errors
def benchmark_inference(inputs, config_path, as_json, quiet, **kw):
    """Inference cost on this device: detector ms/image, head ms/image, images/s, head ▲FLOPs and ▲#params.

    INPUTS: image files or folders (the first --warmup + --num-images are used). The last line
    is images_per_s=<value>.
    """
    from pipeline.benchmark import BenchmarkOptions, format_report, run_benchmark

    kw["overrides"] = list(kw["overrides"])
    report = run_benchmark(BenchmarkOptions(inputs=list(inputs), config=config_path, progress=not quiet, **kw))
    click.echo(json.dumps(report, indent=1) if as_json else format_report(report))


# ------------------------------------------------------------------------------------ params
@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path(__file__).parent / "configs" / "mfdetr_dino_focalnet_l.yaml", show_default=True,
              help="Experiment YAML whose head is counted.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config field (repeatable).")
@click.option("--widths", "widths_of", metavar="DETECTOR[:PRESET]",
              help="Take the head's input widths (C1 channels, encoder levels) from this detector's cache layout, "
                   "e.g. dino-focalnet, hdetr-r50, hdetr-swin-l (default: the config's `widths:`; train-head reads "
                   "them from the cache instead).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: params_delta_M, flops_delta_G (head FLOPs, multiply-add = 1 FLOP, "
                   "torch.utils.flop_counter with RoIAlign / sampling formulas, at --image-size with --boxes boxes), "
                   "widths, per-module breakdown, and the paper's row when the config has a paper: entry.")
@click.option("--all", "all_rows", is_flag=True,
              help="Ours vs the paper's ▲#params and ▲FLOPs (with % differences) for every config in "
                   "configs/ablations/ whose paper row states ▲#params, as a Markdown table (--config is ignored).")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path),
              help="With --all: also write the Markdown table to this file.")
@click.option("--boxes", "num_boxes", type=int, default=None,
              help="Boxes per image for the FLOP count (default: the paper's, 300 for dino-focalnet widths "
                   "(Table 16), 100 otherwise).")
@click.option("--image-size", "image_size", metavar="HxW", default=None,
              help="Resized image for the FLOP count (default 800x1128: the mean area of the first 100 COCO "
                   "val2017 images at shorter side 800 / longer <= 1333, the DETR family's FLOP convention; "
                   "800x1333 = a full-size image).")
@click.option("--flops-convention", "convention", type=click.Choice(["paper", "all"]), default="paper",
              show_default=True,
              help="paper: deformable attention's sampling counts 0 (the paper's counter could not see the custom "
                   "CUDA op); all: every multiply-add, sampling included.")
@click.option("--no-flops", is_flag=True, help="Skip the FLOP count (it runs one head forward, seconds on a CPU).")
@friendly_errors
def params(config_path, overrides, widths_of, as_json, all_rows, out_file, num_boxes, image_size, convention,
           no_flops):
    """Count the trainable parameters (and FLOPs) of the head a config builds (the paper's ▲ columns).

    The head's input widths depend on the detector, so name it with --widths or a `widths:` line in
    the config (or set head.c1_channels and head.num_feature_levels with --set).
    """
    from pipeline.ablations import config_cost, cost_report, cost_report_markdown, load_targets, paper_row
    from pipeline.config import load_config

    size = None
    if image_size is not None:
        try:
            size = tuple(int(v) for v in image_size.lower().split("x"))
            if len(size) != 2 or min(size) <= 0:
                raise ValueError
        except ValueError:
            raise click.BadParameter(f"expected HxW in pixels, e.g. 800x1333, got {image_size!r}",
                                     param_hint="--image-size") from None
    if all_rows:
        paths = sorted((Path(__file__).parent / "configs" / "ablations").glob("*.yaml"))
        rows = cost_report(paths, load_targets(), flops=not no_flops, image_size=size, num_boxes=num_boxes,
                           convention=convention, progress=True)
        text = cost_report_markdown(rows)
        if out_file is not None:
            out_file.parent.mkdir(parents=True, exist_ok=True)
            out_file.write_text(text)
        click.echo(text)
        return
    cfg = load_config(config_path, list(overrides))
    cost = config_cost(cfg, widths_of, flops=as_json and not no_flops, num_boxes=num_boxes, image_size=size,
                       convention=convention)
    if as_json:
        row = None
        if cfg.paper is not None:
            try:
                row = paper_row(cfg, load_targets())
            except FileNotFoundError:
                row = None
        cost["paper"] = None if cfg.paper is None else {
            **cfg.paper, **({"params_delta_M": row.get("params_delta_M"), "flops_delta_G": row.get("flops_delta_G"),
                             "mask_ap": row.get("mask_ap")} if row else {})}
        cost["config"] = str(config_path)
        click.echo(json.dumps(cost, indent=1))
        return
    w = cost["widths"]
    click.echo(f"widths: c1_channels={w['c1_channels']}, num_feature_levels={w['num_feature_levels']}")
    for name, n in cost["modules"].items():
        click.echo(f"{name:<40s} {n:>12,d}")
    total = cost["params"]
    click.echo(f"{'total':<40s} {total:>12,d}  ({total / 1e6:.2f} M)")


# ------------------------------------------------------------------------------------- sweep
@main.command()
@click.option("--cache", required=True, type=click.Path(file_okay=False, path_type=Path), help="Training cache.")
@click.option("--val-cache", required=True, type=click.Path(file_okay=False, path_type=Path), help="Validation cache.")
@click.option("--configs", "patterns", required=True, multiple=True,
              help="Config glob, e.g. 'configs/ablations/t2_*.yaml' (quote it; repeatable).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override applied to every config, e.g. a short schedule --set train.max_iters=50 (repeatable).")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if available), cpu, cuda ...")
@click.option("--no-flops", is_flag=True, help="Leave the ▲FLOPs column empty (it costs one head forward per config).")
@click.option("--targets", type=click.Path(dir_okay=False, path_type=Path),
              help="The paper's numbers (default ../shared/papers/ablation-targets.json).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Sweep directory.")
@impl_option
@friendly_errors
def sweep(cache, val_cache, patterns, overrides, device, no_flops, targets, out, impl):
    """Train and evaluate each config on the same cache (resumable) and write <out>/table.md with
    the paper's numbers beside ours.

    A finished config (its <out>/<name>/eval/metrics.json exists) is not redone; an interrupted one
    resumes from its checkpoint. Every config is checked against the cache before the first trains.
    """
    from pipeline.sweep import run_sweep

    table = run_sweep(cache, val_cache, list(patterns), out, overrides=list(overrides), device=device,
                      flops=not no_flops, targets=targets, impl=impl)
    click.echo(table.read_text())
    click.echo(f"table: {table}")


# --------------------------------------------------------------------------------- detectors
@main.command()
@click.option("--min-size", default=800, show_default=True, help="Image size the cache estimate assumes: shorter side.")
@click.option("--max-size", default=1333, show_default=True, help="... and longer side (the largest default input).")
@click.option("--top-k", default=100, show_default=True, help="Queries per image in the cache estimate.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32", "int8"]), default="float16",
              show_default=True, help="Feature dtype of the cache estimate (as extract --dtype).")
@click.option("--all", "show_all", is_flag=True, help="Also list the reduced test presets.")
def detectors(min_size, max_size, top_k, dtype, show_all):
    """List the supported detectors: presets, checkpoint files, box AP, head widths and cache size per image.

    Cache MB/image is the uncompressed size of one min-size x max-size image with --top-k queries and
    one stored encoder layer (Blosc usually shrinks it); C1 / L are the head's input widths.
    """
    from pipeline.detectors import describe_detectors

    rows = describe_detectors(min_size, max_size, top_k=top_k, encoder_layers=1, dtype=dtype)
    header = f"{'detector':<14s} {'preset':<13s} {'box AP':>6s} {'cache MB/img':>12s} {'C1':>4s} {'L':>2s} " \
             f"{'queries':>7s} {'params':>9s}  checkpoint"
    click.echo(header)
    for r in rows:
        if not (r["release"] or show_all):
            continue
        ap = f"{r['box_ap']:.1f}" if r["box_ap"] is not None else "-"
        click.echo(f"{r['detector']:<14s} {r['preset']:<13s} {ap:>6s} {r['cache_mb_per_image']:>12.1f} "
                   f"{r['c1_channels']:>4d} {r['num_feature_levels']:>2d} {r['num_queries']:>7d} "
                   f"{r['params_m']:>8.1f}M  {r['checkpoint'] or '(test preset, no release)'}")
    click.echo("box AP: COCO val2017. " + "; ".join(sorted({f"{r['detector']}: {r['box_ap_source']}"
                                                              for r in rows if r["box_ap_source"]})))


# --------------------------------------------------------------------------------------- env
@main.command()
def env():
    """Print versions (torch, CUDA, nvcc), GPUs and their compute capability, the CUDA architectures
    compiled into the kernels, and the kernel implementations available (warns on a mismatch)."""
    import platform
    import shutil
    import subprocess

    import numcodecs
    import torch
    import torchvision
    import zarr

    from kernels import ops

    def nvcc_version() -> str:
        import os

        home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
        nvcc = shutil.which("nvcc") or (str(Path(home) / "bin" / "nvcc") if home else None)
        if not nvcc or not Path(nvcc).exists():
            return "not found (the CUDA kernel cannot be built here)"
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.splitlines()
        release = [line.strip() for line in out if "release" in line]
        return f"{release[0] if release else '?'} ({nvcc})"

    click.echo(f"python       {platform.python_version()}")
    click.echo(f"torch        {torch.__version__} (CUDA build {torch.version.cuda}, available: {torch.cuda.is_available()})")
    click.echo(f"nvcc         {nvcc_version()}")
    compiled_archs = ops.compiled_cuda_archs()
    warnings = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = "%d.%d" % torch.cuda.get_device_capability(i)
            click.echo(f"gpu {i}        {torch.cuda.get_device_name(i)} (compute capability {cap})")
            if ops.compiled_available("cuda") and not any(a.split("+")[0] == cap for a in compiled_archs):
                warnings.append(f"gpu {i} has compute capability {cap}, the CUDA kernel was compiled for "
                                f"{compiled_archs} (PTX JIT at best): rebuild with TORCH_CUDA_ARCH_LIST={cap}")
        click.echo(f"torch archs  {torch.cuda.get_arch_list()}")
    elif ops.compiled_available("cuda"):
        warnings.append("the CUDA kernel is built but no GPU is visible")
    click.echo(f"torchvision  {torchvision.__version__}")
    click.echo(f"zarr         {zarr.__version__}; numcodecs {numcodecs.__version__}")
    ext = "built" if ops.COMPILED_ERROR is None else f"not built ({ops.COMPILED_ERROR}); {ops.BUILD_HINT}"
    click.echo(f"kernels._C   {ext}")
    click.echo(f"CUDA archs compiled in: {', '.join(compiled_archs) if compiled_archs else 'none (CPU-only build)'}")
    click.echo(f"ms_deform_attn implementations: {', '.join(ops.available_impls())}; "
               f"setting: {ops.get_impl()} (--impl / {ops.ENV_VAR}) -> "
               + ", ".join(f"{k}: {v}" for k, v in ops.describe_impl()["resolved"].items()))
    for w in warnings:
        click.echo(f"WARNING: {w}")

if __name__ == "__main__":
    main()
