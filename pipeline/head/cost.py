"""▲#params and ▲FLOPs of a head (the paper's cost columns), from its config and input shapes.

Counting conventions (``shared/papers/params-reconstruction.md``):

- ▲#params: trainable head parameters (the frozen detector adds 0), per component as
  :func:`pipeline.head.model.parameter_table`.
- ▲FLOPs: one forward of the head over one image with ``num_boxes`` boxes, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention). The paper,
  like fvcore, counts one multiply-add as one FLOP; ``FlopCounterMode`` counts two, so
  ``flops_G`` is its count / 2 / 1e9. Operators FlopCounterMode has no formula for (RoIAlign,
  grid sampling inside deformable attention, normalisations, element-wise ops) count 0; so do
  the custom deformable-attention kernels, so the count runs on the pure-PyTorch reference.
"""

from __future__ import annotations

import torch

from ..flops import flop_counts
from .config import HeadConfig
from .model import MaskFrozenDetrHead, count_parameters, parameter_table

#: The paper's input size for its cost columns: the test-time resize of Deformable DETR
#: (shorter side 800, longer side at most 1333), taken as a full 800 x 1333 image.
PAPER_INPUT_SIZE = (800, 1333)


@torch.no_grad()
def head_cost(cfg: HeadConfig, spatial_shapes: torch.Tensor | None, c1_size: tuple[int, int] | None,
              image_size: tuple[int, int] = PAPER_INPUT_SIZE, num_boxes: int = 100, flops: bool = True,
              seed: int = 0) -> dict:
    """Parameters and FLOPs of the head ``cfg`` builds.

    Args:
        cfg: head config with its widths set.
        spatial_shapes: ``[L, 2]`` int64 ``(H_l, W_l)`` of the cached encoder levels for an image
            of ``image_size`` (from the detector's ``feature_shapes``), finest first; None only
            with ``flops=False``.
        c1_size: ``(H1, W1)`` of the C1 map for that image.
        image_size: ``(h, w)`` pixels of the resized image.
        num_boxes: boxes (queries) per image (100: the paper's top ~100).
        flops: also count FLOPs (runs one forward on random inputs; seconds on a CPU).
        seed: seed of the random inputs (FLOPs do not depend on values).

    Returns:
        ``{"params": int, "params_delta_M": float, "modules": {name: params},
        "flops_delta_G": float | None, "flops_by_module_G": {name: float} | None,
        "num_boxes", "image_size", "spatial_shapes", "c1_size"}``.

    Raises:
        ValueError: widths not set, or ``spatial_shapes`` with another level count than the config.
    """
    head = MaskFrozenDetrHead(cfg).eval()
    n = count_parameters(head)
    out = {"params": n, "params_delta_M": n / 1e6, "modules": dict(parameter_table(head)),
           "flops_delta_G": None, "flops_by_module_G": None, "num_boxes": num_boxes, "image_size": list(image_size),
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

    total, per = flop_counts(forward, depth=1)
    out["flops_delta_G"] = total
    # encode_image calls image_encoder / neck directly (they appear under their class names)
    top = {"ImageEncoder": "image_encoder", "Neck": "neck"}
    by_module = {}
    for name, gflops in per.items():
        parts = name.split(".")
        if len(parts) == 1 and parts[0] in top:
            by_module[top[parts[0]]] = gflops
        elif len(parts) == 2 and parts[0] == type(head).__name__:
            by_module[parts[1]] = gflops
    out["flops_by_module_G"] = {k: by_module[k] for k in head.COMPONENTS if by_module.get(k)}
    return out
