"""Box conversions and (generalized) IoU used by the matcher and the head.

Same definitions as DETR's ``util/box_ops.py`` (GIoU: Rezatofighi et al. 2019).
"""

from __future__ import annotations

import torch
from torch import Tensor


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``[..., 4]`` ``(cx, cy, w, h)`` -> ``[..., 4]`` ``(x0, y0, x1, y1)`` in the same units."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), -1)


def box_area(boxes: Tensor) -> Tensor:
    """``[N, 4]`` xyxy -> ``[N]`` areas (units squared)."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of xyxy boxes.

    Args:
        boxes1: ``[N, 4]`` xyxy; boxes2: ``[M, 4]`` xyxy (same units).

    Returns:
        ``(iou [N, M], union [N, M])``.
    """
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union, union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU (DETR ``generalized_box_iou``).

    Args:
        boxes1: ``[N, 4]`` xyxy; boxes2: ``[M, 4]`` xyxy (same units).

    Returns:
        ``[N, M]`` GIoU in ``[-1, 1]``.

    Raises:
        ValueError: if a box has ``x1 < x0`` or ``y1 < y0`` (degenerate boxes give inf/nan).
    """
    if not (boxes1[:, 2:] >= boxes1[:, :2]).all():
        raise ValueError("boxes1 has boxes with x1 < x0 or y1 < y0")
    if not (boxes2[:, 2:] >= boxes2[:, :2]).all():
        raise ValueError("boxes2 has boxes with x1 < x0 or y1 < y0")
    iou, union = box_iou(boxes1, boxes2)
    lt = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    area = wh[..., 0] * wh[..., 1]
    return iou - (area - union) / area
