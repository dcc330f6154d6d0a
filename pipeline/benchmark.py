"""Inference cost on the current device: detector and head milliseconds per image, images/s, ▲FLOPs, ▲#params.

``cli.py benchmark-inference`` times, per image and after ``warmup`` untimed images, the same
steps ``predict`` runs: the frozen detector (preprocessed tensor -> :class:`Extracted`), the head
forward (image features + mask logits for every cached query) and the post-processing (Eq. 13
ranking, pasting at 0.5, RLE). On CUDA every timing is bracketed by ``torch.cuda.synchronize``.
The head's ▲FLOPs are counted once on the first image's real record (:func:`pipeline.flops.count_gflops`);
▲#params are its trainable parameters (:func:`pipeline.head.count_parameters`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import data
from .batches import image_features, to_xyxy_pixels
from .evaluate import encode_rle, paste_masks
from .frozen_detector import DetectorOptions, build_frozen_detector
from .head import build_head, count_parameters

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class BenchmarkOptions(DetectorOptions):
    """Options of ``cli.py benchmark-inference`` (see its ``--help``); the detector fields are
    :class:`DetectorOptions`'; ``seed`` also seeds the random head built without ``checkpoint``."""

    inputs: list[Path]
    checkpoint: Path | None = None
    config: Path | None = None
    overrides: list[str] = field(default_factory=list)
    min_size: int = 800
    max_size: int = 1333
    top_k: int = 100
    num_images: int = 5
    warmup: int = 1
    device: str = "auto"
    progress: bool = True


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_benchmark(opts: BenchmarkOptions) -> dict:
    """Time detector, head and post-processing per image; count the head's FLOPs and parameters.

    The head is ``opts.checkpoint`` (trained) or, without one, built from ``opts.config`` with
    random weights and the detector's widths (speed and FLOPs do not depend on the weights).

    Returns:
        ``{"device", "images", "image_sizes", "detector_ms", "head_ms", "post_ms"`` (means over
        the timed images, milliseconds), ``"images_per_s"`` (1000 / (detector + head + post)),
        ``"head_gflops"`` (multiply-adds / 1e9, one image, all ``top_k`` queries),
        ``"head_params"``, ``"head_params_M"``, ``"detector_params_M"``, ``"top_k"``, ``"impl"``}.

    Raises:
        ValueError: fewer images than ``warmup + 1``; detector without weights or --random-init.
    """
    from kernels import ops as kernel_ops

    from .config import load_config
    from .checkpoint import load_head
    from .predict import list_images
    from .train import resolve_device

    device = resolve_device(opts.device)
    impl = kernel_ops.configure(opts.impl)
    images = list_images(opts.inputs)[: opts.warmup + opts.num_images]
    if len(images) < opts.warmup + 1:
        raise ValueError(f"need at least {opts.warmup + 1} images (warm-up {opts.warmup} + 1 timed), "
                         f"found {len(images)}")
    detector, _ = build_frozen_detector(opts, device)
    if opts.checkpoint is not None:
        head, post, cfg, _ = load_head(opts.checkpoint, opts.overrides, device=device)
    else:
        cfg = load_config(opts.config, opts.overrides)
        head_cfg = cfg.head.with_widths(
            c1_channels=int(detector.c1_channels), num_feature_levels=int(detector.num_feature_levels),
            source=f"detector {opts.detector}")
        torch.manual_seed(opts.seed)
        head, _, post = build_head(head_cfg, cfg.evaluate.top_n)
        head = head.to(device).eval()
    layer = cfg.train.encoder_layer
    col_to_cat = {int(k): int(v) for k, v in detector.class_to_category_id().items()}
    contiguous_of = {c: i for i, c in enumerate(sorted(set(col_to_cat.values())))}
    column_to_contiguous = torch.full((int(detector.num_classes),), -1, dtype=torch.int64)
    for col, cat in col_to_cat.items():
        column_to_contiguous[col] = contiguous_of[cat]
    times = {"detector": [], "head": [], "post": []}
    sizes, gflops = [], None
    for n, path in enumerate(tqdm(images, desc="benchmark", unit="img", disable=not opts.progress, dynamic_ncols=True)):
        image = data.load_image(path)
        w, h = image.size
        x = data.preprocess(image, opts.min_size, opts.max_size).to(device, next(detector.parameters()).dtype)
        mask = torch.zeros((1,) + x.shape[1:], dtype=torch.bool, device=device)
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            ex = detector.extract(x[None], mask, [layer], opts.top_k)[0]
        _sync(device)
        t1 = time.perf_counter()
        rec = dataclasses.replace(ex, image_id=n, orig_size=(h, w), size=tuple(x.shape[1:]))
        k = len(rec.boxes)

        def head_forward():
            feats = image_features(head, [rec], device)
            return head(feats, rec.queries.to(device), rec.boxes.to(device),
                        torch.tensor([rec.size], dtype=torch.float32, device=device),
                        torch.zeros(k, dtype=torch.int64, device=device))

        _sync(device)
        t2 = time.perf_counter()
        with torch.inference_mode():
            out = head_forward()
        _sync(device)
        t3 = time.perf_counter()
        with torch.inference_mode():
            logits = rec.logits.to(device)
            det = post(logits, rec.boxes.to(device), out["mask_logits"], out.get("iou_pred"),
                       column_to_contiguous.to(device))
            masks = paste_masks(det["mask_probs"], to_xyxy_pixels(det["boxes"], h, w), h, w,
                                threshold=cfg.evaluate.mask_threshold)
            encode_rle(masks)
        _sync(device)
        t4 = time.perf_counter()
        if gflops is None:
            with torch.inference_mode():
                gflops = count_head_gflops(head_forward)
        if n >= opts.warmup:
            times["detector"].append(t1 - t0)
            times["head"].append(t3 - t2)
            times["post"].append(t4 - t3)
            sizes.append([int(x.shape[1]), int(x.shape[2])])
    ms = {k: 1000 * float(np.mean(v)) for k, v in times.items()}
    n_head = count_parameters(head)
    return {"device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
            "impl": impl["resolved"].get(device.type, impl["impl"]), "images": len(sizes), "image_sizes": sizes,
            "top_k": opts.top_k, "detector_ms": ms["detector"], "head_ms": ms["head"], "post_ms": ms["post"],
            "images_per_s": 1000.0 / (ms["detector"] + ms["head"] + ms["post"]), "head_gflops": gflops,
            "head_params": n_head, "head_params_M": n_head / 1e6,
            "detector_params_M": sum(p.numel() for p in detector.parameters()) / 1e6,
            "random_init": bool(opts.random_init)}


