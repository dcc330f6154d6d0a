"""Crash points inside the writes (``MFDETR_FAULT``): every re-run finishes equal to an uninterrupted run.

Each case runs the real command in a subprocess that dies with ``os._exit(137)`` (as abrupt as
``kill -9``) or fails a write with ENOSPC/EACCES at a named point, checks what the crash left,
re-runs the same command and compares the result with an uninterrupted run: array contents and
attributes of the store, weights of the head, bytes of the results file. The re-run's own
summary must show that finished work was skipped.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import zarr

from pipeline.cache import DONE, PENDING, FeatureCache
from pipeline.evaluate import RESULTS_FILE
from pipeline.checkpoint import load_checkpoint

from ..conftest import COCO_ROOT, SMALL_HEAD, records_equal, require_coco, run_cli

# Two real val2017 images through the reduced detector at a small size: seconds per run.
TINY = ["--detector", "dino-focalnet", "--preset", "golden-small", "--random-init", "--min-size", "128",
        "--max-size", "192", "--encoder-layers", "4,6", "--top-k", "20", "--coco-root", COCO_ROOT,
        "--split", "val2017", "--max-images", 2]


def store_arrays(path) -> dict:
    """Every array of a store, by path, as numpy."""
    out = {}

    def visit(group, prefix=""):
        for name, node in group.members():
            if isinstance(node, zarr.Group):
                visit(node, f"{prefix}{name}/")
            else:
                out[prefix + name] = node[...]

    visit(zarr.open_group(str(path), mode="r"))
    return out


def assert_same_store(a, b):
    """Same arrays (contents, not just done flags) and the same attributes."""
    xa, xb = store_arrays(a), store_arrays(b)
    assert sorted(xa) == sorted(xb)
    for k in xa:
        assert np.array_equal(xa[k], xb[k]), f"array {k} differs"
    assert dict(zarr.open_group(str(a), mode="r").attrs) == dict(zarr.open_group(str(b), mode="r").attrs)


def summary_of(proc) -> dict:
    """The JSON summary ``extract`` prints last."""
    text = proc.stdout
    return json.loads(text[text.index("{"):])


def image_equal(a, b, i: int) -> bool:
    """Image ``i`` reads back identically from two stores."""
    return records_equal(FeatureCache.open(a).read(i, 6), FeatureCache.open(b).read(i, 6))


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory):
    require_coco()
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    run_cli("extract", *TINY, "--out", out)
    return out


@pytest.mark.parametrize("point, images_done_after_crash", [
    ("extract.before_write:2", 1),   # image 2 computed, nothing of it written
    ("cache.between_arrays:2", 1),   # image 2 half written
    ("cache.before_done:2", 1),      # image 2 fully written, done flag missing
    ("cache.create:1", None),        # arrays made under <out>.partial, no attributes
    ("cache.rename:1", None),        # <out>.partial complete, not renamed
])
def test_extract_crash_then_rerun_equals_uninterrupted(tmp_path, reference_store, point, images_done_after_crash):
    out = tmp_path / "crashed.zarr"
    proc = run_cli("extract", *TINY, "--out", out, check=False, env={"MFDETR_FAULT": point})
    assert proc.returncode == 137, proc.stderr[-2000:]
    if images_done_after_crash is None:
        assert not out.exists() and (tmp_path / "crashed.zarr.partial").is_dir()
    else:
        status = FeatureCache.open(out).status()
        assert status.tolist() == [DONE, PENDING]
        assert image_equal(out, reference_store, 0)
    again = run_cli("extract", *TINY, "--out", out)
    summary = summary_of(again)
    assert summary["done"] == 2
    assert summary["extracted_now"] == (2 if images_done_after_crash is None else 1)
    assert "taking over a stale lock" in again.stderr  # the killed job's lock, from a dead pid
    assert_same_store(out, reference_store)
    assert not (tmp_path / "crashed.zarr.partial").exists() and not (tmp_path / "crashed.zarr.lock").exists()


def _bad_image_dataset(tmp_path):
    """A COCO-format copy of two val images whose second file is truncated (a skip)."""
    ann = json.loads((COCO_ROOT / "annotations" / "instances_val2017.json").read_text())
    images = sorted(ann["images"], key=lambda im: im["id"])[:2]
    ids = {im["id"] for im in images}
    ann["images"], ann["annotations"] = images, [a for a in ann["annotations"] if a["image_id"] in ids]
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    for im in images:
        shutil.copy(COCO_ROOT / "val2017" / im["file_name"], img_dir / im["file_name"])
    bad = img_dir / images[1]["file_name"]
    bad.write_bytes(bad.read_bytes()[:2000])
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps(ann))
    args = [a for a in TINY if a not in ("--coco-root", COCO_ROOT, "--split", "val2017")]
    return args + ["--ann-file", ann_file, "--image-dir", img_dir, "--skip-bad-images"], images[1]["id"]


def test_crash_in_the_attribute_write_of_a_skip(tmp_path):
    require_coco()
    args, bad_id = _bad_image_dataset(tmp_path)
    ref = tmp_path / "ref.zarr"
    run_cli("extract", *args, "--out", ref)
    assert FeatureCache.open(ref).skipped.keys() == {str(bad_id)}
    out = tmp_path / "crashed.zarr"
    proc = run_cli("extract", *args, "--out", out, check=False, env={"MFDETR_FAULT": "cache.attrs:1"})
    assert proc.returncode == 137
    cache = FeatureCache.open(out)  # still a readable store
    assert cache.status().tolist() == [DONE, PENDING] and cache.skipped == {}
    again = run_cli("extract", *args, "--out", out)
    assert summary_of(again)["skipped"] == 1
    assert_same_store(out, ref)


@pytest.mark.parametrize("action, errno_text", [("enospc", "No space left on device"),
                                                ("eacces", "Permission denied")])
def test_storage_fault_in_the_cache_then_resume(tmp_path, reference_store, action, errno_text):
    out = tmp_path / "faulty.zarr"
    proc = run_cli("extract", *TINY, "--out", out, check=False,
                   env={"MFDETR_FAULT": f"cache.between_arrays:2:{action}"})
    assert proc.returncode == 1
    assert f"Error: cannot write {out}" in proc.stderr and errno_text in proc.stderr
    assert "Traceback" not in proc.stderr
    cache = FeatureCache.open(out)
    assert cache.status().tolist() == [DONE, PENDING] and image_equal(out, reference_store, 0)
    assert not (tmp_path / "faulty.zarr.lock").exists()  # an error (not a kill) releases the lock
    again = run_cli("extract", *TINY, "--out", out)
    assert summary_of(again)["extracted_now"] == 1
    assert_same_store(out, reference_store)


# ------------------------------------------------------------------------------ train-head
def _train_args(small_caches, out, *extra):
    sets = [x for kv in [*SMALL_HEAD, "train.checkpoint_every=2"] for x in ("--set", kv)]
    return ["train-head", "--cache", small_caches["train"], *sets, "--max-iters", 6, "--batch-size", 2,
            "--device", "cpu", "--out", out, *extra]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, small_caches):
    out = tmp_path_factory.mktemp("straight") / "run"
    run_cli(*_train_args(small_caches, out))
    return out


def _log_steps(run) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _same_weights(a, b) -> bool:
    wa, wb = load_checkpoint(a / "head.pt"), load_checkpoint(b / "head.pt")
    return wa["step"] == wb["step"] and all(torch.equal(wa["head"][k], wb["head"][k]) for k in wa["head"])


@pytest.mark.parametrize("point, resumed_at", [
    ("train.mid_step:5", 4),      # killed inside step 5: the checkpoint of step 4 is the last
    ("train.checkpoint:2", 2),    # killed while writing step 4's checkpoint: step 2's stays intact
])
def test_train_crash_then_resume_equals_uninterrupted(tmp_path, small_caches, straight_run, point, resumed_at):
    run = tmp_path / "run"
    proc = run_cli(*_train_args(small_caches, run), check=False, env={"MFDETR_FAULT": point})
    assert proc.returncode == 137
    assert not (run / "head.pt").exists()
    assert load_checkpoint(run / "checkpoint.pt")["step"] == resumed_at
    again = run_cli(*_train_args(small_caches, run, "--resume"))
    assert f"resumed at step {resumed_at}; trained {6 - resumed_at} more step(s)" in again.stdout
    assert _same_weights(run, straight_run)
    assert _log_steps(run) == _log_steps(straight_run) == [1, 2, 3, 4, 5, 6]  # each step logged once


def test_train_disk_full_while_checkpointing_then_resume(tmp_path, small_caches, straight_run):
    run = tmp_path / "run"
    proc = run_cli(*_train_args(small_caches, run), check=False, env={"MFDETR_FAULT": "train.checkpoint:2:enospc"})
    assert proc.returncode == 1
    assert f"Error: cannot write {run / 'checkpoint.pt'}" in proc.stderr and "No space left" in proc.stderr
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 2  # the previous checkpoint is intact
    assert [p.name for p in run.iterdir() if p.name.endswith(".tmp")] == []
    run_cli(*_train_args(small_caches, run, "--resume"))
    assert _same_weights(run, straight_run)


# ------------------------------------------------------------------------------- evaluate
@pytest.mark.parametrize("point, code", [("evaluate.results:1", 137), ("evaluate.results:1:enospc", 1),
                                         ("evaluate.metrics:1", 137)])
def test_evaluate_crash_while_writing_results(tmp_path, small_caches, straight_run, point, code):
    args = ["evaluate", "--cache", small_caches["val"], "--checkpoint", straight_run / "head.pt",
            "--device", "cpu"]
    ref = tmp_path / "ref"
    run_cli(*args, "--out", ref)
    out = tmp_path / "eval"
    proc = run_cli(*args, "--out", out, check=False, env={"MFDETR_FAULT": point})
    assert proc.returncode == code
    names = sorted(p.name for p in out.iterdir() if not p.name.endswith(".tmp")) if out.exists() else []
    assert names == ([] if point.startswith("evaluate.results") else [RESULTS_FILE])  # no half-written file
    if code == 1:
        assert f"Error: cannot write {out / RESULTS_FILE}" in proc.stderr
    run_cli(*args, "--out", out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())  # temp files gone
    assert (out / RESULTS_FILE).read_bytes() == (ref / RESULTS_FILE).read_bytes()
    assert json.loads((out / "metrics.json").read_text()) == json.loads((ref / "metrics.json").read_text())
