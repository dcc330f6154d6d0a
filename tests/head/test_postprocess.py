"""Post-processing: (query, class) ranking by class score x predicted IoU (Eq. 13), top_n, ties."""

import torch

from pipeline.head import PostProcess, postprocess


def _columns():
    col = torch.full((91,), -1, dtype=torch.int64)
    real = torch.tensor([1, 2, 3, 5, 90])  # a few real COCO ids -> contiguous 0..4
    col[real] = torch.arange(5)
    return col, real


def test_ranking_uses_iou_and_skips_dummy_columns():
    col, real = _columns()
    logits = torch.full((3, 91), -10.0)
    logits[:, 0] = 10.0  # dummy column: never returned
    logits[0, 1], logits[1, 2], logits[2, 90] = 2.0, 1.0, 0.0
    iou = torch.full((3, 5), 0.5)
    iou[0, 0], iou[1, 1], iou[2, 4] = 0.1, 0.9, 1.0
    boxes = torch.rand(3, 4)
    masks = torch.randn(3, 8, 8)
    out = postprocess(logits, boxes, masks, iou, col, top_n=3)
    c = torch.sigmoid(torch.tensor([2.0, 1.0, 0.0]))
    final = c * torch.tensor([0.1, 0.9, 1.0])
    assert out["labels"].tolist() == [2, 90, 1]  # order changed by the IoU rescoring
    assert out["query_index"].tolist() == [1, 2, 0]
    torch.testing.assert_close(out["scores"], final[[1, 2, 0]])
    assert (out["scores"][:-1] >= out["scores"][1:]).all()
    assert set(out["labels"].tolist()) <= set(real.tolist())
    torch.testing.assert_close(out["boxes"], boxes[[1, 2, 0]])
    torch.testing.assert_close(out["mask_probs"], masks[[1, 2, 0]].sigmoid())
    assert out["contiguous"].tolist() == [1, 4, 0]


def test_top_n_and_ties_are_deterministic():
    col, _ = _columns()
    logits = torch.zeros(4, 91)  # every real pair scores 0.5: all tied
    out = postprocess(logits, torch.rand(4, 4), torch.zeros(4, 8, 8), None, col, top_n=7)
    assert len(out["scores"]) == 7
    # ties keep query-major, column-minor order
    assert out["query_index"].tolist() == [0, 0, 0, 0, 0, 1, 1]
    assert out["labels"].tolist() == [1, 2, 3, 5, 90, 1, 2]
    assert torch.equal(out["scores"], out["class_scores"])
    many = postprocess(logits, torch.rand(4, 4), torch.zeros(4, 8, 8), None, col, top_n=100)
    assert len(many["scores"]) == 20  # 4 queries x 5 real columns


def test_candidate_preselection_matches_exact_when_wide_enough():
    col, _ = _columns()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(30, 91, generator=g)
    iou = torch.rand(30, 5, generator=g)
    args = (logits, torch.rand(30, 4, generator=g), torch.randn(30, 8, 8, generator=g), iou, col)
    exact = postprocess(*args, top_n=10)
    wide = postprocess(*args, top_n=10, num_candidates=150)
    assert torch.equal(exact["query_index"], wide["query_index"]) and torch.equal(exact["labels"], wide["labels"])
    call = PostProcess(top_n=10)(*args)
    assert torch.equal(call["scores"], exact["scores"])
