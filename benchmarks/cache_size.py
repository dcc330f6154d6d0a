"""What each way of storing the features costs on disk, in speed, and in accuracy.

On real COCO images (``--coco-root``): extract a train and a val store once in float32 (the
reference), re-encode the same records into one store per choice (``--dtype``, ``--keep-bits``,
``--levels``, codecs), and measure side by side in one run:

  * MB/image on disk (whole store, all arrays) and its ratio to the float16 store,
  * write and read speed: MB/s of float16-equivalent feature bytes (the same data volume for
    every choice, so the rates compare) through ``FeatureCache.write`` / ``read``,
  * relative RMS error (``||a - b|| / ||b||``) and relative max error (``max|a - b| / max|b|``)
    of the features read back vs float32, over all images, per array (tokens, C1, queries),
  * the change of a trained head's mask logits on the val images (relative RMS, max abs),
  * the mask AP of ONE head trained with ``--boxes gt`` on the float32 train store and evaluated
    (``--boxes gt``) on the val store stored each way, and its change vs float32;

and, per array kind and stored dtype, every Blosc codec of :data:`pipeline.cache.CODECS`
(compression ratio, encode/decode MB/s): the codec ``--codec auto`` uses is the best ratio.

The detector is random-init (no official weights here): its features are not the official
weights' features, so the compression ratios and above all the AP change must be re-checked
with the real checkpoint. The last line is ``int8_over_float16=<ratio>`` (disk bytes).

    python benchmarks/cache_size.py --coco-root ../shared/data/coco --preset golden-small \
        --min-size 320 --max-size 480 --train-images 12 --val-images 8 --iters 60
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch
from numcodecs import Blosc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.batches import annotation_file, image_features  # noqa: E402
from pipeline.cache import CODECS, FeatureCache, ImageLayout, quantize_int8, zigzag_int8  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.extract import ExtractOptions, run_extract  # noqa: E402
from pipeline.head import HeadConfig, build_head  # noqa: E402
from pipeline.inference import evaluate_cache  # noqa: E402
from pipeline.train import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMALL_HEAD = ["head.image_encoder_layers=1", "head.box_dim=64", "head.box_encoder_layers=1", "head.num_points=1024"]

#: name -> (dtype, keep_bits, levels or None)
CHOICES = {
    "float32": ("float32", None, None),
    "float16": ("float16", None, None),
    "bfloat16": ("bfloat16", None, None),
    "int8": ("int8", None, None),
    "float16-keep7": ("float16", 7, None),
    "float16-keep5": ("float16", 5, None),
    "float16-levels0-3": ("float16", None, [0, 1, 2, 3]),
    "int8-levels0-3": ("int8", None, [0, 1, 2, 3]),
}


def layouts_of(cache: FeatureCache) -> list[ImageLayout]:
    """The store's per-image layouts (what ``create_or_resume`` needs to build a store like it)."""
    g = cache.group
    shapes, c1, size, orig = g["spatial_shapes"][:], g["c1_shape"][:], g["size"][:], g["orig_size"][:]
    return [ImageLayout(int(cache.image_ids[i]), tuple(orig[i].tolist()), tuple(size[i].tolist()),
                        [tuple(s) for s in shapes[i].tolist()], tuple(c1[i].tolist())) for i in range(len(cache))]