def count_head_gflops(head_forward) -> float:
    """▲FLOPs of one head forward (see :func:`pipeline.flops.count_gflops`)."""
    from .flops import count_gflops

    return count_gflops(head_forward)


def format_report(r: dict) -> str:
    """The human-readable report; its last line is ``images_per_s=<value>`` (the benchmarks' convention)."""
    lines = [f"device: {r['device']}, deformable-attention kernel: {r['impl']}",
             f"images timed: {r['images']} (resized sizes {r['image_sizes']}), top-{r['top_k']} queries per image",
             f"detector   {r['detector_ms']:10.1f} ms/image   ({r['detector_params_M']:.1f} M params, frozen)",
             f"head       {r['head_ms']:10.1f} ms/image   (▲#params {r['head_params']:,} = {r['head_params_M']:.2f} M, "
             f"▲FLOPs {r['head_gflops']:.2f} G multiply-adds, RoIAlign and sampling included)",
             f"post       {r['post_ms']:10.1f} ms/image   (Eq. 13 ranking, paste at 0.5, RLE)",
             f"throughput {r['images_per_s']:10.3f} images/s (detector + head + post, batch 1)"]
    if r.get("random_init"):
        from .cache import RANDOM_INIT_BANNER

        lines.insert(0, f"*** {RANDOM_INIT_BANNER} (timings are still valid) ***")
    lines.append(f"images_per_s={r['images_per_s']:.4f}")
    return "\n".join(lines)
