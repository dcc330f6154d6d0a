"""FLOPs of one call, counted by ``torch.utils.flop_counter.FlopCounterMode`` (the paper's ▲FLOPs convention).

The paper, like fvcore, counts one multiply-add as one FLOP; ``FlopCounterMode`` counts two, so
the result is its total / 2. ``FlopCounterMode`` has formulas for matmuls, convolutions and
attention only; this module registers formulas (:func:`register_sampling_formulas`, done on
import) for the sampling operators the head runs, so none of them counts 0:

- ``aten.grid_sampler_2d`` (bilinear): 4 multiply-adds per output element (the 4 taps of a
  bilinear interpolation). fvcore's ``grid_sampler`` handle counts the same 4 per output element.
- ``torchvision.roi_align`` and ``mfdetr.fused_roi_align`` (:func:`kernels.ops.fused_roi_align`):
  per output element ``s_h * s_w`` bilinear samples of 4 multiply-adds each, plus one
  multiply-add per sample for the bin average (Mask R-CNN's RoIAlign, He et al. 2017, Sec. 3:
  "bilinear interpolation at four regularly sampled locations in each bin" and their average).
  ``s`` is ``sampling_ratio``, or for ``sampling_ratio <= 0`` the adaptive
  ``ceil(box side / output side)`` of each box (torchvision's rule), summed over the boxes. The
  fused op's ``c1 + interpolate(e)`` is element-wise and counts 0, as in its reference.
- ``mfdetr.ms_deform_attn`` (:func:`kernels.ops.ms_deform_attn`, Deformable DETR Eq. 3): per
  output element, ``L * P`` bilinear samples (4 multiply-adds each) and ``L * P`` multiply-adds
  for the attention-weighted sum. The pure-PyTorch reference (``grid_sample`` + a matmul with the
  weights) counts exactly the same, so the count does not depend on the kernel that runs.

Element-wise operators, normalisations, softmax and interpolation still count 0 (the detectron2
``flop_count_operators`` convention the DETR family reports: it ignores element-wise ops).

Two conventions (:data:`CONVENTIONS`):

- ``"paper"`` (default): what the paper's counter saw. The official Deformable-DETR/H-DETR code
  runs deformable attention as a custom CUDA autograd function, which fvcore/detectron2's
  tracer cannot see, so it counts 0 (``mfdetr.ms_deform_attn`` and the ``grid_sampler_2d`` of its
  reference count 0 here). With that, Tables 2-16 are matched within 3 % (README); counting the
  sampling puts every deformable layer ~2.6 % above the paper. RoIAlign is counted (Table 1's
  RoIAlign-on rows, 0.53 / 0.54 G, are almost all RoIAlign: the dot products are 0.03 G).
- ``"all"``: every formula above (the physical multiply-adds, kernel-independent).

Under ``"paper"`` the count is kernel-independent when the compiled ``mfdetr`` kernels are built
(:func:`flop_counts` runs them); on the pure-PyTorch reference the weighted sum of the sampled
values is an ordinary matmul and adds 1 multiply-add per sample and channel (~0.5 % of a
deformable layer).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

#: multiply-adds per bilinear sample (4 taps) and per accumulated sample (bin average / attention weight)
BILINEAR_MACS = 4
ACCUMULATE_MACS = 1


def _prod(shape) -> int:
    return int(math.prod(int(v) for v in shape))


def grid_sampler_flops(input_shape, grid_shape, *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode units (2 per multiply-add) of ``aten.grid_sampler_2d``: 4 multiply-adds per
    output element ``[N, C, H_out, W_out]`` (bilinear; nearest would be fewer, counted the same)."""
    return 2 * BILINEAR_MACS * _prod(out_shape)


def _roi_samples_per_bin(boxes: torch.Tensor, pooled_height: int, pooled_width: int, spatial_scale: float,
                         sampling_ratio: int, aligned: bool) -> int:
    """Bilinear samples summed over the boxes' bins: ``K * PH * PW * s_h * s_w`` (torchvision's
    RoIAlign rule; adaptive ``s = ceil(roi side / pooled side)`` when ``sampling_ratio <= 0``)."""
    k = int(boxes.shape[0])
    if sampling_ratio > 0:
        return k * pooled_height * pooled_width * sampling_ratio * sampling_ratio
    b = boxes.detach().to("cpu", torch.float64)
    offset = 0.5 if aligned else 0.0
    w = b[:, 3] * spatial_scale - offset - (b[:, 1] * spatial_scale - offset)
    h = b[:, 4] * spatial_scale - offset - (b[:, 2] * spatial_scale - offset)
    if not aligned:
        w, h = w.clamp(min=1.0), h.clamp(min=1.0)
    s_w = torch.ceil(w / pooled_width).clamp(min=1)
    s_h = torch.ceil(h / pooled_height).clamp(min=1)
    return int((s_h * s_w).sum()) * pooled_height * pooled_width


def _roi_flops(out, samples: int) -> int:
    channels = int(out.shape[1])
    return 2 * (BILINEAR_MACS + ACCUMULATE_MACS) * samples * channels


