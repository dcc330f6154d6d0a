"""The interface every frozen detector implements, and the per-image record it returns.

Stage one (``pipeline/extract.py``) only talks to detectors through :class:`Detector` and
:class:`~pipeline.record.SampleRecord`, the one record type between the stages; the cache
(``pipeline/cache.py``) stores it and never sees a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from pipeline.record import SampleRecord


@dataclass
class KeyReport:
    """Result of comparing a checkpoint's state_dict with the model's.

    Attributes:
        missing: keys the model has and the file lacks.
        unexpected: keys the file has and the model lacks (after known aliases are dropped).
        mismatched: ``(key, file_shape, model_shape)`` for keys present in both with other shapes.
        aliases_checked: tied alias keys that were compared equal and dropped.
        ignored: keys the file has, the model lacks, and the detector declares ignorable (H-DETR:
            the ``thop`` profiler's ``*total_params`` / ``*total_ops``, as its official loader does).
        ignored_reason: what the ignored keys are (printed with them).
        num_params: number of (unique) parameters of the model.
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    aliases_checked: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    ignored_reason: str = ""
    num_params: int = 0

    @property
    def ok(self) -> bool:
        """True when nothing is missing, unexpected or mis-shaped."""
        return not (self.missing or self.unexpected or self.mismatched)

    def format(self, limit: int = 20) -> str:
        """Human-readable multi-line report (at most ``limit`` keys per section)."""
        lines = [f"parameters: {self.num_params:,}"]
        for title, items in (("missing", self.missing), ("unexpected", self.unexpected)):
            lines.append(f"{title} keys: {len(items)}")
            lines += [f"  {k}" for k in items[:limit]]
            if len(items) > limit:
                lines.append(f"  ... and {len(items) - limit} more")
        lines.append(f"shape mismatches: {len(self.mismatched)}")
        lines += [f"  {k}: file {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched[:limit]]
        if self.aliases_checked:
            lines.append(f"tied aliases checked equal and dropped: {len(self.aliases_checked)}")
        if self.ignored:
            lines.append(f"ignored keys ({self.ignored_reason}): {len(self.ignored)}")
            lines += [f"  {k}" for k in self.ignored[:limit]]
            if len(self.ignored) > limit:
                lines.append(f"  ... and {len(self.ignored) - limit} more")
        lines.append("OK" if self.ok else "MISMATCH")
        return "\n".join(lines)


@runtime_checkable
class Detector(Protocol):
    """A frozen DETR-family detector as stage one sees it.

    Implementations are ``nn.Module`` s built from plain keyword arguments (every
    architecture size is a constructor argument).
    """

    name: str
    hidden_dim: int
    num_classes: int
    num_queries: int
    num_encoder_layers: int
    num_feature_levels: int  # L, encoder levels (the head's input width, recorded in the cache fingerprint)
    c1_channels: int  # channels of the stride-4 C1 map (likewise)

    def config(self) -> dict:
        """JSON-serialisable constructor arguments (recorded in the cache fingerprint)."""

    def class_to_category_id(self) -> dict[int, int]:
        """Map logit column -> dataset category id for the columns that are real classes."""

    def feature_shapes(self, height: int, width: int) -> tuple[Tensor, tuple[int, int]]:
        """Shapes the forward produces for an UNPADDED input of ``height x width`` pixels.

        Returns ``(spatial_shapes [L, 2] int64, (H1, W1))``: the encoder levels and the C1 map.
        """

    def load_checkpoint(self, path: str, strict: bool = True) -> KeyReport:
        """Load an official checkpoint file (``{'model': sd, ...}`` or a bare state_dict)."""

    def extract(
        self, images: Tensor, mask: Tensor, encoder_layers: list[int], top_k: int, trainable: bool = False
    ) -> list[SampleRecord]:
        """Run the frozen forward on a padded batch and return one :class:`~pipeline.record.SampleRecord` per image.

        Args:
            images: ``[B, 3, H, W]`` float, ImageNet-normalised RGB, zero-padded.
            mask: ``[B, H, W]`` bool, True on padding.
            encoder_layers: which encoder layers (1-based) to return.
            top_k: number of queries to keep (<= num_queries).
            trainable: forward under autograd instead of ``torch.inference_mode`` (online fine-tuning).
        """


def crop_tokens(tokens: Tensor, padded_shapes: Tensor, valid_shapes: Tensor) -> Tensor:
    """Crop flattened multi-scale tokens of a padded map to the top-left valid region.

    Args:
        tokens: ``[sum H_l*W_l, D]`` tokens of one image over the padded maps.
        padded_shapes: ``[L, 2]`` int64 padded ``(H_l, W_l)``.
        valid_shapes: ``[L, 2]`` int64 valid ``(h_l, w_l)``, each <= the padded one.

    Returns:
        ``[sum h_l*w_l, D]`` tokens, same level order.

    Raises:
        ValueError: if a valid shape exceeds the padded one or the token count is wrong.
    """
    padded_shapes = padded_shapes.tolist()
    valid_shapes = valid_shapes.tolist()
    total = sum(h * w for h, w in padded_shapes)
    if tokens.shape[0] != total:
        raise ValueError(f"tokens has {tokens.shape[0]} rows, spatial_shapes sum to {total}")
    out, start = [], 0
    for (H, W), (h, w) in zip(padded_shapes, valid_shapes):
        if h > H or w > W:
            raise ValueError(f"valid shape {(h, w)} exceeds padded shape {(H, W)}")
        level = tokens[start : start + H * W].view(H, W, -1)
        out.append(level[:h, :w].reshape(h * w, -1))
        start += H * W
    return torch.cat(out, 0)
