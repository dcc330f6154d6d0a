"""Stage two: train the mask head from the feature cache only (paper Sec. 3.1 recipe).

One loop, top to bottom: cached batch -> image features (per image) -> Hungarian matching of
the cached predictions to the ground truth -> head on the matched queries/boxes -> point-sampled
BCE + dice + mask-IoU loss -> AdamW step. Checkpoints hold head, optimizer, scheduler, step and
RNG states plus the resolved config, so ``--resume`` continues a killed run to the same weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import subprocess
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from kernels import ops as kernel_ops

from . import data
from .batches import CachedImages, EpochSampler, annotation_file, category_maps, image_features, loader_options
from .cache import CacheError, FeatureCache
from .checkpoint import CHECKPOINT_VERSION, load_checkpoint, save_checkpoint
from .config import Config, ConfigError, save_config
from .distributed import DistContext, RankBatches, all_reduce_sum, barrier, init_from_env, sum_gradients
from .faults import fault_point
from .head import build_head
from .cache_requirements import check_cache_supports
from .record import SampleRecord
from .targets import limit_queries, training_targets
from .subsets import mask_subset
from .utils import WriterLock, write_bytes_atomic
from .views import plan_view, view_choices, view_ground_truth

log = logging.getLogger(__name__)


def git_sha() -> str:
    """Commit of the code that runs (``unknown`` outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda if available else cpu; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def image_sizes_of(items: list[SampleRecord]) -> torch.Tensor:
    """``[B, 2]`` float (h, w) of the resized images the detector saw."""
    return torch.tensor([it.size for it in items], dtype=torch.float32)


def _rng_state(sample_gen: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "sample": sample_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, sample_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    sample_gen.set_state(state["sample"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ViewedRecords(torch.utils.data.Dataset):
    """Item ``p`` of ``records`` (a view-major-within-image dataset: item ``n * V + v`` is view ``v``)
    with its ground truth moved into the view's frame (:func:`pipeline.views.view_ground_truth`).

    Raises (on access):
        CacheError: the record's ``orig_size`` is not the frame the view plans (a cache extracted
            with other view rules).
    """

    def __init__(self, records, views: list[str], min_size: int, max_size: int):
        self.records, self.views, self.min_size, self.max_size = records, list(views), min_size, max_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, p: int) -> SampleRecord:
        rec = self.records[p]
        h, w = (int(x) for x in rec.gt["masks"].shape[-2:])
        plan = plan_view(self.views[p % len(self.views)], rec.image_id, w, h, self.min_size, self.max_size)
        if tuple(rec.orig_size) != plan.frame_size:
            raise CacheError(f"image {rec.image_id}, view {plan.name}: cached frame {rec.orig_size} is not the planned "
                             f"{plan.frame_size}; re-extract the cache with this code")
        rec.gt = view_ground_truth(rec.gt, plan)
        return rec


class CachedSource:
    """Stage two's default feature source: a feature cache (``cli.py extract``), read per image.

    The interface :func:`train` asks of a source (the online one, :class:`pipeline.online.OnlineSource`,
    offers the same): ``fingerprint``, ``encoder_layers``, ``feature_widths``, ``image_ids``,
    ``ann_file``, ``label``, ``candidate_indices()``, ``dataset(indices, encoder_layer)`` (a torch
    dataset, items picklable into DataLoader workers), ``records(items, encoder_layer)`` (loader
    items -> :class:`~pipeline.record.SampleRecord` s with ``gt``, in the main process),
    ``parameter_groups(lr)`` (extra trainable parameters, e.g. a fine-tuned detector),
    ``state_dict()`` / ``load_state_dict()`` (their checkpointed state) and ``num_views`` (V views
    per image, :mod:`pipeline.views`: dataset item ``n * V + v`` is view ``v`` of image ``n``, and
    each epoch trains one seeded view per image).

    Raises:
        CacheError: the store cannot be opened.
    """

    kind = "cache"

    def __init__(self, cache_path: str | Path, ann_file: str | Path | None = None):
        self.path, self.label = cache_path, str(cache_path)
        self.cache = FeatureCache.open(cache_path)
        self.fingerprint = self.cache.fingerprint
        self.encoder_layers = self.cache.encoder_layers
        self.feature_widths = self.cache.feature_widths
        self.views = self.fingerprint.get("views", ["orig"])  # extract --views: V entries per image
        self.num_views = len(self.views)
        self.image_ids = [int(i) for i in self.cache.image_ids[::self.num_views]]
        self._ann_override = ann_file

    @property
    def ann_file(self) -> Path:
        """The annotation file the cache was extracted from (or its ``--ann-file`` override), checked by
        SHA-256 when first asked for, i.e. after the config and val-cache checks.

        Raises:
            CacheError: the file is missing or differs from the one recorded in the cache.
        """
        if not hasattr(self, "_ann"):
            self._ann = annotation_file(self.fingerprint, self._ann_override)
        return self._ann

    def candidate_indices(self) -> list[int]:
        """Images (positions in :attr:`image_ids`) whose every view is completely extracted."""
        done = set(self.cache.done_indices())
        v = self.num_views
        return [n for n in range(len(self.image_ids)) if all(n * v + k in done for k in range(v))]

    def dataset(self, indices: list[int], encoder_layer: int):
        """The cached records (layer ``encoder_layer``) of the images ``indices`` with their ground truth;
        item ``n * V + v`` is view ``v`` of image ``indices[n]`` (its ground truth in the view's frame)."""
        v = self.num_views
        records = CachedImages(self.path, [n * v + k for n in indices for k in range(v)], encoder_layer,
                               self.ann_file, with_gt=True)
        if v == 1 and self.views == ["orig"]:
            return records
        pre = self.fingerprint["preprocessing"]
        return ViewedRecords(records, self.views, pre["min_size"], pre["max_size"])

    def records(self, items: list[SampleRecord], encoder_layer: int) -> list[SampleRecord]:
        """Cached items already are records."""
        return items

    def parameter_groups(self, lr: float) -> list[dict]:
        """No trainable parameters besides the head's."""
        return []

    def state_dict(self) -> None:
        """Nothing to checkpoint."""
        return None

    def load_state_dict(self, state) -> None:
        """Nothing to restore."""


def train(cfg: Config, cache_path: str | Path | None, out: str | Path, *, val_cache: str | Path | None = None,
          resume: bool = False, device: str = "auto", ann_file: str | Path | None = None,
          val_ann_file: str | Path | None = None, progress: bool = True, impl: str = "auto",
          tensorboard: bool = False, source=None) -> dict:
    """Train the head on a cache; write ``<out>/head.pt``, ``metrics.jsonl``, ``config.yaml``.

    Args:
        cfg: resolved experiment config.
        cache_path: training cache (``cli.py extract`` output); None with ``source``.
        source: another feature source instead of ``cache_path`` (the interface of
            :class:`CachedSource`): ``cli.py train-head --online`` passes a
            :class:`pipeline.online.OnlineSource` (detector in the loop). Everything else (matching,
            targets, head, loss, optimizer, checkpoints, evaluation) is the same code.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) each process is one rank of a data-parallel run
    (:mod:`pipeline.distributed`): ``train.batch_size`` is the global batch, each rank reads its
    share, gradients are summed over ranks, rank 0 alone holds the lock, logs, checkpoints and
    evaluates; a checkpoint resumes with any number of ranks.
        out: run directory (created).
        val_cache: optional validation cache, evaluated at the end (and per epoch if asked);
            must come from the same detector, checkpoint, preprocessing and encoder layers.
        resume: continue from ``<out>/checkpoint.pt`` (the config must be the same).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1`` ...
        ann_file / val_ann_file: annotation files if they moved since extraction.
        impl: deformable-attention kernel (:data:`kernels.ops.IMPLS`): a run-time choice, logged
            and written to every ``metrics.jsonl`` step record (``"impl"``: the kernel that ran),
            not part of the config (a resumed run may change it).
        progress: show the progress bar (``--quiet`` turns it off).
        tensorboard: also write every ``metrics.jsonl`` record as TensorBoard scalars to
            ``<out>/tensorboard`` (:class:`pipeline.tensorboard_log.TensorBoardMirror`).

    Returns:
        ``{"step": int, "resumed_at": step the run resumed at (None for a fresh run),
        "steps_run": iterations this call trained, "head": path, "eval": metrics or None}``.

    Raises:
        CacheError: unusable/stale cache; ConfigError: bad config; ValueError: bad resume, or
            neither/both of ``cache_path`` and ``source``.
    """
    if (cache_path is None) == (source is None):
        raise ValueError("train: give either a cache (--cache) or an online source (--online), not both or neither")
    kernel_ops.configure(impl)  # an unavailable --impl is refused before anything is opened
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = init_from_env(resolve_device(device))  # torchrun: this rank of the process group (pipeline/distributed.py)
    try:
        with WriterLock(out / "train.lock", command="train-head") if ctx.is_main else contextlib.nullcontext():
            if source is None:
                source = CachedSource(cache_path, ann_file)
            return _train_locked(cfg, source, out, val_cache=val_cache, resume=resume, ctx=ctx,
                                 ann_file=ann_file, val_ann_file=val_ann_file, progress=progress and ctx.is_main,
                                 impl=impl, tensorboard=tensorboard)
    finally:
        ctx.close()


def _train_locked(cfg: Config, source, out: Path, *, val_cache, resume, ctx: DistContext, ann_file, val_ann_file,
                  progress, impl, tensorboard=False) -> dict:
    """:func:`train` once the run directory's lock is held (by rank 0)."""
    tc = cfg.train
    if tc.boxes not in ("pred", "gt"):
        raise ValueError(f"train.boxes must be 'pred' or 'gt', got {tc.boxes!r}")
    dev = ctx.device
    main = ctx.is_main
    impl_info = kernel_ops.configure(impl)
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    if tc.deterministic and dev.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)

    head_cfg = check_cache_supports(cfg, source, source.label)  # refuses what the source lacks, before training
    if val_cache is not None:
        if source.parameter_groups(tc.lr):
            raise ValueError(
                "--val-cache holds the original detector's features, not those of the detector this run fine-tunes: "
                "train with --finetune partial/full without --val-cache, then extract the validation images with the "
                "run's fine-tuned detector and evaluate on them (README: Evaluating a fine-tuned run):\n"
                f"  cli.py extract <the same detector and size flags> --finetuned {out / 'head.pt'} "
                "--coco-root ROOT --split val2017 --out VAL_FT.zarr\n"
                f"  cli.py evaluate --cache VAL_FT.zarr --checkpoint {out / 'head.pt'} --out {out / 'eval'}")
        FeatureCache.open(val_cache, expected=source.fingerprint)  # refuse a stale/foreign val cache early
    ann = source.ann_file
    coco = data.load_coco(ann)
    maps = category_maps(source.fingerprint, coco)
    cfg = dataclasses.replace(cfg, head=head_cfg)  # the resolved config is what runs and is saved
    if getattr(head_cfg, "mask_scoring", False) and head_cfg.num_score_classes < maps["num_categories"]:
        raise ValueError(f"head.num_score_classes={head_cfg.num_score_classes} < {maps['num_categories']} "
                         "dataset categories")
    head, criterion, _ = build_head(head_cfg, cfg.evaluate.top_n)
    head.to(dev)
    matcher = criterion.matcher

    image_ids = source.image_ids
    indices = [i for i in source.candidate_indices() if len(coco.getAnnIds(imgIds=image_ids[i], iscrowd=False)) > 0]
    if not indices:
        raise CacheError(f"{source.label}: no completely extracted image with non-crowd annotations to train on")
    if tc.mask_fraction < 1.0:  # label efficiency (pipeline/subsets.py): the masks of a seeded subset
        all_count = len(indices)
        indices = mask_subset(indices, tc.mask_fraction, tc.seed)
        if main:
            write_bytes_atomic(out / "mask_subset.json", json.dumps(
                {"mask_fraction": tc.mask_fraction, "seed": tc.seed, "images": len(indices), "of": all_count,
                 "image_ids": [image_ids[i] for i in indices]}).encode())
        log.info("--mask-fraction %g: training on the masks of %d of %d images (ids in %s)", tc.mask_fraction,
                 len(indices), all_count, out / "mask_subset.json")
    iters_per_epoch = math.ceil(len(indices) / tc.batch_size)
    total = tc.max_iters if tc.max_iters is not None else tc.epochs * iters_per_epoch
    params = [p for p in head.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the config's head has no trainable parameters (a training-free baseline): evaluate it "
                          "with `cli.py evaluate --head baseline --config FILE --cache CACHE`")
    detector_groups = source.parameter_groups(tc.lr)  # online fine-tuning: the detector at 1/10 of the head's lr
    optimizer = torch.optim.AdamW([{"params": params, "name": "head"}, *detector_groups], lr=tc.lr,
                                  betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    params = params + [p for g in detector_groups for p in g["params"]]  # all of them are clipped together
    milestones = sorted({max(1, int(round(f * total))) for f in tc.lr_drops})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=tc.lr_drop_factor)
    sample_gen = torch.Generator(device=dev).manual_seed(_rank_seed(tc.seed, ctx.rank, 0))  # point sampling, on dev
    step = 0
    ckpt_path = out / "checkpoint.pt"
    if resume:
        if not ckpt_path.is_file():
            raise ValueError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = load_checkpoint(ckpt_path)
        if json.dumps(ckpt["config"], sort_keys=True) != json.dumps(cfg.to_dict(), sort_keys=True):
            raise ValueError(f"--resume: {ckpt_path} was written with another config; use the same config "
                             "and overrides, or a new --out")
        head.load_state_dict(ckpt["head"])
        source.load_state_dict(ckpt.get("detector"))
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"], sample_gen)  # rank 0's; other ranks re-seed their point sampling below
        step = int(ckpt["step"])
        if not main:
            sample_gen.manual_seed(_rank_seed(tc.seed, ctx.rank, step))
        log.info("resumed %s at step %d/%d", ckpt_path, step, total)
    if main:
        save_config(cfg, out / "config.yaml")
    log.info("git %s; %d training images, %d iterations (%d per epoch) of global batch %d, device %s%s", git_sha(),
             len(indices), total, iters_per_epoch, tc.batch_size, dev,
             f", rank {ctx.rank} of {ctx.world_size}" if ctx.world_size > 1 else "")

    dataset = source.dataset(indices, tc.encoder_layer)
    metrics_file = _open_metrics_log(out / "metrics.jsonl", step) if main else None
    if tensorboard and main:  # scalars beside the JSON lines (optional extra)
        from .tensorboard_log import TensorBoardMirror

        metrics_file = TensorBoardMirror(metrics_file, out / "tensorboard", purge_step=step if resume else None)
    kernel = impl_info["resolved"].get(dev.type, impl_info["impl"])  # the kernel this run's steps use
    start_step = step
    autocast = tc.amp and dev.type == "cuda"
    meta = {"kind": "mask-frozen-detr-head", "version": CHECKPOINT_VERSION, "config": cfg.to_dict(),
            "fingerprint": source.fingerprint, "git": git_sha(), "total_iters": total}

    def checkpoint_payload():
        extra = {} if source.state_dict() is None else {"detector": source.state_dict()}
        return dict(meta, head=head.state_dict(), optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(), step=step, rng=_rng_state(sample_gen), **extra)

    bar = tqdm(total=total, initial=step, desc="train-head", unit="it", disable=not progress, dynamic_ncols=True)
    t0 = time.time()
    head.train()
    while step < total:
        epoch, offset = divmod(step, iters_per_epoch)
        order = EpochSampler(len(indices), tc.seed, epoch, start=offset * tc.batch_size)
        views = getattr(source, "num_views", 1)
        if views > 1:  # one seeded view per image and epoch (pipeline/views.py)
            choice = view_choices(tc.seed, epoch, len(indices), views)
            order = [n * views + choice[n] for n in order]
        batches = RankBatches(order, tc.batch_size, ctx.rank, ctx.world_size)  # this rank's share of each global batch
        loader = DataLoader(dataset, batch_sampler=batches, **loader_options(dev, tc.num_workers),
                            persistent_workers=False)
        for items in loader:
            items = limit_queries(source.records(items, tc.encoder_layer), tc.num_queries)
            targets = training_targets(items, matcher, maps, tc.boxes, head_cfg)
            normaliser = {}
            if ctx.world_size > 1:  # every rank divides by the global batch's instance count
                local = 0.0 if targets is None else float(targets["masks"].shape[0])
                normaliser = {"num_instances": max(1.0, float(all_reduce_sum(torch.tensor(local, device=dev), ctx)))}
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                feats = image_features(head, items, dev)
                if targets is None:
                    loss = sum((f.sum() for f in feats), torch.zeros((), device=dev)) * 0.0
                    losses = {"loss": loss}
                else:
                    outputs = head(feats, targets["queries"].to(dev), targets["boxes"].to(dev),
                                   image_sizes_of(items).to(dev), targets["batch_index"].to(dev))
                    losses = criterion(outputs, {"masks": targets["masks"].to(dev),
                                                 "mask_sizes": targets["mask_sizes"].to(dev),
                                                 "labels": targets["labels"].to(dev), **normaliser},
                                       generator=sample_gen)
                    loss = losses["loss"]
            logged = _global_losses(losses, ctx)  # the global batch's losses (this rank's own when alone)
            if not math.isfinite(logged["loss"]):
                raise NonFiniteLossError(_non_finite_message(torch.tensor(logged["loss"]), items, step + 1,
                                                             ckpt_path))
            fault_point("train.mid_step", out)
            optimizer.zero_grad(set_to_none=True)
            if loss.requires_grad:  # a rank with no image in this global batch has nothing to differentiate
                loss.backward()
            sum_gradients(params, ctx)  # ranks hold identical gradients from here on
            grad_norm = (torch.nn.utils.clip_grad_norm_(params, tc.clip_grad_norm)
                         if tc.clip_grad_norm > 0 else torch.tensor(0.0))
            optimizer.step()
            scheduler.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{logged['loss']:.4f}")
            if main and (step % tc.log_every == 0 or step == total):
                rec = {"step": step, "epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                       "grad_norm": float(grad_norm), "time": round(time.time() - t0, 2), "impl": kernel, **logged}
                if ctx.world_size > 1:
                    rec["world_size"] = ctx.world_size
                metrics_file.write(json.dumps(rec) + "\n")
                metrics_file.flush()
            if main and (step % tc.checkpoint_every == 0 or step == total):
                save_checkpoint(ckpt_path, **checkpoint_payload())
            if step >= total:
                break
        if tc.eval_every_epoch and val_cache is not None and step < total:
            if main:
                _evaluate_into(head, cfg, val_cache, out / f"eval_epoch{epoch + 1}", dev, tc.boxes, val_ann_file,
                               metrics_file, step, progress)
                head.train()
            barrier(ctx)
    bar.close()
    result = {"step": step, "resumed_at": start_step if resume else None, "steps_run": step - start_step,
              "head": str(out / "head.pt"), "eval": None}
    if main:
        save_checkpoint(out / "head.pt", **checkpoint_payload())
        if val_cache is not None:
            result["eval"] = _evaluate_into(head, cfg, val_cache, out / "eval", dev, tc.boxes, val_ann_file,
                                            metrics_file, step, progress)
        metrics_file.close()
    barrier(ctx)
    return result


_LOSS_KEYS = ("loss_bce", "loss_dice", "loss_iou", "loss")


def _global_losses(losses: dict, ctx: DistContext) -> dict[str, float]:
    """The step's loss values as floats; under torchrun summed over ranks (each rank's terms are
    already divided by the global instance count), a component kept when any rank computed it."""
    if ctx.world_size <= 1:
        return {k: v.detach().item() for k, v in losses.items()}
    dev = ctx.device
    values = torch.tensor([float(losses[k].detach()) if k in losses else 0.0 for k in _LOSS_KEYS]
                          + [1.0 if k in losses else 0.0 for k in _LOSS_KEYS], device=dev, dtype=torch.float64)
    values = all_reduce_sum(values, ctx).tolist()
    n = len(_LOSS_KEYS)
    return {k: values[j] for j, k in enumerate(_LOSS_KEYS) if values[n + j] > 0}


def _rank_seed(seed: int, rank: int, step: int) -> int:
    """Seed of a rank's point-sampling generator: ``seed + 1`` on rank 0 (the single-process run's);
    other ranks draw their own points, re-seeded from the step when a run resumes."""
    return seed + 1 if rank == 0 else seed + 1 + 7919 * rank + 104729 * step


class NonFiniteLossError(ValueError):
    """The loss became NaN/Inf; training stopped before the update (the last checkpoint is intact)."""


def _non_finite_message(loss: torch.Tensor, items: list[SampleRecord], step: int, ckpt_path: Path) -> str:
    """Name the step, the images of the batch, and which of them hold non-finite cached values."""
    ids = [int(it.image_id) for it in items]
    culprits = [f"{int(it.image_id)} ({', '.join(it.non_finite_fields())})" for it in items if it.non_finite_fields()]
    where = (f"non-finite cached values in image(s) {'; '.join(culprits)}: re-extract them"
             if culprits else "the cached inputs are finite: lower train.lr or check the config")
    last = f"{ckpt_path} is intact; continue with --resume" if ckpt_path.is_file() else "no checkpoint was written yet"
    return (f"loss is {float(loss.detach()):g} at step {step} on images {ids}; {where}. Stopped before the "
            f"update: {last}")


def _open_metrics_log(path: Path, step: int):
    """Open ``metrics.jsonl`` for appending, holding only the records of steps ``<= step``.

    A fresh run (``step == 0``) starts an empty log; a resumed run drops what the killed run
    logged after its last checkpoint (those steps are trained again), so every step is logged
    exactly once. The kept lines are rewritten atomically.
    """
    kept = []
    if step > 0 and path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the crash
                continue
            if int(rec.get("step", 0)) <= step:
                kept.append(line + "\n")
    write_bytes_atomic(path, "".join(kept).encode())
    return open(path, "a")


def _evaluate_into(head, cfg, val_cache, out_dir, dev, boxes_mode, ann_file, metrics_file, step, progress=True):
    from .inference import evaluate_cache

    metrics = evaluate_cache(head, cfg, val_cache, out_dir, device=dev, boxes=boxes_mode, ann_file=ann_file,
                             progress=progress)
    metrics_file.write(json.dumps({"step": step, "eval": {k: {m: v for m, v in d.items() if m != "per_category"}
                                                           for k, d in metrics.items() if isinstance(d, dict) and "AP" in d}})
                       + "\n")
    metrics_file.flush()
    return metrics
