"""Stage two of Mask Frozen-DETR: the trainable mask head, its loss and its post-processing.

``build_head(cfg) -> (head, criterion, postprocess)`` follows DETR's ``build_model`` split.
This package only knows cached tensors and never imports ``pipeline.detectors``.
"""

from __future__ import annotations

from .config import HeadConfig
from .losses import (MaskCriterion, dice_loss, mask_iou, mask_targets_in_boxes, point_sample,
                     sigmoid_bce_loss, uncertain_point_coords_with_randomness)
from .matcher import HungarianMatcher
from .model import MaskFrozenDetrHead, count_parameters, format_parameter_table, parameter_table
from .postprocess import PostProcess, postprocess

__all__ = [
    "HeadConfig", "MaskFrozenDetrHead", "MaskCriterion", "HungarianMatcher", "PostProcess", "build_head",
    "build_matcher", "count_parameters", "parameter_table", "format_parameter_table", "postprocess",
    "mask_targets_in_boxes",
    "point_sample", "uncertain_point_coords_with_randomness", "sigmoid_bce_loss", "dice_loss", "mask_iou",
]


def build_head(cfg: HeadConfig | dict | None = None) -> tuple[MaskFrozenDetrHead, MaskCriterion, PostProcess]:
    """Build the head, its criterion and its post-processor from one config.

    Args:
        cfg: a :class:`HeadConfig`, a plain dict (``HeadConfig.from_dict``) or None (defaults).

    Returns:
        ``(head, criterion, postprocess)``; ``criterion.matcher`` is the config's
        :class:`HungarianMatcher` and ``criterion.mask_target_size`` its T.

    Raises:
        ValueError: on an invalid config.
    """
    if not isinstance(cfg, HeadConfig):
        cfg = HeadConfig.from_dict(cfg)
    head = MaskFrozenDetrHead(cfg)
    criterion = MaskCriterion(cfg.num_points, cfg.oversample_ratio, cfg.importance_sample_ratio,
                              cfg.loss_bce_weight, cfg.loss_dice_weight,
                              cfg.loss_iou_weight if cfg.mask_scoring else 0.0,
                              target_size=cfg.target_size, matcher=build_matcher(cfg))
    return head, criterion, PostProcess()  # top_n is an evaluation setting, passed per call


def build_matcher(cfg: HeadConfig | dict | None = None) -> HungarianMatcher:
    """DINO's Hungarian matcher with the config's costs."""
    if not isinstance(cfg, HeadConfig):
        cfg = HeadConfig.from_dict(cfg)
    return HungarianMatcher(cfg.cost_class, cfg.cost_bbox, cfg.cost_giou, cfg.focal_alpha, cfg.focal_gamma)
