"""Disk to plan for: the feature cache of COCO train2017 / val2017 per dtype and level choice.

Computed from the shapes, not measured: for every image of ``--ann-file`` (the shared subset is a
sample of COCO's image sizes) the detector's feature shapes at the test-time resize give the
uncompressed bytes (:func:`pipeline.cache.bytes_per_image`, the exact layout the store writes,
which ``cli.py cache-info`` reports as ``data_bytes``); the mean per image is scaled to the split's
image count and divided by the compression ratio per dtype that ``benchmarks/cache_size.py``
measured (``--ratio dtype=x``; random-init features, re-check with real weights). Last line
``train2017_int8_tb=<TB>``.

    python benchmarks/cache_sizing.py --ann-file ../shared/data/coco/annotations/instances_train2017.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import data  # noqa: E402
from pipeline.cache import bytes_per_image  # noqa: E402
from pipeline.detectors import build_detector  # noqa: E402

SPLIT_IMAGES = {"train2017": 118_287, "val2017": 5_000}


@click.command()
@click.option("--ann-file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="COCO annotation file whose image sizes are the sample.")
@click.option("--detector", default="dino-focalnet", show_default=True)
@click.option("--preset", default=None, help="Default: the official release.")
@click.option("--min-size", default=800, show_default=True)
@click.option("--max-size", default=1333, show_default=True)
@click.option("--top-k", default=100, show_default=True)
@click.option("--encoder-layers", default=1, show_default=True, help="Number of stored encoder layers.")
@click.option("--ratio", multiple=True, default=("float16=1.22", "bfloat16=1.57", "int8=1.32", "float32=1.16"),
              show_default=True, help="Measured compression ratio per dtype (benchmarks/cache_size.py).")
def main(ann_file, detector, preset, min_size, max_size, top_k, encoder_layers, ratio):
    ratios = {k: float(v) for k, v in (r.split("=") for r in ratio)}
    with torch.device("meta"):
        model = build_detector(detector, preset=preset)
    images = json.loads(Path(ann_file).read_text())["images"]
    n_levels = int(model.num_feature_levels)
    choices = [("all", list(range(n_levels))), (",".join(map(str, range(1, n_levels))), list(range(1, n_levels)))]
    totals = {}
    for im in images:
        rh, rw = data.resize_shape(int(im["width"]), int(im["height"]), min_size, max_size)
        shapes, (h1, w1) = model.feature_shapes(rh, rw)
        for dtype in ratios:
            for name, levels in choices:
                tokens = int(shapes[levels].prod(1).sum())
                totals[(dtype, name)] = totals.get((dtype, name), 0) + bytes_per_image(
                    top_k=top_k, hidden_dim=model.hidden_dim, num_classes=model.num_classes, num_levels=len(levels),
                    num_tokens=tokens, c1_numel=model.c1_channels * h1 * w1, num_encoder_layers=encoder_layers,
                    dtype=dtype, c1_channels=model.c1_channels)
    click.echo(f"{detector} {preset or '(release)'} at {min_size}/{max_size}, top-{top_k}, {encoder_layers} encoder "
               f"layer(s); image sizes of {len(images)} images in {ann_file}")
    click.echo(f"{'dtype':<9s} {'levels':<8s} {'MB/img raw':>10s} {'ratio':>6s} {'MB/img disk':>11s} "
               f"{'train2017 TB':>12s} {'val2017 GB':>10s}")
    for (dtype, name), total in totals.items():
        raw = total / len(images) / 1e6
        disk = raw / ratios[dtype]
        click.echo(f"{dtype:<9s} {name:<8s} {raw:10.1f} {ratios[dtype]:6.2f} {disk:11.1f} "
                   f"{disk * SPLIT_IMAGES['train2017'] / 1e6:12.2f} {disk * SPLIT_IMAGES['val2017'] / 1e3:10.0f}")
    int8 = totals[("int8", "all")] / len(images) / 1e6 / ratios["int8"]
    click.echo(f"train2017_int8_tb={int8 * SPLIT_IMAGES['train2017'] / 1e6:.2f}")


if __name__ == "__main__":
    main()
