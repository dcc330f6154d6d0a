"""Head checkpoints: the one place they are written and read (training, evaluation, sweeps).

A checkpoint is a ``torch.save`` dict with ``kind="mask-frozen-detr-head"``, ``version``, the
resolved ``config`` (plain dict), the cache ``fingerprint``, ``git``, ``head`` (state dict) and,
for resumable ones, optimizer / scheduler / step / RNG states (see :mod:`pipeline.train`).
"""

from __future__ import annotations

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


def load_checkpoint(path: str | Path) -> dict:
    """Read one of our checkpoints (``weights_only=True``: plain data and tensors only).

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
