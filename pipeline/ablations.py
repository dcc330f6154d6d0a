"""The paper's ablation rows as configs: targets, costs and the side-by-side table of a sweep.

``configs/ablations/*.yaml`` hold one paper row each (``paper: {table, row}``, ``widths:``);
``shared/papers/ablation-targets.json`` holds the paper's numbers of every row. This module
joins the two: :func:`config_cost` (▲#params / ▲FLOPs of a config at the paper's input size)
and :func:`paper_row` (the row's printed numbers).
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

from .config import Config

#: Where the transcribed paper tables live relative to the repository (``../shared``).
DEFAULT_TARGETS = Path(__file__).resolve().parent.parent.parent / "shared" / "papers" / "ablation-targets.json"
#: The columns of a paper table, in the paper's order: (our metrics key, the JSON key, header).
METRIC_COLUMNS = (("AP", "mask_ap", "AP"), ("AP50", "ap50", "AP50"), ("AP75", "ap75", "AP75"),
                  ("APs", "ap_s", "APs"), ("APm", "ap_m", "APm"), ("APl", "ap_l", "APl"))


def load_targets(path: str | Path | None = None) -> dict[tuple[int, str], dict]:
    """``{(table, setting text): row}`` from ``ablation-targets.json``.

    Raises:
        FileNotFoundError: the file is missing (names it).
    """
    path = Path(path) if path is not None else DEFAULT_TARGETS
    if not path.is_file():
        raise FileNotFoundError(f"paper targets not found: {path} (pass --targets)")
    doc = json.loads(path.read_text())
    return {(int(t["table"]), r["setting"]): r for t in doc["tables"] for r in t["rows"]}


def paper_row(cfg: Config, targets: dict) -> dict | None:
    """The paper row a config reproduces, or None when it has no ``paper:`` entry.

    Raises:
        ValueError: the ``paper:`` entry names a row the targets do not have (the text must
            match ``ablation-targets.json`` exactly).
    """
    if cfg.paper is None:
        return None
    key = (int(cfg.paper["table"]), cfg.paper["row"])
    if key not in targets:
        rows = [s for (t, s) in targets if t == key[0]]
        raise ValueError(f"paper row {key} is not in ablation-targets.json; table {key[0]} has rows {rows}")
    return targets[key]


def detector_geometry(detector: str, image_size: tuple[int, int]) -> dict:
    """Widths and feature shapes of a detector's cache for one image (built on the meta device).

    Returns:
        ``{"detector", "c1_channels", "num_feature_levels", "spatial_shapes" [L, 2] tensor,
        "c1_size" (H1, W1)}``.

    Raises:
        ValueError: unknown detector (``name[:preset]``).
    """
    return copy.deepcopy(_detector_geometry(detector, tuple(image_size)))


@functools.lru_cache(maxsize=None)
def _detector_geometry(detector: str, image_size: tuple[int, int]) -> dict:
    import torch

    from .detectors import build_detector

    name, _, preset = detector.partition(":")
    with torch.device("meta"):
        model = build_detector(name, preset=preset or None)
    shapes, c1_size = model.feature_shapes(*image_size)
    return {"detector": detector, "c1_channels": int(model.c1_channels),
            "num_feature_levels": int(model.num_feature_levels),
            "spatial_shapes": torch.as_tensor(shapes, dtype=torch.int64, device="cpu"),
            "c1_size": tuple(int(v) for v in c1_size)}


def config_cost(cfg: Config, widths: str | None = None, *, flops: bool = True, num_boxes: int = 100,
                image_size: tuple[int, int] | None = None) -> dict:
    """▲#params / ▲FLOPs of a config's head with a detector's widths (:func:`pipeline.head.cost.head_cost`).

    Args:
        cfg: the config; widths: detector name (default ``cfg.widths``; with neither, the
            config's own ``head.c1_channels`` / ``num_feature_levels`` and no FLOPs).

    Returns:
        :func:`head_cost`'s dict plus ``"widths": {"detector", "c1_channels", "num_feature_levels"}``.

    Raises:
        ValueError: no widths known, or the config contradicts the detector's.
    """
    from .head.cost import PAPER_INPUT_SIZE, head_cost

    image_size = tuple(image_size or PAPER_INPUT_SIZE)
    widths = widths or cfg.widths
    head_cfg = cfg.head
    if widths is not None:
        geo = detector_geometry(widths, image_size)
        head_cfg = head_cfg.with_widths(geo["c1_channels"], geo["num_feature_levels"], source=f"detector {widths}")
    elif not head_cfg.has_widths:
        raise ValueError("the head's input widths depend on the detector: pass --widths DETECTOR "
                         "(dino-focalnet, hdetr-r50, hdetr-swin-l), add `widths: DETECTOR` to the config, or "
                         "--set head.c1_channels=... --set head.num_feature_levels=...")
    else:
        geo = None
        flops = False
    out = head_cost(head_cfg, geo["spatial_shapes"] if geo else None, geo["c1_size"] if geo else None,
                    image_size=image_size, num_boxes=num_boxes, flops=flops)
    out["widths"] = {"detector": widths, "c1_channels": head_cfg.c1_channels,
                     "num_feature_levels": head_cfg.num_feature_levels}
    return out
