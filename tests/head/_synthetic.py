"""Synthetic cached tensors shaped like one DINO-FocalNet image of the feature cache."""

from __future__ import annotations

import torch

from pipeline.layers.deformable import level_start_index_of

#: The cache widths of DINO-FocalNet-L (``c1_channels``, ``num_feature_levels``), which a head built
#: by hand must be given (``train-head`` reads them from the cache's fingerprint).
DINO_WIDTHS = {"c1_channels": 192, "num_feature_levels": 5}
#: The cache widths of H-DETR R50 (res2: 256 channels; 4 encoder levels).
HDETR_R50_WIDTHS = {"c1_channels": 256, "num_feature_levels": 4}


def fake_image(h: int, w: int, *, levels: int = 5, c1_channels: int = 192, dim: int = 256, seed: int = 0,
               dtype: torch.dtype = torch.float16):
    """Encoder tokens / shapes / start index / C1 of an ``h x w`` (resized pixels) image.

    Levels have strides 4, 8, 16, ... (finest first, as the cache stores them); C1 is stride 4.

    Returns:
        ``(tokens [S, dim], spatial_shapes [L, 2], level_start_index [L], c1 [c1_channels, H1, W1])``.
    """
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor([[max(1, -(-h // (4 * 2 ** lvl))), max(1, -(-w // (4 * 2 ** lvl)))]
                           for lvl in range(levels)], dtype=torch.int64)
    s = int(shapes.prod(1).sum())
    tokens = torch.randn(s, dim, generator=g).to(dtype)
    c1 = torch.randn(c1_channels, int(shapes[0, 0]), int(shapes[0, 1]), generator=g).to(dtype)
    return tokens, shapes, level_start_index_of(shapes), c1


def random_boxes(m: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[m, 4]`` valid cxcywh normalized boxes inside the image."""
    g = torch.Generator().manual_seed(seed)
    wh = torch.rand(m, 2, generator=g) * 0.5 + 0.05
    c = wh / 2 + torch.rand(m, 2, generator=g) * (1 - wh)
    return torch.cat((c, wh), 1).to(dtype)
