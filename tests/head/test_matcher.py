"""DINO's Hungarian matcher recovers a known assignment."""

import pytest
import torch

from pipeline.head import HungarianMatcher, build_matcher

from ._synthetic import random_boxes


@pytest.mark.parametrize("num_extra", [0, 20])
def test_matching_recovers_random_permutation(num_extra):
    g = torch.Generator().manual_seed(0)
    num_gt, num_classes = 12, 91
    gt_boxes = random_boxes(num_gt, seed=5)
    gt_labels = torch.randint(1, num_classes, (num_gt,), generator=g)
    perm = torch.randperm(num_gt, generator=g)  # prediction i is ground truth perm[i]
    boxes = (gt_boxes[perm] + 0.003 * torch.randn(num_gt, 4, generator=g)).clamp(0.01, 0.99)
    logits = torch.full((num_gt, num_classes), -4.0) + 0.3 * torch.randn(num_gt, num_classes, generator=g)
    logits[torch.arange(num_gt), gt_labels[perm]] = 3.0
    if num_extra:  # low-confidence random extra predictions
        boxes = torch.cat((boxes, random_boxes(num_extra, seed=9)))
        logits = torch.cat((logits, torch.full((num_extra, num_classes), -6.0)))
    matcher = build_matcher()
    pred_idx, gt_idx = matcher.match(logits, boxes, gt_labels, gt_boxes)
    assert pred_idx.dtype == torch.int64 and len(pred_idx) == num_gt
    assert torch.equal(pred_idx, torch.arange(num_gt))
    assert torch.equal(gt_idx, perm)


def test_matching_empty_and_errors():
    matcher = HungarianMatcher()
    p, g = matcher.match(torch.zeros(5, 91), random_boxes(5), torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4))
    assert p.numel() == 0 and g.numel() == 0
    p, g = matcher.match(torch.zeros(0, 91), torch.zeros(0, 4), torch.tensor([1]), random_boxes(1))
    assert p.numel() == 0 and g.numel() == 0
    with pytest.raises(ValueError, match="non-finite"):
        bad = random_boxes(3)
        bad[0, 0] = float("nan")
        matcher.match(torch.zeros(3, 91), bad, torch.tensor([1, 2]), random_boxes(2))
    with pytest.raises(ValueError, match="gt_labels"):
        matcher.match(torch.zeros(3, 91), random_boxes(3), torch.tensor([91]), random_boxes(1))
