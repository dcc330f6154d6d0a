"""Users' tools on real images: --mask-fraction, predict (overlays + results json), visualize."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from pipeline.cache import FeatureCache

from .conftest import COCO_ROOT, REPO, SMALL_HEAD, head_sets, run_cli

CONFIG = REPO / "configs" / "mfdetr_dino_focalnet_l.yaml"


@pytest.fixture(scope="module")
def fraction_run(small_caches, tmp_path_factory):
    """A 2-iteration head trained with --mask-fraction 0.25 on the 12-image train cache (--tensorboard, --quiet)."""
    run = tmp_path_factory.mktemp("frac") / "run"
    proc = run_cli("train-head", "--cache", small_caches["train"], "--config", CONFIG, *head_sets(),
                   "--mask-fraction", 0.25, "--max-iters", 2, "--batch-size", 2, "--device", "cpu",
                   "--tensorboard", "--quiet", "--out", run)
    return run, proc


def test_mask_fraction_trains_on_the_stated_number_of_images(fraction_run, small_caches):
    run, proc = fraction_run
    subset = json.loads((run / "mask_subset.json").read_text())
    cache = FeatureCache.open(small_caches["train"])
    coco = COCO(str(COCO_ROOT / "annotations" / "instances_train2017.json"))
    trainable = [int(cache.image_ids[i]) for i in cache.done_indices()
                 if coco.getAnnIds(imgIds=int(cache.image_ids[i]), iscrowd=False)]
    assert subset["of"] == len(trainable)
    assert subset["images"] == len(subset["image_ids"]) == max(1, round(0.25 * len(trainable)))
    assert set(subset["image_ids"]) <= set(trainable)
    assert "mask_fraction: 0.25" in (run / "config.yaml").read_text()


def test_tensorboard_scalars_beside_jsonl_and_quiet(fraction_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, proc = fraction_run
    assert "train-head:" not in proc.stderr and " INFO " not in proc.stderr  # --quiet: no bar, no info lines
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert "train/loss" in events.Tags()["scalars"] and "train/lr" in events.Tags()["scalars"]
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [s["step"] for s in steps]
    assert [e.value for e in loss] == pytest.approx([s["loss"] for s in steps], rel=1e-6)


def test_mask_fraction_outside_0_1_is_refused(tmp_path, small_caches):
    from pipeline.config import ConfigError, load_config
    from pipeline.subsets import check_mask_fraction

    proc = run_cli("train-head", "--cache", small_caches["train"], "--mask-fraction", "0", "--max-iters", 1,
                   "--out", tmp_path / "r", check=False)
    assert proc.returncode == 2
    assert "--mask-fraction" in proc.stderr and "(0, 1]" in proc.stderr
    assert not (tmp_path / "r").exists()
    for bad in (1.5, -0.1, float("nan"), "half"):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            check_mask_fraction(bad)
    with pytest.raises(ConfigError, match="train.mask_fraction"):
        load_config(CONFIG, ["train.mask_fraction=2"])
    assert check_mask_fraction(1) == 1.0


def test_predict_writes_overlays_and_loadable_results(fraction_run, tmp_path):
    run, _ = fraction_run
    images = tmp_path / "images"
    images.mkdir()
    names = sorted(p.name for p in (COCO_ROOT / "val2017").iterdir())[:2]
    for n in names:
        shutil.copy(COCO_ROOT / "val2017" / n, images / n)
    (images / "broken.jpg").write_bytes((COCO_ROOT / "val2017" / names[0]).read_bytes()[:2000])
    out = tmp_path / "pred"
    # SMALL_EXTRACT's detector (golden-small, random init, seed 0): the one the head was trained on
    proc = run_cli("predict", images, "--checkpoint", run / "head.pt", "--detector", "dino-focalnet",
                   "--preset", "golden-small", "--random-init", "--top-n", 5, "--score-threshold", 0.0,
                   "--device", "cpu", "--out", out)
    assert "RANDOM-INIT" in proc.stderr and "broken.jpg" in proc.stderr
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["images"] == 2 and list(summary["failed"]) == [str(images / "broken.jpg")]
    for n in names:
        png = out / n.replace(".jpg", ".png")
        with Image.open(png) as im, Image.open(images / n) as orig:
            assert im.size == orig.size
            drawn = np.asarray(im.convert("RGB"), dtype=np.int16)
            assert np.abs(drawn - np.asarray(orig.convert("RGB"), dtype=np.int16)).max() > 0  # something drawn
    gt = COCO(str(out / "images.json"))
    dt = gt.loadRes(str(out / "coco_instances_results.json"))
    assert len(dt.getAnnIds()) == 2 * 5
    assert {a["image_id"] for a in dt.loadAnns(dt.getAnnIds())} == set(gt.getImgIds())
    assert all(a["area"] > 0 or a["segmentation"] for a in dt.loadAnns(dt.getAnnIds()))


def test_predict_refuses_another_detector(fraction_run, tmp_path):
    run, _ = fraction_run
    img = sorted((COCO_ROOT / "val2017").iterdir())[0]
    proc = run_cli("predict", img, "--checkpoint", run / "head.pt", "--preset", "golden-small", "--random-init",
                   "--seed", 1, "--device", "cpu", "--out", tmp_path / "p", check=False)
    assert proc.returncode == 2 and "checkpoint_sha256" in proc.stderr


def test_visualize_writes_probability_maps(fraction_run, small_caches, tmp_path):
    run, _ = fraction_run
    cache = FeatureCache.open(small_caches["val"])
    image_id = int(cache.image_ids[cache.done_indices()[0]])
    out = tmp_path / "vis"
    run_cli("visualize", "--cache", small_caches["val"], "--checkpoint", run / "head.pt", "--image-id", image_id,
            "--top", 3, "--device", "cpu", "--out", out)
    res = json.loads((out / f"{image_id}_instances.json").read_text())
    assert len(res["instances"]) == 3
    info = COCO(str(COCO_ROOT / "annotations" / "instances_val2017.json")).imgs[image_id]
    with Image.open(res["probs_png"]) as im:
        assert im.size == (info["width"], info["height"])
    for inst in res["instances"]:
        with Image.open(inst["png"]) as im:
            im.load()
            assert im.width > 3 * 100 and im.height > 100
    proc = run_cli("visualize", "--cache", small_caches["val"], "--checkpoint", run / "head.pt", "--image-id", 1,
                   "--out", out, check=False)
    assert proc.returncode == 2 and "image id 1" in proc.stderr


def test_evaluate_boundary_and_plots_from_the_cli(fraction_run, small_caches, tmp_path):
    run, _ = fraction_run
    out = tmp_path / "eval"
    proc = run_cli("evaluate", "--cache", small_caches["val"], "--checkpoint", run / "head.pt", "--iou-type",
                   "boundary", "--plots", "--quiet", "--device", "cpu", "--out", out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"segm", "bbox", "boundary"} <= set(metrics)
    assert metrics["boundary"]["evaluator"].startswith("unofficial")
    assert metrics["boundary"]["AP"] is not None and 0 <= metrics["boundary"]["AP"] <= 100
    assert "unofficial evaluator: faster-coco-eval" in proc.stdout
    for name in ("pr_segm", "pr_bbox", "pr_boundary", "per_category_segm"):
        with Image.open(out / f"{name}.png") as im:
            im.load()
            assert im.width >= 600


def test_sam_baseline_on_cached_boxes_with_random_weights(small_caches, tmp_path):
    out = tmp_path / "sam"
    # a reduced encoder input (256 px instead of 1024) keeps ViT-B's forward to seconds on a CPU
    proc = run_cli("evaluate", "--cache", small_caches["val"], "--sam", "sam", "--sam-model", "vit_b",
                   "--random-init", "--sam-image-size", 256, "--max-images", 1, "--quiet", "--device", "cpu",
                   "--out", out)
    assert "RANDOM-INIT SAM" in proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mask_source"] == "sam vit_b" and metrics["boxes"] == "pred"
    assert "RANDOM-INIT SAM" in metrics["banner"] and metrics["segm"]["AP"] is not None
    cache = FeatureCache.open(small_caches["val"])
    image_id = int(cache.image_ids[cache.done_indices()[0]])
    item = cache.read(cache.done_indices()[0])
    results = json.loads((out / "coco_instances_results.json").read_text())
    assert len(results) == 100 and {r["image_id"] for r in results} == {image_id}
    assert all(r["segmentation"]["size"] == list(item.orig_size) for r in results)
    # the boxes are the cached ones: every result box is one of the cached query boxes (xyxy pixels)
    from pipeline.batches import to_xyxy_pixels

    h, w = item.orig_size
    cached = to_xyxy_pixels(item.boxes.float(), h, w).numpy()
    for r in results[:10]:
        x, y, bw, bh = r["bbox"]
        assert np.abs(cached - np.array([x, y, x + bw, y + bh])).max(axis=1).min() < 1e-3
    gt = COCO(str(COCO_ROOT / "annotations" / "instances_val2017.json"))
    assert len(gt.loadRes(str(out / "coco_instances_results.json")).getAnnIds()) == 100


def test_hq_sam_masks_on_boxes_and_wrong_size_weights_refused(tmp_path, small_caches):
    import torch

    from pipeline.sam_baseline import build_sam, sam_masks

    torch.manual_seed(0)
    img = np.asarray(Image.open(sorted((COCO_ROOT / "val2017").iterdir())[0]).convert("RGB"))
    sam = build_sam("hq-sam", "vit_b", image_size=256)
    from segment_anything_hq import SamPredictor

    boxes = torch.tensor([[10.0, 20.0, 200.0, 220.0], [50.0, 60.0, 120.0, 300.0]])
    masks = sam_masks(SamPredictor(sam), "hq-sam", img, boxes)
    assert masks.shape == (2,) + img.shape[:2] and masks.dtype == torch.bool

    wrong = tmp_path / "sam_vit_l_like.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(1024, 3, 16, 16)}, wrong)
    proc = run_cli("evaluate", "--cache", small_caches["val"], "--sam", "sam", "--sam-model", "vit_b",
                   "--sam-weights", wrong, "--out", tmp_path / "e", check=False)
    assert proc.returncode == 2 and "holds vit_l, not --sam-model vit_b" in proc.stderr


def test_benchmark_inference_reports_speed_flops_params(tmp_path):
    import torch

    from pipeline.config import load_config
    from pipeline.detectors import detector_widths
    from pipeline.flops import count_gflops
    from pipeline.head import build_head, count_parameters

    lin = torch.nn.Linear(64, 32)
    assert count_gflops(lambda: lin(torch.zeros(10, 64))) == pytest.approx(10 * 64 * 32 / 1e9)
    images = sorted((COCO_ROOT / "val2017").iterdir())[:2]
    proc = run_cli("benchmark-inference", *images, "--preset", "golden-small", "--random-init", "--min-size", 160,
                   "--max-size", 240, "--top-k", 30, "--num-images", 1, "--warmup", 1, *head_sets(), "--device", "cpu",
                   "--json", "--quiet")
    r = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert r["images"] == 1 and r["detector_ms"] > 0 and r["head_ms"] > 0 and r["post_ms"] > 0
    assert r["images_per_s"] == pytest.approx(1000 / (r["detector_ms"] + r["head_ms"] + r["post_ms"]))
    cfg = load_config(CONFIG, list(SMALL_HEAD))
    head = build_head(cfg.head.with_widths(**detector_widths("dino-focalnet", "golden-small")))[0]
    assert r["head_params"] == count_parameters(head)
    assert r["head_gflops"] > 0.1  # the box encoder alone: 30 boxes x 32 x 32 tokens through 64-d layers
