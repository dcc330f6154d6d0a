"""Pure-PyTorch reference implementations of the custom ops (the supported CPU path).

Each function here is the semantic definition its compiled kernels are tested against.
Nothing in ``kernels/`` imports from ``pipeline/``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention core (Deformable DETR, Zhu et al. 2020, Eq. 3).

    Matches ``ms_deform_attn_core_pytorch`` of the official Deformable-DETR / DINO code:
    bilinear sampling with ``F.grid_sample(align_corners=False, padding_mode='zeros')`` on
    the grid ``2 * loc - 1``, then a weighted sum over levels and points.

    Args:
        value: ``[N, S, M, Dh]`` per-head values of the flattened multi-scale map
            (S = sum over levels of ``H_l * W_l``; M heads of ``Dh`` channels).
        spatial_shapes: ``[L, 2]`` int64 ``(H_l, W_l)`` of each level, in the order the levels
            are concatenated in ``value``.
        sampling_locations: ``[N, Lq, M, L, P, 2]`` ``(x, y)`` normalized to ``[0, 1]`` of each
            level (0 = left/top edge of the first pixel, 1 = right/bottom edge of the last).
        attention_weights: ``[N, Lq, M, L, P]`` weights (softmax-ed over ``L*P`` by the caller).

    Returns:
        ``[N, Lq, M * Dh]`` same dtype as ``value``.

    Raises:
        ValueError: if the shapes disagree (the message names the argument).
    """
    if value.dim() != 4:
        raise ValueError(f"value must be [N, S, M, Dh], got shape {tuple(value.shape)}")
    n, s, m, dh = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"sampling_locations must be [N, Lq, M, L, P, 2], got {tuple(sampling_locations.shape)}"
        )
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(
            f"attention_weights shape {tuple(attention_weights.shape)} != "
            f"sampling_locations.shape[:-1] {tuple(sampling_locations.shape[:-1])}"
        )
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    if len(sizes) != num_levels or sum(sizes) != s:
        raise ValueError(
            f"spatial_shapes {spatial_shapes.tolist()} do not match value tokens S={s} "
            f"and L={num_levels} sampling levels"
        )
    if lq == 0 or n == 0:
        return value.new_zeros((n, lq, m * dh))
    grids = sampling_locations * 2 - 1  # grid_sample coordinates in [-1, 1]
    out = None
    for lvl, (level_value, (h, w)) in enumerate(zip(value.split(sizes, dim=1), spatial_shapes.tolist())):
        # [N, H*W, M, Dh] -> [N*M, Dh, H, W]
        level_value = level_value.permute(0, 2, 3, 1).reshape(n * m, dh, int(h), int(w))
        # [N, Lq, M, P, 2] -> [N*M, Lq, P, 2]
        grid = grids[:, :, :, lvl].transpose(1, 2).reshape(n * m, lq, num_points, 2)
        sampled = F.grid_sample(level_value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # weighted sum over the P points as a batched matmul: [N*M, Lq, Dh, P] @ [N*M, Lq, P, 1]
        weights = attention_weights[:, :, :, lvl].transpose(1, 2).reshape(n * m, lq, num_points, 1)
        part = torch.matmul(sampled.permute(0, 2, 1, 3), weights)[..., 0]  # [N*M, Lq, Dh]
        out = part if out is None else out + part
    return out.view(n, m, lq, dh).permute(0, 2, 1, 3).reshape(n, lq, m * dh)


def fused_roi_align(
    c1: Tensor,
    e: Tensor,
    boxes: Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
) -> Tensor:
    """RoIAlign of ``F = c1 + interpolate(e)``, materialising F (the definition the fused kernels match).

    ``torchvision.ops.roi_align(c1 + F.interpolate(e, size=c1.shape[-2:], mode="bilinear",
    align_corners=False), boxes, output_size, spatial_scale, sampling_ratio, aligned=True)``
    (Mask Frozen-DETR Eq. 3 and 5: the head pools F = Neck(C1) + interpolate(ImageEncoder(E))).

    Args:
        c1: ``Tensor[B, C, H, W]`` the stride-4 map.
        e: ``Tensor[B, C, He, We]`` the coarser map, bilinearly resized to ``(H, W)``.
        boxes: ``Tensor[K, 5]`` ``(batch index, x1, y1, x2, y2)``, xyxy in the input pixel
            coordinates that ``spatial_scale`` maps to c1's pixels; ``aligned=True``: pixel
            centres at half-integers of those coordinates.
        output_size: ``R`` or ``(PH, PW)``.
        spatial_scale: box coordinates -> c1 pixels.
        sampling_ratio: samples per bin side; ``<= 0`` = adaptive ``ceil(box size / output size)``.

    Returns:
        ``Tensor[K, C, PH, PW]`` in c1's dtype.
    """
    from torchvision.ops import roi_align

    fused = c1 + F.interpolate(e, size=c1.shape[-2:], mode="bilinear", align_corners=False)
    return roi_align(fused, boxes, output_size, spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
                     aligned=True)