def roi_align_flops(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, *args,
                    out_val=None, **kwargs) -> int:
    """FlopCounterMode units of ``torchvision.roi_align`` (raw arguments: the adaptive sampling
    ratio depends on the boxes): 5 multiply-adds per bilinear sample per channel."""
    return _roi_flops(out_val, _roi_samples_per_bin(rois, int(pooled_height), int(pooled_width),
                                                   float(spatial_scale), int(sampling_ratio), bool(aligned)))


def fused_roi_align_flops(c1, e, boxes, pooled_height, pooled_width, spatial_scale, sampling_ratio, *args,
                          out_val=None, **kwargs) -> int:
    """FlopCounterMode units of ``mfdetr.fused_roi_align`` (aligned RoIAlign of ``c1 + up(e)``):
    the same as :func:`roi_align_flops`; the element-wise sum counts 0 as in the reference."""
    return _roi_flops(out_val, _roi_samples_per_bin(boxes, int(pooled_height), int(pooled_width),
                                                   float(spatial_scale), int(sampling_ratio), True))


def ms_deform_attn_flops(value_shape, spatial_shapes_shape, level_start_index_shape, sampling_locations_shape,
                         attention_weights_shape, *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode units of ``mfdetr.ms_deform_attn``: output ``[N, Lq, M * Dh]``, sampling
    locations ``[N, Lq, M, L, P, 2]``: ``N * Lq * M * Dh * L * P * (4 + 1)`` multiply-adds."""
    n, lq, m, levels, points, _ = (int(v) for v in sampling_locations_shape)
    dh = int(value_shape[3])
    return 2 * (BILINEAR_MACS + ACCUMULATE_MACS) * n * lq * m * dh * levels * points


def register_sampling_formulas() -> list[str]:
    """Register the formulas above with ``torch.utils.flop_counter`` (idempotent).

    Returns:
        the operator names registered now or before (those whose library is loaded: the
        ``mfdetr`` ops only when ``kernels/_C`` is built, ``torchvision`` when installed).
    """
    import torchvision  # noqa: F401  (loads the torchvision:: operators)

    from kernels import ops as kernel_ops  # noqa: F401  (loads mfdetr:: when built)

    done = []
    wanted = [(lambda: torch.ops.aten.grid_sampler_2d, grid_sampler_flops, False),
              (lambda: torch.ops.torchvision.roi_align, roi_align_flops, True),
              (lambda: torch.ops.mfdetr.fused_roi_align, fused_roi_align_flops, True),
              (lambda: torch.ops.mfdetr.ms_deform_attn, ms_deform_attn_flops, False)]
    for get, formula, raw in wanted:
        try:
            packet = get()
        except (AttributeError, RuntimeError):
            continue  # library not loaded (no compiled kernels)
        if packet not in flop_registry:
            if raw:
                def wrapped(*args, out_val=None, _f=formula, **kwargs):
                    return _f(*args, out_val=out_val, **kwargs)
                register_flop_formula(packet, get_raw=True)(wrapped)
            else:
                register_flop_formula(packet)(formula)
        done.append(str(packet))
    return done


#: FLOP conventions of :func:`flop_counts` (see the module docstring).
CONVENTIONS = ("paper", "all")


def _zero(*args, **kwargs) -> int:
    return 0


def flop_counts(fn: Callable[[], object], depth: int = 2, impl: str = "auto",
                convention: str = "paper") -> tuple[float, dict[str, float]]:
    """GFLOPs of ``fn()`` in total and per module, run once with the sampling formulas registered.

    Args:
        fn: a closure running the computation to count (e.g. one head forward on one image).
        depth: module nesting depth of the per-module counts (``FlopCounterMode``'s ``depth``).
        impl: kernel implementation to run under (:func:`kernels.ops.set_impl`; ``"auto"`` = the
            compiled kernels when built); under ``convention="all"`` the count is the same for each.
        convention: ``"paper"`` (deformable sampling counts 0, as the paper's counter) or ``"all"``.

    Returns:
        ``(total, {module path: GFLOPs})``, multiply-adds / 1e9; module paths as
        ``FlopCounterMode`` names them (``"Global"`` = the total, ``"<Class>.<child>"`` below it).

    Raises:
        ValueError: unknown ``convention``.
    """
    from kernels import ops as kernel_ops

    if convention not in CONVENTIONS:
        raise ValueError(f"unknown FLOP convention {convention!r}; expected one of {CONVENTIONS}")
    register_sampling_formulas()
    custom = {}
    if convention == "paper":
        custom[torch.ops.aten.grid_sampler_2d] = _zero
        if hasattr(torch.ops.mfdetr, "ms_deform_attn"):
            custom[torch.ops.mfdetr.ms_deform_attn] = _zero
    previous = kernel_ops.set_impl(impl)
    try:
        counter = FlopCounterMode(display=False, depth=depth, custom_mapping=custom)
        with counter:
            fn()
    finally:
        kernel_ops.set_impl(previous)
    per = {name: sum(counts.values()) / 2 / 1e9 for name, counts in counter.get_flop_counts().items()}
    return counter.get_total_flops() / 2 / 1e9, per


def count_gflops(fn: Callable[[], object], convention: str = "paper") -> float:
    """Total GFLOPs (multiply-adds / 1e9) of ``fn()``, run once (:func:`flop_counts`)."""
    return flop_counts(fn, convention=convention)[0]
