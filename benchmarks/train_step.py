"""Do reads keep the head busy? Head steps on in-memory samples vs the same steps fed from the cache.

Side by side in one run, on the same cache, batches and head:

  (a) head forward + backward + optimizer step on samples already in memory (read beforehand);
  (b) the same steps with each batch read from the Zarr cache through the training DataLoader
      (``CachedImages``, ``--num-workers`` spawned workers that each open the store).

The two kinds of step alternate (same head, same machine load); prints the median and mean
seconds per step of both and peak memory (CUDA: ``max_memory_allocated``; CPU: the training
process's max RSS); the last line is ``cache_over_memory=<median (b) / median (a)>`` (target
<= 1.05). (a)'s batches are CPU tensors, so both pay the same host-to-device copy: the ratio
measures what reading and decoding the cache adds to a step.

    python benchmarks/train_step.py --cache train.zarr --steps 10 --batch-size 2 --num-workers 1
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from pathlib import Path

import click
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import data  # noqa: E402
from pipeline.batches import CachedImages, annotation_file, category_maps, image_features, loader_options  # noqa: E402
from pipeline.cache import FeatureCache  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.head import build_head  # noqa: E402
from pipeline.train import image_sizes_of, training_targets  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMALL_HEAD = ["head.image_encoder_layers=1", "head.box_dim=64", "head.box_encoder_layers=1", "head.num_points=1024"]


def _step(head, head_cfg, criterion, optimizer, items, maps, dev, gen):
    tg = training_targets(items, criterion.matcher, maps, "gt", head_cfg)
    if tg is None:
        return
    out = head(image_features(head, items, dev), tg["queries"].to(dev), tg["boxes"].to(dev),
               image_sizes_of(items).to(dev), tg["batch_index"].to(dev))
    loss = criterion(out, {"masks": tg["masks"].to(dev), "labels": tg["labels"].to(dev)}, generator=gen)["loss"]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@click.command()
@click.option("--cache", "cache_path", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--config", "config_path", default=str(REPO / "configs" / "mfdetr_dino_focalnet_l.yaml"), show_default=True)
@click.option("--small-head", is_flag=True, help="The reduced test head (fast on CPU).")
@click.option("--steps", default=10, show_default=True)
@click.option("--batch-size", default=2, show_default=True)
@click.option("--num-workers", default=1, show_default=True)
@click.option("--device", default="cpu", show_default=True)
def main(cache_path, config_path, small_head, steps, batch_size, num_workers, device):
    dev = torch.device(device)
    cfg = load_config(config_path, SMALL_HEAD if small_head else [])
    cache = FeatureCache.open(cache_path)
    layer = cfg.train.encoder_layer if cfg.train.encoder_layer in cache.encoder_layers else cache.encoder_layers[0]
    ann = annotation_file(cache.fingerprint)
    coco = data.load_coco(ann)
    maps = category_maps(cache.fingerprint, coco)
    indices = [i for i in cache.done_indices()
               if len(coco.getAnnIds(imgIds=int(cache.image_ids[i]), iscrowd=False)) > 0]
    order = [indices[(s * batch_size + j) % len(indices)] for s in range(steps) for j in range(batch_size)]
    ds = CachedImages(cache_path, order, layer, ann, with_gt=True)
    torch.manual_seed(0)
    head_cfg = cfg.head.with_widths(**cache.feature_widths)
    head, criterion, _ = build_head(head_cfg)
    head.to(dev).train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    memory = [ds[n] for n in range(len(ds))]  # (a)'s batches, read and decoded beforehand (CPU memory)
    # exactly train-head's loader (pipeline.batches.loader_options): spawned workers, pinned + prefetched on CUDA
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, **loader_options(dev, num_workers),
                        persistent_workers=bool(num_workers))
    it = iter(loader)
    _step(head, head_cfg, criterion, optimizer, next(it), maps, dev, gen)  # warm-up (and worker start-up)

    def timed(fn) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    # (a) and (b) alternate step by step, so both see the same machine load (a shared CPU box
    # varies by tens of % within a minute); the ratio is of the medians.
    t_mem, t_cache = [], []
    for s in range(1, steps):
        batch = memory[s * batch_size:(s + 1) * batch_size]
        t_mem.append(timed(lambda: _step(head, head_cfg, criterion, optimizer, batch, maps, dev, gen)))
        t_cache.append(timed(lambda: _step(head, head_cfg, criterion, optimizer, next(it), maps, dev, gen)))
    peak = (f"{torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB (CUDA)" if dev.type == "cuda"
            else f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (max RSS of the "
                 "training process, (a)'s in-memory batches included)")
    med_mem, med_cache = statistics.median(t_mem), statistics.median(t_cache)
    click.echo(f"{steps - 1} + {steps - 1} alternating steps of {batch_size} images, {cache.dtype} cache {cache_path}, "
               f"{num_workers} loader workers, {device}, {torch.get_num_threads()} threads")
    click.echo(f"(a) in memory   {med_mem:8.3f} s/step (median; mean {statistics.mean(t_mem):.3f})")
    click.echo(f"(b) from cache  {med_cache:8.3f} s/step (median; mean {statistics.mean(t_cache):.3f})")
    click.echo(f"peak memory {peak}")
    click.echo(f"cache_over_memory={med_cache / med_mem:.3f}")


if __name__ == "__main__":
    main()
