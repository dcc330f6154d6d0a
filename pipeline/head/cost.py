"""▲#params and ▲FLOPs of a head (the paper's cost columns), from its config and input shapes.

Counting conventions (``shared/papers/params-reconstruction.md``):

- ▲#params: trainable head parameters (the frozen detector adds 0), per component as
  :func:`pipeline.head.model.parameter_table`.
- ▲FLOPs: one forward of the head over one image with ``num_boxes`` boxes, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention) plus the
  formulas :mod:`pipeline.flops` registers for RoIAlign, grid sampling and the custom kernels.
  One multiply-add = one FLOP (the paper's, fvcore's and detectron2's convention); by default
  deformable attention's sampling counts 0, as the paper's counter could not see the custom
  CUDA op (:mod:`pipeline.flops`, convention ``"paper"``).
- The image: :data:`PAPER_IMAGE_SIZE`, the DETR family's FLOP convention (DETR, Deformable DETR
  and H-DETR report FLOPs averaged over the first 100 COCO val2017 images at their test-time
  resize, shorter side 800, longer at most 1333, with detectron2's ``flop_count_operators``).
  The head's image-side cost is linear in the pixel count (per-token layers, convolutions,
  RoIAlign of fixed size), so that average is the count at one image of the images' mean
  area; a full 800 x 1333 image overstates Tables 2-14 by 10-17 %.
- The boxes: :func:`paper_num_boxes`: 100 for the H-DETR tables (the paper's "top ~100"), 300
  for Table 16 on DINO-FocalNet-L (its ▲FLOPs steps are 3x the 100-box cost of a box layer;
  ``shared/papers/params-reconstruction.md``).
"""

from __future__ import annotations

import torch

from ..flops import flop_counts
from .config import HeadConfig
from .model import MaskFrozenDetrHead, count_parameters, parameter_table

#: The paper's input for its ▲FLOPs: the mean resized area of the first 100 COCO val2017 images
#: (annotation order; shorter side 800, longer at most 1333): 902,195 pixels = 800 x 1127.7,
#: 0.846 of a full 800 x 1333 (:func:`pipeline.ablations.mean_resized_area` recomputes it;
#: tests/test_ablations.py checks it against ../shared/data/coco).
PAPER_IMAGE_SIZE = (800, 1128)
#: A full-size image (the upper bound of the resize), ``params --image-size 800x1333``.
FULL_IMAGE_SIZE = (800, 1333)
#: Boxes per image of the paper's ▲FLOPs, by detector (default 100).
PAPER_NUM_BOXES = {"dino-focalnet": 300}


def paper_num_boxes(detector: str | None) -> int:
    """Boxes per image the paper's ▲FLOPs count for a detector's table: 300 for DINO-FocalNet-L
    (Table 16), 100 otherwise (H-DETR, Tables 1-14)."""
    name = (detector or "").partition(":")[0]
    return PAPER_NUM_BOXES.get(name, 100)


@torch.no_grad()
def head_cost(cfg: HeadConfig, spatial_shapes: torch.Tensor | None, c1_size: tuple[int, int] | None,
              image_size: tuple[int, int] = PAPER_IMAGE_SIZE, num_boxes: int = 100, flops: bool = True,
              seed: int = 0, convention: str = "paper") -> dict:
    """Parameters and FLOPs of the head ``cfg`` builds.

    Args:
        cfg: head config with its widths set.
        spatial_shapes: ``[L, 2]`` int64 ``(H_l, W_l)`` of the cached encoder levels for an image
            of ``image_size`` (from the detector's ``feature_shapes``), finest first; None only
            with ``flops=False``.
        c1_size: ``(H1, W1)`` of the C1 map for that image.
        image_size: ``(h, w)`` pixels of the resized image.
        num_boxes: boxes (queries) per image (:func:`paper_num_boxes`).
        flops: also count FLOPs (runs one forward on random inputs; seconds on a CPU).
        seed: seed of the random inputs (FLOPs do not depend on values).
        convention: :data:`pipeline.flops.CONVENTIONS` (``"paper"``: deformable sampling counts 0).

    Returns:
        ``{"params": int, "params_delta_M": float, "modules": {name: params},
        "flops_delta_G": float | None, "flops_by_module_G": {name: float} | None (the head's
        components, plus ``"roi_align"``: RoIAlign and the channel mapper before it; without
        RoIAlign, Eq. 1, the mapper on F is ``"channel_mapper"`` and the dot products ``"mask_head"``),
        "num_boxes", "image_size", "spatial_shapes", "c1_size"}``.

    Raises:
        ValueError: widths not set, or ``spatial_shapes`` with another level count than the config.
    """
    head = MaskFrozenDetrHead(cfg).eval()
    n = count_parameters(head)
    out = {"params": n, "params_delta_M": n / 1e6, "modules": dict(parameter_table(head)),
           "flops_delta_G": None, "flops_by_module_G": None, "num_boxes": num_boxes, "image_size": list(image_size),
           "flops_convention": convention,
           "spatial_shapes": None if spatial_shapes is None else spatial_shapes.tolist(),
           "c1_size": None if c1_size is None else list(c1_size)}
    if not flops:
        return out
    if spatial_shapes.shape[0] != cfg.num_feature_levels:
        raise ValueError(f"{spatial_shapes.shape[0]} levels given, the head has num_feature_levels={cfg.num_feature_levels}")
    g = torch.Generator().manual_seed(seed)
    shapes = spatial_shapes.to(torch.int64)
    start = torch.cat((shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]))
    tokens = torch.randn(int(shapes.prod(1).sum()), cfg.hidden_dim, generator=g)
    c1 = torch.randn(cfg.c1_channels, *c1_size, generator=g)
    queries = torch.randn(num_boxes, cfg.hidden_dim, generator=g)
    boxes = torch.cat((0.2 + 0.6 * torch.rand(num_boxes, 2, generator=g),
                       0.05 + 0.3 * torch.rand(num_boxes, 2, generator=g)), 1)
    def forward():
        feat = head.encode_image(tokens, shapes, start, c1)
        head([feat], queries, boxes, torch.tensor([list(image_size)], dtype=torch.float32),
             torch.zeros(num_boxes, dtype=torch.int64))

    total, per = flop_counts(forward, depth=2, impl="auto", convention=convention)
    out["flops_delta_G"] = total
    # encode_image calls image_encoder / neck directly (they appear under their class names); the
    # head's forward calls box_encoder.layers[i] / query_encoder[i] directly, so a component's
    # count is the sum of its outermost counted sub-paths
    top = {"ImageEncoder": "image_encoder", "Neck": "neck"}
    head_name = type(head).__name__
    by_module: dict[str, float] = {}
    for name, gflops in per.items():
        parts = name.split(".")
        if len(parts) == 1 and parts[0] in top:
            by_module[top[parts[0]]] = gflops
        elif len(parts) >= 2 and parts[0] == head_name:
            if any(".".join(parts[:i]) in per for i in range(2, len(parts))):
                continue  # counted in an enclosing path
            by_module[parts[1]] = by_module.get(parts[1], 0.0) + gflops
    out["flops_by_module_G"] = {k: by_module[k] for k in head.COMPONENTS if by_module.get(k)}
    # what the head's forward runs itself: RoIAlign (and the channel mapper, applied before it), or
    # without RoIAlign the channel mapper on F only
    inside = per.get(head_name, 0.0) - sum(v for k, v in by_module.items() if k not in top.values())
    if inside > 1e-9:
        out["flops_by_module_G"]["roi_align" if cfg.roi_align else "channel_mapper"] = inside
    return out
