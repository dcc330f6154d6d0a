"""Matching of cached predictions to the ground truth, and the mask targets of the matched pairs.

The one place stage two pairs detector queries with ground-truth objects: training
(:func:`training_targets`) and ``--boxes gt`` evaluation (:func:`match_image` in
:mod:`pipeline.inference`) call the same function with the config's matcher
(:func:`pipeline.head.build_matcher`, DINO's Hungarian matcher with ``head.cost_*``).
"""

from __future__ import annotations

import dataclasses

import torch

from .batches import to_xyxy_pixels
from .head import mask_targets_in_boxes
from .head.model import mask_frame_boxes, mask_grid_size, pad_mask_grids
from .record import SampleRecord


QUERY_KEYS = ("queries", "logits", "boxes", "query_index")


def limit_queries(items: list[SampleRecord], num_queries: int | None) -> list[SampleRecord]:
    """Keep the first ``num_queries`` cached queries of each sample (``train.num_queries``).

    The cache stores queries by descending class score, so these are the best-scored ones.
    ``None`` returns ``items`` unchanged; otherwise shallow copies with ``queries``, ``logits``,
    ``boxes`` and ``query_index`` cut to ``[:num_queries]``.
    """
    if num_queries is None:
        return items
    return [dataclasses.replace(it, **{k: getattr(it, k)[:num_queries] for k in QUERY_KEYS}) for it in items]


def match_image(matcher, item: SampleRecord, column_of: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Hungarian matching of one image's cached predictions to its non-crowd ground truth.

    Args:
        matcher: a :class:`pipeline.head.HungarianMatcher` (the config's costs).
        item: a cached sample with ``logits [K, C]``, ``boxes [K, 4]`` cxcywh normalized and
            ``gt`` (:func:`pipeline.batches.ground_truth`).
        column_of: ``{category_id: logit column}`` (:func:`pipeline.batches.category_maps`).

    Returns:
        ``(query_idx [g], gt_idx [g])`` int64 on CPU, ``g = min(K, G)``, sorted by ``query_idx``.
    """
    gt = item.gt
    labels = torch.as_tensor([column_of[int(c)] for c in gt["category_ids"].tolist()], dtype=torch.int64)
    return matcher.match(item.logits.float(), item.boxes.float(), labels, gt["boxes_cxcywh"])


def training_targets(items: list[SampleRecord], matcher, maps: dict, boxes_mode: str, head_cfg):
    """Queries, boxes and mask targets of the matched (query, object) pairs of a batch.

    Args:
        items: cached samples with ``gt``.
        matcher: the config's matcher; maps: :func:`pipeline.batches.category_maps`.
        boxes_mode: ``"pred"`` (the matched query's predicted box) or ``"gt"`` (the object's box).
        head_cfg: the :class:`pipeline.head.HeadConfig`: targets are resampled into the boxes the
            head's masks span (:func:`pipeline.head.model.mask_frame_boxes`) at
            :func:`pipeline.head.model.mask_grid_size`: ``target_size`` square with RoIAlign;
            without it (``roi_align`` False, Eq. 1) the whole image at F's grid, C1's ``(H1, W1)``.

    Returns:
        None when no image has an object, else a dict: ``queries [M, D]``, ``boxes [M, 4]``
        cxcywh normalized, ``batch_index [M]``, ``masks`` float targets in ``[0, 1]`` in the box
        frame (``[M, T, T]``; without RoIAlign ``[M, max H1, max W1]``, each image's grid at the
        top-left, 0 elsewhere: :func:`pipeline.head.model.pad_mask_grids`), ``mask_sizes [M, 2]``
        int64 ``(rows, cols)`` of each target's grid, ``labels [M]`` contiguous class index.
    """
    queries, boxes, bidx, masks, labels = [], [], [], [], []
    for b, it in enumerate(items):
        gt = it.gt
        if gt["category_ids"].numel() == 0:
            continue
        q_idx, g_idx = match_image(matcher, it, maps["column_of"])
        sel = it.boxes.float()[q_idx] if boxes_mode == "pred" else gt["boxes_cxcywh"][g_idx]
        h, w = it.orig_size
        queries.append(it.queries.float()[q_idx])
        boxes.append(sel)
        bidx.append(torch.full((len(q_idx),), b, dtype=torch.int64))
        frame = to_xyxy_pixels(mask_frame_boxes(head_cfg, sel), h, w)
        masks.append(mask_targets_in_boxes(gt["masks"][g_idx], frame, mask_grid_size(head_cfg, it.c1.shape[-2:])))
        labels.append(torch.as_tensor([maps["contiguous_of"][int(c)] for c in gt["category_ids"][g_idx].tolist()],
                                      dtype=torch.int64))
    if not queries:
        return None
    masks, sizes = pad_mask_grids(masks, value=0.0)
    return {"queries": torch.cat(queries), "boxes": torch.cat(boxes), "batch_index": torch.cat(bidx),
            "masks": masks, "mask_sizes": sizes, "labels": torch.cat(labels)}
