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


def config_cost(cfg: Config, widths: str | None = None, *, flops: bool = True, num_boxes: int | None = None,
                image_size: tuple[int, int] | None = None, convention: str = "paper") -> dict:
    """▲#params / ▲FLOPs of a config's head with a detector's widths (:func:`pipeline.head.cost.head_cost`).

    Args:
        cfg: the config; widths: detector name (default ``cfg.widths``; with neither, the
            config's own ``head.c1_channels`` / ``num_feature_levels`` and no FLOPs).
        flops: also count ▲FLOPs (one head forward, seconds on a CPU).
        num_boxes: boxes per image (default: the paper's for the detector,
            :func:`pipeline.head.cost.paper_num_boxes`: 300 for dino-focalnet, else 100).
        image_size: ``(h, w)`` resized image (default :data:`pipeline.head.cost.PAPER_IMAGE_SIZE`).
        convention: FLOP convention (:data:`pipeline.flops.CONVENTIONS`; ``"paper"`` by default).

    Returns:
        :func:`head_cost`'s dict plus ``"widths": {"detector", "c1_channels", "num_feature_levels"}``.

    Raises:
        ValueError: no widths known, or the config contradicts the detector's.
    """
    from .head.cost import PAPER_IMAGE_SIZE, head_cost, paper_num_boxes

    image_size = tuple(image_size or PAPER_IMAGE_SIZE)
    widths = widths or cfg.widths
    num_boxes = paper_num_boxes(widths) if num_boxes is None else int(num_boxes)
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
                    image_size=image_size, num_boxes=num_boxes, flops=flops, convention=convention)
    out["widths"] = {"detector": widths, "c1_channels": head_cfg.c1_channels,
                     "num_feature_levels": head_cfg.num_feature_levels}
    return out


def mean_resized_area(ann_file: str | Path, num_images: int = 100, min_size: int = 800, max_size: int = 1333) -> float:
    """Mean pixel count of the first ``num_images`` images of a COCO annotation file (file order)
    after the DETR test-time resize (shorter side ``min_size``, longer at most ``max_size``;
    :func:`pipeline.data.resize_shape`): the image the paper's ▲FLOPs average over.

    Raises:
        FileNotFoundError: the annotation file is missing.
        ValueError: it lists no images.
    """
    from .data import resize_shape

    path = Path(ann_file)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    images = json.loads(path.read_text())["images"][:num_images]
    if not images:
        raise ValueError(f"{path}: no images")
    sizes = [resize_shape(int(i["width"]), int(i["height"]), min_size, max_size) for i in images]
    return sum(h * w for h, w in sizes) / len(sizes)


def cost_report(paths: list[str | Path], targets: dict, *, flops: bool = True, image_size: tuple[int, int] | None = None,
                num_boxes: int | None = None, convention: str = "paper", progress: bool = False) -> list[dict]:
    """Ours vs the paper's ▲#params / ▲FLOPs for every config with a ``paper:`` row that states ▲#params.

    Args:
        paths: config files (those without ``paper:``, or whose row has no ▲#params, are skipped).
        targets: :func:`load_targets`.
        flops, image_size, num_boxes, convention: as :func:`config_cost` (defaults: the paper's convention).
        progress: show a tqdm bar (one head forward per config).

    Returns:
        one dict per row, sorted by (table, file name): ``{"config", "table", "row",
        "params_M", "paper_params_M", "params_diff", "flops_G", "paper_flops_G", "flops_diff",
        "excuse"}``; ``*_diff`` = ours / paper - 1 (None where either side is missing or 0);
        ``excuse`` = the YAML's ``paper.flops_excuse`` / ``paper.excuse`` text, if any.

    Raises:
        ValueError: a ``paper:`` entry names a row the targets lack.
    """
    from tqdm import tqdm

    from .config import load_config

    def diff(ours, paper):
        if ours is None or paper is None or paper == 0:
            return None
        return ours / paper - 1

    rows = []
    for path in tqdm(sorted(Path(p) for p in paths), desc="cost", disable=not progress):
        cfg = load_config(path)
        row = paper_row(cfg, targets)
        if row is None or row.get("params_delta_M") is None:
            continue
        cost = config_cost(cfg, flops=flops, image_size=image_size, num_boxes=num_boxes, convention=convention)
        excuse = "; ".join(str(cfg.paper[k]) for k in ("flops_excuse", "excuse") if k in cfg.paper)
        rows.append({"config": path.stem, "table": int(cfg.paper["table"]), "row": cfg.paper["row"],
                     "params_M": cost["params_delta_M"], "paper_params_M": row["params_delta_M"],
                     "params_diff": diff(cost["params_delta_M"], row["params_delta_M"]),
                     "flops_G": cost["flops_delta_G"], "paper_flops_G": row.get("flops_delta_G"),
                     "flops_diff": diff(cost["flops_delta_G"], row.get("flops_delta_G")),
                     "num_boxes": cost["num_boxes"], "image_size": cost["image_size"],
                     "convention": cost["flops_convention"], "excuse": excuse})
    rows.sort(key=lambda r: (r["table"], r["config"]))
    return rows


def cost_report_markdown(rows: list[dict]) -> str:
    """:func:`cost_report` as a Markdown table (one line per row, then the worst differences)."""
    def num(v, fmt):
        return "–" if v is None else fmt.format(v)

    lines = ["| config | table | ▲#params ours (M) | paper | diff | ▲FLOPs ours (G) | paper | diff | boxes | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['table']} | {num(r['params_M'], '{:.3f}')} | {r['paper_params_M']} | "
                     f"{num(r['params_diff'], '{:+.1%}')} | {num(r['flops_G'], '{:.2f}')} | "
                     f"{num(r['paper_flops_G'], '{}')} | {num(r['flops_diff'], '{:+.1%}')} | {r['num_boxes']} | "
                     f"{r['excuse']} |")
    p = [abs(r["params_diff"]) for r in rows if r["params_diff"] is not None]
    f = [abs(r["flops_diff"]) for r in rows if r["flops_diff"] is not None]
    size = rows[0]["image_size"] if rows else None
    lines.append("")
    lines.append(f"{len(rows)} rows; image {size[0]}x{size[1]}, FLOP convention {rows[0]['convention']!r}"
                 if size else f"{len(rows)} rows")
    if p:
        lines.append(f"▲#params: max |diff| {max(p):.2%}, {sum(v <= 0.03 for v in p)}/{len(p)} within 3 %")
    if f:
        lines.append(f"▲FLOPs: max |diff| {max(f):.2%}, {sum(v <= 0.05 for v in f)}/{len(f)} within 5 %, "
                     f"{sum(v <= 0.10 for v in f)}/{len(f)} within 10 %")
    return "\n".join(lines) + "\n"
