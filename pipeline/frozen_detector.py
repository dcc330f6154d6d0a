"""The frozen detector of stage one, as every command that runs a detector names and builds it.

``extract``, ``predict`` and ``benchmark-inference`` take the same detector options
(:class:`DetectorOptions`, the ``--detector/--preset/--weights/--random-init/--seed/--precision/
--device/--impl`` flags) and build the detector through one function,
:func:`build_frozen_detector`, so a checkpoint is loaded, seeded and frozen the same way
whichever command runs it. ``--finetuned RUN/head.pt`` (``extract``) loads a run's fine-tuned
detector parameters (``train-head --online --finetune partial|full``, paper Table 11) over the
official weights, so a fine-tuned head is evaluated on its own detector's features.
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
        finetuned: a head checkpoint (``head.pt`` / ``checkpoint.pt``) of a run that fine-tuned
            this detector: its ``detector`` parameters replace those of ``weights`` (see
            :func:`load_finetuned`); None = the detector as ``weights`` define it.
    """

    detector: str = "dino-focalnet"
    preset: str | None = None
    weights: Path | None = None
    random_init: bool = False
    seed: int = 0
    precision: str = "float32"
    device: str = "cpu"
    impl: str = "auto"
    finetuned: Path | None = None


def build_frozen_detector(opts: DetectorOptions, device: str | torch.device | None = None):
    """Build the detector, load its weights (or seed a random init) and freeze it.

    Args:
        opts: the detector options; ``opts.device`` unless ``device`` is given (a resolved
            ``auto``).

    Returns:
        ``(detector, checkpoint_sha256)``: the module in eval mode with ``requires_grad=False``,
        on the device in ``opts.precision``; the sha is the checkpoint file's SHA-256, or
        ``"random-init:seed=<seed>"`` without weights (a warning with the random-init banner is
        issued then). ``detector.finetuned_fingerprint`` is None, or with ``opts.finetuned`` the
        fingerprint entries of :func:`load_finetuned` (recorded by ``extract``).

    Raises:
        ValueError: neither ``weights`` nor ``random_init`` given; an unknown ``precision``; a
            ``finetuned`` file that is not a fine-tuned run of this detector (:func:`load_finetuned`).
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
    detector.finetuned_fingerprint = None
    if opts.finetuned is not None:
        detector.finetuned_fingerprint = load_finetuned(detector, opts.finetuned, opts.detector, sha)
    detector = detector.to(device=device or opts.device, dtype=PRECISIONS[opts.precision])
    return detector.eval().requires_grad_(False), sha


def load_finetuned(detector: torch.nn.Module, path: str | Path, detector_name: str, checkpoint_sha: str) -> dict:
    """Copy a fine-tuned run's detector parameters into ``detector`` (in place, under ``no_grad``).

    The run (``train-head --online --finetune partial|full``, paper Table 11) saved the tensors it
    trained as ``ckpt["detector"]`` (``{named_parameters name: tensor}``; partial = the Transformer
    encoder and decoder); every other parameter stays what the official weights give, so those
    must be the weights the run started from.

    Args:
        detector: the built detector with its official (or seeded random) weights loaded.
        path: the run's ``head.pt`` or ``checkpoint.pt``.
        detector_name: registry name of ``detector`` (``--detector``).
        checkpoint_sha: SHA-256 of the loaded official weights (``random-init:seed=<s>`` without).

    Returns:
        the fingerprint entries of the features this detector computes: ``finetuned``
        (:func:`pipeline.checkpoint.finetuned_fingerprint`: mode and SHA-256 of the fine-tuned
        parameters; compared by every fingerprint check) and ``finetuned_from`` (``checkpoint``:
        the resolved file path, ``step``: the run's training step; informative).

    Raises:
        ValueError (naming ``path``): not a head checkpoint; no fine-tuned detector parameters
            in it (a run with ``--finetune none`` or from a cache); a run of another detector,
            architecture or official weights; parameter names or shapes this detector lacks.
    """
    from .checkpoint import load_checkpoint

    path = Path(path)
    ckpt = load_checkpoint(path)
    state = ckpt.get("detector")
    if not state:
        raise ValueError(f"--finetuned {path}: holds no fine-tuned detector parameters (its run trained with "
                         "--finetune none or from a cache); extract without --finetuned: such a head reads the "
                         "original detector's features")
    fp = ckpt.get("fingerprint", {})
    found = {"detector": detector_name, "detector_config": detector.config(), "checkpoint_sha256": checkpoint_sha}
    diffs = [f"{k}: the run has {fp.get(k)!r}, here {v!r}" for k, v in found.items() if fp.get(k) != v]
    if diffs:
        raise ValueError(f"--finetuned {path}: the run fine-tuned another detector ({'; '.join(diffs)}); pass the "
                         "--detector, --preset and --weights (or --random-init --seed) its run started from")
    named = dict(detector.named_parameters(remove_duplicate=True))
    unknown = sorted(set(state) - set(named))
    shapes = sorted(k for k in set(state) & set(named) if tuple(state[k].shape) != tuple(named[k].shape))
    if unknown or shapes:
        raise ValueError(f"--finetuned {path}: its detector parameters do not match {detector_name}: "
                         f"{len(unknown)} unknown name(s) {unknown[:3]}, {len(shapes)} of another shape {shapes[:3]}")
    with torch.no_grad():
        for k, t in state.items():
            named[k].copy_(t)
    record = fp["finetuned"]  # load_checkpoint derived it from the detector state (hashed once)
    log.info("--finetuned %s: %d fine-tuned detector tensors (%s, step %s) over the official weights", path,
             len(state), record["finetune"], ckpt.get("step"))
    return {"finetuned": record, "finetuned_from": {"checkpoint": str(path.resolve()), "step": ckpt.get("step")}}
