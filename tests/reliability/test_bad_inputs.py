"""A corpus of bad inputs, one test each: a clear error naming the culprit, or a documented, counted skip.

Images, annotation files, checkpoints, caches, configs and non-finite values. Where a command
is refused, what was already written is checked to be intact (array contents, file bytes).
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

from pipeline.cache import CacheError, FeatureCache
from pipeline.config import ConfigError, load_config
from pipeline.data import DataError, gt_instances, load_coco, load_image
from pipeline.detectors import build_detector
from pipeline.detectors.checkpoint import CheckpointError, read_state_dict
from pipeline.checkpoint import load_checkpoint

from ..conftest import COCO_ROOT, SMALL_HEAD, require_coco, run_cli
from ..test_cache import _create, _fingerprint

VAL_DIR = COCO_ROOT / "val2017"


@pytest.fixture(scope="module")
def real_jpeg():
    require_coco()
    return sorted(VAL_DIR.glob("*.jpg"))[0]


def _rgb(path) -> np.ndarray:
    return np.asarray(load_image(path))


# ----------------------------------------------------------------------------------- images
def test_missing_image_file(tmp_path):
    with pytest.raises(DataError, match="image file not found") as err:
        load_image(tmp_path / "nope.jpg")
    assert str(tmp_path / "nope.jpg") in str(err.value)


def test_zero_byte_image(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"corrupt or truncated image file .*empty\.jpg"):
        load_image(tmp_path / "empty.jpg")


def test_truncated_jpeg(tmp_path, real_jpeg):
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(real_jpeg.read_bytes()[:3000])
    with pytest.raises(DataError, match=r"corrupt or truncated image file .*cut\.jpg"):
        load_image(cut)


def test_not_an_image(tmp_path):
    (tmp_path / "notes.jpg").write_text("this is text, not a JPEG\n")
    with pytest.raises(DataError, match="UnidentifiedImageError"):
        load_image(tmp_path / "notes.jpg")


def test_cmyk_jpeg_decodes_to_rgb(tmp_path, real_jpeg):
    src = Image.open(real_jpeg).convert("RGB")
    src.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    out = load_image(tmp_path / "cmyk.jpg", expected_size=src.size)
    assert out.mode == "RGB" and out.size == src.size
    assert np.abs(np.asarray(out, dtype=np.int16) - np.asarray(src, dtype=np.int16)).mean() < 8  # JPEG loss only


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    values = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)  # up to 64491
    Image.fromarray(values).save(tmp_path / "g16.png")
    out = _rgb(tmp_path / "g16.png")
    assert out.shape == (48, 64, 3)
    expected = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
    assert np.array_equal(out[..., 0], expected) and np.array_equal(out[..., 1], expected)
    assert out.max() == 251 and (out[..., 0] == 255).mean() == 0  # PIL's plain convert saturates ~99 % at 255


def test_rgba_png_drops_alpha(tmp_path, real_jpeg):
    rgb = Image.open(real_jpeg).convert("RGB").resize((64, 48))
    rgba = rgb.copy()
    rgba.putalpha(Image.new("L", rgb.size, 7))
    rgba.save(tmp_path / "rgba.png")
    assert np.array_equal(_rgb(tmp_path / "rgba.png"), np.asarray(rgb))


def test_grayscale_jpeg_becomes_three_equal_channels(tmp_path, real_jpeg):
    Image.open(real_jpeg).convert("L").save(tmp_path / "gray.jpg")
    out = _rgb(tmp_path / "gray.jpg")
    assert out.ndim == 3 and out.shape[2] == 3
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


def test_palette_png_decodes_to_its_colours(tmp_path):
    pal = Image.new("P", (8, 4))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putdata([0, 1] * 16)
    pal.save(tmp_path / "pal.png")
    out = _rgb(tmp_path / "pal.png")
    assert out[0, 0].tolist() == [255, 0, 0] and out[0, 1].tolist() == [0, 0, 255]


def test_exif_rotated_jpeg_is_decoded_upright(tmp_path, real_jpeg):
    src = Image.open(real_jpeg).convert("RGB")
    w, h = src.size
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display = rotate 90 degrees clockwise
    src.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    out = load_image(tmp_path / "rot.jpg", expected_size=(h, w))  # annotations describe the upright image
    assert out.size == (h, w)
    upright = np.asarray(src.transpose(Image.Transpose.ROTATE_270), dtype=np.int16)
    assert np.abs(np.asarray(out, dtype=np.int16) - upright).mean() < 4


def test_image_size_disagreeing_with_annotation(real_jpeg):
    w, h = Image.open(real_jpeg).size
    with pytest.raises(DataError) as err:
        load_image(real_jpeg, expected_size=(w + 1, h))
    assert f"{w} x {h}" in str(err.value) and f"{w + 1} x {h}" in str(err.value) and real_jpeg.name in str(err.value)


def test_extract_checks_images_before_building_the_detector(tmp_path):
    require_coco()
    ann = json.loads((COCO_ROOT / "annotations" / "instances_val2017.json").read_text())
    images = sorted(ann["images"], key=lambda im: im["id"])[:3]
    ann["images"] = images
    ann["annotations"] = [a for a in ann["annotations"] if a["image_id"] in {im["id"] for im in images}]
    ann_file = _write(tmp_path, ann)
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    shutil.copy(VAL_DIR / images[0]["file_name"], img_dir / images[0]["file_name"])  # 2 of 3 missing
    out = tmp_path / "c.zarr"
    proc = run_cli("extract", "--preset", "golden-small", "--random-init", "--ann-file", ann_file, "--image-dir",
                   img_dir, "--out", out, check=False)
    assert proc.returncode == 2
    assert "2 of 3 image files are missing" in proc.stderr and images[1]["file_name"] in proc.stderr
    assert "--skip-bad-images" in proc.stderr and not out.exists()  # refused before any compute or write


# ------------------------------------------------------------------------------ annotations
def _dataset(**changes) -> dict:
    """A small valid COCO dict (2 images, 1 category) with ``changes`` applied."""
    d = {"images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
                    {"id": 2, "file_name": "b.jpg", "width": 40, "height": 30}],
         "annotations": [{"id": 10, "image_id": 1, "category_id": 3, "bbox": [2, 2, 10, 8], "area": 80, "iscrowd": 0,
                          "segmentation": [[2, 2, 12, 2, 12, 10, 2, 10]]}],
         "categories": [{"id": 3, "name": "car"}]}
    d.update(changes)
    return d


def _write(tmp_path, obj, name="ann.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def test_malformed_json(tmp_path):
    path = _write(tmp_path, '{"images": [')
    with pytest.raises(DataError, match="not valid JSON") as err:
        load_coco(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_missing_top_level_key(tmp_path, key):
    d = _dataset()
    del d[key]
    with pytest.raises(DataError, match=f"has no '{key}' key"):
        load_coco(_write(tmp_path, d))


def test_polygon_with_fewer_than_three_points_is_a_counted_skip(tmp_path, caplog):
    anns = [dict(_dataset()["annotations"][0], id=10, segmentation=[[2, 2, 12, 2]]),  # 2 points: dropped
            dict(_dataset()["annotations"][0], id=11, segmentation=[[1, 1, 5], [2, 2, 12, 2, 12, 10, 2, 10]])]
    with caplog.at_level(logging.WARNING):
        coco = load_coco(_write(tmp_path, _dataset(annotations=anns)))
    assert "dropped 2 polygon(s) of fewer than 3 points and 1 annotation(s)" in caplog.text
    assert sorted(coco.anns) == [11] and coco.anns[11]["segmentation"] == [[2, 2, 12, 2, 12, 10, 2, 10]]
    assert gt_instances(coco, 1)["masks"].sum() > 0


def test_rle_of_the_wrong_size(tmp_path):
    rle = mask_util.encode(np.asfortranarray(np.ones((20, 40), dtype=np.uint8)))
    ann = dict(_dataset()["annotations"][0], iscrowd=1, segmentation={"size": [20, 40], "counts": rle["counts"].decode()})
    with pytest.raises(DataError, match=r"annotation 10: RLE size \[20, 40\] differs .* \[30, 40\]"):
        load_coco(_write(tmp_path, _dataset(annotations=[ann])))


@pytest.mark.parametrize("bbox", [[2, 2, 0, 8], [12, 2, -10, 8]], ids=["zero-area", "negative"])
def test_empty_box_is_a_counted_skip(tmp_path, caplog, bbox):
    ann = dict(_dataset()["annotations"][0], bbox=bbox)
    with caplog.at_level(logging.WARNING):
        coco = load_coco(_write(tmp_path, _dataset(annotations=[ann])))
    assert "1 annotation(s) with a zero-area or negative box" in caplog.text
    assert len(gt_instances(coco, 1)["ann_ids"]) == 0  # not a training target


@pytest.mark.parametrize("bbox", [[1, 2, 3], [1, 2, float("nan"), 4], "1,2,3,4"])
def test_malformed_box(tmp_path, bbox):
    ann = dict(_dataset()["annotations"][0], bbox=bbox)
    with pytest.raises(DataError, match=r"annotation 10: bbox .* is not \[x, y, width, height\]"):
        load_coco(_write(tmp_path, _dataset(annotations=[ann])))


def test_crowd_only_image_gives_no_training_target(tmp_path):
    from pipeline.batches import ground_truth

    ann = dict(_dataset()["annotations"][0], iscrowd=1)
    coco = load_coco(_write(tmp_path, _dataset(annotations=[ann])))
    assert gt_instances(coco, 1)["iscrowd"].tolist() == [True]
    assert len(ground_truth(coco, 1)["category_ids"]) == 0


def test_image_without_annotations_is_valid(tmp_path):
    coco = load_coco(_write(tmp_path, _dataset()))
    gt = gt_instances(coco, 2)
    assert gt["boxes_xyxy"].shape == (0, 4) and gt["masks"].shape == (0, 30, 40)


def test_unknown_category_id(tmp_path):
    ann = dict(_dataset()["annotations"][0], category_id=99)
    with pytest.raises(DataError, match="annotation 10 refers to unknown category_id 99"):
        load_coco(_write(tmp_path, _dataset(annotations=[ann])))


def test_duplicate_image_ids(tmp_path):
    d = _dataset()
    d["images"][1]["id"] = 1
    with pytest.raises(DataError, match=r"duplicate image ids \[1\]"):
        load_coco(_write(tmp_path, d))


# ------------------------------------------------------------------------------ checkpoints
def test_checkpoint_of_another_model(tmp_path):
    import torchvision

    path = tmp_path / "resnet18.pth"
    torch.save({"model": torchvision.models.resnet18().state_dict()}, path)
    with torch.device("meta"):
        model = build_detector("dino-focalnet", preset="golden-small")
    with pytest.raises(CheckpointError) as err:
        model.load_checkpoint(str(path))
    assert str(path) in str(err.value) and "layer1.0.conv1.weight" in str(err.value)


def test_truncated_checkpoint(tmp_path):
    full = tmp_path / "full.pth"
    torch.save({"model": {"w": torch.zeros(1000)}}, full)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(full.read_bytes()[:1500])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint") as err:
        read_state_dict(cut)
    assert str(cut) in str(err.value)


class _RunsCode:
    """Unpickling this would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    assert "refusing to unpickle global 'posix.system'" in str(err.value) and str(path) in str(err.value)
    assert "weights_only=False" not in str(err.value)  # never advise running the file's code
    with pytest.raises(ValueError, match="cannot be read as a head checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_head_checkpoint_for_evaluate(tmp_path):
    path = tmp_path / "head.pt"
    torch.save({"kind": "mask-frozen-detr-head", "head": {"w": torch.zeros(5000)}}, path)
    path.write_bytes(path.read_bytes()[:2000])
    proc = run_cli("evaluate", "--cache", tmp_path / "none.zarr", "--checkpoint", path, "--out", tmp_path / "e",
                   check=False)
    assert proc.returncode == 2 and f"{path}: cannot be read as a head checkpoint" in proc.stderr


# ----------------------------------------------------------------------------------- caches
@pytest.mark.parametrize("field, value", [("detector", "other-detector"), ("checkpoint_sha256", "f00d"),
                                          ("preprocessing", {"min_size": 800, "max_size": 1333})])
def test_cache_from_another_setup_is_refused(tmp_path, field, value):
    _create(tmp_path / "c.zarr")
    with pytest.raises(CacheError, match=f"stale or from another setup:\\n  {field}: expected"):
        FeatureCache.open(tmp_path / "c.zarr", expected=_fingerprint(**{field: value}))


def test_val_cache_with_another_fingerprint_is_refused_before_training(tmp_path):
    _create(tmp_path / "train.zarr")
    FeatureCache.create_or_resume(tmp_path / "val.zarr", _fingerprint(checkpoint_sha256="other"),
                                  [], top_k=5, hidden_dim=8, num_classes=3, c1_channels=6)
    proc = run_cli("train-head", "--cache", tmp_path / "train.zarr", "--val-cache", tmp_path / "val.zarr",
                   "--out", tmp_path / "run", check=False)
    assert proc.returncode == 2
    assert "val.zarr: cache is stale or from another setup" in proc.stderr and "checkpoint_sha256" in proc.stderr
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_store_with_a_newer_format_version(tmp_path):
    cache = _create(tmp_path / "c.zarr")
    cache.group.attrs["format_version"] = 99
    with pytest.raises(CacheError, match="format version 99 is not supported"):
        FeatureCache.open(tmp_path / "c.zarr")


# ---------------------------------------------------------------------------------- configs
def test_config_with_an_unknown_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("head:\n  hiden_dim: 256\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: head: unknown HeadConfig keys: \['hiden_dim'\]"):
        load_config(path)


def test_config_with_a_wrong_type(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: fast\n")
    with pytest.raises(ConfigError, match="expected a number, got 'fast'"):
        load_config(path)


# ------------------------------------------------------------------------------ non-finite
def _train_args(cache, run, *extra):
    sets = [x for kv in [*SMALL_HEAD, "train.checkpoint_every=1"] for x in ("--set", kv)]
    return ["train-head", "--cache", cache, *sets, "--batch-size", 2, "--device", "cpu", "--out", run, *extra]


def test_nan_in_cached_features_stops_training_naming_the_images(tmp_path, small_caches):
    cache_path = tmp_path / "train.zarr"
    shutil.copytree(small_caches["train"], cache_path)
    run = tmp_path / "run"
    args = _train_args(cache_path, run, "--max-iters", 2)
    proc = run_cli(*args, check=False, env={"MFDETR_FAULT": "train.mid_step:2"})  # stopped with step 1 saved
    assert proc.returncode == 137 and load_checkpoint(run / "checkpoint.pt")["step"] == 1
    before = (run / "checkpoint.pt").read_bytes()
    cache = FeatureCache.open(cache_path, mode="r+")
    q = cache.group["queries"][...]
    q[:] = np.nan
    cache.group["queries"][...] = q
    proc = run_cli(*args, "--resume", check=False)
    assert proc.returncode == 2
    assert "loss is nan at step 2 on images" in proc.stderr and "(queries)" in proc.stderr
    assert "is intact; continue with --resume" in proc.stderr
    assert (run / "checkpoint.pt").read_bytes() == before


def test_nan_loss_from_finite_features_names_the_step(tmp_path, small_caches):
    run = tmp_path / "run"
    proc = run_cli(*_train_args(small_caches["train"], run, "--max-iters", 4, "--set", "train.lr=1e30",
                                "--set", "train.clip_grad_norm=0"), check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "the cached inputs are finite" in proc.stderr and "Stopped before the update" in proc.stderr
    step = int(proc.stderr.split(" at step ")[1].split()[0])
    assert load_checkpoint(run / "checkpoint.pt")["step"] == step - 1
