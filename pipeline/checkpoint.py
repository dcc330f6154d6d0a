"""Head checkpoints: the one place they are written and read (training, evaluation, sweeps).

A checkpoint is a ``torch.save`` dict with ``kind="mask-frozen-detr-head"``, ``version``, the
resolved ``config`` (plain dict), the cache ``fingerprint``, ``git``, ``head`` (state dict) and,
for resumable ones, optimizer / scheduler / step / RNG states (see :mod:`pipeline.train`). A run
that fine-tuned its detector (``train-head --online --finetune partial|full``, paper Table 11)
also holds ``detector``: the fine-tuned detector parameters ``{name: tensor}``.

Such a head only evaluates on features of that fine-tuned detector: :func:`load_checkpoint`
derives the fingerprint's ``finetuned`` entry (:func:`finetuned_fingerprint`) from the
``detector`` state, and ``cli.py extract --finetuned RUN/head.pt`` records the same entry in the
cache it writes, so the usual fingerprint check (:data:`pipeline.cache.COMPATIBILITY_KEYS`) pairs
a head with the caches of its own detector and refuses every other pairing.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch

from .utils import write_bytes_atomic

CHECKPOINT_VERSION = 1


def save_checkpoint(path: Path, **payload) -> None:
    """``torch.save`` ``payload`` to ``path`` atomically (:func:`pipeline.utils.write_bytes_atomic`).

    Serialised in memory first, so that a full disk raises an ``OSError`` naming ``path`` (not
    torch's stream-writer error) and a crash never leaves half a checkpoint.

    Raises:
        OSError: ``path`` cannot be written (disk full, permissions).
    """
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes_atomic(path, buffer.getvalue(), fault="train.checkpoint")


def detector_state_sha256(state: dict) -> str:
    """SHA-256 of a detector state ``{name: tensor}``: names, dtypes, shapes and bytes, in name order.

    Identifies a fine-tuned detector independent of the file holding it (``head.pt`` and the
    final ``checkpoint.pt`` of one run give the same digest).
    """
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def finetuned_fingerprint(ckpt: dict) -> dict | None:
    """The ``finetuned`` fingerprint entry of the features a checkpoint's head reads.

    A run with a fine-tuned detector (``ckpt["detector"]``): ``{"finetune": "partial"|"full",
    "detector_sha256": detector_state_sha256(...)}``; otherwise what its training cache recorded
    (a head trained on a ``--finetuned`` cache), None for the original detector.
    """
    state = ckpt.get("detector")
    if state is None:
        return ckpt.get("fingerprint", {}).get("finetuned")
    mode = (ckpt.get("fingerprint", {}).get("online") or {}).get("finetune", "unknown")
    return {"finetune": mode, "detector_sha256": detector_state_sha256(state)}


def load_checkpoint(path: str | Path) -> dict:
    """Read one of our checkpoints (``weights_only=True``: plain data and tensors only).

    The returned ``fingerprint`` (that of the caches the head evaluates on) carries
    ``finetuned`` (:func:`finetuned_fingerprint`) when the run fine-tuned its detector.

    Raises:
        ValueError: the file is missing or is not a Mask Frozen-DETR head checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"{path}: cannot be read as a head checkpoint: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "mask-frozen-detr-head":
        raise ValueError(f"{path}: not a Mask Frozen-DETR head checkpoint (no kind='mask-frozen-detr-head')")
    finetuned = finetuned_fingerprint(ckpt)
    if finetuned is not None and isinstance(ckpt.get("fingerprint"), dict):
        ckpt["fingerprint"] = {**ckpt["fingerprint"], "finetuned": finetuned}
    return ckpt


def load_head(path: str | Path, overrides: list[str] | None = None, device="cpu"):
    """A trained head ready to evaluate: ``(head, postprocess, cfg, ckpt)``.

    Args:
        path: a ``head.pt`` / ``checkpoint.pt`` of :func:`pipeline.train.train`.
        overrides: ``--set`` items applied to the stored config (e.g. ``evaluate.top_n=50``).
        device: where the head is moved.

    Returns:
        the head (weights loaded, eval mode), its :class:`pipeline.head.PostProcess`, the
        resolved :class:`pipeline.config.Config`, and the raw checkpoint dict.

    Raises:
        ValueError: not a head checkpoint; ConfigError: bad overrides.
    """
    from .config import apply_overrides, config_from_dict
    from .head import build_head

    ckpt = load_checkpoint(path)
    cfg = config_from_dict(apply_overrides(ckpt["config"], list(overrides or [])), where=str(path))
    head, _, postprocess = build_head(cfg.head, cfg.evaluate.top_n)
    head.load_state_dict(ckpt["head"])
    head.to(device).eval()
    return head, postprocess, cfg, ckpt
