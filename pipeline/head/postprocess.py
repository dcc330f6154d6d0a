"""Turn one image's detector outputs + head outputs into ranked instance candidates (Eq. 13)."""

from __future__ import annotations

import torch
from torch import Tensor


def mask_mean_score(mask_logits: Tensor, threshold: float = 0.5) -> Tensor:
    """Eq. 2's mask quality: mean of the mask probabilities above ``threshold`` (0 if none).

    Args:
        mask_logits: ``[K, R, R]`` pre-sigmoid.

    Returns:
        ``[K]`` in ``[threshold, 1]`` or 0, dtype of ``mask_logits``.
    """
    probs = mask_logits.sigmoid().flatten(1)
    above = probs > threshold
    return (probs * above).sum(1) / above.sum(1).clamp(min=1)


def postprocess(logits: Tensor, boxes: Tensor, mask_logits: Tensor, iou_pred: Tensor | None,
                column_to_contiguous: Tensor, top_n: int = 100, num_candidates: int | None = None,
                score: str | None = None) -> dict[str, Tensor]:
    """Rank (query, class) pairs of ONE image by mask-aware score and keep the best ``top_n``.

    Candidates are all (query, class) pairs over the real logit columns
    (``column_to_contiguous >= 0``), ranked by sigmoid class score ``c``; with ``num_candidates``
    only the best ``max(top_n, num_candidates)`` by ``c`` are kept before rescoring (None = all,
    exact). Final score ``s = c * iou[class]`` (Eq. 13; the IoU prediction clamped to [0, 1]),
    or ``c`` without mask scoring. ``score="mask_mean"`` gives ``s = c * mean(M[M > 0.5])``
    instead (Eq. 2, the training-free baseline), ``score="class"`` ``s = c``; None = ``"iou"``
    when ``iou_pred`` is given, else ``"class"``. Sorting is stable and descending: ties keep query-major,
    column-minor order, so the result is deterministic.

    Args:
        logits: ``[K, C]`` pre-sigmoid class logits (C = 91 for DINO; column = COCO category id).
        boxes: ``[K, 4]`` cxcywh normalized.
        mask_logits: ``[K, R, R]`` head mask logits (box frame; ``[K, H1, W1]`` at F's grid for a
            head without RoIAlign, any size works).
        iou_pred: ``[K, num_score_classes]`` head IoU prediction (contiguous class index) or None.
        column_to_contiguous: ``[C]`` int64, contiguous class of each column, -1 for dummy columns.
        top_n: detections to keep.
        num_candidates: optional pre-selection size by class score.

    Returns:
        dict with ``scores [n]`` (final), ``class_scores [n]``, ``iou_scores [n]`` (ones without
        scoring), ``labels [n]`` int64 logit column (= category id for DINO), ``contiguous [n]``
        int64, ``query_index [n]`` int64 row into the inputs, ``boxes [n, 4]`` cxcywh normalized,
        ``mask_probs [n, R, R]`` sigmoid of the mask logits; ``n = min(top_n, #candidates)``.
        ``iou_scores`` holds the mask-quality factor of the score (predicted IoU, Eq. 2's mean, or ones).

    Raises:
        ValueError: on inconsistent shapes, a contiguous index outside ``iou_pred``'s columns, or
            ``score="iou"`` without ``iou_pred``.
    """
    score = score or ("iou" if iou_pred is not None else "class")
    if score not in ("iou", "class", "mask_mean"):
        raise ValueError(f"score must be 'iou', 'class' or 'mask_mean', got {score!r}")
    if score == "iou" and iou_pred is None:
        raise ValueError("score='iou' needs iou_pred (a head with mask scoring)")
    k, c = logits.shape
    if boxes.shape != (k, 4) or mask_logits.shape[0] != k or column_to_contiguous.shape != (c,):
        raise ValueError(f"logits {tuple(logits.shape)}, boxes {tuple(boxes.shape)}, mask_logits "
                         f"{tuple(mask_logits.shape)}, column_to_contiguous "
                         f"{tuple(column_to_contiguous.shape)} disagree")
    device = logits.device
    column_to_contiguous = column_to_contiguous.to(device)
    columns = torch.nonzero(column_to_contiguous >= 0).flatten()
    contiguous = column_to_contiguous[columns]
    if iou_pred is not None:
        if iou_pred.shape[0] != k:
            raise ValueError(f"iou_pred has {iou_pred.shape[0]} rows, logits {k}")
        if columns.numel() and int(contiguous.max()) >= iou_pred.shape[1]:
            raise ValueError(f"column_to_contiguous reaches {int(contiguous.max())}, iou_pred has "
                             f"{iou_pred.shape[1]} columns")
    class_scores = logits[:, columns].sigmoid()  # [K, C']
    flat = class_scores.flatten()
    cand = torch.arange(flat.numel(), device=device)
    if num_candidates is not None and max(top_n, num_candidates) < flat.numel():
        order = torch.sort(flat, descending=True, stable=True).indices[: max(top_n, num_candidates)]
        cand = torch.sort(order).values  # back to query-major order so tie-breaking is unchanged
    qi = torch.div(cand, max(columns.numel(), 1), rounding_mode="floor")
    ci = cand % max(columns.numel(), 1)
    cls = flat[cand]
    if score == "iou":
        ious = iou_pred[qi, contiguous[ci]].to(cls.dtype).clamp(0.0, 1.0)
    elif score == "mask_mean":
        ious = mask_mean_score(mask_logits).to(cls.dtype)[qi]
    else:
        ious = torch.ones_like(cls)
    final = cls * ious
    keep = torch.sort(final, descending=True, stable=True).indices[:top_n]
    qi, ci = qi[keep], ci[keep]
    return {
        "scores": final[keep],
        "class_scores": cls[keep],
        "iou_scores": ious[keep],
        "labels": columns[ci],
        "contiguous": contiguous[ci],
        "query_index": qi,
        "boxes": boxes[qi],
        "mask_probs": mask_logits[qi].sigmoid(),
    }


class PostProcess:
    """Callable wrapper of :func:`postprocess` with the config's ``top_n`` and ``score`` (DETR's
    ``PostProcess`` role); built by :func:`pipeline.head.build_head` from the head config."""

    def __init__(self, top_n: int = 100, num_candidates: int | None = None, score: str | None = None):
        self.top_n, self.num_candidates, self.score = top_n, num_candidates, score

    @torch.no_grad()
    def __call__(self, logits: Tensor, boxes: Tensor, mask_logits: Tensor, iou_pred: Tensor | None,
                 column_to_contiguous: Tensor, top_n: int | None = None) -> dict[str, Tensor]:
        """See :func:`postprocess`; ``top_n`` defaults to the configured one."""
        return postprocess(logits, boxes, mask_logits, iou_pred, column_to_contiguous,
                           self.top_n if top_n is None else top_n, self.num_candidates, self.score)
