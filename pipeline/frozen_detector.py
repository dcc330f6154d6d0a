"""The frozen detector of stage one, as every command that runs a detector names and builds it.

``extract``, ``predict`` and ``benchmark-inference`` take the same detector options
(:class:`DetectorOptions`, the ``--detector/--preset/--weights/--random-init/--seed/--precision/
--device/--impl`` flags) and build the detector through one function,
:func:`build_frozen_detector`, so a checkpoint is loaded, seeded and frozen the same way
whichever command runs it.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .cache import RANDOM_INIT_BANNER
from .detectors import build_detector
from .utils import file_sha256

log = logging.getLogger(__name__)

PRECISIONS = {"float32": torch.float32, "float64": torch.float64}


@dataclass(kw_only=True)
class DetectorOptions:
    """Which detector to run and how: the fields shared by every command that runs one.

    Attributes:
        detector: registry name (``dino-focalnet``, ``hdetr-r50``, ``hdetr-swin-l``; see
            ``cli.py detectors``).
        preset: architecture preset of that detector (None = its official release;
            ``golden-small`` = the reduced test model).
        weights: official checkpoint path (``.pth`` with a ``model`` dict, or a bare state_dict),
            or None with ``random_init``.
        random_init: allow running without weights (random weights drawn from ``seed``).
        seed: seed of the random-init weights.
        precision: detector compute dtype, ``float32`` or ``float64`` (exact comparisons with the
            official code use float64; see README).
        device: ``cpu``, ``cuda``, ``cuda:1``, or ``auto`` where a command resolves it.
        impl: deformable-attention kernel (:data:`kernels.ops.IMPLS`); a run-time choice, never part
            of a cache's fingerprint.
    """

    detector: str = "dino-focalnet"
    preset: str | None = None
    weights: Path | None = None
    random_init: bool = False
    seed: int = 0
    precision: str = "float32"
    device: str = "cpu"
    impl: str = "auto"


def build_frozen_detector(opts: DetectorOptions, device: str | torch.device | None = None):
    """Build the detector, load its weights (or seed a random init) and freeze it.

    Args:
        opts: the detector options; ``opts.device`` unless ``device`` is given (a resolved
            ``auto``).

    Returns:
        ``(detector, checkpoint_sha256)``: the module in eval mode with ``requires_grad=False``,
        on the device in ``opts.precision``; the sha is the checkpoint file's SHA-256, or
        ``"random-init:seed=<seed>"`` without weights (a warning with the random-init banner is
        issued then).

    Raises:
        ValueError: neither ``weights`` nor ``random_init`` given; an unknown ``precision``.
        CheckpointError: the file is not this detector's checkpoint (key report in the message).
    """
    if opts.weights is None and not opts.random_init:
        raise ValueError("--weights is required (the official checkpoint file); pass --random-init to run "
                         "with random weights for a smoke test")
    if opts.precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {sorted(PRECISIONS)}, got {opts.precision!r}")
    torch.manual_seed(opts.seed)
    detector = build_detector(opts.detector, preset=opts.preset)
    if opts.weights is not None:
        report = detector.load_checkpoint(str(opts.weights), strict=True)
        log.info("loaded %s: %s", opts.weights, report.format().splitlines()[-1])
        sha = file_sha256(Path(opts.weights))
    else:
        warnings.warn(RANDOM_INIT_BANNER, stacklevel=2)
        sha = f"random-init:seed={opts.seed}"
    detector = detector.to(device=device or opts.device, dtype=PRECISIONS[opts.precision])
    return detector.eval().requires_grad_(False), sha
