"""The one record that travels between the stages: what the frozen detector gives for ONE image.

A detector's ``extract`` produces it (``pipeline/detectors``), :meth:`pipeline.cache.FeatureCache.write`
stores it and :meth:`~pipeline.cache.FeatureCache.read` returns it again, so stage two (training,
inference) reads the same type whether the values come from the cache or, later, from a live
detector. The module knows tensors only: it imports neither models nor the store.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

#: Float features a consumer checks for NaN/Inf (``tokens`` = the encoder layer(s) held).
FEATURE_FIELDS = ("queries", "tokens", "c1", "boxes")


@dataclass
class SampleRecord:
    """One image's detector outputs, with batch padding cropped away.

    Written by the detector in its forward dtype (float32, or float64 under ``.double()``); read
    back from the cache in the cache's stored dtype (float16/bfloat16/float32; int8 stores are
    dequantised to float32), see :mod:`pipeline.cache`.

    Attributes:
        queries: ``[K, D]`` the top-K object queries of the LAST decoder layer (the ``hs[-1]``
            the class/box heads read: after DINO's final decoder LayerNorm; H-DETR has none),
            ranked by their best class score (descending). D = hidden dim (256).
        logits: ``[K, C]`` class logits (pre-sigmoid) of those queries. For DINO C = 91 and the
            column index is the raw COCO ``category_id`` (column 0 and unused ids are dummies).
        boxes: ``[K, 4]`` boxes, **cxcywh normalized** to the valid (unpadded) resized image,
            i.e. to the whole original image as well.
        query_index: ``[K]`` int64, index of each kept query among the detector's queries.
        encoder_tokens: ``{layer: [S, D]}`` Transformer-encoder output after encoder layer
            ``layer`` (counted from 1), flattened multi-scale tokens of the valid region only,
            levels concatenated in ``spatial_shapes`` order, row-major (y, x) within a level.
            A record read from the cache holds the layers that were asked for.
        spatial_shapes: ``[L, 2]`` int64 ``(H_l, W_l)`` of the valid region at each level
            (sum of ``H_l * W_l`` = S).
        level_start_index: ``[L]`` int64 start of each level in the flattened tokens.
        valid_ratios: ``[L, 2]`` float ``(w_ratio, h_ratio)`` of the valid region inside the
            padded map, as the detector computed them (Deformable-DETR ``get_valid_ratio``).
            After cropping the stored tokens are a full (unpadded) map, so a consumer uses ratio 1.
        c1: ``[C1, H1, W1]`` backbone stride-4 map (FocalNet-L stage 1: 192 channels; ResNet-50
            res2: 256; Swin-L stage 1: 192), the ``C1`` of the paper's Eq. 1/5, valid region only.
        extras: detector-side extras not stored in the cache (``scores [K]``: ranking scores).
        image_id: dataset image id (set by stage one before writing; always set when read).
        orig_size: ``(height, width)`` of the original image, pixels.
        size: ``(height, width)`` of the resized image the detector saw, pixels.
        gt: stage two's ground truth of the image when a dataset attaches it
            (:class:`pipeline.batches.CachedImages` ``with_gt``), else None.
    """

    queries: Tensor
    logits: Tensor
    boxes: Tensor
    query_index: Tensor
    encoder_tokens: dict[int, Tensor]
    spatial_shapes: Tensor
    level_start_index: Tensor
    valid_ratios: Tensor
    c1: Tensor
    extras: dict = field(default_factory=dict)
    image_id: int | None = None
    orig_size: tuple[int, int] | None = None
    size: tuple[int, int] | None = None
    gt: dict | None = None

    @property
    def tokens(self) -> Tensor:
        """``[S, D]`` the encoder tokens when the record holds exactly one layer.

        Raises:
            ValueError: the record holds several layers (use ``encoder_tokens[layer]``) or none.
        """
        if len(self.encoder_tokens) != 1:
            raise ValueError(f"record of image {self.image_id} holds encoder layers {sorted(self.encoder_tokens)}; "
                             "pick one with encoder_tokens[layer]")
        return next(iter(self.encoder_tokens.values()))

    def select_levels(self, levels: list[int]) -> "SampleRecord":
        """The record with only the encoder levels ``levels`` (indices into ``spatial_shapes``, ascending).

        Tokens of the kept levels stay in level order; ``spatial_shapes``, ``level_start_index``
        and ``valid_ratios`` keep those levels' rows. Other fields are shared, not copied.

        Raises:
            ValueError: a level outside ``0..L-1``, repeated or not ascending.
        """
        levels = [int(k) for k in levels]
        num_levels = int(self.spatial_shapes.shape[0])
        if not levels or levels != sorted(set(levels)) or not all(0 <= k < num_levels for k in levels):
            raise ValueError(f"levels must be ascending distinct indices in 0..{num_levels - 1}, got {levels}")
        if levels == list(range(num_levels)):
            return self
        sizes = (self.spatial_shapes[:, 0] * self.spatial_shapes[:, 1]).tolist()
        starts = [0]
        for n in sizes[:-1]:
            starts.append(starts[-1] + n)
        rows = torch.cat([torch.arange(starts[k], starts[k] + sizes[k]) for k in levels])
        shapes = self.spatial_shapes[levels]
        kept = shapes[:, 0] * shapes[:, 1]
        return dataclasses.replace(
            self, encoder_tokens={k: t[rows.to(t.device)] for k, t in self.encoder_tokens.items()},
            spatial_shapes=shapes, level_start_index=torch.cat((kept.new_zeros(1), kept.cumsum(0)[:-1])),
            valid_ratios=self.valid_ratios[levels])

    def pin_memory(self) -> "SampleRecord":
        """The record with every CPU tensor (``gt``'s included) in page-locked memory, for
        ``non_blocking`` copies to CUDA; the DataLoader's ``pin_memory=True`` calls this on each item."""
        def pin(v):
            if isinstance(v, Tensor):
                return v.pin_memory()
            if isinstance(v, dict):
                return {k: pin(x) for k, x in v.items()}
            return v

        return dataclasses.replace(self, **{f.name: pin(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def non_finite_fields(self) -> list[str]:
        """Names among :data:`FEATURE_FIELDS` that hold NaN or Inf (empty when all are finite)."""
        bad = []
        for name in FEATURE_FIELDS:
            values = list(self.encoder_tokens.values()) if name == "tokens" else [getattr(self, name)]
            if not all(bool(torch.isfinite(v.float()).all()) for v in values):
                bad.append(name)
        return bad
