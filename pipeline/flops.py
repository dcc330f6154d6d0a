"""FLOPs of one call, counted by ``torch.utils.flop_counter.FlopCounterMode`` (the paper's ▲FLOPs convention).

The paper, like fvcore, counts one multiply-add as one FLOP; ``FlopCounterMode`` counts two, so
the result is its total / 2. Operators it has no formula for (RoIAlign, grid sampling inside
deformable attention, normalisations, element-wise ops) count 0, and so would the compiled
deformable-attention kernels: the call runs on the pure-PyTorch reference kernel.
"""

from __future__ import annotations

from typing import Callable

from torch.utils.flop_counter import FlopCounterMode


def count_gflops(fn: Callable[[], object]) -> float:
    """GFLOPs (multiply-adds / 1e9) of ``fn()``, run once under the reference kernel.

    Args:
        fn: a closure running the computation to count (e.g. one head forward on one image).

    Returns:
        multiply-adds / 1e9 as a float.
    """
    from kernels import ops as kernel_ops

    previous = kernel_ops.set_impl("reference")
    try:
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
    finally:
        kernel_ops.set_impl(previous)
    return counter.get_total_flops() / 2 / 1e9
