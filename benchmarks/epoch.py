"""What the cache buys: one training epoch with the detector in the loop vs from the feature cache.

Side by side in one run, on the same real images (``../shared/data/coco``), the same head, config,
seed and batches (``pipeline.train.train`` both times; only the feature source differs):

  (a) online: ``train-head --online`` with the frozen detector (``inference_mode``) in every step;
  (b) cached: the same epoch from a cache of those images (extracted first; that one-off pass is
      timed too and reported, not part of the epoch).

The detector is DINO-FocalNet-L at its real widths (``--preset large``: FocalNet-L, 5 levels,
256-d, 900 queries), random weights (timing does not depend on them), at a reduced test-time
resolution (``--min-size/--max-size``, default 320/480 instead of 800/1333). The head is the
paper's default (``configs/mfdetr_dino_focalnet_l.yaml``) unless ``--small-head``. Epoch time =
the training loop's own clock at its last step (``metrics.jsonl`` ``time``), so model building
and data-set set-up are excluded on both sides, and so is the first step's warm-up (epoch = mean
of steps 2..n times n). Each side runs ``--repeats`` epochs (default 2), online and cached
alternated, and the best of each is compared, so a drift in the machine's speed during the run
does not land on one side only.

Prints both epoch times, the one-off extraction time, the store's MB/image and the train2017 disk
estimate for V views at this resolution; last line ``cached_speedup=<(a)/(b)>`` (target >= 3).
Unless ``--no-flops``, both epochs run once more under ``FlopCounterMode`` (:func:`pipeline.flops.count_gflops`,
every multiply-add counted; the backward of the compiled deformable-attention kernel counts 0) and
the FLOP-implied speed-up (online multiply-adds / cached multiply-adds) is printed beside the
measured one: what the cache would buy if the detector and the head step ran at one FLOP rate.

    python benchmarks/epoch.py --images 4 --min-size 320 --max-size 480 --views 1
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cache import FeatureCache  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.extract import ExtractOptions, run_extract  # noqa: E402
from pipeline.flops import count_gflops  # noqa: E402
from pipeline.online import OnlineSource  # noqa: E402
from pipeline.train import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COCO = REPO.parent / "shared" / "data" / "coco"
SMALL_HEAD = ["head.image_encoder_layers=1", "head.box_dim=64", "head.box_encoder_layers=1", "head.num_points=1024"]
TRAIN2017 = 118_287


def _epoch_seconds(run: Path) -> float:
    """Epoch time without the first step's warm-up: mean of steps 2..n (loop clock) times n."""
    times = [float(r["time"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "time" in r]
    if len(times) < 2:
        raise click.UsageError("the epoch needs at least 2 steps (--images > --batch-size)")
    return (times[-1] - times[0]) / (len(times) - 1) * len(times)


@click.command()
@click.option("--coco-root", default=str(COCO), show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--split", default="train2017", show_default=True)
@click.option("--images", default=4, show_default=True, help="Images in the epoch.")
@click.option("--batch-size", default=1, show_default=True)
@click.option("--min-size", default=320, show_default=True, help="Test-time resize, shorter side (paper: 800).")
@click.option("--max-size", default=480, show_default=True, help="Cap on the longer side (paper: 1333).")
@click.option("--preset", default="large", show_default=True, help="DINO-FocalNet preset (large = the paper's widths).")
@click.option("--dtype", default="float16", show_default=True, help="Cache dtype.")
@click.option("--views", default=1, show_default=True, help="V for the train2017 disk estimate.")
@click.option("--small-head", is_flag=True, help="The reduced test head instead of the paper's.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), help="Keep the store and runs here.")
@click.option("--repeats", default=2, show_default=True, type=click.IntRange(min=1),
              help="Epochs per side, online and cached alternated; the best of each is compared.")
@click.option("--no-flops", is_flag=True, help="Skip the FLOP count of both epochs (one more pass of each).")
def main(coco_root, split, images, batch_size, min_size, max_size, preset, dtype, views, small_head, device, workdir,
         repeats, no_flops):
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="epoch_bench_")
        workdir = Path(tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    det = dict(detector="dino-focalnet", preset=preset, random_init=True, seed=0, coco_root=coco_root, split=split,
               max_images=images, min_size=min_size, max_size=max_size, encoder_layers=[4], top_k=100,
               device=device)
    cfg = load_config(REPO / "configs" / "mfdetr_dino_focalnet_l.yaml",
                      (SMALL_HEAD if small_head else []) + [f"train.batch_size={batch_size}", "train.epochs=1",
                                                             "train.log_every=1", "train.checkpoint_every=100000"])
    store = workdir / "cache.zarr"
    t = time.perf_counter()
    summary = run_extract(ExtractOptions(out=store, dtype=dtype, overwrite=True, **det))
    t_extract = time.perf_counter() - t
    source = OnlineSource(ExtractOptions(out=workdir / "online", **det), finetune="none")
    runs_online, runs_cached = [], []
    for r in range(repeats):  # alternated, so drift in the machine's speed reaches both sides alike
        train(cfg, None, workdir / f"online-{r}", device=device, progress=False, source=source)
        runs_online.append(_epoch_seconds(workdir / f"online-{r}"))
        train(cfg, store, workdir / f"cached-{r}", device=device, progress=False)
        runs_cached.append(_epoch_seconds(workdir / f"cached-{r}"))
    t_online, t_cached = min(runs_online), min(runs_cached)
    gmac_online = None if no_flops else count_gflops(
        lambda: train(cfg, None, workdir / "online-flops", device=device, progress=False, source=source), "all")
    del source
    gmac_cached = None if no_flops else count_gflops(
        lambda: train(cfg, store, workdir / "cached-flops", device=device, progress=False), "all")
    cache = FeatureCache.open(store)
    mb = cache.disk_bytes() / 1e6 / max(1, len(cache.done_indices()))
    steps = -(-images // batch_size)
    click.echo(f"DINO-FocalNet-{preset} (random init), {images} {split} images at {min_size}/{max_size}, "
               f"batch {batch_size} ({steps} steps), {'reduced' if small_head else 'paper'} head, {device}, "
               f"{torch.get_num_threads()} threads")
    def runs(times):
        return ", ".join(f"{t:.2f}" for t in times)

    click.echo(f"(a) online epoch   {t_online:9.2f} s   ({t_online / images:.2f} s/image; best of {repeats}: "
               f"{runs(runs_online)})")
    click.echo(f"(b) cached epoch   {t_cached:9.2f} s   ({t_cached / images:.2f} s/image; best of {repeats}: "
               f"{runs(runs_cached)})")
    click.echo(f"one-off extraction {t_extract:9.2f} s   ({summary['seconds_per_image']:.2f} s/image, {dtype}, "
               f"{mb:.2f} MB/image on disk)")
    if not no_flops:
        click.echo(f"multiply-adds per epoch: online {gmac_online:.1f} G, cached {gmac_cached:.1f} G "
                   f"(detector {gmac_online - gmac_cached:.1f} G); FLOP-implied speed-up "
                   f"{gmac_online / gmac_cached:.2f}; FLOP rate online {gmac_online / t_online:.1f} G/s, "
                   f"cached {gmac_cached / t_cached:.1f} G/s")
    click.echo(f"break-even after {t_extract / max(1e-9, t_online - t_cached):.2f} epochs")
    click.echo(f"train2017 disk at this resolution, {views} view(s): {TRAIN2017 * views * mb / 1e6:.2f} TB "
               f"({TRAIN2017:,} images x {views} x {mb:.2f} MB)")
    if tmp is not None:
        tmp.cleanup()
    click.echo(f"cached_speedup={t_online / t_cached:.2f}")


if __name__ == "__main__":
    main()
