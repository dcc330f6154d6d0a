"""Label efficiency: train the head on the masks of a seeded subset of the cached images.

A reviewer of the paper asked how the head fares with fewer mask labels. ``train-head
--mask-fraction F`` keeps the whole cache (nothing is re-extracted) and trains on the masks of
``max(1, round(F * N))`` of its N trainable images, drawn with the run's seed; evaluation is
unchanged.
"""

from __future__ import annotations

import torch


def check_mask_fraction(fraction: float, where: str = "--mask-fraction") -> float:
    """Return ``fraction`` as a float if it lies in (0, 1].

    Raises:
        ValueError: ``fraction`` is not a number in (0, 1] (the message names ``where``).
    """
    try:
        f = float(fraction)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected a number in (0, 1], got {fraction!r}") from None
    if not 0.0 < f <= 1.0:  # NaN fails this too
        raise ValueError(f"{where}: the fraction of images whose masks train must be in (0, 1], got {fraction!r}")
    return f


def mask_subset(indices: list[int], fraction: float, seed: int) -> list[int]:
    """The store indices whose masks train: a seeded subset of ``indices`` in store order.

    Args:
        indices: trainable store indices (completely extracted images with non-crowd objects).
        fraction: in (0, 1]; 1 keeps every index.
        seed: the training seed (``train.seed``); the same seed gives the same subset.

    Returns:
        ``max(1, round(fraction * len(indices)))`` indices (all of them when ``fraction == 1``),
        sorted, drawn by ``torch.randperm`` with a generator seeded ``seed``.

    Raises:
        ValueError: ``fraction`` outside (0, 1].
    """
    fraction = check_mask_fraction(fraction, "train.mask_fraction")
    if fraction == 1.0 or not indices:
        return list(indices)
    n = max(1, int(round(fraction * len(indices))))
    order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(int(seed))).tolist()
    return sorted(indices[k] for k in order[:n])
