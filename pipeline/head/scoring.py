"""Mask scoring head (Appendix A, Eq. 12-13; Mask Scoring R-CNN, Huang et al. 2019)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MaskScoringHead(nn.Module):
    """Predict, per class, the IoU of the predicted mask with the ground truth (Eq. 12).

    ``iou = MLP(Flatten(Conv(Cat(M_i, R_i))))``: the mask probabilities (1 channel) and the box
    tokens (h channels) at ``R x R`` -> 3 x [3x3 conv, stride 2, padding 1, ``conv_dim``
    channels, ReLU] (32 -> 16 -> 8 -> 4) -> flatten (``conv_dim * ceil(R/8)^2`` = 2048) ->
    Linear -> ReLU -> Linear -> ReLU -> Linear(``num_classes``). A slimmed Mask Scoring R-CNN
    MaskIoU head; 733,008 parameters at h=128, R=32, 80 classes.

    Args:
        in_dim: h, channels of the box tokens.
        roi_size: R.
        num_classes: IoU outputs (80 contiguous COCO classes).
        conv_dim, fc_dim: widths (128, 128).
        num_convs: stride-2 convolutions (3).
    """

    def __init__(self, in_dim: int = 128, roi_size: int = 32, num_classes: int = 80, conv_dim: int = 128,
                 fc_dim: int = 128, num_convs: int = 3):
        super().__init__()
        convs, c, s = [], in_dim + 1, roi_size
        for _ in range(num_convs):
            convs += [nn.Conv2d(c, conv_dim, 3, stride=2, padding=1), nn.ReLU()]
            c, s = conv_dim, (s + 1) // 2
        self.convs = nn.Sequential(*convs)
        self.fcs = nn.Sequential(nn.Linear(conv_dim * s * s, fc_dim), nn.ReLU(), nn.Linear(fc_dim, fc_dim), nn.ReLU())
        self.iou = nn.Linear(fc_dim, num_classes)
        self.roi_size = roi_size

    def forward(self, mask_probs: Tensor, box_tokens: Tensor) -> Tensor:
        """Per-class IoU prediction.

        Args:
            mask_probs: ``[M, R, R]`` sigmoid of the mask logits (box frame).
            box_tokens: ``[M, R*R, h]`` box-encoder output, row-major (y, x).

        Returns:
            ``[M, num_classes]`` predicted IoU (unbounded regression output; ~[0, 1] when trained).
        """
        m, r = mask_probs.shape[0], self.roi_size
        feats = box_tokens.transpose(1, 2).reshape(m, -1, r, r)
        x = torch.cat((mask_probs[:, None], feats), 1)
        return self.iou(self.fcs(self.convs(x).flatten(1)))
