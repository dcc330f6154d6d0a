"""Evaluation extras on the real COCO val annotations: faster-coco-eval vs pycocotools, Boundary AP, plots."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from pipeline.evaluate import AP_KEYS, evaluate_coco
from pipeline.faster_eval import UNOFFICIAL, evaluate_faster
from pipeline.plots import pr_curves, write_plots

from .conftest import COCO_ROOT, require_coco

ANN = COCO_ROOT / "annotations" / "instances_val2017.json"


def _results(gt: COCO, shift: bool, seed: int = 0) -> list[dict]:
    """Results from the real ground truth: masks shifted by up to 6 px (half of them), 10 % with a
    wrong category, random scores - an imperfect detector with a well-defined answer."""
    rng = np.random.default_rng(seed)
    out = []
    for a in gt.loadAnns(gt.getAnnIds(iscrowd=False)):
        m = gt.annToMask(a)
        if shift and rng.random() < 0.5:
            m = np.roll(m, int(rng.integers(-6, 7)), axis=1)
        rle = mask_util.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode()
        cat = a["category_id"] if not shift or rng.random() < 0.9 else int(rng.choice(sorted(gt.cats)))
        out.append({"image_id": a["image_id"], "category_id": cat, "segmentation": rle, "bbox": a["bbox"],
                    "score": float(rng.random()) if shift else 1.0})
    return out


@pytest.fixture(scope="module")
def gt():
    require_coco()
    return COCO(str(ANN))


def test_faster_coco_eval_segm_equals_pycocotools(gt, tmp_path):
    results = _results(gt, shift=True)
    official = evaluate_coco(gt, results, tmp_path, iou_types=("segm",))["segm"]
    unofficial = evaluate_faster(ANN, results, "segm")
    assert unofficial["evaluator"] == UNOFFICIAL
    assert 20 < official["AP"] < 95  # a non-trivial operating point
    for k in AP_KEYS:
        assert unofficial[k] == pytest.approx(official[k], abs=1e-4 * 100), k  # 1e-4 in AP units (percent here)
    for name, ap in official["per_category"].items():
        assert unofficial["per_category"][name] == pytest.approx(ap, abs=1e-2, nan_ok=True), name


def test_boundary_ap_perfect_is_100_and_penalises_shifted_edges(gt):
    perfect = evaluate_faster(ANN, _results(gt, shift=False), "boundary")
    assert perfect["AP"] == pytest.approx(100.0, abs=1e-6)
    shifted = _results(gt, shift=True)
    b = evaluate_faster(ANN, shifted, "boundary")
    s = evaluate_faster(ANN, shifted, "segm")
    assert b["dilation_ratio"] == 0.02 and b["evaluator"] == UNOFFICIAL
    assert 0 < b["AP"] < s["AP"]  # boundary IoU = min(mask IoU, boundary IoU) <= mask IoU


def test_plots_write_pr_curves_and_per_category_chart(gt, tmp_path):
    precisions = {}
    metrics = evaluate_coco(gt, _results(gt, shift=True), tmp_path, precision_out=precisions)
    assert set(precisions) == {"segm", "bbox"} and precisions["segm"].shape[:2] == (10, 101)
    curves = pr_curves(precisions["segm"])
    ok = np.isfinite(curves["IoU=0.50"])
    assert ok.any() and ((curves["IoU=0.50"][ok] >= 0) & (curves["IoU=0.50"][ok] <= 1)).all()
    # precision at IoU 0.5 is at least at IoU 0.75 at every recall point (a stricter match)
    both = ok & np.isfinite(curves["IoU=0.75"])
    assert (curves["IoU=0.50"][both] >= curves["IoU=0.75"][both] - 1e-12).all()
    paths = write_plots(metrics, precisions, tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["per_category_bbox.png", "per_category_segm.png", "pr_bbox.png",
                                             "pr_segm.png"]
    with Image.open(tmp_path / "plots" / "pr_segm.png") as im:
        assert im.size == (800, 600)
    with Image.open(tmp_path / "plots" / "per_category_segm.png") as im:
        im.load()
        assert im.width == 800 and im.height > 300
