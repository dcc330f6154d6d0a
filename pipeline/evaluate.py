"""From predicted box-frame masks to COCO results json and the official COCOeval numbers.

* :func:`paste_masks` - resample ``R x R`` box-frame mask probabilities into the full image
  (detectron2 ``layers/mask_ops.py`` ``paste_masks_in_image`` semantics).
* :func:`encode_rle` / :func:`instances_to_coco_json` - COCO results records
  (detectron2 ``evaluation/coco_evaluation.py`` ``instances_to_coco_json``).
* :func:`evaluate_coco` - official pycocotools COCOeval per IoU type, the standard 12-line
  summary, the AP / AP50 / AP75 / APs / APm / APl table in percent, per-category AP, and
  ``coco_instances_results.json`` + ``metrics.json`` written atomically.

All boxes here are in ORIGINAL image pixels (the frame of the annotation file).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from .utils import write_bytes_atomic

logger = logging.getLogger(__name__)

RESULTS_FILE = "coco_instances_results.json"
METRICS_FILE = "metrics.json"
AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")

# Bytes of float32 intermediate one pasting chunk may use on an accelerator (detectron2 uses 1 GB).
_GPU_MEM_LIMIT = 1024**3


# --------------------------------------------------------------------------------------------
# Pasting masks
# --------------------------------------------------------------------------------------------


def _paste_chunk(masks: Tensor, boxes: Tensor, height: int, width: int, tight: bool) -> tuple[Tensor, tuple]:
    """Bilinear resample of ``masks [n, 1, R, R]`` into ``boxes [n, 4]``.

    Returns ``(values [n, h', w'], (y0, y1, x0, x1))``: the image region those values cover
    (the union of the boxes, grown by one pixel, clipped to the image, if ``tight``; else the
    whole image). Outside the region every value is 0 (grid_sample zero padding).
    """
    if tight:
        x0 = int(torch.clamp(boxes[:, 0].min().floor() - 1, min=0).item())
        y0 = int(torch.clamp(boxes[:, 1].min().floor() - 1, min=0).item())
        x1 = int(torch.clamp(boxes[:, 2].max().ceil() + 1, max=width).item())
        y1 = int(torch.clamp(boxes[:, 3].max().ceil() + 1, max=height).item())
        x0, y0 = min(x0, width), min(y0, height)
        x1, y1 = max(x1, x0), max(y1, y0)
    else:
        x0, y0, x1, y1 = 0, 0, width, height
    n = masks.shape[0]
    if x1 <= x0 or y1 <= y0:
        return masks.new_zeros((n, y1 - y0, x1 - x0)), (y0, y1, x0, x1)
    bx0, by0, bx1, by1 = boxes.split(1, dim=1)  # each [n, 1]
    # Pixel centres at (j + 0.5, i + 0.5); box edge x0 -> -1, x1 -> +1 (grid_sample with
    # align_corners=False puts -1 / +1 on the outer edges of the R x R box-frame grid).
    img_x = torch.arange(x0, x1, device=masks.device, dtype=torch.float32) + 0.5
    img_y = torch.arange(y0, y1, device=masks.device, dtype=torch.float32) + 0.5
    img_x = (img_x[None] - bx0) / (bx1 - bx0) * 2 - 1  # [n, w']
    img_y = (img_y[None] - by0) / (by1 - by0) * 2 - 1  # [n, h']
    gx = img_x[:, None, :].expand(n, img_y.shape[1], img_x.shape[1])
    gy = img_y[:, :, None].expand(n, img_y.shape[1], img_x.shape[1])
    grid = torch.stack([gx, gy], dim=3).to(masks.dtype)
    out = F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[:, 0], (y0, y1, x0, x1)


def paste_masks(
    mask_probs: Tensor,
    boxes_xyxy: Tensor,
    height: int,
    width: int,
    threshold: float = 0.5,
    chunk_size: int | None = None,
) -> Tensor:
    """Paste box-frame mask probabilities into the full image and binarise them.

    Each ``R x R`` mask is taken to span its box exactly: with a box ``[x0, y0, x1, y1]`` in
    continuous image coordinates, mask cell ``(r, c)`` has its centre at
    ``(x0 + (c + 0.5) (x1 - x0) / R, y0 + (r + 0.5) (y1 - y0) / R)`` - the ``aligned=True``
    convention of ``torchvision.ops.roi_align``. Image pixel ``(i, j)`` has its centre at
    ``(j + 0.5, i + 0.5)`` and takes the bilinear interpolation of the mask there (zero outside
    the box frame), then ``>= threshold``. This is detectron2's ``paste_masks_in_image`` /
    ``_do_paste_mask`` (``F.grid_sample(..., align_corners=False)``).

    Work is done in chunks: on CPU one mask at a time over the pixels near its box; on an
    accelerator enough masks per chunk to keep the float32 intermediate under ~1 GiB.

    Args:
        mask_probs: ``[N, R, R]`` (or ``[N, 1, R, R]``) float probabilities in the box frame
            (``R x R'`` non-square also works).
        boxes_xyxy: ``[N, 4]`` float, xyxy, ORIGINAL image pixels.
        height, width: original image size in pixels.
        threshold: binarisation threshold on the interpolated probability (``>=``).
        chunk_size: masks per chunk; ``None`` = automatic (see above).

    Returns:
        ``[N, height, width]`` bool on the device of ``mask_probs``. ``N = 0`` gives
        ``[0, height, width]``.

    Raises:
        ValueError: shapes that do not match (the argument is named).
    """
    if mask_probs.dim() == 4:
        if mask_probs.shape[1] != 1:
            raise ValueError(f"mask_probs must be [N, R, R] or [N, 1, R, R], got {tuple(mask_probs.shape)}")
        mask_probs = mask_probs[:, 0]
    if mask_probs.dim() != 3:
        raise ValueError(f"mask_probs must be [N, R, R] or [N, 1, R, R], got {tuple(mask_probs.shape)}")
    if boxes_xyxy.dim() != 2 or boxes_xyxy.shape[1] != 4 or boxes_xyxy.shape[0] != mask_probs.shape[0]:
        raise ValueError(
            f"boxes_xyxy must be [N, 4] with N = {mask_probs.shape[0]} (mask_probs), got {tuple(boxes_xyxy.shape)}"
        )
    height, width = int(height), int(width)
    device = mask_probs.device
    n = mask_probs.shape[0]
    out = torch.zeros((n, height, width), dtype=torch.bool, device=device)
    if n == 0 or height == 0 or width == 0:
        return out
    masks = mask_probs[:, None].float() if not mask_probs.is_floating_point() else mask_probs[:, None]
    if masks.dtype not in (torch.float32, torch.float64):
        masks = masks.float()  # half / bfloat16: interpolate in float32
    boxes = boxes_xyxy.to(device=device, dtype=torch.float32)

    on_cpu = device.type == "cpu"
    if chunk_size is None:
        chunk_size = 1 if on_cpu else max(1, min(n, _GPU_MEM_LIMIT // (4 * height * width)))
    tight = on_cpu or chunk_size == 1
    for start in range(0, n, chunk_size):
        sl = slice(start, min(n, start + chunk_size))
        vals, (y0, y1, x0, x1) = _paste_chunk(masks[sl], boxes[sl], height, width, tight)
        out[sl, y0:y1, x0:x1] = vals >= threshold
    return out


# --------------------------------------------------------------------------------------------
# COCO results records
# --------------------------------------------------------------------------------------------


def encode_rle(masks: Tensor | np.ndarray) -> list[dict]:
    """COCO compressed RLE of binary masks.

    Args:
        masks: ``[N, H, W]`` bool (or {0, 1} integer) tensor / array, original pixels.

    Returns:
        N dicts ``{"size": [H, W], "counts": str}`` (pycocotools ``mask.encode`` on a Fortran-order
        uint8 array; ``counts`` decoded from bytes to str so it is JSON-serialisable, as
        detectron2's ``instances_to_coco_json`` does).
    """
    if isinstance(masks, Tensor):
        masks = masks.detach().to("cpu").numpy()
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {masks.shape}")
    if masks.shape[0] == 0:
        return []
    arr = np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8))  # [H, W, N] Fortran
    rles = mask_util.encode(arr)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("utf-8")
    return list(rles)


def instances_to_coco_json(
    image_id: int,
    scores: Tensor,
    category_ids: Tensor,
    boxes_xyxy: Tensor,
    masks: Tensor | None = None,
) -> list[dict]:
    """COCO results records for the predictions on one image.

    Args:
        image_id: dataset image id (as in the annotation file).
        scores: ``[N]`` float confidences.
        category_ids: ``[N]`` int, DATASET category ids (not contiguous indices).
        boxes_xyxy: ``[N, 4]`` float, xyxy, original pixels.
        masks: ``[N, H, W]`` bool in original pixels, or ``None`` for box-only results.

    Returns:
        N dicts ``{"image_id", "category_id", "bbox": [x, y, w, h] (COCO xywh, original pixels),
        "score": float}`` plus ``"segmentation"`` (RLE with str counts) when masks are given -
        detectron2's ``instances_to_coco_json``.

    Raises:
        ValueError: inconsistent N between the arguments.
    """
    n = int(scores.shape[0])
    if category_ids.shape[0] != n or boxes_xyxy.shape[0] != n or (masks is not None and masks.shape[0] != n):
        raise ValueError(
            f"inconsistent counts: scores {n}, category_ids {category_ids.shape[0]}, boxes {boxes_xyxy.shape[0]}"
            + (f", masks {masks.shape[0]}" if masks is not None else "")
        )
    if n == 0:
        return []
    boxes = boxes_xyxy.detach().to("cpu", torch.float64).clone()
    boxes[:, 2:] -= boxes[:, :2]
    boxes = boxes.tolist()
    scores_l = scores.detach().to("cpu", torch.float64).tolist()
    cats = category_ids.detach().to("cpu").long().tolist()
    rles = encode_rle(masks) if masks is not None else None
    results = []
    for k in range(n):
        rec = {"image_id": int(image_id), "category_id": int(cats[k]), "bbox": boxes[k], "score": float(scores_l[k])}
        if rles is not None:
            rec["segmentation"] = rles[k]
        results.append(rec)
    return results


# --------------------------------------------------------------------------------------------
# Writing files
# --------------------------------------------------------------------------------------------


def _json_safe(obj):
    """Replace NaN / inf floats by None so the output is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_json_atomic(path: str | Path, obj, fault: str | None = None) -> Path:
    """Write ``obj`` as strict JSON to ``path`` atomically (:func:`pipeline.utils.write_bytes_atomic`):
    a reader never sees a half-written file. NaN / inf floats are written as ``null``.

    Raises:
        OSError: ``path`` cannot be written (disk full, permissions), naming it.
    """
    return write_bytes_atomic(path, json.dumps(_json_safe(obj), allow_nan=False).encode(), fault=fault)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _fmt(v) -> str:
    return "nan" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def _grid(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    line = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    fmt_row = lambda r: "|" + "|".join(f" {str(x):^{w}} " for x, w in zip(r, widths)) + "|"  # noqa: E731
    return "\n".join([fmt_row(header), line] + [fmt_row(r) for r in rows])


def _ap_table(iou_type: str, m: dict) -> str:
    return f"Evaluation results for {iou_type} (percent):\n" + _grid(AP_KEYS, [[_fmt(m.get(k)) for k in AP_KEYS]])


def _per_category_table(iou_type: str, per_cat: dict, n_pairs: int = 3) -> str:
    items = list(per_cat.items())
    n_pairs = max(1, min(n_pairs, len(items)))
    header = ["category", "AP"] * n_pairs
    rows = []
    for i in range(0, len(items), n_pairs):
        row = []
        for name, ap in items[i : i + n_pairs]:
            row += [name, _fmt(ap)]
        row += [""] * (2 * n_pairs - len(row))
        rows.append(row)
    return f"Per-category {iou_type} AP (percent):\n" + _grid(header, rows)


def format_ap_table(metrics: dict, per_category: bool = False) -> str:
    """Human-readable tables of a metrics dict from :func:`evaluate_coco` (or ``metrics.json``).

    One AP / AP50 / AP75 / APs / APm / APl row per IoU type in percent (as detectron2 prints it),
    optionally the per-category AP table; the ``banner`` (if any) above every table.
    """
    banner = metrics.get("banner")
    parts = []
    for iou_type, m in metrics.items():
        if not isinstance(m, dict) or "AP" not in m:
            continue
        tables = [_ap_table(iou_type, m)]
        if per_category and m.get("per_category"):
            tables.append(_per_category_table(iou_type, m["per_category"]))
        for t in tables:
            parts.append((f"*** {banner} ***\n" if banner else "") + t)
    return "\n\n".join(parts)


# --------------------------------------------------------------------------------------------
# COCOeval
# --------------------------------------------------------------------------------------------


def _empty_results_coco(coco_gt: COCO) -> COCO:
    """A results COCO with no detections (``COCO.loadRes([])`` fails on an empty list)."""
    dt = COCO()
    dt.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        dt.createIndex()
    return dt


def derive_metrics(coco_eval, cats: dict) -> dict:
    """AP numbers in percent from an accumulated COCOeval (detectron2 ``_derive_coco_results``).

    Args:
        coco_eval: a pycocotools ``COCOeval`` (or faster-coco-eval's, same attributes) after
            ``accumulate`` and ``summarize``.
        cats: the ground truth's ``COCO.cats`` (category id -> dict with ``name``).

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` in percent (NaN where COCOeval reports -1)
        and ``"per_category": {name: AP}`` (area "all", 100 detections, mean over IoU thresholds
        and recall points of the defined precisions).
    """
    out = {}
    for idx, key in enumerate(AP_KEYS):
        v = float(coco_eval.stats[idx])
        out[key] = v * 100 if v >= 0 else float("nan")
    # precision: [T iou thresholds, R recall points, K categories, A area ranges, M max dets]
    precisions = np.asarray(coco_eval.eval["precision"])
    per_cat = {}
    for k, cat_id in enumerate(coco_eval.params.catIds):
        p = precisions[:, :, k, 0, -1]
        p = p[p > -1]
        per_cat[cats[cat_id]["name"]] = float(np.mean(p) * 100) if p.size else float("nan")
    out["per_category"] = per_cat
    return out


def evaluate_coco(
    coco_gt: COCO | None,
    results: list[dict],
    out_dir: str | Path,
    iou_types: Sequence[str] = ("segm", "bbox"),
    banner: str | None = None,
    format_only: bool = False,
    image_ids: Sequence[int] | None = None,
    extra: dict | None = None,
    precision_out: dict | None = None,
) -> dict:
    """Write COCO results, run the official COCOeval, print and save the numbers.

    Follows detectron2's ``COCOEvaluator`` (``evaluation/coco_evaluation.py``):
    ``coco_gt.loadRes(results)``, ``COCOeval(gt, dt, iou_type)`` with ``params.imgIds`` restricted
    to the evaluated images, ``evaluate / accumulate / summarize`` (the standard 12-line summary
    is printed), then AP / AP50 / AP75 / APs / APm / APl in percent and per-category AP
    (area "all", maxDets 100, mean over IoU thresholds and recall points). For ``segm`` the
    ``bbox`` field is dropped from the results so the area ranges use the mask area, as
    detectron2 does.

    Files (each written atomically, temp file + ``os.replace``):
      * ``<out_dir>/coco_instances_results.json``: ``results`` as given;
      * ``<out_dir>/metrics.json``: ``{iou_type: {"AP", "AP50", "AP75", "APs", "APm", "APl",
        "per_category": {name: AP}}, ..., "banner": str (if given)}``, percent; undefined
        values (NaN, e.g. a category absent from the ground truth) are written as ``null``.

    Args:
        coco_gt: ground truth; may be ``None`` when ``format_only``.
        results: records from :func:`instances_to_coco_json` (boxes COCO xywh, original pixels).
        out_dir: output folder (created).
        iou_types: subset of ``("segm", "bbox")``.
        banner: a warning line printed above every table and stored in ``metrics.json``
            (e.g. ``"RANDOM-INIT DETECTOR: numbers are meaningless"``).
        format_only: only write the results json; no evaluation, no ground truth needed.
        image_ids: the images that were evaluated (images with no prediction count as misses);
            ``None`` = every image of ``coco_gt``.
        extra: run facts stored as-is at the top level of ``metrics.json`` (e.g. ``{"impl": ...}``,
            the kernel that ran); keys must not clash with iou types or ``banner``.
        precision_out: if a dict, filled with ``{iou_type: precision [T, R, K, A, M]}`` (COCOeval's
            accumulated array, for :mod:`pipeline.plots`).

    Returns:
        The metrics dict (as written to ``metrics.json`` but with NaN floats kept); ``{}`` (plus
        ``banner``) when ``format_only``. With an empty ``results`` list a warning is logged
        and COCOeval runs against no detections (AP 0 on every category with ground truth).

    Raises:
        ValueError: unknown iou type; ``coco_gt`` missing without ``format_only``; results on
            images outside ``image_ids`` / the ground truth, or with unknown category ids.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for t in iou_types:
        if t not in ("segm", "bbox"):
            raise ValueError(f"unknown iou type {t!r} (expected 'segm' or 'bbox')")

    results_path = write_json_atomic(out_dir / RESULTS_FILE, results, fault="evaluate.results")
    logger.info("wrote %d results to %s", len(results), results_path)
    metrics: dict = {}
    if banner:
        metrics["banner"] = banner
    metrics.update(extra or {})
    if format_only:
        logger.info("format_only: results written, evaluation skipped")
        return metrics
    if coco_gt is None:
        raise ValueError("evaluate_coco needs coco_gt unless format_only=True")

    eval_ids = sorted(coco_gt.getImgIds()) if image_ids is None else sorted({int(i) for i in image_ids})
    unknown = sorted({i for i in eval_ids if i not in coco_gt.imgs})
    if unknown:
        raise ValueError(f"image_ids not in the ground truth: {unknown[:20]}")
    eval_set = set(eval_ids)
    stray = sorted({int(r["image_id"]) for r in results} - eval_set)
    if stray:
        raise ValueError(f"results on images outside the evaluated set: {stray[:20]}")
    bad_cats = sorted({int(r["category_id"]) for r in results} - set(coco_gt.cats))
    if bad_cats:
        raise ValueError(f"results with category ids not in the ground truth: {bad_cats}")

    def say(text: str) -> None:
        print((f"*** {banner} ***\n" if banner else "") + text, flush=True)

    if not results:
        logger.warning("no predictions at all: every AP is 0 (COCOeval run against an empty result set)")

    for iou_type in iou_types:
        if results and iou_type == "segm" and any("segmentation" not in r for r in results):
            logger.warning("results lack 'segmentation': segm evaluation skipped")
            continue
        if results:
            dt_list = copy.deepcopy(results)
            if iou_type == "segm":
                for r in dt_list:
                    r.pop("bbox", None)  # use the mask area for small/medium/large
            with contextlib.redirect_stdout(io.StringIO()):
                coco_dt = coco_gt.loadRes(dt_list)
        else:
            coco_dt = _empty_results_coco(coco_gt)
        coco_eval = COCOeval(coco_gt, coco_dt, iou_type)
        coco_eval.params.imgIds = eval_ids
        with contextlib.redirect_stdout(io.StringIO()):
            coco_eval.evaluate()
            coco_eval.accumulate()
        say(f"COCOeval {iou_type} on {len(eval_ids)} images, {len(results)} detections:")
        coco_eval.summarize()  # prints the standard 12-line summary
        m = derive_metrics(coco_eval, coco_gt.cats)
        if precision_out is not None:
            precision_out[iou_type] = coco_eval.eval["precision"]
        metrics[iou_type] = m
        say(_ap_table(iou_type, m))
        say(_per_category_table(iou_type, m["per_category"]))

    write_json_atomic(out_dir / METRICS_FILE, metrics, fault="evaluate.metrics")
    logger.info("wrote %s", out_dir / METRICS_FILE)
    return metrics
