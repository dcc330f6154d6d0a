"""Boundary AP (and a cross-check) through faster-coco-eval, the UNOFFICIAL evaluator.

The official numbers of this project are pycocotools' (:func:`pipeline.evaluate.evaluate_coco`).
faster-coco-eval (PyPI ``faster-coco-eval``, C++ ``evaluateImg``/``accumulate``) adds the
Boundary IoU of Cheng et al. 2021 (``iouType="boundary"``: per pair the minimum of mask IoU and
the IoU of the mask boundaries dilated by ``dilation_ratio`` x the image diagonal; default 0.02,
the Boundary IoU paper's and its ``boundary_iou_api``'s value). Its ``segm`` AP is held equal to
pycocotools' within 1e-4 on the real data by ``tests/test_eval_tools.py``; every number from here
is labelled :data:`UNOFFICIAL` in tables and ``metrics.json``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

UNOFFICIAL = "unofficial evaluator: faster-coco-eval"
IOU_TYPES = ("segm", "bbox", "boundary")


def _require():
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        raise ValueError("boundary AP needs faster-coco-eval: pip install 'mask-frozen-detr[eval]' "
                         "(or pip install faster-coco-eval)") from None
    from faster_coco_eval import COCO, COCOeval_faster

    return COCO, COCOeval_faster


def evaluate_faster(ann_file: str | Path, results: list[dict], iou_type: str = "boundary",
                    image_ids: Sequence[int] | None = None, dilation_ratio: float = 0.02) -> dict:
    """AP of COCO results with faster-coco-eval (unofficial).

    Args:
        ann_file: ground-truth COCO json (original pixels).
        results: COCO results records (``segmentation`` RLE for ``segm`` / ``boundary``; bbox xywh).
        iou_type: ``segm``, ``bbox`` or ``boundary``.
        image_ids: evaluated images (None = all of ``ann_file``).
        dilation_ratio: boundary width as a fraction of the image diagonal (``boundary`` only).

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` in percent (NaN when undefined),
        ``"per_category": {name: AP}``, ``"evaluator": UNOFFICIAL``, and for boundary
        ``"dilation_ratio"``; the ``precision`` array of the accumulated evaluation under
        ``"_precision"`` (``[T, R, K, A, M]``, not written to json).

    Raises:
        ValueError: unknown ``iou_type``; faster-coco-eval not installed.
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"unknown iou type {iou_type!r} (expected one of {IOU_TYPES})")
    from .evaluate import AP_KEYS, derive_metrics

    COCO, COCOeval_faster = _require()
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        dt_list = copy.deepcopy(results)
        if iou_type != "bbox":
            for r in dt_list:
                r.pop("bbox", None)  # mask areas for small/medium/large, as the official path
        dt = gt.loadRes(dt_list) if dt_list else None
    if dt is None:
        log.warning("no results: %s AP is 0", iou_type)
        return {k: 0.0 for k in AP_KEYS} | {"per_category": {}, "evaluator": UNOFFICIAL}
    kw = {"boundary_dilation_ratio": dilation_ratio} if iou_type == "boundary" else {}
    ev = COCOeval_faster(gt, dt, iou_type, print_function=log.debug, **kw)
    if image_ids is not None:
        ev.params.imgIds = sorted(int(i) for i in image_ids)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    out = derive_metrics(ev, gt.cats)
    out["evaluator"] = UNOFFICIAL
    if iou_type == "boundary":
        out["dilation_ratio"] = dilation_ratio
    out["_precision"] = np.asarray(ev.eval["precision"])
    return out


def add_boundary_ap(out_dir: str | Path, ann_file: str | Path, image_ids: Sequence[int],
                    dilation_ratio: float = 0.02, banner: str | None = None) -> dict:
    """Boundary AP of ``<out_dir>/coco_instances_results.json``, added to ``<out_dir>/metrics.json``.

    Reads the results ``evaluate`` wrote, evaluates them with :func:`evaluate_faster`
    (``iou_type="boundary"``), prints the table under an "unofficial evaluator" line and rewrites
    ``metrics.json`` atomically with a ``"boundary"`` entry (labelled ``"evaluator": UNOFFICIAL``).

    Returns:
        the boundary metrics (with ``_precision``).

    Raises:
        ValueError: faster-coco-eval missing; FileNotFoundError: no results/metrics in ``out_dir``.
    """
    import json

    from .evaluate import METRICS_FILE, RESULTS_FILE, format_ap_table, write_json_atomic

    out_dir = Path(out_dir)
    results = json.loads((out_dir / RESULTS_FILE).read_text())
    m = evaluate_faster(ann_file, results, "boundary", image_ids, dilation_ratio)
    metrics = json.loads((out_dir / METRICS_FILE).read_text())
    metrics["boundary"] = {k: v for k, v in m.items() if not k.startswith("_")}
    write_json_atomic(out_dir / METRICS_FILE, metrics)
    table = format_ap_table({"boundary": metrics["boundary"]} | ({"banner": banner} if banner else {}))
    print(f"({UNOFFICIAL}; Boundary IoU, dilation ratio {dilation_ratio})\n{table}", flush=True)
    return m
