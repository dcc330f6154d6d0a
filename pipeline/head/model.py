"""The Mask Frozen-DETR head: frozen-detector tensors in, box-frame mask logits (+ IoU) out.

Stage two only sees cached tensors; nothing here imports ``pipeline.detectors``.

Data flow for one image (paper equations in brackets):

1. ``encode_image``: ``F = Neck(C1) + interpolate(F_e(E)_finest)`` [Eq. 5, 6, 14], kept as its two
   terms (:class:`ImageFeatures`): F is never materialised at stride 4.
2. ``forward``: channel mapper Linear(D, h) on F -> RoIAlign ``R x R`` at each box [Eq. 3], as one
   fused RoIAlign of ``mapper(Neck(C1)) + interpolate(W_mapper E)`` (:func:`kernels.ops.fused_roi_align`;
   the mapper is linear and bilinear weights sum to 1, so this equals RoIAlign of ``mapper(F)``)
   -> + learned positional embedding -> for each box-encoder block: deformable block over the
   box tokens [Eq. 9], then a query layer (B2O + FFN) [Eq. 11] -> mask logits
   ``q . R^T`` [Eq. 4] -> mask scoring ``iou = MLP(Conv(Cat(M, R)))`` [Eq. 12].

   With ``cfg.roi_align`` False (Table 1's "RoIAlign ✗", the training-free baseline of Eq. 1):
   no RoIAlign; each query is dotted with every pixel of ``mapper(F)`` at F's own stride-4 grid,
   ``M_i = q_i . F^T`` ``[H1, W1]`` per image (Eq. 1; Eq. 2's interpolation to the image is the
   pasting in :mod:`pipeline.inference`). Images differ in ``(H1, W1)``, so a batch's logits are
   padded (:func:`pad_mask_grids`) and returned with each box's grid size (``mask_sizes``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from kernels import ops as kernel_ops

from .box_ops import box_cxcywh_to_xyxy
from .config import HeadConfig
from .encoders import BoxEncoder, ImageEncoder, Neck, QueryLayer, upsample_to
from .scoring import MaskScoringHead


class ImageFeatures(NamedTuple):
    """The fused stride-4 map ``F = c1 + interpolate(e, size)`` of one image, kept as its two terms.

    Built by :meth:`MaskFrozenDetrHead.encode_image`; with RoIAlign only RoIAlign at the boxes reads F,
    through :func:`kernels.ops.fused_roi_align`, so the ``[D, H1, W1]`` sum is never stored (at 800x1333
    it would be 256 x 200 x 334 floats per image, kept for the backward pass). Without RoIAlign
    (``cfg.roi_align`` False, Eq. 1) the head materialises it once per image.

    Attributes:
        c1: ``[D, H1, W1]`` ``Neck(C1)`` (or C1 itself without a neck), or None when the head does not
            fuse C1 (Table 12 "w/o C1"), in which case ``F = interpolate(e, size)``.
        e: ``[D, He, We]`` the image encoder's output at its finest level.
        size: ``(H1, W1)``, the size of F (C1's size), in stride-4 feature pixels.
    """

    c1: Tensor | None
    e: Tensor
    size: tuple[int, int]

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the terms."""
        return self.e.dtype

    def materialize(self) -> Tensor:
        """F itself, ``[D, H1, W1]`` (bilinear, align_corners=False): for inspection and tests."""
        out = upsample_to(self.e, self.size)
        return out if self.c1 is None else out + self.c1


#: Logit written where :func:`pad_mask_grids` pads a smaller grid: sigmoid gives exactly 0 in
#: float32 / bfloat16 / float16, so padded cells are background for every reader, and it stays finite.
MASK_PAD_LOGIT = -1e4


class DotProductMaskHead(nn.Module):
    """Eq. 4: mask logits = ``q_i . R_i^T`` (no parameters; Table 14 "dot product"); with one map
    shared by all queries, Eq. 1's ``q_i . F^T``."""

    def forward(self, box_tokens: Tensor, query: Tensor) -> Tensor:
        """``box_tokens [M, N, h]`` (each box its own tokens, Eq. 4) or ``[N, h]`` (one map for every
        box, Eq. 1), ``query [M, h]`` -> ``[M, N]`` logits, dtype of the inputs."""
        if box_tokens.dim() == 2:
            return query @ box_tokens.transpose(0, 1)
        return torch.einsum("mnc,mc->mn", box_tokens, query)


class SegmenterMaskHead(nn.Module):
    """Segmenter's mask-transformer tail at width h (Strudel et al. 2021; Table 14 "segmenter head").

    ``x = LN(tokens), c = LN(query)`` (one shared LayerNorm(h)), ``x @ P_patch`` and ``c @ P_query``
    (bias-free h x h projections), both L2-normalized, cosine-similarity logits, then a 2-parameter
    mask norm. Segmenter's mask norm is LayerNorm over the class channel; with one mask channel
    that normalization would make every logit equal to its bias, so we keep the LayerNorm(1)
    parameter count (gain, bias) as a learned scalar affine without the normalization step.
    33,026 parameters at h=128, as the Table 14 accounting.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj_patch = nn.Parameter(dim ** -0.5 * torch.randn(dim, dim))
        self.proj_query = nn.Parameter(dim ** -0.5 * torch.randn(dim, dim))
        self.mask_gain = nn.Parameter(torch.ones(1))
        self.mask_bias = nn.Parameter(torch.zeros(1))

    def forward(self, box_tokens: Tensor, query: Tensor) -> Tensor:
        """``box_tokens [M, N, h]``, ``query [M, h]`` -> ``[M, N]`` logits."""
        x = F.normalize(self.norm(box_tokens) @ self.proj_patch, dim=-1)
        c = F.normalize(self.norm(query) @ self.proj_query, dim=-1)
        return torch.einsum("mnc,mc->mn", x, c) * self.mask_gain + self.mask_bias


class MaskFrozenDetrHead(nn.Module):
    """The trainable head of Mask Frozen-DETR (Sections 3.2-3.4, Appendix A).

    Build it with :func:`pipeline.head.build_head` (or directly from a :class:`HeadConfig`).
    Submodules (each a row of :func:`parameter_table`): ``neck``, ``image_encoder``,
    ``channel_mapper``, ``query_proj``, ``box_pos_embed``, ``box_encoder``, ``query_encoder``,
    ``mask_head``, ``mask_scoring``. Absent components are ``None`` / identities.

    Raises (constructor):
        ValueError: an invalid config, or widths (``c1_channels``, ``num_feature_levels``) not set.

    The default config with DINO-FocalNet-L's widths (192, 5; 3 image / 2 box layers) has 4,076,208 parameters:
    the Table 16 (3, 2) accounting (4,026,288 -> "4.03 M") plus the C1 neck PWConv(192, 256) +
    GN(256) = 49,920. The paper's DINO row has no C1 neck (the detector's own stride-4 level,
    already GN(PWConv(C1)), plays its role); we keep the neck because C1 is 192-d here and the
    fusion ``Neck(C1) + interpolate(E)`` of Eq. 5/14 is the method as written. ``neck=False,
    fuse_c1=False`` gives the paper's exact DINO accounting.

    Everything runs per image (no padding across images), so an image's outputs do not depend on
    which other images share its batch.
    """

    COMPONENTS = ("neck", "image_encoder", "channel_mapper", "query_proj", "box_pos_embed", "box_encoder",
                  "query_encoder", "mask_head", "mask_scoring")

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        cfg.validate()
        if not cfg.has_widths:
            raise ValueError("head.c1_channels / head.num_feature_levels are not set: they are the cache's widths "
                             "(train-head reads them from the cache's fingerprint; `cli.py params` takes "
                             "--widths DETECTOR); for a head built by hand use HeadConfig.with_widths(...)")
        self.cfg = cfg
        # a parameter-free head (Table 1 baseline) still needs to know its dtype and device
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)
        d, h, r = cfg.hidden_dim, cfg.box_dim, cfg.roi_size
        self.neck = Neck(cfg.c1_channels, d) if (cfg.neck and cfg.fuse_c1) else None
        self.image_encoder = ImageEncoder(
            cfg.image_encoder_layers, d, cfg.image_encoder_ffn_dim, cfg.num_feature_levels,
            cfg.image_encoder_heads, cfg.image_encoder_points, cfg.activation, cfg.dropout,
            kind=cfg.image_encoder_block, window=cfg.image_encoder_window)
        self.channel_mapper = nn.Linear(d, h) if h != d else nn.Identity()
        self.query_proj = nn.Linear(d, h) if h != d else nn.Identity()
        self.box_pos_embed = nn.Parameter(torch.zeros(r * r, h)) if cfg.box_pos_embed else None
        if self.box_pos_embed is not None:
            nn.init.trunc_normal_(self.box_pos_embed, std=0.02)
        self.box_encoder = BoxEncoder(cfg.box_encoder_layers, h, cfg.box_ffn_ratio * h, r, cfg.box_encoder_heads,
                                      cfg.box_encoder_points, cfg.activation, cfg.dropout,
                                      kind=cfg.box_encoder_block, window=cfg.box_encoder_window)
        has_query_layers = cfg.query_ffn or cfg.query_b2o or cfg.query_o2o
        self.query_encoder = nn.ModuleList(
            QueryLayer(h, cfg.query_heads, cfg.box_ffn_ratio * h, use_o2o=cfg.query_o2o, use_b2o=cfg.query_b2o,
                       use_ffn=cfg.query_ffn, activation=cfg.activation, dropout=cfg.dropout)
            for _ in range(cfg.box_encoder_layers if has_query_layers else 0))
        self.mask_head = DotProductMaskHead() if cfg.mask_head == "dot_product" else SegmenterMaskHead(h)
        self.mask_scoring = (MaskScoringHead(h, r, cfg.num_score_classes, cfg.score_conv_dim, cfg.score_fc_dim)
                             if cfg.mask_scoring else None)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype the head computes in (follows ``.to()`` / ``.double()``); inputs are cast to it."""
        return self._anchor.dtype

    def encode_image(self, tokens: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                     c1: Tensor) -> ImageFeatures:
        """Fused stride-4 feature map F of one image (Eq. 5 with the neck of Eq. 14), as its two terms.

        ``F = Neck(C1) + interpolate(F_e(E)_finest)``: the image encoder runs over all levels of
        E; its finest level (largest ``H_l * W_l``; level 0 in the cache's finest-first order)
        is bilinearly resized (align_corners=False) to C1's size.

        Args:
            tokens: ``[S, D]`` encoder tokens (any float dtype; float16 from the cache).
            spatial_shapes: ``[L, 2]`` int64 ``(H_l, W_l)``; L must equal ``num_feature_levels``.
            level_start_index: ``[L]`` int64.
            c1: ``[C1, H1, W1]`` backbone stage-1 map (stride 4).

        Returns:
            :class:`ImageFeatures` in the head's dtype: ``c1 = Neck(C1)`` ``[D, H1, W1]`` (None without
            C1 fusion), ``e`` ``[D, He, We]`` (finest encoder level), ``size = (H1, W1)``;
            ``.materialize()`` gives F ``[D, H1, W1]``.

        Raises:
            ValueError: on a level-count, token-count, or C1-channel mismatch.
        """
        dtype, device = self.dtype, self.device
        tokens = tokens.to(device=device, dtype=dtype)
        c1 = c1.to(device=device, dtype=dtype)
        spatial_shapes = spatial_shapes.to(device=device, dtype=torch.int64)
        level_start_index = level_start_index.to(device=device, dtype=torch.int64)
        if tokens.dim() != 2 or tokens.shape[1] != self.cfg.hidden_dim:
            raise ValueError(f"tokens must be [S, {self.cfg.hidden_dim}], got {tuple(tokens.shape)}")
        if c1.dim() != 3:
            raise ValueError(f"c1 must be [C1, H1, W1], got {tuple(c1.shape)}")
        enc = self.image_encoder(tokens, spatial_shapes, level_start_index)
        sizes = spatial_shapes.prod(1)
        finest = int(torch.argmax(sizes))
        hf, wf = spatial_shapes[finest].tolist()
        start = int(level_start_index[finest])
        e = enc[start:start + hf * wf].transpose(0, 1).reshape(-1, hf, wf)
        size = (int(c1.shape[-2]), int(c1.shape[-1]))
        if not self.cfg.fuse_c1:
            return ImageFeatures(None, e, size)
        expected = self.cfg.c1_channels if self.neck is not None else self.cfg.hidden_dim
        if c1.shape[0] != expected:
            raise ValueError(f"c1 has {c1.shape[0]} channels, expected {expected}")
        return ImageFeatures(self.neck(c1) if self.neck is not None else c1, e, size)

    @property
    def device(self) -> torch.device:
        """Device the head computes on (follows ``.to()``)."""
        return self._anchor.device

    def _map_channels(self, x: Tensor, bias: bool) -> Tensor:
        """The channel mapper Linear(D, h) on a ``[D, H, W]`` map (``bias=False``: its weight only)."""
        if isinstance(self.channel_mapper, nn.Identity):
            return x
        b = self.channel_mapper.bias if bias else None
        return F.linear(x.permute(1, 2, 0), self.channel_mapper.weight, b).permute(2, 0, 1)

    def _pool(self, feat: ImageFeatures, xyxy: Tensor) -> Tensor:
        """RoIAlign (aligned, ``R x R``) of ``mapper(F)`` at ``[m, 4]`` xyxy boxes in F's pixels -> ``[m, h, R, R]``.

        ``mapper(c1 + up(e)) = mapper(c1) + up(W e)`` (linear mapper, bilinear weights summing to 1),
        so the mapper runs on the two unsummed terms and the fused kernel pools their sum.
        """
        dtype, device = self.dtype, self.device
        e = self._map_channels(feat.e.to(device=device, dtype=dtype), bias=feat.c1 is None)
        r, ratio = self.cfg.roi_size, self.cfg.roi_sampling_ratio
        if feat.c1 is None:  # F = up(e): plain RoIAlign of the upsampled map (an ablation only)
            return roi_align(upsample_to(e, feat.size)[None], [xyxy], output_size=r, spatial_scale=1.0,
                             sampling_ratio=ratio, aligned=True)
        c1 = self._map_channels(feat.c1.to(device=device, dtype=dtype), bias=True)
        rois = torch.cat((xyxy.new_zeros(len(xyxy), 1), xyxy), dim=1)
        return kernel_ops.fused_roi_align(c1[None].contiguous(), e[None].contiguous(), rois, r, 1.0, ratio)

    def _empty_outputs(self, ref: Tensor) -> dict[str, Tensor]:
        r = self.cfg.roi_size
        if not self.cfg.roi_align:
            return {"mask_logits": ref.new_zeros((0, 0, 0), dtype=self.dtype),
                    "mask_sizes": torch.zeros((0, 2), dtype=torch.int64, device=ref.device)}
        out = {"mask_logits": ref.new_zeros((0, r, r), dtype=self.dtype)}
        if self.mask_scoring is not None:
            out["iou_pred"] = ref.new_zeros((0, self.cfg.num_score_classes), dtype=self.dtype)
        return out

    def _image_masks(self, features: list[ImageFeatures], queries: Tensor, batch_index: Tensor) -> dict[str, Tensor]:
        """Eq. 1 without RoIAlign: ``q_i . mapper(F)^T`` at F's grid of each box's image (see :meth:`forward`)."""
        order, parts = [], []
        for b in torch.unique(batch_index).tolist():
            idx = torch.nonzero(batch_index == b).flatten()
            feat = features[b]
            fmap = self._map_channels(feat.materialize().to(device=self.device, dtype=self.dtype), bias=True)
            logits = self.mask_head(fmap.flatten(1).transpose(0, 1), self.query_proj(queries[idx]))  # [n, H1*W1]
            order.append(idx)
            parts.append(logits.view(-1, *feat.size))
        padded, sizes = pad_mask_grids(parts)
        inverse = torch.argsort(torch.cat(order))
        return {"mask_logits": padded[inverse], "mask_sizes": sizes[inverse]}

    def forward(self, features: list[Tensor], queries: Tensor, boxes: Tensor, image_sizes: Tensor,
                batch_index: Tensor) -> dict[str, Tensor]:
        """Mask logits (box frame, or F's grid without RoIAlign) and per-class mask IoU for M boxes from B images.

        Boxes are given flattened with a batch index (as RoIAlign), so images may have different
        numbers of boxes; each image is processed on its own.

        Without RoIAlign (``cfg.roi_align`` False; Table 1 "RoIAlign ✗", paper Eq. 1) the boxes are
        not used: the logits of a box of image b are ``q . mapper(F_b)^T`` at F_b's own grid
        ``[H1_b, W1_b]`` (C1's size, spanning the resized image), where ``q = query_proj(query)``.
        Images of a batch have different grids, so ``mask_logits`` is ``[M, max H1, max W1]``
        (each box's ``[H1_b, W1_b]`` at the top-left, :data:`MASK_PAD_LOGIT` elsewhere) and
        ``mask_sizes [M, 2]`` int64 gives ``(H1_b, W1_b)``; :func:`unpad_mask_logits` crops one image's.

        Args:
            features: B :class:`ImageFeatures` from :meth:`encode_image` (sizes may differ).
            queries: ``[M, D]`` last-decoder-layer queries of the boxes.
            boxes: ``[M, 4]`` cxcywh normalized to the image (the detector's boxes).
            image_sizes: ``[B, 2]`` float ``(h, w)`` of the resized image the detector saw, in
                pixels. Box pixels ``box * (w, h)`` are mapped to feature pixels by the per-axis
                ratio ``(W1_b / w, H1_b / h)``, i.e. the feature map is taken to span the image.
                RoIAlign is :func:`kernels.ops.fused_roi_align` (implementation: the process-wide
                ``--impl`` setting; ``reference`` = torchvision ``roi_align`` on the materialised sum).
            batch_index: ``[M]`` int64 image of each box, in ``[0, B)``.

        Returns:
            dict with ``mask_logits [M, R, R]`` (pre-sigmoid, box frame, row-major y/x) and, with
            mask scoring, ``iou_pred [M, num_score_classes]``; without RoIAlign ``mask_logits
            [M, max H1, max W1]`` (F's grid, padded) and ``mask_sizes [M, 2]`` instead. M = 0 gives
            empty tensors.

        Raises:
            ValueError: on inconsistent shapes or a batch index out of range.
        """
        m = queries.shape[0]
        if boxes.shape != (m, 4) or batch_index.shape != (m,):
            raise ValueError(f"queries {tuple(queries.shape)}, boxes {tuple(boxes.shape)} and batch_index "
                             f"{tuple(batch_index.shape)} disagree (want [M, D], [M, 4], [M])")
        if image_sizes.dim() != 2 or image_sizes.shape != (len(features), 2):
            raise ValueError(f"image_sizes must be [B={len(features)}, 2], got {tuple(image_sizes.shape)}")
        if m == 0:
            return self._empty_outputs(queries)
        if int(batch_index.min()) < 0 or int(batch_index.max()) >= len(features):
            raise ValueError(f"batch_index must lie in [0, {len(features)}), got "
                             f"[{int(batch_index.min())}, {int(batch_index.max())}]")
        dtype, device = self.dtype, self.device
        queries = queries.to(device=device, dtype=dtype)
        boxes = boxes.to(device=device, dtype=dtype)
        batch_index = batch_index.to(device)
        image_sizes = image_sizes.to(device=device, dtype=dtype)
        if not self.cfg.roi_align:
            return self._image_masks(features, queries, batch_index)

        r = self.cfg.roi_size
        geometry = self.box_encoder.geometry(dtype, device)
        order, mask_parts, iou_parts = [], [], []
        for b in torch.unique(batch_index).tolist():
            idx = torch.nonzero(batch_index == b).flatten()
            h1, w1 = features[b].size
            img_h, img_w = image_sizes[b].unbind(0)
            xyxy = box_cxcywh_to_xyxy(mask_frame_boxes(self.cfg, boxes[idx]))
            scale = torch.stack((w1 / img_w, h1 / img_h, w1 / img_w, h1 / img_h))
            xyxy = xyxy * torch.stack((img_w, img_h, img_w, img_h)) * scale
            rois = self._pool(features[b], xyxy)
            tokens = rois.flatten(2).transpose(1, 2)  # [m, R*R, h]
            if self.box_pos_embed is not None:
                tokens = tokens + self.box_pos_embed
            q = self.query_proj(queries[idx])
            for layer in range(len(self.box_encoder.layers)):
                tokens = self.box_encoder.layer(layer, tokens, geometry)
                if layer < len(self.query_encoder):
                    q = self.query_encoder[layer](q, tokens)
            logits = self.mask_head(tokens, q).view(-1, r, r)
            order.append(idx)
            mask_parts.append(logits)
            if self.mask_scoring is not None:
                probs = logits.sigmoid()
                if self.cfg.score_detach_mask:
                    probs = probs.detach()
                iou_parts.append(self.mask_scoring(probs, tokens))
        inverse = torch.argsort(torch.cat(order))
        out = {"mask_logits": torch.cat(mask_parts)[inverse]}
        if self.mask_scoring is not None:
            out["iou_pred"] = torch.cat(iou_parts)[inverse]
        return out


