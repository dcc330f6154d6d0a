"""Does extraction keep the detector busy? Detector forward-only vs full ``extract``, side by side.

On the same real images and batches (``--batch-size``; only same-size images are batched):

  (a) detector forward only: images decoded and preprocessed beforehand, only
      ``detector.extract`` timed (what the device could do);
  (b) full ``run_extract`` into a fresh store: decoding (``--decode-workers``), forward, level
      selection and the writer (quantisation, compression, disk) together, the writer as
      ``extract`` chooses it (:func:`pipeline.extract.write_behind`: a background thread when
      the forward leaves cores idle, else inline);
  (c) the same with the other writer mode, for comparison.

Prints images/s of each, with the loop's stage seconds (decode / forward / write); the last line
is ``extract_over_forward=<(b)/(a)>`` (target >= 0.95: the detector never waits for decoding or
the disk). All are timed warm: an untimed extraction of the same images runs first. On a
CPU-only machine decoding and the writer's compression share the cores with the forward, so
there the ratio is bounded by forward / (forward + decode + write) of the CPU seconds.

    python benchmarks/extract.py --coco-root ../shared/data/coco --images 8 --batch-size 2 \
        --min-size 240 --max-size 360 --preset golden-small
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import data  # noqa: E402
from pipeline.cache import FeatureCache  # noqa: E402
from pipeline.extract import (ExtractOptions, build_frozen_detector, run_extract, size_batches,  # noqa: E402
                              write_behind)


@click.command()
@click.option("--coco-root", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--split", default="val2017", show_default=True)
@click.option("--images", default=8, show_default=True)
@click.option("--batch-size", default=2, show_default=True)
@click.option("--decode-workers", type=int, default=None)
@click.option("--dtype", default="float16", show_default=True)
@click.option("--min-size", default=240, show_default=True)
@click.option("--max-size", default=360, show_default=True)
@click.option("--preset", default="golden-small", show_default=True, help="dino-focalnet preset (random init).")
@click.option("--device", default="cpu", show_default=True)
def main(coco_root, split, images, batch_size, decode_workers, dtype, min_size, max_size, preset, device):
    with tempfile.TemporaryDirectory() as tmp:
        opts = ExtractOptions(out=Path(tmp) / "c.zarr", preset=preset, random_init=True, coco_root=coco_root,
                              split=split, max_images=images, min_size=min_size, max_size=max_size, dtype=dtype,
                              batch_size=batch_size, decode_workers=decode_workers, device=device)
        # An untimed first extraction warms the per-shape kernel caches (oneDNN primitives, allocator)
        # for every batch shape, so (b) and (a), which runs after it, both see warm shapes.
        run_extract(dataclasses.replace(opts, out=Path(tmp) / "warm-up.zarr"))
        auto = write_behind(device)
        summary = run_extract(opts)
        full = summary["seconds"]  # the extraction loop: decode + forward + write (detector built before)
        other = run_extract(dataclasses.replace(opts, out=Path(tmp) / "other.zarr",
                                                writer="inline" if auto else "thread"))
        detector, _ = build_frozen_detector(opts)
        cache = FeatureCache.open(opts.out)
        ann_file, image_dir = data.resolve_dataset(coco_root, split)
        coco = data.load_coco(ann_file, require_annotations=False)
        idx = list(range(len(cache)))
        xs = {i: data.preprocess(data.load_image(Path(image_dir) / coco.imgs[int(cache.image_ids[i])]["file_name"]),
                                 min_size, max_size) for i in idx}
        t = time.perf_counter()
        for batch in size_batches(cache.sizes(idx), idx, batch_size):
            x = torch.stack([xs[i] for i in batch]).to(device)
            mask = torch.zeros((x.shape[0],) + x.shape[2:], dtype=torch.bool, device=device)
            detector.extract(x, mask, cache.encoder_layers, cache.fingerprint["top_k"])
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        forward = time.perf_counter() - t
        n = summary["extracted_now"]
        click.echo(f"{n} {split} images at {min_size}/{max_size}, preset {preset}, batch {batch_size}, "
                   f"{summary['forwards']} forwards, dtype {dtype}, {torch.get_num_threads()} threads, {device}")
        mode = {True: "background writer", False: "inline writer"}

        def stages(s):
            return ", ".join(f"{k} {v:.2f} s" for k, v in s["stage_seconds"].items())

        click.echo(f"(a) detector forward only  {n / forward:7.3f} images/s  (forward {forward:.2f} s)")
        click.echo(f"(b) full extract           {n / full:7.3f} images/s  ({mode[auto]}, as extract chooses; "
                   f"{stages(summary)})")
        click.echo(f"(c) full extract           {n / other['seconds']:7.3f} images/s  ({mode[not auto]}; "
                   f"{stages(other)})")
        click.echo(f"{mode[not auto]} over forward: {forward / other['seconds']:.3f}")
        click.echo(f"extract_over_forward={forward / full:.3f}")


if __name__ == "__main__":
    main()
