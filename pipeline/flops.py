"""FLOPs of one call, counted by ``torch.utils.flop_counter.FlopCounterMode`` (the paper's ▲FLOPs convention).

The paper, like fvcore, counts one multiply-add as one FLOP; ``FlopCounterMode`` counts two, so
the result is its total / 2. Operators it has no formula for (RoIAlign, grid sampling inside
deformable attention, normalisations, element-wise ops) count 0, and so would the compiled
deformable-attention kernels: the call runs on the pure-PyTorch reference kernel.
"""

from __future__ import annotations

from typing import Callable

from torch.utils.flop_counter import FlopCounterMode


def flop_counts(fn: Callable[[], object], depth: int = 2) -> tuple[float, dict[str, float]]:
    """GFLOPs of ``fn()`` in total and per module, run once under the reference kernel.

    Args:
        fn: a closure running the computation to count (e.g. one head forward on one image).
        depth: module nesting depth of the per-module counts (``FlopCounterMode``'s ``depth``).

    Returns:
        ``(total, {module path: GFLOPs})``, multiply-adds / 1e9; module paths as
        ``FlopCounterMode`` names them (``"Global"`` = the total, ``"<Class>.<child>"`` below it).
    """
    from kernels import ops as kernel_ops

    previous = kernel_ops.set_impl("reference")
    try:
        counter = FlopCounterMode(display=False, depth=depth)
        with counter:
            fn()
    finally:
        kernel_ops.set_impl(previous)
    per = {name: sum(counts.values()) / 2 / 1e9 for name, counts in counter.get_flop_counts().items()}
    return counter.get_total_flops() / 2 / 1e9, per


def count_gflops(fn: Callable[[], object]) -> float:
    """Total GFLOPs (multiply-adds / 1e9) of ``fn()``, run once under the reference kernel (:func:`flop_counts`)."""
    return flop_counts(fn)[0]
