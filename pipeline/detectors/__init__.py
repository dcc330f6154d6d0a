"""Frozen detectors of stage one, by name.

``DETECTORS`` maps a detector name to its builder; :func:`build_detector` builds one by name.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from pipeline.detectors.dino_focalnet import DINOFocalNet, build_dino_focalnet
from pipeline.detectors.hdetr import HDETR, build_hdetr_r50, build_hdetr_swin_l

#: name -> builder(preset=..., **kwargs) returning an ``nn.Module`` implementing
#: :class:`pipeline.detectors.base.Detector`; each builder's default preset is the official release.
DETECTORS: dict[str, Callable[..., nn.Module]] = {
    "dino-focalnet": build_dino_focalnet,
    "hdetr-r50": build_hdetr_r50,
    "hdetr-swin-l": build_hdetr_swin_l,
}


def build_detector(name: str, **kw) -> nn.Module:
    """Build the detector registered as ``name`` with keyword arguments ``kw`` (passed to its builder).

    Raises:
        ValueError: unknown name (the message lists the known names).
    """
    try:
        builder = DETECTORS[name]
    except KeyError:
        raise ValueError(f"unknown detector {name!r}; known detectors: {', '.join(sorted(DETECTORS))}") from None
    return builder(**kw)


__all__ = ["DETECTORS", "DINOFocalNet", "HDETR", "build_detector", "build_dino_focalnet", "build_hdetr_r50",
           "build_hdetr_swin_l"]