def reencode(src: Path, dst: Path, dtype: str, keep_bits, levels, codec: str = "auto") -> dict:
    """Write every record of ``src`` into a new store ``dst`` stored another way; returns timings."""
    cache = FeatureCache.open(src)
    fp = dict(cache.fingerprint, dtype=dtype, keep_bits=keep_bits, codec=codec)
    layouts = layouts_of(cache)
    if levels is not None:
        fp["levels"] = [cache.fingerprint["levels"][k] for k in levels]
        fp["feature_widths"] = dict(fp["feature_widths"], num_feature_levels=len(levels))
        layouts = [dataclasses.replace(l, spatial_shapes=[l.spatial_shapes[k] for k in levels]) for l in layouts]
    records = [cache.read(i, cache.encoder_layers) for i in cache.done_indices()]
    if levels is not None:
        records = [r.select_levels(levels) for r in records]
    out = FeatureCache.create_or_resume(dst, fp, layouts, top_k=int(cache.group["queries"].shape[1]),
                                        hidden_dim=int(cache.group["queries"].shape[2]),
                                        num_classes=int(cache.group["logits"].shape[2]),
                                        c1_channels=int(cache.group["c1"].shape[1]), overwrite=True)
    t = time.perf_counter()
    for i, rec in zip(cache.done_indices(), records):
        out.write(i, rec)
    write_s = time.perf_counter() - t
    t = time.perf_counter()
    for i in out.done_indices():
        out.read(i, out.encoder_layers)
    read_s = time.perf_counter() - t
    f16_bytes = sum(2 * (r.queries.numel() + r.c1.numel() + sum(v.numel() for v in r.encoder_tokens.values()))
                    for r in records)
    return {"write_mb_s": f16_bytes / 1e6 / write_s, "read_mb_s": f16_bytes / 1e6 / read_s,
            "mb_per_image": out.disk_bytes() / 1e6 / len(records)}


def feature_errors(ref: Path, other: Path) -> dict:
    """Relative RMS and relative max error per feature array of ``other`` vs ``ref`` (same images)."""
    a, b = FeatureCache.open(ref), FeatureCache.open(other)
    sums = {k: [0.0, 0.0, 0.0, 0.0] for k in ("tokens", "c1", "queries")}  # err^2, ref^2, max err, max ref
    for i in a.done_indices():
        ra, rb = a.read(i, a.encoder_layers), b.read(i, a.encoder_layers)
        if rb.spatial_shapes.shape != ra.spatial_shapes.shape:
            ra = ra.select_levels([a.fingerprint["levels"].index(k) for k in b.fingerprint["levels"]])
        pairs = {"tokens": (torch.cat(list(rb.encoder_tokens.values())), torch.cat(list(ra.encoder_tokens.values()))),
                 "c1": (rb.c1, ra.c1), "queries": (rb.queries, ra.queries)}
        for k, (x, y) in pairs.items():
            x, y = x.double(), y.double()
            s = sums[k]
            s[0] += float((x - y).pow(2).sum())
            s[1] += float(y.pow(2).sum())
            s[2] = max(s[2], float((x - y).abs().max()))
            s[3] = max(s[3], float(y.abs().max()))
    return {k: {"rel_rms": (s[0] / s[1]) ** 0.5, "rel_max": s[2] / s[3]} for k, s in sums.items()}


def codec_table(ref: Path, max_images: int = 4) -> list[dict]:
    """Compression ratio and speeds of each Blosc codec per (stored dtype, array kind)."""
    cache = FeatureCache.open(ref)
    recs = [cache.read(i, cache.encoder_layers) for i in cache.done_indices()[:max_images]]
    arrays = {"tokens": torch.cat([torch.cat(list(r.encoder_tokens.values())) for r in recs]),
              "c1": torch.cat([r.c1.flatten(1).T for r in recs]), "queries": torch.cat([r.queries for r in recs])}
    rows = []
    for kind, x in arrays.items():
        q, scale = quantize_int8(x)
        stored = {"float16": x.half().numpy(), "int8": zigzag_int8(q.numpy())}  # int8 as stored (zigzag uint8)
        if kind == "tokens":
            stored["scale"] = scale.numpy()
        for dtype, arr in stored.items():
            raw = np.ascontiguousarray(arr)  # an array, so Blosc's typesize is the dtype's (shuffle works per element)
            for name, (cname, shuffle, clevel) in CODECS.items():
                codec = Blosc(cname=cname, clevel=clevel, shuffle={"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE,
                                                              "bitshuffle": Blosc.BITSHUFFLE}[shuffle])
                t = time.perf_counter()
                enc = codec.encode(raw)
                t_enc = time.perf_counter() - t
                t = time.perf_counter()
                codec.decode(enc)
                t_dec = time.perf_counter() - t
                rows.append({"dtype": dtype, "kind": "scale" if dtype == "scale" else kind, "codec": name,
                             "ratio": raw.nbytes / len(enc), "enc_mb_s": raw.nbytes / 1e6 / t_enc,
                             "dec_mb_s": raw.nbytes / 1e6 / t_dec})
    return rows


