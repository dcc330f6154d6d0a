"""Mask targets, point sampling and the criterion (BCE + dice on sampled points, mask-IoU L2)."""

import pytest
import torch

from pipeline.head import (HeadConfig, MaskCriterion, dice_loss, mask_iou, mask_targets_in_boxes, point_sample,
                           sigmoid_bce_loss, uncertain_point_coords_with_randomness)


def _rectangle(h=60, w=80, y0=10, y1=40, x0=20, x1=60):
    m = torch.zeros(1, h, w, dtype=torch.bool)
    m[0, y0:y1, x0:x1] = True
    return m


def test_mask_targets_rectangle_inside_is_ones():
    mask = _rectangle()
    inner = mask_targets_in_boxes(mask, torch.tensor([[21.0, 11.0, 59.0, 39.0]]), size=28)
    assert inner.shape == (1, 28, 28) and inner.dtype == torch.float32
    assert torch.equal(inner, torch.ones_like(inner))
    exact = mask_targets_in_boxes(mask, torch.tensor([[20.0, 10.0, 60.0, 40.0]]), size=28)
    assert (exact >= 0.5).all()  # only the outer half-pixel ring is partial
    assert torch.equal(exact[0, 1:-1, 1:-1], torch.ones(26, 26))


def test_mask_targets_box_larger_than_rectangle():
    mask = _rectangle()
    # box twice the rectangle size, same centre: ones in the central half, zeros in the outer quarter
    out = mask_targets_in_boxes(mask, torch.tensor([[0.0, -5.0, 80.0, 55.0]]), size=40)[0]
    assert torch.equal(out[12:28, 12:28], torch.ones(16, 16))
    assert out[:8].abs().max() == 0 and out[:, :8].abs().max() == 0
    assert out[32:].abs().max() == 0 and out[:, 32:].abs().max() == 0


def test_mask_targets_empty_and_errors():
    assert mask_targets_in_boxes(torch.zeros(0, 10, 10), torch.zeros(0, 4), size=7).shape == (0, 7, 7)
    with pytest.raises(ValueError):
        mask_targets_in_boxes(torch.zeros(2, 10, 10), torch.zeros(1, 4))


def test_point_sample_bin_centres():
    grid = torch.arange(16.0).view(1, 1, 4, 4)
    coords = torch.tensor([[[0.125, 0.125], [0.875, 0.125], [0.375, 0.625]]])  # (x, y)
    assert torch.equal(point_sample(grid, coords), torch.tensor([[[0.0, 3.0, 9.0]]]))


def test_uncertain_points_prefer_boundary_and_are_reproducible():
    logits = torch.full((2, 1, 16, 16), 10.0)
    logits[:, :, :, 8:] = -10.0  # boundary at x = 0.5
    kw = dict(num_points=200, oversample_ratio=3.0, importance_sample_ratio=0.75)
    a = uncertain_point_coords_with_randomness(logits, generator=torch.Generator().manual_seed(3), **kw)
    b = uncertain_point_coords_with_randomness(logits, generator=torch.Generator().manual_seed(3), **kw)
    assert a.shape == (2, 200, 2) and torch.equal(a, b)
    assert ((a >= 0) & (a <= 1)).all()
    # ~6 % of the 600 candidates fall in the interpolation band |x - 0.5| < 1/32 around the
    # boundary; the most uncertain points (topk, sorted) come from there first
    assert ((a[:, :25, 0] - 0.5).abs() < 1 / 32).all()
    assert ((a[:, 150:, 0] - 0.5).abs() >= 1 / 32).any()  # the random tail is not concentrated


def test_perfect_logits_zero_bce_and_dice():
    g = torch.Generator().manual_seed(0)
    targets = (torch.rand(5, 300, generator=g) > 0.5).float()
    logits = 100.0 * (2 * targets - 1)
    assert sigmoid_bce_loss(logits, targets, 5) < 1e-6
    assert dice_loss(logits, targets, 5) < 1e-6
    wrong = -logits
    assert sigmoid_bce_loss(wrong, targets, 5) > 10 and dice_loss(wrong, targets, 5) > 0.9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_criterion_perfect_prediction_is_zero(dtype):
    # uniform instances (full and empty) so no sampled point straddles a boundary
    masks = torch.stack([torch.ones(112, 112), torch.zeros(112, 112), torch.ones(112, 112)]).to(dtype)
    logits = torch.stack([torch.full((32, 32), 100.0), torch.full((32, 32), -100.0),
                          torch.full((32, 32), 100.0)]).to(dtype).requires_grad_()
    labels = torch.tensor([3, 7, 79])
    iou_pred = torch.zeros(3, 80, dtype=dtype)
    iou_pred[0, 3], iou_pred[2, 79] = 1.0, 1.0  # IoU 1 for full masks; empty vs empty counts as 0
    crit = MaskCriterion(num_points=500)
    losses = crit({"mask_logits": logits, "iou_pred": iou_pred}, {"masks": masks, "labels": labels},
                  generator=torch.Generator().manual_seed(0))
    for k in ("loss_bce", "loss_dice", "loss_iou", "loss"):
        assert losses[k].dtype == dtype and losses[k] < 1e-6, k