def mask_frame_boxes(cfg: HeadConfig, boxes: Tensor) -> Tensor:
    """The boxes the head's masks span: ``boxes`` (cxcywh normalized, ``[M, 4]``; the ``R x R``
    RoIAlign grid), or the whole image ``(0.5, 0.5, 1, 1)`` for every box when ``cfg.roi_align``
    is False (Table 1's "RoIAlign ✗": Eq. 1's mask at F's grid covers the image). Training
    targets (:mod:`pipeline.targets`), the head's RoIAlign and the pasting at inference
    (:mod:`pipeline.inference`) all use these boxes, so the three always agree.
    """
    if cfg.roi_align:
        return boxes
    return boxes.new_tensor([0.5, 0.5, 1.0, 1.0]).expand_as(boxes).clone()


def mask_grid_size(cfg: HeadConfig, c1_size: tuple[int, int]) -> tuple[int, int]:
    """``(rows, cols)`` of the training targets of one image's masks: ``(T, T)`` (``cfg.target_size``,
    resampled into each box) with RoIAlign, F's own grid ``c1_size = (H1, W1)`` without it (Eq. 1)."""
    if cfg.roi_align:
        return cfg.target_size, cfg.target_size
    return int(c1_size[0]), int(c1_size[1])


def pad_mask_grids(parts: list[Tensor], value: float = MASK_PAD_LOGIT) -> tuple[Tensor, Tensor]:
    """Stack per-image mask grids of different sizes into one padded tensor.

    Args:
        parts: tensors ``[n_b, H_b, W_b]`` (one per image, same dtype and device; at least one).
        value: fill of the padded cells (:data:`MASK_PAD_LOGIT` for logits, 0 for targets).

    Returns:
        ``(padded [sum n_b, max H_b, max W_b], sizes [sum n_b, 2] int64 (H_b, W_b))``, image b's
        grid at the top-left of its rows.

    Raises:
        ValueError: no parts, or a part that is not 3-d.
    """
    if not parts or any(p.dim() != 3 for p in parts):
        raise ValueError(f"need one or more [n, H, W] mask grids, got shapes {[tuple(p.shape) for p in parts]}")
    hmax, wmax = max(p.shape[1] for p in parts), max(p.shape[2] for p in parts)
    padded = torch.cat([F.pad(p, (0, wmax - p.shape[2], 0, hmax - p.shape[1]), value=value) for p in parts])
    sizes = torch.cat([torch.tensor([p.shape[1:]], dtype=torch.int64).expand(p.shape[0], 2) for p in parts])
    return padded, sizes.to(padded.device)


