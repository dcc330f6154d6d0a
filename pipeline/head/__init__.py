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
    "build_matcher", "build_postprocess", "count_parameters", "parameter_table", "format_parameter_table", "postprocess",
    "mask_targets_in_boxes",
    "point_sample", "uncertain_point_coords_with_randomness", "sigmoid_bce_loss", "dice_loss", "mask_iou",
]


def build_head(cfg: HeadConfig, top_n: int = 100) -> tuple[MaskFrozenDetrHead, MaskCriterion, PostProcess]:
    """Build the head, its criterion and its post-processor from one (parsed) config.

    Args:
        cfg: the :class:`HeadConfig` (``Config.head``; parsed once by ``pipeline.config``), with
            its widths set (:meth:`HeadConfig.with_widths`).
        top_n: detections the post-processor keeps per image (``evaluate.top_n``).

    Returns:
        ``(head, criterion, postprocess)``; ``criterion.matcher`` is the config's
        :class:`HungarianMatcher`, ``criterion.mask_target_size`` its T, ``postprocess`` a
        :class:`PostProcess` with ``top_n`` and the config's final score (Eq. 2 / Eq. 13).

    Raises:
        ValueError: on an invalid config or missing widths.
    """
    head = MaskFrozenDetrHead(cfg)
    criterion = MaskCriterion(cfg.num_points, cfg.oversample_ratio, cfg.importance_sample_ratio,
                              cfg.loss_bce_weight, cfg.loss_dice_weight,
                              cfg.loss_iou_weight if cfg.mask_scoring else 0.0,
                              target_size=cfg.target_size, matcher=build_matcher(cfg), mask_loss=cfg.mask_loss)
    return head, criterion, build_postprocess(cfg, top_n)


def build_postprocess(cfg: HeadConfig, top_n: int = 100) -> PostProcess:
    """The post-processor of a head config: ``top_n`` per image, ranked by the config's final
    score (:attr:`HeadConfig.final_score`: Eq. 13 with mask scoring, Eq. 2 for the baseline)."""
    return PostProcess(top_n=top_n, score=cfg.final_score)


def build_matcher(cfg: HeadConfig | None = None) -> HungarianMatcher:
    """DINO's Hungarian matcher with the config's costs (defaults when ``cfg`` is None)."""
    cfg = cfg or HeadConfig()
    return HungarianMatcher(cfg.cost_class, cfg.cost_bbox, cfg.cost_giou, cfg.focal_alpha, cfg.focal_gamma)