def c1_granularity(ref: Path) -> dict:
    """int8 relative RMS error of C1 with one scale per pixel row vs one per channel (per image)."""
    cache = FeatureCache.open(ref)
    err = {"pixel_row": [0.0, 0.0], "channel": [0.0, 0.0]}
    for i in cache.done_indices():
        x = cache.read(i).c1.flatten(1).T.float()  # [P, C1]
        for name, dim in (("pixel_row", -1), ("channel", 0)):
            q, s = quantize_int8(x, dim)
            y = q.float() * s.float().unsqueeze(dim)
            err[name][0] += float((y - x).pow(2).sum())
            err[name][1] += float(x.pow(2).sum())
    return {k: (a / b) ** 0.5 for k, (a, b) in err.items()}


def head_outputs(head, store: Path, layer: int) -> list[torch.Tensor]:
    """The head's mask logits on every cached query (predicted boxes) of every image of ``store``."""
    cache = FeatureCache.open(store)
    outs = []
    with torch.no_grad():
        for i in cache.done_indices():
            rec = cache.read(i, layer)
            feats = image_features(head, [rec], "cpu")
            k = rec.queries.shape[0]
            out = head(feats, rec.queries.float(), rec.boxes.float(), torch.tensor([rec.size], dtype=torch.float32),
                       torch.zeros(k, dtype=torch.int64))
            outs.append(out["mask_logits"])
    return outs