def unpad_mask_logits(mask_logits: Tensor, mask_sizes: Tensor | None) -> Tensor:
    """One image's masks without padding: ``mask_logits [n, H, W]`` cropped to ``mask_sizes [n, 2]``
    (all rows equal: one image's grid). ``mask_sizes`` None or ``n = 0``: unchanged.

    Raises:
        ValueError: rows of ``mask_sizes`` that differ (masks of more than one image).
    """
    if mask_sizes is None or mask_sizes.shape[0] == 0:
        return mask_logits
    if bool((mask_sizes != mask_sizes[0]).any()):
        raise ValueError(f"unpad_mask_logits takes one image's masks; got grids {mask_sizes.unique(dim=0).tolist()}")
    h, w = mask_sizes[0].tolist()
    return mask_logits[:, :h, :w]


def count_parameters(head: nn.Module, trainable_only: bool = True) -> int:
    """Number of (unique) parameter elements of ``head`` (the paper's ▲#params convention).

    Args:
        head: any module.
        trainable_only: count only parameters with ``requires_grad``.
    """
    return sum(p.numel() for p in head.parameters() if p.requires_grad or not trainable_only)


def parameter_table(head: nn.Module) -> list[tuple[str, int]]:
    """Per-component parameter counts (for ``cli.py params``).

    For a :class:`MaskFrozenDetrHead` the rows are its components in data-flow order
    (``neck``, ``image_encoder``, ``channel_mapper``, ``query_proj``, ``box_pos_embed``,
    ``box_encoder``, ``query_encoder``, ``mask_head``, ``mask_scoring``), absent (``None``)
    components omitted; for any other module, its direct parameters then its direct children.
    Rows sum to ``count_parameters(head, trainable_only=False)``.

    Returns:
        ``[(name, count), ...]``.
    """
    names = getattr(head, "COMPONENTS", None)
    if names is None:
        names = [n for n, _ in head.named_parameters(recurse=False)] + [n for n, _ in head.named_children()]
    rows = []
    for name in names:
        obj = getattr(head, name)
        if obj is None:
            continue
        count = obj.numel() if isinstance(obj, nn.Parameter) else sum(p.numel() for p in obj.parameters())
        rows.append((name, count))
    return rows


def format_parameter_table(head: nn.Module) -> str:
    """Printable :func:`parameter_table` with a total line (what ``cli.py params`` shows)."""
    rows = parameter_table(head)
    width = max([len(n) for n, _ in rows] + [5])
    lines = [f"{name:<{width}}  {count:>11,}" for name, count in rows]
    total = count_parameters(head, trainable_only=False)
    lines.append(f"{'total':<{width}}  {total:>11,}  ({total / 1e6:.2f} M)")
    return "\n".join(lines)
