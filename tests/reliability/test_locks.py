"""Two writers on one store or run directory: the second is refused, a dead owner's lock is taken over."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys

import pytest

from pipeline.extract import lock_path
from pipeline.utils import LockError, WriterLock

from ..conftest import run_cli
from .test_crash_points import TINY


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def live_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    proc.kill()
    proc.wait()


def _write_lock(path, pid, host=None):
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "command": "extract",
                                "started": "2026-12-01T10:00:00+00:00"}))


def test_lock_is_exclusive_and_released(tmp_path):
    path = tmp_path / "store.zarr.lock"
    with WriterLock(path, "extract") as lock:
        assert lock.owned and json.loads(path.read_text())["pid"] > 0
        with pytest.raises(LockError, match=r"held by pid \d+ on .*extract, started"):
            WriterLock(path, "extract").acquire()
    assert not path.exists()


def test_live_owner_refuses_and_lock_is_untouched(tmp_path, live_process):
    path = tmp_path / "store.zarr.lock"
    _write_lock(path, live_process.pid)
    before = path.read_bytes()
    with pytest.raises(LockError) as err:
        WriterLock(path, "extract").acquire()
    assert f"pid {live_process.pid}" in str(err.value) and "2026-12-01T10:00:00" in str(err.value)
    assert str(path) in str(err.value)
    assert path.read_bytes() == before


def test_dead_owner_is_taken_over_with_a_warning(tmp_path, caplog):
    path = tmp_path / "store.zarr.lock"
    pid = _dead_pid()
    _write_lock(path, pid)
    with caplog.at_level(logging.WARNING), WriterLock(path, "extract"):
        assert json.loads(path.read_text())["pid"] != pid
    assert f"stale lock of pid {pid}" in caplog.text
    assert not path.exists()


def test_owner_on_another_host_is_never_taken_over(tmp_path):
    path = tmp_path / "store.zarr.lock"
    _write_lock(path, _dead_pid(), host="some-other-node")
    with pytest.raises(LockError, match="some-other-node"):
        WriterLock(path, "extract").acquire()


def test_unreadable_lock_is_refused(tmp_path):
    path = tmp_path / "store.zarr.lock"
    path.write_text("{not json")
    with pytest.raises(LockError, match="cannot be read"):
        WriterLock(path, "extract").acquire()


def test_second_extract_on_one_store_is_refused(tmp_path, live_process):
    out = tmp_path / "shared.zarr"
    _write_lock(lock_path(out), live_process.pid)
    proc = run_cli("extract", *TINY, "--out", out, check=False)
    assert proc.returncode == 2
    assert f"held by pid {live_process.pid}" in proc.stderr and "two writers would corrupt it" in proc.stderr
    assert not out.exists()  # refused before anything was written


def test_second_train_head_on_one_run_is_refused(tmp_path, live_process):
    run = tmp_path / "run"
    run.mkdir()
    _write_lock(run / "train.lock", live_process.pid)
    proc = run_cli("train-head", "--cache", tmp_path / "no-cache.zarr", "--out", run, check=False)
    assert proc.returncode == 2 and f"held by pid {live_process.pid}" in proc.stderr
    assert sorted(p.name for p in run.iterdir()) == ["train.lock"]
