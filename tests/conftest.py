"""Shared fixtures: the real COCO subset in ../shared/data/coco and small caches built from it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
COCO_ROOT = SHARED / "data" / "coco"

# A fast, real extraction: the golden fixture's reduced DINO-FocalNet (same code as the full
# model), random weights from the seed, small test-time size, a few real images.
SMALL_EXTRACT = ["--detector", "dino-focalnet", "--preset", "golden-small", "--random-init",
                 "--min-size", "160", "--max-size", "240", "--encoder-layers", "4,6", "--top-k", "30"]

# A reduced head for the golden-small detector (16-channel C1) that trains in seconds on CPU.
SMALL_HEAD = ["head.image_encoder_layers=1", "head.box_dim=64", "head.box_encoder_layers=1",
              "head.num_points=1024", "train.log_every=1"]


def record_fields(a, b):
    """``(name, x, y)`` for each field of two :class:`~pipeline.record.SampleRecord` s; a dict of
    tensors (encoder tokens by layer) gives its sorted keys, then one entry per key."""
    import dataclasses

    import torch

    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, dict) and x and all(isinstance(v, torch.Tensor) for v in x.values()):
            yield f"{f.name} keys", sorted(x), sorted(y)
            if sorted(x) == sorted(y):
                yield from ((f"{f.name}[{k}]", v, y[k]) for k, v in x.items())
        else:
            yield f.name, x, y


def records_equal(a, b) -> bool:
    """Two :class:`~pipeline.record.SampleRecord` s hold identical tensors (dtype included) and metadata."""
    import torch

    for _, x, y in record_fields(a, b):
        if isinstance(x, torch.Tensor):
            if x.dtype != y.dtype or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def skip_or_fail_without(path: Path, what: str) -> None:
    """Skip a test whose reference data ``path`` is absent, or FAIL it when ``CI`` is set.

    CI must never go green having checked nothing: there, missing shared data is an error.
    """
    if path.exists():
        return
    message = f"{what} not found at {path}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so tests that need it fail instead of skipping)", pytrace=False)
    pytest.skip(message)


def require_coco():
    """Skip (fail under ``CI``) unless the real COCO subset is present."""
    skip_or_fail_without(COCO_ROOT / "annotations" / "instances_val2017.json", "real COCO subset")


@pytest.fixture
def coco_required():
    """Fixture form of :func:`require_coco` (``pytest.mark.usefixtures("coco_required")``)."""
    require_coco()


def head_sets(extra=()) -> list[str]:
    """``--set`` arguments for the reduced test head (:data:`SMALL_HEAD`) plus ``extra`` overrides."""
    out = []
    for item in [*SMALL_HEAD, *extra]:
        out += ["--set", item]
    return out


def run_cli(*args, check=True, env=None, timeout=900):
    """Run ``python cli.py ...`` in a subprocess, as a user would; returns CompletedProcess."""
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"cli {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def small_caches(tmp_path_factory):
    """Train (12 images) and val (10 images) caches of real COCO images, extracted once per session."""
    require_coco()
    root = tmp_path_factory.mktemp("caches")
    train = root / "train.zarr"
    val = root / "val.zarr"
    run_cli("extract", *SMALL_EXTRACT, "--coco-root", COCO_ROOT, "--split", "train2017", "--max-images", 12,
            "--out", train)
    run_cli("extract", *SMALL_EXTRACT, "--coco-root", COCO_ROOT, "--split", "val2017", "--max-images", 10,
            "--out", val)
    return {"train": train, "val": val}
