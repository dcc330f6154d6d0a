"""What one training step per image costs with the cache vs. with the detector in the loop.

Measured side by side in one run, on the same images and settings:
  (a) the frozen detector's forward (what an epoch would cost per image without the cache),
  (b) reading the image's cached features back from the Zarr store,
  (c) the head's forward + backward on that image (GT boxes, the default config), with the
      compiled deformable-attention kernel (``--impl``, default auto) and, side by side, with the
      pure-PyTorch reference (what the head cost before the kernels, issue 15).
Prints seconds per image and the ratios (a)/(b+c) and (b)/(c); the last line holds
``head_speedup`` (reference head step / kernel head step) and ``detector_over_cache`` as name=value.

    python benchmarks/bench_cache_vs_detector.py --coco-root ../shared/data/coco --split val2017 \
        --images 3 --min-size 256 --max-size 384
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import click
import torch

# the repository first: this folder's kernels.py (the kernel benchmark) must not shadow the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import ops  # noqa: E402
from pipeline import data  # noqa: E402
from pipeline.batches import CachedImages, annotation_file, category_maps, image_features
from pipeline.cache import FeatureCache
from pipeline.config import load_config
from pipeline.extract import ExtractOptions, build_frozen_detector, run_extract
from pipeline.head import build_head
from pipeline.targets import training_targets
from pipeline.train import image_sizes_of

REPO = Path(__file__).resolve().parents[1]


@click.command()
@click.option("--coco-root", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--split", default="val2017")
@click.option("--images", default=3, show_default=True)
@click.option("--min-size", default=256, show_default=True)
@click.option("--max-size", default=384, show_default=True)
@click.option("--preset", default="large", show_default=True)
@click.option("--impl", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Kernel of the timed detector and head runs (the head is also timed with the reference).")
def main(coco_root, split, images, min_size, max_size, preset, impl):
    ops.set_impl(impl)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "bench.zarr"
        opts = ExtractOptions(out=store, preset=preset, random_init=True, coco_root=coco_root, split=split,
                              max_images=images, min_size=min_size, max_size=max_size)
        run_extract(opts)  # builds the cache (not timed)
        detector, _ = build_frozen_detector(opts)
        ann_file, image_dir = data.resolve_dataset(coco_root, split)
        coco = data.load_coco(ann_file)
        cache = FeatureCache.open(store)
        t_det = 0.0
        for image_id in cache.image_ids.tolist():
            info = coco.imgs[image_id]
            x = data.preprocess(data.load_image(Path(image_dir) / info["file_name"]), min_size, max_size)
            t = time.perf_counter()
            detector.extract(x[None], torch.zeros((1,) + x.shape[1:], dtype=torch.bool), [4], 100)
            t_det += time.perf_counter() - t
        del detector
        cfg = load_config(REPO / "configs" / "mfdetr_dino_focalnet_l.yaml")
        head, criterion, _ = build_head(cfg.head.with_widths(**cache.feature_widths))
        maps = category_maps(cache.fingerprint, coco)
        ds = CachedImages(store, cache.done_indices(), 4, annotation_file(cache.fingerprint), with_gt=True)
        t_read = 0.0
        t_head = {"kernel": 0.0, "reference": 0.0}
        gen = torch.Generator().manual_seed(0)
        for n in range(len(ds)):
            t = time.perf_counter()
            item = ds[n]
            t_read += time.perf_counter() - t
            for which in ("kernel", "reference"):
                with ops.use_impl(impl if which == "kernel" else "reference"):
                    t = time.perf_counter()
                    tg = training_targets([item], criterion.matcher, maps, "gt", head.cfg)
                    if tg is not None:
                        out = head(image_features(head, [item], "cpu"), tg["queries"], tg["boxes"],
                                   image_sizes_of([item]), tg["batch_index"])
                        loss = criterion(out, {"masks": tg["masks"], "labels": tg["labels"]}, generator=gen)["loss"]
                        loss.backward()
                    t_head[which] += time.perf_counter() - t
        n = len(ds)
        det, read, hd, hd_ref = t_det / n, t_read / n, t_head["kernel"] / n, t_head["reference"] / n
        click.echo(f"{n} images at {min_size}/{max_size}, preset {preset}, {torch.get_num_threads()} threads")
        click.echo(f"(a) detector forward      {det:8.3f} s/image")
        click.echo(f"(b) cache read (+GT)      {read:8.3f} s/image")
        kernel = ops.describe_impl()["resolved"]["cpu"]
        click.echo(f"(c) head forward+backward {hd:8.3f} s/image  (ms_deform_attn: {kernel})")
        click.echo(f"    same, reference kernel {hd_ref:8.3f} s/image  (before issue 15)")
        click.echo(f"detector / (read + head): {det / (read + hd):.2f}x   read / head: {read / hd:.3f}")
        click.echo(f"head_speedup={hd_ref / hd:.2f} detector_over_cache={det / (read + hd):.2f}")


if __name__ == "__main__":
    main()
