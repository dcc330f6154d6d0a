"""Typed entry points of the custom ops, with an explicit choice of implementation.

Only the pure-PyTorch reference exists today (``impl="reference"``); compiled CPU/CUDA
kernels register here as further ``impl`` values and are tested against the reference.
The implementation is chosen explicitly, never by a silent ``try/except``.
"""

from __future__ import annotations

from torch import Tensor

from . import reference

MS_DEFORM_ATTN_IMPLS = ("reference",)


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    impl: str = "reference",
) -> Tensor:
    """Multi-scale deformable attention; see :func:`kernels.reference.ms_deform_attn`.

    Args:
        value: ``[N, S, M, Dh]``.
        spatial_shapes: ``[L, 2]`` int64 ``(H_l, W_l)``.
        level_start_index: ``[L]`` int64 start of each level in S (used by compiled kernels).
        sampling_locations: ``[N, Lq, M, L, P, 2]`` ``(x, y)`` in ``[0, 1]``.
        attention_weights: ``[N, Lq, M, L, P]``.
        impl: ``"reference"`` (pure PyTorch, any device and dtype, differentiable).

    Returns:
        ``[N, Lq, M * Dh]``.

    Raises:
        ValueError: unknown ``impl`` or inconsistent shapes.
    """
    if impl not in MS_DEFORM_ATTN_IMPLS:
        raise ValueError(f"impl must be one of {MS_DEFORM_ATTN_IMPLS}, got {impl!r}")
    if level_start_index.numel() != spatial_shapes.shape[0]:
        raise ValueError(
            f"level_start_index has {level_start_index.numel()} entries, "
            f"spatial_shapes has {spatial_shapes.shape[0]} levels"
        )
    return reference.ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights)