@click.command()
@click.option("--coco-root", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", default="golden-small", show_default=True, help="dino-focalnet preset (random init).")
@click.option("--min-size", default=320, show_default=True)
@click.option("--max-size", default=480, show_default=True)
@click.option("--train-images", default=12, show_default=True)
@click.option("--val-images", default=8, show_default=True)
@click.option("--iters", default=60, show_default=True, help="Head training iterations (--boxes gt).")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the stores go (default: a temporary folder, removed at the end).")
def main(coco_root, preset, min_size, max_size, train_images, val_images, iters, work_dir):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(work_dir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        cfg = load_config(REPO / "configs" / "mfdetr_dino_focalnet_l.yaml",
                          SMALL_HEAD + ["train.boxes=gt", f"train.max_iters={iters}", "train.batch_size=2",
                                        "train.log_every=1000"])
        layer = cfg.train.encoder_layer
        ref = {}
        for split, n in (("train2017", train_images), ("val2017", val_images)):
            ref[split] = root / f"{split}-float32.zarr"
            if not (ref[split] / "zarr.json").exists():
                run_extract(ExtractOptions(out=ref[split], detector="dino-focalnet", preset=preset, random_init=True,
                                           coco_root=coco_root, split=split, max_images=n, min_size=min_size,
                                           max_size=max_size, encoder_layers=[layer], top_k=100, dtype="float32"))
        click.echo(f"{preset} (random init), {min_size}/{max_size}, encoder layer {layer}, "
                   f"{train_images} train / {val_images} val images of {coco_root}")
        train(cfg, ref["train2017"], root / "head", device="cpu", progress=False)
        ckpt = torch.load(root / "head" / "head.pt", map_location="cpu", weights_only=False)
        cache = FeatureCache.open(ref["val2017"])
        head, _, _ = build_head(HeadConfig.from_dict(ckpt["config"]["head"]))
        head.load_state_dict(ckpt["head"])
        head.eval()
        base_logits = head_outputs(head, ref["val2017"], layer)
        ann = annotation_file(cache.fingerprint)
        rows = {}
        for name, (dtype, keep_bits, levels) in CHOICES.items():
            store = root / f"val-{name}.zarr"
            row = reencode(ref["val2017"], store, dtype, keep_bits, levels)
            row["errors"] = feature_errors(ref["val2017"], store)
            if levels is None:  # a head is trained for the stored levels: the AP columns need the full set
                logits = head_outputs(head, store, layer)
                diff = torch.cat([(a - b).flatten() for a, b in zip(logits, base_logits)]).double()
                base = torch.cat([b.flatten() for b in base_logits]).double()
                row["logit_rel_rms"] = float(diff.pow(2).mean().sqrt() / base.pow(2).mean().sqrt())
                row["logit_max_abs"] = float(diff.abs().max())
                metrics = evaluate_cache(head, cfg, store, root / f"eval-{name}", device="cpu", boxes="gt",
                                         ann_file=ann, progress=False)
                row["mask_ap"] = float(metrics["segm"]["AP"]) if "segm" in metrics else float("nan")
            rows[name] = row
        f16 = rows["float16"]["mb_per_image"]
        click.echo(f"\n{'choice':<18s} {'MB/img':>7s} {'x f16':>6s} {'write':>7s} {'read':>7s}  "
                   f"{'tok rms':>8s} {'tok max':>8s} {'c1 rms':>8s} {'c1 max':>8s} {'q rms':>8s}  "
                   f"{'logit rms':>9s} {'logit max':>9s} {'mask AP':>7s} {'dAP':>6s}")
        ap0 = rows["float32"].get("mask_ap")
        for name, r in rows.items():
            e = r["errors"]
            ap = r.get("mask_ap")
            tail = (f"{r['logit_rel_rms']:9.2e} {r['logit_max_abs']:9.2e} {ap:7.2f} {ap - ap0:+6.2f}"
                    if ap is not None else f"{'-':>9s} {'-':>9s} {'-':>7s} {'-':>6s}")
            click.echo(f"{name:<18s} {r['mb_per_image']:7.3f} {r['mb_per_image'] / f16:6.3f} {r['write_mb_s']:7.1f} "
                       f"{r['read_mb_s']:7.1f}  {e['tokens']['rel_rms']:8.2e} {e['tokens']['rel_max']:8.2e} "
                       f"{e['c1']['rel_rms']:8.2e} {e['c1']['rel_max']:8.2e} {e['queries']['rel_rms']:8.2e}  {tail}")
        click.echo("MB/img: whole store on disk per image; write/read: MB/s of float16-equivalent features; "
                   "rms/max: relative to float32; logit: head mask logits vs float32 store; "
                   "mask AP: one head (--boxes gt) evaluated on each store")
        gran = c1_granularity(ref["val2017"])
        click.echo(f"\nint8 C1 scale granularity, relative RMS error: per pixel row {gran['pixel_row']:.2e}, "
                   f"per channel {gran['channel']:.2e} -> {min(gran, key=gran.get)}")
        table = codec_table(ref["val2017"])
        click.echo(f"\n{'dtype':<8s} {'array':<8s} {'codec':<15s} {'ratio':>6s} {'enc MB/s':>9s} {'dec MB/s':>9s}")
        best = {}
        for r in table:
            click.echo(f"{r['dtype']:<8s} {r['kind']:<8s} {r['codec']:<15s} {r['ratio']:6.3f} {r['enc_mb_s']:9.0f} "
                       f"{r['dec_mb_s']:9.0f}")
            key = (r["dtype"], r["kind"])
            if key not in best or r["ratio"] > best[key]["ratio"] * 1.005:
                best[key] = r
        click.echo("best ratio per array: " + json.dumps({f"{d}/{k}": f"{r['codec']} {r['ratio']:.3f}"
                                                          for (d, k), r in best.items()}))
        click.echo("RANDOM-INIT detector: compression and above all the AP change must be re-checked with the "
                   "official weights")
        click.echo(f"int8_over_float16={rows['int8']['mb_per_image'] / f16:.3f}")


if __name__ == "__main__":
    main()
