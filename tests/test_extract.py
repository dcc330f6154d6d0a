"""Stage one on real COCO images: determinism, SIGKILL + resume, stale stores, bad images."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.cache import DONE, PENDING, SKIPPED, FeatureCache

from .conftest import COCO_ROOT, REPO, SMALL_EXTRACT, record_fields, records_equal, require_coco, run_cli


def _arrays(path: Path) -> dict:
    g = zarr.open_group(str(path), mode="r")
    out = {}

    def visit(group, prefix=""):
        for name, node in group.members():
            if isinstance(node, zarr.Group):
                visit(node, f"{prefix}{name}/")
            else:
                out[prefix + name] = node[...]

    visit(g)
    return out


def _assert_same_store(a: Path, b: Path):
    xa, xb = _arrays(a), _arrays(b)
    assert sorted(xa) == sorted(xb)
    for k in xa:
        assert np.array_equal(xa[k], xb[k]), f"array {k} differs"
    fa = dict(zarr.open_group(str(a), mode="r").attrs)
    fb = dict(zarr.open_group(str(b), mode="r").attrs)
    assert fa == fb


def test_extract_writes_complete_cache(small_caches):
    cache = FeatureCache.open(small_caches["val"])
    assert len(cache) == 10 and cache.done_indices() == list(range(10))
    assert 58636 in cache.image_ids.tolist()  # a real val2017 image without annotations: extracted like any other
    fp = cache.fingerprint
    assert fp["detector"] == "dino-focalnet" and fp["random_init"] is True
    assert fp["checkpoint_sha256"] == "random-init:seed=0"
    assert fp["encoder_layers"] == [4, 6] and fp["top_k"] == 30 and fp["dtype"] == "float16"
    assert fp["preprocessing"]["min_size"] == 160 and fp["preprocessing"]["max_size"] == 240
    # class columns -> COCO category ids, identity on the 80 real ids
    assert len(fp["class_to_category_id"]) == 80 and all(int(k) == v for k, v in fp["class_to_category_id"].items())
    item = cache.read(0, 6)
    h, w = item.size
    assert min(h, w) <= 160 and max(h, w) <= 240
    assert item.queries.shape == (30, 256) and item.logits.shape == (30, 91)
    assert item.c1.shape[0] == 16 and item.spatial_shapes.shape == (5, 2)
    assert item.tokens.shape == (int(item.spatial_shapes.prod(1).sum()), 256)
    best = item.logits.sigmoid().max(1).values
    assert bool((best[:-1] >= best[1:]).all()), "queries must be ranked by best class score"
    assert bool(((item.boxes >= 0) & (item.boxes <= 1)).all())


def test_random_init_is_reproducible_and_required(tmp_path, small_caches):
    require_coco()
    out = tmp_path / "again.zarr"
    run_cli("extract", *SMALL_EXTRACT, "--coco-root", COCO_ROOT, "--split", "val2017", "--max-images", 10,
            "--out", out)
    _assert_same_store(out, small_caches["val"])
    proc = run_cli("extract", "--preset", "golden-small", "--coco-root", COCO_ROOT, "--split", "val2017",
                   "--out", tmp_path / "x.zarr", check=False)
    assert proc.returncode == 2 and "--weights is required" in proc.stderr


def test_sigkill_then_rerun_equals_uninterrupted(tmp_path, small_caches):
    require_coco()
    out = tmp_path / "killed.zarr"
    args = [sys.executable, str(REPO / "cli.py"), "extract", *SMALL_EXTRACT, "--coco-root", str(COCO_ROOT),
            "--split", "val2017", "--max-images", "10", "--out", str(out)]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done_dir = out / "done" / "c"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if done_dir.is_dir() and len(list(done_dir.iterdir())) >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "extraction finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    status = FeatureCache.open(out).status()
    assert 0 < int((status == DONE).sum()) < 10
    run_cli("extract", *SMALL_EXTRACT, "--coco-root", COCO_ROOT, "--split", "val2017", "--max-images", 10,
            "--out", out)
    _assert_same_store(out, small_caches["val"])


def test_other_settings_refused_and_store_untouched(tmp_path, small_caches):
    out = tmp_path / "copy.zarr"
    shutil.copytree(small_caches["val"], out)
    before = _arrays(out)
    proc = run_cli("extract", *[a if a != "160" else "192" for a in SMALL_EXTRACT], "--coco-root", COCO_ROOT,
                   "--split", "val2017", "--max-images", 10, "--out", out, check=False)
    assert proc.returncode == 2
    assert "preprocessing" in proc.stderr and "--overwrite" in proc.stderr
    after = _arrays(out)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def _copy_dataset(tmp_path: Path, n: int = 4):
    """A COCO-format copy of the first n val images (so files can be damaged)."""
    ann = json.loads((COCO_ROOT / "annotations" / "instances_val2017.json").read_text())
    images = sorted(ann["images"], key=lambda im: im["id"])[:n]
    ids = {im["id"] for im in images}
    ann["images"] = images
    ann["annotations"] = [a for a in ann["annotations"] if a["image_id"] in ids]
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    for im in images:
        shutil.copy(COCO_ROOT / "val2017" / im["file_name"], img_dir / im["file_name"])
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps(ann))
    return ann_file, img_dir, images


def test_bad_image_stops_with_error_or_is_skipped(tmp_path):
    require_coco()
    ann_file, img_dir, images = _copy_dataset(tmp_path)
    bad = img_dir / images[3]["file_name"]  # past the 3 images decoded before the detector is built
    bad.write_bytes(bad.read_bytes()[:2000])  # truncated JPEG
    out = tmp_path / "c.zarr"
    common = [*SMALL_EXTRACT, "--ann-file", ann_file, "--image-dir", img_dir, "--out", out]
    proc = run_cli("extract", *common, check=False)
    assert proc.returncode == 2 and images[3]["file_name"] in proc.stderr
    before = FeatureCache.open(out)
    assert before.status().tolist() == [DONE, DONE, DONE, PENDING]  # written before the error: kept
    kept = [before.read(i, 6) for i in range(3)]
    proc = run_cli("extract", *common, "--skip-bad-images")
    cache = FeatureCache.open(out)
    assert cache.status().tolist() == [DONE, DONE, DONE, SKIPPED]
    assert list(cache.skipped) == [str(images[3]["id"])]
    for i in range(3):  # array contents, not just flags, survived the error and the re-run
        again = cache.read(i, 6)
        assert records_equal(kept[i], again)
    info = json.loads(run_cli("cache-info", out, "--json").stdout)  # what a user sees of this store
    assert (info["images"], info["done"], info["pending"]) == (4, 3, 0)
    assert list(info["skipped"]) == [str(images[3]["id"])] and "truncated" in info["skipped"][str(images[3]["id"])]
    assert info["storage"]["dtype"] == "float16" and info["storage"]["encoder_layers"] == [4, 6]
    arrays = info["arrays"]
    assert arrays["encoder/layer_6"]["dtype"] == "float16" and arrays["c1"]["shape"][1] == 16
    # uncompressed bytes count the rows of every image of the layout, the skipped one's (allocated, never
    # written) included, float16
    rows = sum(int((s[:, 0] * s[:, 1]).sum()) for s in cache._spatial_shapes)
    assert arrays["encoder/layer_6"]["data_bytes"] == rows * cache.read(0, 6).tokens.shape[1] * 2
    assert arrays["encoder/layer_6"]["data_bytes"] > sum(int(cache.read(i, 6).tokens.numel()) * 2 for i in range(3))
    assert info["disk_bytes"] == cache.disk_bytes() and sum(a["stored_bytes"] for a in arrays.values()) <= info["disk_bytes"]
    assert abs(info["mb_per_done_image"] - cache.disk_bytes() / 1e6 / 3) < 1e-3
    text = run_cli("cache-info", out).stdout
    assert f"skipped {images[3]['id']}:" in text and "encoder/layer_6" in text and "MB per done image" in text


def test_missing_image_and_wrong_size(tmp_path):
    require_coco()
    ann_file, img_dir, images = _copy_dataset(tmp_path, 2)
    (img_dir / images[1]["file_name"]).unlink()
    proc = run_cli("extract", *SMALL_EXTRACT, "--ann-file", ann_file, "--image-dir", img_dir,
                   "--out", tmp_path / "a.zarr", check=False)
    assert proc.returncode == 2 and images[1]["file_name"] in proc.stderr
    ann = json.loads(ann_file.read_text())
    ann["images"][0]["width"] += 7
    ann_file.write_text(json.dumps(ann))
    proc = run_cli("extract", *SMALL_EXTRACT, "--ann-file", ann_file, "--image-dir", img_dir,
                   "--image-ids", str(images[0]["id"]), "--out", tmp_path / "b.zarr", check=False)
    assert proc.returncode == 2 and images[0]["file_name"] in proc.stderr and "647 x 426" in proc.stderr


def test_caches_from_different_kernels_are_used_together(tmp_path):
    """The kernel is a run-time choice: same fingerprint, values within 1e-5 (float32 store)."""
    require_coco()
    from kernels import ops

    if not ops.compiled_available("cpu"):
        pytest.skip("CPU kernel not built")
    stores = {}
    for impl in ("reference", "cpu"):
        stores[impl] = tmp_path / f"{impl}.zarr"
        res = run_cli("extract", *SMALL_EXTRACT, "--coco-root", COCO_ROOT, "--split", "val2017", "--max-images", 2,
                      "--dtype", "float32", "--impl", impl, "--out", stores[impl])
        summary = json.loads(res.stdout[res.stdout.index("{"):])
        assert summary["impl"]["impl"] == impl and summary["impl"]["resolved"]["cpu"] == impl
    ref = FeatureCache.open(stores["reference"])
    FeatureCache.open(stores["cpu"], expected=ref.fingerprint)  # accepted together (raises if not)
    assert dict(zarr.open_group(str(stores["cpu"]), mode="r").attrs) == dict(
        zarr.open_group(str(stores["reference"]), mode="r").attrs)
    a, b = _arrays(stores["reference"]), _arrays(stores["cpu"])
    assert sorted(a) == sorted(b)
    for k in a:
        if a[k].dtype.kind == "f":
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-5, err_msg=k)
        else:
            assert np.array_equal(a[k], b[k]), k


def test_int8_store_with_fewer_levels_trains_a_head(tmp_path):
    """--dtype int8 --levels: scales in the store and schema, values dequantised to float32 on read,
    and a head trains on it with the stored level count; bad choices are refused before any write."""
    require_coco()
    from pipeline.train import load_checkpoint

    from .conftest import SMALL_HEAD

    common = ["--detector", "dino-focalnet", "--preset", "golden-small", "--random-init", "--min-size", "160",
              "--max-size", "240", "--encoder-layers", "4", "--top-k", "30", "--coco-root", COCO_ROOT,
              "--split", "train2017", "--max-images", 2]
    proc = run_cli("extract", *common, "--dtype", "int8", "--keep-bits", "5", "--out", tmp_path / "bad.zarr", check=False)
    assert proc.returncode == 2 and "--keep-bits applies to float16/float32" in proc.stderr, proc.stderr
    from pipeline.cache import CacheError
    from pipeline.extract import ExtractOptions, run_extract

    opts = ExtractOptions(out=tmp_path / "bad.zarr", preset="golden-small", random_init=True, coco_root=COCO_ROOT,
                          split="train2017", max_images=2, min_size=160, max_size=240)
    for bad, error, msg in (({"levels": [0, 7]}, ValueError, "--levels must be distinct level indices in 0..4"),
                            ({"codec": "brotli"}, CacheError, "--codec must be")):
        with pytest.raises(error, match=msg):
            run_extract(dataclasses.replace(opts, **bad))
    assert not (tmp_path / "bad.zarr").exists()
    out = tmp_path / "int8.zarr"
    run_cli("extract", *common, "--dtype", "int8", "--levels", "0,1,2", "--out", out)
    cache = FeatureCache.open(out)
    fp = cache.fingerprint
    assert fp["dtype"] == "int8" and fp["levels"] == [0, 1, 2] and fp["codec"] == "auto"
    assert fp["feature_widths"] == {"c1_channels": 16, "num_feature_levels": 3}
    g = zarr.open_group(str(out), mode="r")  # int8 values zigzag-coded as uint8
    assert g["encoder/layer_4"].dtype == np.uint8 and g["encoder/layer_4_scale"].dtype == np.float16
    assert g["c1"].dtype == np.uint8 and g["c1_scale"].shape == (g["c1"].shape[0],)
    rec = cache.read(0, 4)
    assert rec.tokens.dtype == rec.c1.dtype == rec.queries.dtype == torch.float32
    assert rec.spatial_shapes.shape == (3, 2) and rec.tokens.shape[0] == int(rec.spatial_shapes.prod(1).sum())
    run = tmp_path / "run"
    run_cli("train-head", "--cache", out, "--config", REPO / "configs" / "mfdetr_dino_focalnet_l.yaml",
            *[a for s in SMALL_HEAD for a in ("--set", s)], "--max-iters", 2, "--batch-size", 2, "--boxes", "gt",
            "--device", "cpu", "--out", run)
    ckpt = load_checkpoint(run / "head.pt")
    assert ckpt["step"] == 2 and ckpt["config"]["head"]["num_feature_levels"] == 3


def test_batch_of_same_size_images_equals_batch_one(tmp_path, small_caches):
    """--batch-size 2 batches only images of identical resized size (three 640x480 val images and one
    640x426 -> 3 forwards), and each image's values equal the batch-1 store's up to float rounding."""
    require_coco()
    ids = [17627, 139, 41888, 47112]  # 640x480, 640x426, 640x480, 640x480 (all in the first 10 val images)
    out = tmp_path / "b2.zarr"
    res = run_cli("extract", *SMALL_EXTRACT, "--coco-root", COCO_ROOT, "--split", "val2017", "--image-ids",
                  ",".join(map(str, ids)), "--batch-size", 2, "--out", out)
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert summary["done"] == 4 and summary["forwards"] == 3
    one, two = FeatureCache.open(small_caches["val"]), FeatureCache.open(out)
    for image_id in ids:
        a, b = one.read(one.index_of(image_id), [4, 6]), two.read(two.index_of(image_id), [4, 6])
        assert (a.image_id, a.size, a.orig_size) == (b.image_id, b.size, b.orig_size)
        assert torch.equal(a.query_index, b.query_index) and torch.equal(a.spatial_shapes, b.spatial_shapes)
        for name in ("queries", "logits", "boxes", "c1"):  # float16 features: one rounding step at most
            torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=2e-3, atol=2e-5, msg=name)
        for k in (4, 6):
            torch.testing.assert_close(b.encoder_tokens[k], a.encoder_tokens[k], rtol=2e-3, atol=2e-5)


def _assert_records_within_one_float32_ulp(a, b):
    """Integer tensors and metadata equal; float tensors within one float32 rounding step."""
    for name, x, y in record_fields(a, b):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            torch.testing.assert_close(x, y, rtol=2.0 ** -23, atol=0.0, msg=name)
        elif isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), name
        else:
            assert x == y, name


def test_float64_batch_of_two_equals_batch_one(tmp_path):
    """With the detector in float64 (--precision float64, stored as float32), B = 2 equals B = 1 to
    one float32 rounding step: batching adds no cross-image effect. The float64 values differ by
    ~1e-14 (BLAS picks another blocking for another batch size), which flips the float32 rounding
    of about one stored value in a million (in float32 the two differ by up to ~3e-6; the test
    above allows one float16 step). The writer (``--writer inline`` / ``thread``) changes nothing:
    those two B = 2 stores are equal bit for bit."""
    require_coco()
    ids = "17627,41888"  # two 640x480 val images: one forward at B = 2
    common = [*SMALL_EXTRACT, "--coco-root", COCO_ROOT, "--split", "val2017", "--image-ids", ids,
              "--precision", "float64", "--dtype", "float32"]
    run_cli("extract", *common, "--batch-size", 1, "--writer", "inline", "--out", tmp_path / "b1.zarr")
    res = run_cli("extract", *common, "--batch-size", 2, "--writer", "thread", "--out", tmp_path / "b2.zarr")
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert summary["forwards"] == 1 and summary["done"] == 2
    assert set(summary["stage_seconds"]) == {"decode", "forward", "write"}
    run_cli("extract", *common, "--batch-size", 2, "--writer", "inline", "--out", tmp_path / "b2_inline.zarr")
    one, two = FeatureCache.open(tmp_path / "b1.zarr"), FeatureCache.open(tmp_path / "b2.zarr")
    inline = FeatureCache.open(tmp_path / "b2_inline.zarr")
    for i in range(2):
        record = two.read(i, [4, 6])
        assert records_equal(record, inline.read(i, [4, 6]))
        _assert_records_within_one_float32_ulp(record, one.read(i, [4, 6]))


def test_local_cluster_equals_single_process_and_failed_units_are_reported(tmp_path, small_caches):
    """A real dask.distributed LocalCluster of 2 worker processes: a unit that fails (injected ENOSPC in
    each worker's first write) is reported by image id with --retries 0 while the rest is written; the
    re-run resumes it and the store equals the single-process one array by array (bitwise: workers use
    the main process's thread count). An unreachable --scheduler is a clear error."""
    require_coco()
    out = tmp_path / "cluster.zarr"
    args = ["extract", *SMALL_EXTRACT, "--coco-root", COCO_ROOT, "--split", "val2017", "--max-images", 10,
            "--workers", 2, "--unit-images", 3, "--out", out]
    proc = run_cli(*args, "--retries", 0, env={"MFDETR_FAULT": "extract.before_write:1:enospc"}, check=False)
    assert proc.returncode == 2 and "work unit(s) failed after 0 retries" in proc.stderr, proc.stderr
    assert "No space left on device" in proc.stderr and "images [" in proc.stderr
    partial = FeatureCache.open(out).status()
    assert 0 < int((partial == DONE).sum()) < 10  # the units that did not fail are kept
    run_cli(*args)
    _assert_same_store(out, small_caches["val"])
    proc = run_cli("extract", *SMALL_EXTRACT, "--coco-root", COCO_ROOT, "--split", "val2017", "--max-images", 1,
                   "--scheduler", "tcp://127.0.0.1:9", "--out", tmp_path / "s.zarr", check=False)
    assert proc.returncode == 2 and "--scheduler tcp://127.0.0.1:9: cannot reach the dask scheduler" in proc.stderr
