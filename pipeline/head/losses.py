"""Mask targets, point sampling and the head's losses (Appendix A; Mask2Former; Mask Scoring R-CNN).

- :func:`mask_targets_in_boxes`: ground-truth bitmasks resampled into the (predicted) boxes.
- :func:`point_sample`, :func:`uncertain_point_coords_with_randomness`: Mask2Former's
  PointRend-style sampling (Kirillov et al. 2020; Cheng et al. 2022).
- :func:`sigmoid_bce_loss`, :func:`dice_loss`, :func:`mask_iou`: free loss functions.
- :class:`MaskCriterion`: the weighted sum the training loop minimises.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align


def mask_targets_in_boxes(gt_masks: Tensor, boxes_xyxy: Tensor, size: int | tuple[int, int] = 112) -> Tensor:
    """Resample full-image ground-truth masks into boxes (Mask R-CNN / detectron2 ``crop_and_resize``).

    ``torchvision.ops.roi_align(aligned=True, sampling_ratio=0)`` of mask ``i`` at box ``i``:
    pixel ``(x, y)`` of the bitmask covers ``[x, x+1) x [y, y+1)``, so a box equal to a filled
    rectangle's pixel extent gives ones everywhere except partial values (>= 0.5) on its outer bins.

    Args:
        gt_masks: ``[M, H, W]`` bool / uint8 / float bitmasks at ORIGINAL image resolution.
        boxes_xyxy: ``[M, 4]`` boxes in original-image pixels (x0, y0, x1, y1).
        size: T, output side, or ``(rows, cols)`` (e.g. F's grid for a head without RoIAlign).

    Returns:
        ``[M, T, T]`` (``[M, rows, cols]``) float32 (float64 if ``boxes_xyxy`` is float64) soft
        targets in ``[0, 1]``, box frame, row-major (y, x).

    Raises:
        ValueError: if M differs between the arguments or shapes are wrong.
    """
    if gt_masks.dim() != 3 or boxes_xyxy.dim() != 2 or boxes_xyxy.shape[1] != 4:
        raise ValueError(f"gt_masks must be [M, H, W] and boxes_xyxy [M, 4], got "
                         f"{tuple(gt_masks.shape)} and {tuple(boxes_xyxy.shape)}")
    if gt_masks.shape[0] != boxes_xyxy.shape[0]:
        raise ValueError(f"gt_masks has {gt_masks.shape[0]} masks, boxes_xyxy {boxes_xyxy.shape[0]} boxes")
    dtype = torch.float64 if boxes_xyxy.dtype == torch.float64 else torch.float32
    m = gt_masks.shape[0]
    size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if m == 0:
        return torch.zeros(0, *size, dtype=dtype, device=gt_masks.device)
    rois = torch.cat((torch.arange(m, device=gt_masks.device, dtype=dtype)[:, None],
                      boxes_xyxy.to(device=gt_masks.device, dtype=dtype)), 1)
    out = roi_align(gt_masks[:, None].to(dtype), rois, output_size=size, spatial_scale=1.0,
                    sampling_ratio=0, aligned=True)
    return out[:, 0].clamp_(0.0, 1.0)


def point_sample(inputs: Tensor, point_coords: Tensor) -> Tensor:
    """Bilinear values of maps at normalized points (PointRend / Mask2Former ``point_sample``).

    ``grid_sample(align_corners=False)`` like Mask2Former, but with ``padding_mode="border"``
    instead of zeros: our maps are box frames whose content continues past the outer half bin
    (an object usually touches its box), so zero padding would pull both logits and targets
    towards 0 within half a bin of the box edge and make those points look "uncertain".

    Args:
        inputs: ``[N, C, H, W]``.
        point_coords: ``[N, P, 2]`` ``(x, y)`` in ``[0, 1]`` of the map extent (0 = left/top edge
            of the first pixel, 1 = right/bottom edge of the last).

    Returns:
        ``[N, C, P]``.
    """
    out = F.grid_sample(inputs, 2.0 * point_coords[:, :, None, :] - 1.0, mode="bilinear",
                        padding_mode="border", align_corners=False)
    return out[..., 0]


@torch.no_grad()
def uncertain_point_coords_with_randomness(logits: Tensor, num_points: int, oversample_ratio: float,
                                           importance_sample_ratio: float,
                                           generator: torch.Generator | None = None) -> Tensor:
    """Points to supervise: the most uncertain of ``k N`` random ones plus random ones (Appendix A).

    Mask2Former's ``get_uncertain_point_coords_with_randomness`` with uncertainty ``-|logit|``:
    draw ``k N`` uniform points, keep the ``beta N`` with the highest uncertainty, add
    ``(1 - beta) N`` fresh uniform points.

    Args:
        logits: ``[M, 1, R, R]`` mask logits.
        num_points: N; oversample_ratio: k >= 1; importance_sample_ratio: beta in [0, 1].
        generator: RNG on ``logits.device`` (deterministic sampling); None = global RNG.

    Returns:
        ``[M, N, 2]`` ``(x, y)`` in ``[0, 1]``, dtype of ``logits``.
    """
    m = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    kw = dict(dtype=logits.dtype, device=logits.device, generator=generator)
    coords = torch.rand(m, num_sampled, 2, **kw)
    uncertainty = -point_sample(logits, coords)[:, 0].abs()
    num_uncertain = int(importance_sample_ratio * num_points)
    idx = torch.topk(uncertainty, k=num_uncertain, dim=1).indices
    coords = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2))
    if num_points - num_uncertain > 0:
        coords = torch.cat((coords, torch.rand(m, num_points - num_uncertain, 2, **kw)), 1)
    return coords


def sigmoid_bce_loss(logits: Tensor, targets: Tensor, num_instances: float) -> Tensor:
    """Binary cross-entropy with logits, mean over points, summed over instances / ``num_instances``.

    Args:
        logits: ``[M, P]`` pre-sigmoid; targets: ``[M, P]`` in ``[0, 1]``.
        num_instances: normalizer (>= 1 recommended).

    Returns:
        scalar.
    """
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return loss.mean(1).sum() / num_instances


def dice_loss(logits: Tensor, targets: Tensor, num_instances: float) -> Tensor:
    """Dice loss ``1 - (2 sum(p t) + 1) / (sum p + sum t + 1)`` per instance, summed / ``num_instances``.

    Mask2Former's ``dice_loss`` (p = sigmoid(logits)).

    Args:
        logits: ``[M, P]``; targets: ``[M, P]`` in ``[0, 1]``; num_instances: normalizer.

    Returns:
        scalar.
    """
    p = logits.sigmoid()
    numerator = 2 * (p * targets).sum(-1)
    denominator = p.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_instances


def mask_iou(pred_masks: Tensor, target_masks: Tensor) -> Tensor:
    """IoU of binary masks (Mask Scoring R-CNN's MaskIoU target).

    Args:
        pred_masks, target_masks: ``[M, H, W]`` bool (or {0, 1}).

    Returns:
        ``[M]`` float IoU; 0 where both masks are empty.
    """
    pred, tgt = pred_masks.flatten(1).float(), target_masks.flatten(1).float()
    inter = (pred * tgt).sum(1)
    union = (pred + tgt).clamp(max=1).sum(1)
    return inter / union.clamp(min=1)


def _mask_groups(logits: Tensor, masks: Tensor, logit_sizes: Tensor | None, target_sizes: Tensor | None):
    """``(rows, logits, masks)`` per grid size: one group of every row when the head gives no
    ``mask_sizes`` (RoIAlign's ``R x R``); else the rows of each ``(H, W)`` in ``logit_sizes [M, 2]``,
    both tensors cropped to ``[:, :H, :W]`` (a head without RoIAlign pads its per-image grids,
    :func:`pipeline.head.model.pad_mask_grids`).

    Raises:
        ValueError: ``target_sizes`` given and different from ``logit_sizes``, or targets smaller than a grid.
    """
    if logit_sizes is None:
        yield slice(None), logits, masks
        return
    logit_sizes = logit_sizes.to(logits.device)
    if target_sizes is not None and not torch.equal(target_sizes.to(logits.device), logit_sizes):
        raise ValueError("targets['mask_sizes'] differ from the head's mask_sizes: the targets were not built at "
                         "the head's mask grid (pipeline.targets.training_targets with the head's config)")
    for h, w in torch.unique(logit_sizes, dim=0).tolist():
        if h > masks.shape[-2] or w > masks.shape[-1]:
            raise ValueError(f"target masks {tuple(masks.shape[-2:])} are smaller than the head's {h} x {w} grid")
        idx = torch.nonzero((logit_sizes == logit_sizes.new_tensor([h, w])).all(1)).flatten()
        yield idx, logits[idx, :h, :w], masks[idx, :h, :w]


class MaskCriterion(nn.Module):
    """Loss of the head on matched instances (Appendix A; Table 12 "samp. pixel sup." + "mask scoring").

    ``loss = w_bce * BCE + w_dice * Dice + w_iou * L2(iou_pred[label], IoU)``:

    - BCE and Dice on N points per instance chosen by
      :func:`uncertain_point_coords_with_randomness` from the ``R x R`` logits; logits and the
      ``T x T`` targets are both read with :func:`point_sample` (the two grids span the same box).
      A head without RoIAlign (Eq. 1) gives logits at F's grid of each image and its targets are
      at that grid (``mask_sizes``); each grid size is sampled on its own, unpadded.
    - Mask IoU: the logits binarised at 0 vs the target area-resampled to ``R x R`` and
      binarised at 0.5; the target IoU is detached; squared error of the prediction for the
      instance's class (Mask Scoring R-CNN, weight 1).
    - All terms are summed over instances and divided by ``num_instances`` (default M, at least 1).

    Default weights 5 / 5 / 1: Mask2Former's mask / dice weights and Mask Scoring R-CNN's IoU
    weight (the paper states none).

    Losses are computed in at least float32 (bf16/fp16 logits from autocast are up-cast).

    Args:
        num_points, oversample_ratio, importance_sample_ratio: sampling (12544, 3.0, 0.75).
        bce_weight, dice_weight, iou_weight: loss weights.
        target_size: T the targets should be built at (exposed as ``mask_target_size`` for the
            training loop's :func:`mask_targets_in_boxes` call; any T works here).
        matcher: the Hungarian matcher the training loop should use (exposed as ``matcher``).
        mask_loss: ``"points"`` (the sampled points above) or ``"full"``: BCE and Dice on every
            pixel of the ``T x T`` targets, the logits bilinearly resized (align_corners=False)
            to ``T x T`` (Table 12 "samp. pixel sup." off).

    Raises (constructor):
        ValueError: unknown ``mask_loss``.
    """

    def __init__(self, num_points: int = 112 * 112, oversample_ratio: float = 3.0,
                 importance_sample_ratio: float = 0.75, bce_weight: float = 5.0, dice_weight: float = 5.0,
                 iou_weight: float = 1.0, target_size: int = 112, matcher=None, mask_loss: str = "points"):
        super().__init__()
        if mask_loss not in ("points", "full"):
            raise ValueError(f"mask_loss must be 'points' or 'full', got {mask_loss!r}")
        self.mask_loss = mask_loss
        self.mask_target_size = target_size
        self.matcher = matcher
        self.num_points, self.oversample_ratio = num_points, oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.weight_dict = {"loss_bce": bce_weight, "loss_dice": dice_weight, "loss_iou": iou_weight}

    def forward(self, outputs: dict[str, Tensor], targets: dict[str, Tensor],
                generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Compute the losses.

        Args:
            outputs: the head's dict: ``mask_logits [M, R, R]`` and optionally ``iou_pred [M, C]``;
                without RoIAlign ``mask_logits [M, H, W]`` padded with ``mask_sizes [M, 2]`` (each
                box's grid; the loss reads only ``[:H_i, :W_i]``, grids of one size together).
            targets: ``masks [M, T, T]`` float in ``[0, 1]`` (from :func:`mask_targets_in_boxes`,
                resampled into the same boxes the head used; without RoIAlign at the head's grid,
                :func:`pipeline.targets.training_targets`), optional ``mask_sizes [M, 2]`` (checked
                against the head's), ``labels [M]`` int64 index into
                ``iou_pred``'s columns (contiguous class; needed only with ``iou_pred``), optional
                ``num_instances`` (float normalizer, e.g. summed over a batch / processes).
            generator: RNG for point sampling, on the logits' device.

        Returns:
            ``{"loss_bce", "loss_dice", ["loss_iou"], "loss"}`` scalars; the components are
            unweighted, ``loss`` is the weighted sum (``weight_dict``).

        Raises:
            ValueError: if M differs between outputs and targets, labels are out of range, or the
                targets' grid sizes differ from the head's.
        """
        logits = outputs["mask_logits"]
        dtype = torch.promote_types(logits.dtype, torch.float32)
        logits = logits.to(dtype)
        masks = targets["masks"].to(device=logits.device, dtype=dtype)
        m = logits.shape[0]
        if masks.shape[0] != m:
            raise ValueError(f"{m} mask logits but {masks.shape[0]} target masks")
        num = float(targets.get("num_instances", max(m, 1)))
        num = max(num, 1.0)
        iou_pred = outputs.get("iou_pred")
        if iou_pred is not None:
            iou_pred = iou_pred.to(dtype)
        losses: dict[str, Tensor] = {}
        if m == 0:
            zero = logits.sum() * 0.0
            losses = {"loss_bce": zero, "loss_dice": zero.clone()}
            if iou_pred is not None:
                losses["loss_iou"] = iou_pred.sum() * 0.0
        else:
            losses["loss_bce"], losses["loss_dice"] = 0.0, 0.0
            iou_target = logits.new_zeros(m)
            for idx, group_logits, group_masks in _mask_groups(logits, masks, outputs.get("mask_sizes"),
                                                               targets.get("mask_sizes")):
                if self.mask_loss == "full":
                    size = tuple(group_masks.shape[-2:])
                    point_logits = F.interpolate(group_logits[:, None], size=size, mode="bilinear",
                                                 align_corners=False)[:, 0].flatten(1)
                    point_targets = group_masks.flatten(1)
                else:
                    coords = uncertain_point_coords_with_randomness(
                        group_logits[:, None], self.num_points, self.oversample_ratio, self.importance_sample_ratio,
                        generator)
                    point_logits = point_sample(group_logits[:, None], coords)[:, 0]
                    point_targets = point_sample(group_masks[:, None], coords)[:, 0]
                losses["loss_bce"] = losses["loss_bce"] + sigmoid_bce_loss(point_logits, point_targets, num)
                losses["loss_dice"] = losses["loss_dice"] + dice_loss(point_logits, point_targets, num)
                if iou_pred is not None:
                    with torch.no_grad():
                        r = group_logits.shape[-2:]
                        tgt = F.interpolate(group_masks[:, None], size=r, mode="area")[:, 0] >= 0.5
                        iou_target[idx] = mask_iou(group_logits > 0, tgt).to(iou_target.dtype)
            if iou_pred is not None:
                labels = targets["labels"].to(logits.device)
                if labels.shape != (m,) or int(labels.min()) < 0 or int(labels.max()) >= iou_pred.shape[1]:
                    raise ValueError(f"labels must be [M={m}] in [0, {iou_pred.shape[1]}), got "
                                     f"{tuple(labels.shape)}")
                pred = iou_pred.gather(1, labels[:, None])[:, 0]
                losses["loss_iou"] = ((pred - iou_target.to(iou_pred.dtype)) ** 2).sum() / num
        losses["loss"] = sum(self.weight_dict[k] * v for k, v in losses.items())
        return losses