def test_criterion_iou_target_and_normalisation():
    masks = torch.zeros(2, 112, 112)
    masks[:, :, :56] = 1.0  # left half
    logits = torch.full((2, 32, 32), -5.0)
    logits[:, :, :32] = 5.0  # predicts everything: IoU 0.5
    iou_pred = torch.zeros(2, 80)
    crit = MaskCriterion(num_points=256)
    out = crit({"mask_logits": logits, "iou_pred": iou_pred}, {"masks": masks, "labels": torch.tensor([0, 1])})
    torch.testing.assert_close(out["loss_iou"], torch.tensor(0.25))  # (0 - 0.5)^2, mean over 2
    out4 = crit({"mask_logits": logits, "iou_pred": iou_pred},
                {"masks": masks, "labels": torch.tensor([0, 1]), "num_instances": 4.0})
    torch.testing.assert_close(out4["loss_iou"], torch.tensor(0.125))
    half = torch.zeros(2, 32, 32, dtype=torch.bool)
    half[:, :, :16] = True
    assert torch.equal(mask_iou(logits > 0, half), torch.tensor([0.5, 0.5]))
    assert torch.equal(mask_iou(half, torch.zeros_like(half)), torch.tensor([0.0, 0.0]))


def test_criterion_deterministic_with_generator_and_empty():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 32, 32, generator=g)
    masks = (torch.rand(4, 112, 112, generator=g) > 0.5).float()
    tg = {"masks": masks, "labels": torch.tensor([0, 1, 2, 3])}
    out = {"mask_logits": logits, "iou_pred": torch.rand(4, 80, generator=g)}
    crit = MaskCriterion()
    a = crit(out, tg, generator=torch.Generator().manual_seed(1))
    b = crit(out, tg, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    total = sum(crit.weight_dict[k] * a[k] for k in ("loss_bce", "loss_dice", "loss_iou"))
    torch.testing.assert_close(a["loss"], total)
    empty_logits = torch.zeros(0, 32, 32, requires_grad=True)
    e = crit({"mask_logits": empty_logits, "iou_pred": torch.zeros(0, 80)},
             {"masks": torch.zeros(0, 112, 112), "labels": torch.zeros(0, dtype=torch.int64)})
    assert e["loss"] == 0
    e["loss"].backward()
    with pytest.raises(ValueError):
        crit(out, {"masks": masks[:3], "labels": torch.tensor([0, 1, 2])})


def test_criterion_upcasts_bf16_and_exposes_matcher():
    from pipeline.head import HungarianMatcher, build_head

    _, crit, _ = build_head(HeadConfig.from_dict({"c1_channels": 192, "num_feature_levels": 5, "target_size": 56, "num_points": 64}))
    assert crit.mask_target_size == 56 and isinstance(crit.matcher, HungarianMatcher)
    logits = torch.randn(2, 32, 32).bfloat16()
    out = crit({"mask_logits": logits, "iou_pred": torch.rand(2, 80).bfloat16()},
               {"masks": torch.rand(2, 56, 56), "labels": torch.tensor([1, 2])})
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])


def test_full_mask_loss_is_bce_and_dice_over_every_target_pixel():
    """Table 12 row 1: no point sampling; the R x R logits resized to the T x T targets."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, 8, generator=g, dtype=torch.float64)
    masks = (torch.rand(3, 16, 16, generator=g) > 0.5).double()
    crit = MaskCriterion(iou_weight=0.0, target_size=16, mask_loss="full")
    out = crit({"mask_logits": logits}, {"masks": masks})
    up = F.interpolate(logits[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0].flatten(1)
    assert torch.allclose(out["loss_bce"], sigmoid_bce_loss(up, masks.flatten(1), 3))
    assert torch.allclose(out["loss_dice"], dice_loss(up, masks.flatten(1), 3))
    assert torch.allclose(out["loss"], 5 * out["loss_bce"] + 5 * out["loss_dice"])
    with pytest.raises(ValueError, match="mask_loss"):
        MaskCriterion(mask_loss="dense")


def test_criterion_on_padded_grids_of_different_sizes():
    """A head without RoIAlign gives each image's logits at F's grid, padded (``mask_sizes``): the loss
    reads each grid unpadded, so it equals the sum of the per-grid losses."""
    g = torch.Generator().manual_seed(0)
    small, large = torch.randn(2, 5, 7, generator=g, dtype=torch.float64), torch.randn(1, 6, 4, generator=g,
                                                                                    dtype=torch.float64)
    t_small, t_large = (torch.rand(2, 5, 7, generator=g) > 0.5).double(), (torch.rand(1, 6, 4, generator=g) > 0.5).double()
    from pipeline.head.model import pad_mask_grids

    logits, sizes = pad_mask_grids([small, large])
    masks, t_sizes = pad_mask_grids([t_small, t_large], value=0.0)
    assert logits.shape == (3, 6, 7) and sizes.tolist() == [[5, 7], [5, 7], [6, 4]] and torch.equal(sizes, t_sizes)
    crit = MaskCriterion(iou_weight=0.0, mask_loss="full")
    out = crit({"mask_logits": logits, "mask_sizes": sizes}, {"masks": masks, "mask_sizes": t_sizes})
    want = sum(crit({"mask_logits": lg}, {"masks": tg, "num_instances": 3})["loss"]
               for lg, tg in ((small, t_small), (large, t_large)))
    torch.testing.assert_close(out["loss"], want)
    with pytest.raises(ValueError, match="mask_sizes"):
        crit({"mask_logits": logits, "mask_sizes": sizes}, {"masks": masks, "mask_sizes": t_sizes.flip(0)})
