"""Hungarian matching of detector predictions to ground truth (DINO's ``HungarianMatcher``).

Used in stage two to decide which frozen-detector query (and box) is trained against which
ground-truth mask.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher:
    """One-to-one assignment minimising DINO's matching cost.

    ``C = cost_class * C_focal + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU)``, with the focal
    classification cost ``alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))`` of the
    ground-truth class, solved by ``scipy.optimize.linear_sum_assignment`` (DETR / Deformable
    DETR / DINO ``models/.../matcher.py``).

    Args:
        cost_class, cost_bbox, cost_giou: weights (DINO: 2.0, 5.0, 2.0).
        focal_alpha, focal_gamma: focal-cost parameters (0.25, 2.0).
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matcher costs are 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def cost_matrix(self, logits: Tensor, boxes: Tensor, gt_labels: Tensor, gt_boxes: Tensor) -> Tensor:
        """Matching cost of every prediction/ground-truth pair, ``[K, G]`` float (see class doc)."""
        logits, boxes, gt_boxes = logits.float(), boxes.float(), gt_boxes.float()
        prob = logits.sigmoid()
        a, g = self.focal_alpha, self.focal_gamma
        neg = (1 - a) * prob.pow(g) * (-(1 - prob + 1e-8).log())
        pos = a * (1 - prob).pow(g) * (-(prob + 1e-8).log())
        cost_class = pos[:, gt_labels] - neg[:, gt_labels]
        cost_bbox = torch.cdist(boxes, gt_boxes, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(gt_boxes))
        return self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou

    @torch.no_grad()
    def match(self, logits: Tensor, boxes: Tensor, gt_labels: Tensor, gt_boxes: Tensor) -> tuple[Tensor, Tensor]:
        """Match the K predictions of ONE image to its G ground-truth objects.

        Args:
            logits: ``[K, C]`` pre-sigmoid class logits (column = logit index; raw COCO id for DINO).
            boxes: ``[K, 4]`` predicted boxes, cxcywh normalized.
            gt_labels: ``[G]`` int64 logit column of each ground-truth object.
            gt_boxes: ``[G, 4]`` cxcywh normalized.

        Returns:
            ``(pred_idx [g], gt_idx [g])`` int64 on CPU, ``g = min(K, G)``, sorted by ``pred_idx``;
            empty when K or G is 0.

        Raises:
            ValueError: on shape mismatches, a label outside ``[0, C)``, or a non-finite cost
                (e.g. NaN boxes).
        """
        k, c = logits.shape
        gcount = gt_labels.shape[0]
        if boxes.shape != (k, 4) or gt_boxes.shape != (gcount, 4):
            raise ValueError(f"boxes {tuple(boxes.shape)} / gt_boxes {tuple(gt_boxes.shape)} must be "
                             f"[K={k}, 4] / [G={gcount}, 4]")
        empty = torch.zeros(0, dtype=torch.int64)
        if k == 0 or gcount == 0:
            return empty, empty.clone()
        if int(gt_labels.min()) < 0 or int(gt_labels.max()) >= c:
            raise ValueError(f"gt_labels must lie in [0, {c}), got [{int(gt_labels.min())}, {int(gt_labels.max())}]")
        if not (torch.isfinite(boxes).all() and torch.isfinite(gt_boxes).all() and torch.isfinite(logits).all()):
            raise ValueError("non-finite logits or boxes (NaN/inf) given to the matcher")
        cost = self.cost_matrix(logits, boxes, gt_labels.to(logits.device), gt_boxes.to(boxes.device)).cpu()
        if not torch.isfinite(cost).all():
            raise ValueError("matching cost has non-finite entries (check boxes for NaN/inf)")
        rows, cols = linear_sum_assignment(cost.numpy())
        return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)

    __call__ = match
