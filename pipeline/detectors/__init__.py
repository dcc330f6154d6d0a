"""Frozen detectors of stage one, by name.

``DETECTORS`` maps a detector name to its builder; :func:`build_detector` builds one by name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipeline.detectors import dino_focalnet, hdetr
from pipeline.detectors.dino_focalnet import DINOFocalNet, build_dino_focalnet
from pipeline.detectors.hdetr import HDETR, build_hdetr_r50, build_hdetr_swin_l

#: name -> builder(preset=..., **kwargs) returning an ``nn.Module`` implementing
#: :class:`pipeline.detectors.base.Detector`; each builder's default preset is the official release.
DETECTORS: dict[str, Callable[..., nn.Module]] = {
    "dino-focalnet": build_dino_focalnet,
    "hdetr-r50": build_hdetr_r50,
    "hdetr-swin-l": build_hdetr_swin_l,
}

#: name -> ``(presets, releases)``: every preset's constructor arguments, and the presets that are
#: official releases with their checkpoint file name and COCO val box AP.
CATALOGUE: dict[str, tuple[dict[str, dict], dict[str, dict]]] = {
    "dino-focalnet": (dino_focalnet.PRESETS, dino_focalnet.RELEASES),
    "hdetr-r50": (hdetr.PRESETS_R50, hdetr.RELEASES_R50),
    "hdetr-swin-l": (hdetr.PRESETS_SWIN_L, hdetr.RELEASES_SWIN_L),
}


def build_detector(name: str, **kw) -> nn.Module:
    """Build the detector registered as ``name`` with keyword arguments ``kw`` (passed to its builder).

    ``preset=None`` (or no preset) builds the detector's official release.

    Raises:
        ValueError: unknown name (the message lists the known names) or unknown preset.
    """
    try:
        builder = DETECTORS[name]
    except KeyError:
        raise ValueError(f"unknown detector {name!r}; known detectors: {', '.join(sorted(DETECTORS))}") from None
    if kw.get("preset", "") is None:
        kw.pop("preset")
    return builder(**kw)


def detector_widths(name: str, preset: str | None = None) -> dict[str, int]:
    """``{"c1_channels", "num_feature_levels"}`` of a detector's cache: the mask head's input widths.

    Read from the model itself, built on the meta device (no memory, no weights).

    Raises:
        ValueError: unknown detector or preset.
    """
    with torch.device("meta"):
        model = build_detector(name, preset=preset)
    return {"c1_channels": int(model.c1_channels), "num_feature_levels": int(model.num_feature_levels)}


def describe_detectors(height: int = 800, width: int = 1333, top_k: int = 100, encoder_layers: int = 1,
                       dtype: str = "float16") -> list[dict]:
    """One row per (detector, preset) for ``cli.py detectors``.

    Each row: ``detector``, ``preset``, ``release`` (bool), ``checkpoint`` (file name or ""),
    ``box_ap`` (COCO val, or None), ``box_ap_source``, ``c1_channels``, ``num_feature_levels``,
    ``num_queries``, ``cache_mb_per_image`` (uncompressed bytes of one ``height x width`` image in the
    feature cache with ``top_k`` queries, ``encoder_layers`` stored encoder layers and ``dtype``
    features; :func:`pipeline.cache.bytes_per_image`), ``params_m`` (detector parameters, millions).
    """
    from pipeline.cache import bytes_per_image

    rows = []
    for name, (presets, releases) in CATALOGUE.items():
        for preset in presets:
            with torch.device("meta"):
                model = build_detector(name, preset=preset)
            shapes, (h1, w1) = model.feature_shapes(height, width)
            nbytes = bytes_per_image(top_k=min(top_k, model.num_queries), hidden_dim=model.hidden_dim,
                                     num_classes=model.num_classes, num_levels=len(shapes),
                                     num_tokens=int(shapes.prod(1).sum()), c1_numel=model.c1_channels * h1 * w1,
                                     num_encoder_layers=encoder_layers, dtype=dtype, c1_channels=model.c1_channels)
            rel = releases.get(preset, {})
            rows.append({"detector": name, "preset": preset, "release": bool(rel),
                         "checkpoint": rel.get("checkpoint", ""), "box_ap": rel.get("box_ap"),
                         "box_ap_source": rel.get("box_ap_source", ""), "c1_channels": model.c1_channels,
                         "num_feature_levels": model.num_feature_levels, "num_queries": model.num_queries,
                         "cache_mb_per_image": nbytes / 1e6,
                         "params_m": sum(p.numel() for p in model.parameters()) / 1e6})
    return rows


__all__ = ["CATALOGUE", "DETECTORS", "DINOFocalNet", "HDETR", "build_detector", "describe_detectors", "detector_widths", "build_dino_focalnet", "build_hdetr_r50",
           "build_hdetr_swin_l"]
