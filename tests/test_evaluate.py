"""pipeline/evaluate.py on the real COCO subset in ../shared/data/coco."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_util
from torchvision.ops import roi_align

from pipeline.data import load_coco, select_image_ids
from pipeline.evaluate import (
    AP_KEYS,
    METRICS_FILE,
    RESULTS_FILE,
    encode_rle,
    evaluate_coco,
    format_ap_table,
    instances_to_coco_json,
    paste_masks,
)

from .conftest import COCO_ROOT, require_coco
VAL_ANN = COCO_ROOT / "annotations" / "instances_val2017.json"
EMPTY_VAL_IMAGE = 58636
BANNER = "RANDOM-INIT DETECTOR: numbers are meaningless"


@pytest.fixture(scope="module")
def coco_val():
    require_coco()
    return load_coco(VAL_ANN)


@pytest.fixture(scope="module")
def subset_ids(coco_val):
    ids = select_image_ids(coco_val)
    chosen = ids[:29]
    if EMPTY_VAL_IMAGE not in chosen:
        chosen = sorted(chosen + [EMPTY_VAL_IMAGE])
    return chosen


def _gt_as_predictions(coco, image_ids):
    """Non-crowd ground truth as results (crowd is never matched by COCOeval, so it is left out)."""
    results = []
    for image_id in image_ids:
        info = coco.imgs[image_id]
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])) if not a["iscrowd"]]
        if not anns:
            continue
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64)
        boxes[:, 2:] += boxes[:, :2]
        masks = torch.from_numpy(np.stack([coco.annToMask(a) for a in anns])).bool()
        assert masks.shape[1:] == (info["height"], info["width"])
        results += instances_to_coco_json(
            image_id,
            torch.ones(len(anns)),
            torch.tensor([a["category_id"] for a in anns]),
            boxes,
            masks,
        )
    return results


# ------------------------------------------------------------------------------- paste_masks


def test_paste_masks_box_frame_convention():
    # R >= box size: an all-ones box-frame mask covers exactly the pixels whose centres lie inside the box
    box = torch.tensor([[10.0, 20.0, 30.0, 50.0]])
    out = paste_masks(torch.ones(1, 32, 32), box, 60, 40)
    expected = torch.zeros(60, 40, dtype=torch.bool)
    expected[20:50, 10:30] = True
    assert out.shape == (1, 60, 40) and out.dtype == torch.bool
    assert torch.equal(out[0], expected)
    # coarse R: bilinear weights fade towards the zero padding outside the frame; along an edge a
    # pixel centre half a pixel inside keeps weight >= 0.5, at the four corners the product drops below
    coarse = paste_masks(torch.ones(1, 8, 8), box, 60, 40)[0]
    corners = expected.clone()
    corners[[20, 20, 49, 49], [10, 29, 10, 29]] = False
    assert torch.equal(coarse, corners)
    # left half on: cells c < 16 of 32 over x in [10, 30) -> pixel centres x < 20
    half = torch.zeros(1, 32, 32)
    half[:, :, :16] = 1
    out = paste_masks(half, box, 60, 40)
    expected = torch.zeros(60, 40, dtype=torch.bool)
    expected[20:50, 10:20] = True
    assert torch.equal(out[0], expected)
    # float64 and [N, 1, R, R] input give the same
    assert torch.equal(paste_masks(half[:, None].double(), box.double(), 60, 40), out)


def test_paste_masks_empty_and_chunking():
    out = paste_masks(torch.zeros(0, 28, 28), torch.zeros(0, 4), 50, 70)
    assert out.shape == (0, 50, 70) and out.dtype == torch.bool
    g = torch.Generator().manual_seed(0)
    n = 7
    probs = torch.rand(n, 28, 28, generator=g)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([90.0, 60.0]) - 10  # some boxes leave the image
    wh = torch.rand(n, 2, generator=g) * 50 + 1
    boxes = torch.cat([xy, xy + wh], 1)
    a = paste_masks(probs, boxes, 64, 96)
    b = paste_masks(probs[:, None], boxes, 64, 96, chunk_size=3)
    assert torch.equal(a, b)
    # reference: the whole image sampled at pixel centres in one go
    xs = (torch.arange(96) + 0.5)[None]
    ys = (torch.arange(64) + 0.5)[None]
    gx = ((xs - boxes[:, :1]) / (boxes[:, 2:3] - boxes[:, :1]) * 2 - 1)[:, None, :].expand(n, 64, 96)
    gy = ((ys - boxes[:, 1:2]) / (boxes[:, 3:4] - boxes[:, 1:2]) * 2 - 1)[:, :, None].expand(n, 64, 96)
    ref = F.grid_sample(probs[:, None], torch.stack([gx, gy], 3), align_corners=False)[:, 0] >= 0.5
    assert torch.equal(a, ref)
    with pytest.raises(ValueError, match="boxes_xyxy"):
        paste_masks(probs, boxes[:3], 64, 96)


def test_paste_of_roi_align_keeps_iou(coco_val):
    checked = 0
    for image_id in select_image_ids(coco_val)[:40]:
        info = coco_val.imgs[image_id]
        H, W = info["height"], info["width"]
        anns = [
            a
            for a in coco_val.loadAnns(coco_val.getAnnIds(imgIds=[image_id]))
            if not a["iscrowd"] and min(a["bbox"][2], a["bbox"][3]) >= 64
        ]
        if not anns:
            continue
        gt = torch.from_numpy(np.stack([coco_val.annToMask(a) for a in anns])).float()  # [K, H, W]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
        boxes[:, 2:] += boxes[:, :2]
        rois = torch.cat([torch.arange(len(anns), dtype=torch.float32)[:, None], boxes], 1)
        frame = roi_align(gt[:, None], rois, output_size=(32, 32), spatial_scale=1.0, sampling_ratio=2, aligned=True)
        pasted = paste_masks(frame[:, 0], boxes, H, W)
        gtb = gt.bool()
        inter = (pasted & gtb).flatten(1).sum(1).float()
        union = (pasted | gtb).flatten(1).sum(1).float()
        iou = inter / union
        assert (iou >= 0.9).all(), f"image {image_id}: IoU {iou.tolist()}"
        checked += len(anns)
    assert checked >= 10


def test_without_roi_align_targets_at_fs_grid_paste_back_to_the_gt(coco_val):
    """Table 1 "RoIAlign ✗": ground truth resampled at F's stride-4 grid of the resized image (the
    targets of pipeline.targets) and pasted into the whole original image (Eq. 2, as evaluate does)
    gives the ground-truth mask back."""
    from pipeline.batches import to_xyxy_pixels
    from pipeline.head import HeadConfig
    from pipeline.head.losses import mask_targets_in_boxes
    from pipeline.head.model import mask_frame_boxes, mask_grid_size

    cfg = HeadConfig.from_dict({"roi_align": False, "box_encoder_layers": 0, "box_pos_embed": False,
                                "query_ffn": False, "query_b2o": False, "mask_scoring": False})
    checked = 0
    for image_id in select_image_ids(coco_val)[:8]:
        info = coco_val.imgs[image_id]
        H, W = info["height"], info["width"]
        anns = [a for a in coco_val.loadAnns(coco_val.getAnnIds(imgIds=[image_id]))
                if not a["iscrowd"] and min(a["bbox"][2], a["bbox"][3]) >= 32]
        if not anns:
            continue
        gt = torch.from_numpy(np.stack([coco_val.annToMask(a) for a in anns])).float()
        scale = min(800 / min(H, W), 1333 / max(H, W))  # the detectors' test resize; C1 is its stride-4 map
        c1_size = (-(-round(H * scale) // 4), -(-round(W * scale) // 4))
        boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]]).expand(len(anns), 4)  # any box: the mask spans the image
        frame = to_xyxy_pixels(mask_frame_boxes(cfg, boxes), H, W)
        targets = mask_targets_in_boxes(gt, frame, mask_grid_size(cfg, c1_size))
        assert targets.shape == (len(anns), *c1_size)
        pasted = paste_masks(targets, frame, H, W)
        gtb = gt.bool()
        iou = (pasted & gtb).flatten(1).sum(1).float() / (pasted | gtb).flatten(1).sum(1).float()
        assert (iou >= 0.9).all(), f"image {image_id}: IoU {iou.tolist()}"
        checked += len(anns)
    assert checked >= 10


# ------------------------------------------------------------------------------- records


def test_encode_rle_roundtrip():
    m = torch.zeros(3, 17, 23, dtype=torch.bool)
    m[0, 2:9, 4:20] = True
    m[2, 16, 22] = True
    rles = encode_rle(m)
    assert len(rles) == 3 and all(isinstance(r["counts"], str) and r["size"] == [17, 23] for r in rles)
    json.dumps(rles)
    for k, r in enumerate(rles):
        dec = mask_util.decode({"size": r["size"], "counts": r["counts"].encode()})
        assert np.array_equal(dec.astype(bool), m[k].numpy())
    assert encode_rle(torch.zeros(0, 5, 5, dtype=torch.bool)) == []


def test_instances_to_coco_json_fields():
    m = torch.zeros(2, 10, 12, dtype=torch.bool)
    m[0, 1:4, 2:8] = True
    recs = instances_to_coco_json(
        42, torch.tensor([0.9, 0.25]), torch.tensor([1, 90]), torch.tensor([[2.0, 1.0, 8.0, 4.0], [0.0, 0.0, 12.0, 10.0]]), m
    )
    assert recs[0]["bbox"] == pytest.approx([2.0, 1.0, 6.0, 3.0]) and recs[1]["bbox"] == pytest.approx([0, 0, 12, 10])
    assert recs[0]["image_id"] == 42 and recs[1]["category_id"] == 90 and recs[0]["score"] == pytest.approx(0.9)
    assert isinstance(recs[0]["score"], float) and "segmentation" in recs[0]
    boxes_only = instances_to_coco_json(42, torch.tensor([0.5]), torch.tensor([3]), torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    assert "segmentation" not in boxes_only[0]
    assert instances_to_coco_json(1, torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, 4)) == []


# ------------------------------------------------------------------------------- COCOeval


def test_ground_truth_as_predictions_gives_ap_1(coco_val, subset_ids, tmp_path, capsys):
    results = _gt_as_predictions(coco_val, subset_ids)
    metrics = evaluate_coco(coco_val, results, tmp_path, banner=BANNER, image_ids=subset_ids)
    for iou_type in ("segm", "bbox"):
        m = metrics[iou_type]
        for key in ("AP", "AP50", "AP75"):
            assert m[key] == pytest.approx(100.0, abs=1e-6), (iou_type, key, m[key])
        for key in ("APs", "APm", "APl"):
            assert math.isnan(m[key]) or m[key] == pytest.approx(100.0, abs=1e-6)
        present = {coco_val.cats[r["category_id"]]["name"] for r in results}
        for name, ap in m["per_category"].items():
            if name in present:
                assert ap == pytest.approx(100.0, abs=1e-6)
    out = capsys.readouterr().out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in out
    assert out.count(BANNER) >= 4  # above each AP table and each per-category table
    assert "100.000" in out

    # files: valid strict JSON, results as given, metrics in percent with the banner
    written = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert len(written) == len(results) and written[0]["segmentation"]["counts"] == results[0]["segmentation"]["counts"]
    text = (tmp_path / METRICS_FILE).read_text()
    assert "NaN" not in text
    saved = json.loads(text)
    assert saved["banner"] == BANNER
    assert set(saved) == {"banner", "segm", "bbox"}
    assert set(saved["segm"]) == set(AP_KEYS) | {"per_category"}
    assert saved["segm"]["AP"] == pytest.approx(100.0)
    assert len(saved["bbox"]["per_category"]) == 80
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp files left

    table = format_ap_table(saved, per_category=True)
    assert BANNER in table and "AP50" in table and "person" in table


def test_missing_image_counts_as_miss(coco_val, subset_ids, tmp_path, capsys):
    results = _gt_as_predictions(coco_val, subset_ids)
    dropped = results[0]["image_id"]
    partial = [r for r in results if r["image_id"] != dropped]
    metrics = evaluate_coco(coco_val, partial, tmp_path, iou_types=("bbox",), image_ids=subset_ids)
    assert set(metrics) == {"bbox"} and metrics["bbox"]["AP"] < 100.0
    with pytest.raises(ValueError, match="outside"):
        evaluate_coco(coco_val, results, tmp_path, iou_types=("bbox",), image_ids=subset_ids[1:])


def test_format_only(tmp_path):
    results = instances_to_coco_json(139, torch.tensor([0.7]), torch.tensor([64]), torch.tensor([[1.0, 2.0, 30.0, 40.0]]))
    metrics = evaluate_coco(None, results, tmp_path / "out", format_only=True)
    assert metrics == {}
    assert json.loads((tmp_path / "out" / RESULTS_FILE).read_text()) == results
    assert not (tmp_path / "out" / METRICS_FILE).exists()
    with pytest.raises(ValueError, match="coco_gt"):
        evaluate_coco(None, results, tmp_path / "out2")


def test_empty_results(coco_val, subset_ids, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.evaluate"):
        metrics = evaluate_coco(coco_val, [], tmp_path, image_ids=subset_ids, banner=BANNER)
    assert "no predictions" in caplog.text
    for iou_type in ("segm", "bbox"):
        assert metrics[iou_type]["AP"] == 0.0 and metrics[iou_type]["AP50"] == 0.0
    assert json.loads((tmp_path / RESULTS_FILE).read_text()) == []
    saved = json.loads((tmp_path / METRICS_FILE).read_text())
    assert saved["segm"]["AP"] == 0.0 and saved["banner"] == BANNER
