"""Fixtures for the detector tests: the shared reference data and one golden forward per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ..conftest import skip_or_fail_without

#: ``../shared/detector`` relative to the repository root (reference data, read-only).
SHARED_DETECTOR_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "detector"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The reference-data directory; the test is skipped when it is absent."""
    skip_or_fail_without(SHARED_DETECTOR_DIR, "reference data directory")
    return SHARED_DETECTOR_DIR


@pytest.fixture(scope="session")
def golden(shared_dir: Path) -> dict:
    """``golden_dino_focalnet_small.pt``: state_dict (float16), inputs, outputs, outputs_float64."""
    path = shared_dir / "golden_dino_focalnet_small.pt"
    skip_or_fail_without(path, "golden fixture")
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def golden_model(golden):
    """The 'golden-small' preset with the golden weights loaded (float32, eval)."""
    from pipeline.detectors import build_detector
    from pipeline.detectors.checkpoint import load_state_dict_checked

    model = build_detector("dino-focalnet", preset="golden-small").eval()
    report = load_state_dict_checked(model, golden["state_dict"], strict=True, source="golden")
    assert report.ok, report.format()
    return model


@pytest.fixture(scope="session")
def golden_forward(golden, golden_model) -> dict:
    """Our float32 forward on the golden inputs."""
    with torch.inference_mode():
        return golden_model(golden["inputs"]["images"], golden["inputs"]["mask"])
