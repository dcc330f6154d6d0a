"""The fault-injection hook itself: inert when unset, exact about which hit fails, strict about its syntax."""

from __future__ import annotations

import errno

import pytest

from pipeline import faults


def test_unset_has_no_effect(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    for point in faults.POINTS:
        faults.fault_point(point)  # returns normally


def test_fails_exactly_at_the_nth_hit(monkeypatch, tmp_path):
    monkeypatch.setattr(faults, "_hits", {})
    monkeypatch.setenv(faults.ENV, "cache.before_done:3:enospc,train.checkpoint:1:eacces")
    faults.fault_point("cache.before_done", tmp_path)
    faults.fault_point("cache.before_done", tmp_path)
    faults.fault_point("cache.between_arrays", tmp_path)  # not asked for
    with pytest.raises(OSError) as err:
        faults.fault_point("cache.before_done", tmp_path / "x.zarr")
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "x.zarr")
    faults.fault_point("cache.before_done", tmp_path)  # the 4th hit passes
    with pytest.raises(PermissionError) as err:
        faults.fault_point("train.checkpoint", tmp_path)
    assert err.value.errno == errno.EACCES


@pytest.mark.parametrize("spec, match", [("cache.before_done", "bad entry"), ("cache.before_done:0", "bad entry"),
                                         ("no.such.point:1", "unknown point"), ("cache.create:1:boom", "unknown action")])
def test_malformed_spec_is_refused(monkeypatch, spec, match):
    monkeypatch.setenv(faults.ENV, spec)
    with pytest.raises(ValueError, match=match):
        faults.fault_point("cache.create")
