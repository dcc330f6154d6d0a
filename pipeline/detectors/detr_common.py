"""Generic (Deformable-)DETR pieces shared by every detector family in this package.

What is here is the same arithmetic in FocalNet-DINO (commit 23901e0, ``models/dino/utils.py``,
``position_encoding.py``, ``deformable_transformer.py``) and H-Deformable-DETR (commit f58ceb1,
``util/misc.py``, ``models/position_encoding.py``, ``models/deformable_transformer.py``,
``models/deformable_detr.py``): the clamped inverse sigmoid, the ReLU MLP heads, the 2-D sine
position embedding (with the two families' options), the sine embedding of boxes, the two-stage
encoder proposals, the post-norm deformable encoder stack and decoder layer, the official mask
resizing, the COCO category ids, and the per-image :class:`~pipeline.record.SampleRecord`
record built from a padded forward.  The valid-ratio and reference-point helpers live in
:mod:`pipeline.layers.deformable` (the mask head uses them too).

Dtypes: geometric helpers (sine embeddings, valid ratios, encoder reference points, two-stage
proposals and their validity test, the sine-embedding frequencies) are computed in float32 as in
both official codes and cast to the model dtype, so a ``.double()`` model reproduces the official
float64 runs, float32 islands included.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.detectors.base import crop_tokens
from pipeline.record import SampleRecord
from pipeline.layers.deformable import (
    DeformableEncoderLayer,
    MSDeformAttn,
    encoder_reference_points,
    level_start_index_of,
    valid_ratios_from_mask,
)

#: The 80 COCO category ids actually used (1..90 without 12, 26, 29, 30, 45, 66, 68, 69, 71, 83).
#: DETR-family COCO models have 91 logit columns indexed by the raw ``category_id``.
COCO_CATEGORY_IDS: tuple[int, ...] = tuple(
    i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))


def mask_to(mask: Tensor, size: Sequence[int]) -> Tensor:
    """Official mask resizing: ``F.interpolate(mask[None].float(), size).bool()[0]`` (nearest). ``[B, H, W]`` bool."""
    return F.interpolate(mask[None].float(), size=tuple(int(s) for s in size)).to(torch.bool)[0]


def valid_hw(mask: Tensor) -> tuple[int, int]:
    """Number of non-padded rows (along column 0) and columns (along row 0) of one ``[H, W]`` mask."""
    return int((~mask[:, 0]).sum()), int((~mask[0, :]).sum())


def inverse_sigmoid(x: Tensor, eps: float = 1e-3) -> Tensor:
    """Clamped logit ``log(x / (1 - x))`` with both terms clamped at ``eps`` (``util.misc.inverse_sigmoid`` of both repos).

    ``x``: any shape, values expected in ``[0, 1]`` (clamped first). Same shape/dtype out.
    """
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _interleave_sin_cos(x: Tensor) -> Tensor:
    """``[..., F]`` -> ``[..., F]`` with ``sin`` of even and ``cos`` of odd features, interleaved."""
    return torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)


def sine_position_embedding(mask: Tensor, num_pos_feats: int = 128, temperature_h: float = 20.0,
                            temperature_w: float = 20.0, normalize: bool = True,
                            scale: float = 2 * math.pi, offset: float = 0.0) -> Tensor:
    """Normalised 2-D sine position embedding of a padded map.

    DINO's ``PositionEmbeddingSineHW`` (``offset=0``, temperatures 20) and Deformable/H-DETR's
    ``PositionEmbeddingSine`` (``offset=0.5``, temperature 10000): the cumulative row/column
    counts ``c`` become ``(c - offset) / (c_last + 1e-6) * scale``.

    Args:
        mask: ``[B, H, W]`` bool, True on padding.
        num_pos_feats: features per axis (``hidden_dim // 2``).
        temperature_h, temperature_w: frequency bases.
        normalize: normalise the counts as above (else use them raw).
        scale: ``2 * pi``.
        offset: subtracted from the counts before normalising (0 for DINO, 0.5 for H-DETR).

    Returns:
        ``[B, 2 * num_pos_feats, H, W]`` float32, channels ``(y features, x features)``.
    """
    not_mask = ~mask
    y_embed = not_mask.cumsum(1, dtype=torch.float32)
    x_embed = not_mask.cumsum(2, dtype=torch.float32)
    if normalize:
        eps = 1e-6
        if offset:
            y_embed = (y_embed - offset) / (y_embed[:, -1:, :] + eps) * scale
            x_embed = (x_embed - offset) / (x_embed[:, :, -1:] + eps) * scale
        else:
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=mask.device)
    exponent = 2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats
    pos_x = _interleave_sin_cos(x_embed[:, :, :, None] / temperature_w ** exponent)
    pos_y = _interleave_sin_cos(y_embed[:, :, :, None] / temperature_h ** exponent)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class PositionEmbeddingSine(nn.Module):
    """Module form of :func:`sine_position_embedding` (no parameters; ``backbone.1`` of the official Joiners).

    Args:
        num_pos_feats: features per axis (``hidden_dim // 2``).
        temperature_h, temperature_w: frequency bases (DINO-FocalNet: 20, 20; H-DETR: 10000, 10000).
        normalize: normalise the cumulative counts.
        scale: ``2 * pi`` when None.
        offset: 0 (DINO) or 0.5 (Deformable / H-DETR).

    Raises:
        ValueError: ``scale`` given without ``normalize``.
    """

    def __init__(self, num_pos_feats: int = 128, temperature_h: float = 20.0, temperature_w: float = 20.0,
                 normalize: bool = True, scale: float | None = None, offset: float = 0.0):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("normalize should be True if scale is passed")
        self.num_pos_feats = num_pos_feats
        self.temperature_h = temperature_h
        self.temperature_w = temperature_w
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self.offset = offset

    def forward(self, mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """``mask [B, H, W]`` bool -> ``[B, 2 * num_pos_feats, H, W]`` computed in float32, cast to ``dtype``."""
        return sine_position_embedding(mask, self.num_pos_feats, self.temperature_h, self.temperature_w,
                                       self.normalize, self.scale, self.offset).to(dtype)


def query_sine_embedding(boxes: Tensor, num_feats: int = 128, temperature: float = 10000.0,
                         order: str = "yxwh") -> Tensor:
    """Sine embedding of reference boxes or points.

    ``order="yxwh"`` is DINO's ``gen_sineembed_for_position`` (y before x); ``order="xywh"`` is
    H-DETR's ``get_proposal_pos_embed`` applied to already-sigmoided boxes (coordinates in input
    order).  Each coordinate ``c`` gives ``num_feats`` features ``sin/cos(2*pi*c / T**(2*(i//2)/num_feats))``
    interleaved; the frequencies are evaluated in float32, as both official codes do.

    Args:
        boxes: ``[..., 4]`` ``(cx, cy, w, h)`` or ``[..., 2]`` ``(x, y)``, normalized to ``[0, 1]``.
        num_feats: features per coordinate (both official codes hard-code 128 = ``d_model // 2``).
        temperature: frequency base (10000).
        order: ``"yxwh"`` (DINO) or ``"xywh"`` (H-DETR).

    Returns:
        ``[..., 4 * num_feats]`` or ``[..., 2 * num_feats]``, dtype of ``boxes``.

    Raises:
        ValueError: if the last dimension is not 2 or 4, or ``order`` is unknown.
    """
    if boxes.shape[-1] not in (2, 4):
        raise ValueError(f"boxes last dim must be 2 or 4, got {tuple(boxes.shape)}")
    if order not in ("yxwh", "xywh"):
        raise ValueError(f"order must be 'yxwh' or 'xywh', got {order!r}")
    scale = 2 * math.pi
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=boxes.device)
    dim_t = (temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)).to(boxes.dtype)
    parts = [_interleave_sin_cos((boxes[..., i] * scale)[..., None] / dim_t) for i in range(boxes.shape[-1])]
    if order == "xywh":
        return torch.cat(parts, dim=-1)
    index = [1, 0] if boxes.shape[-1] == 2 else [1, 0, 2, 3]
    return torch.cat([parts[i] for i in index], dim=-1)


class MLP(nn.Module):
    """ReLU multi-layer perceptron with keys ``layers.{i}`` (official ``MLP`` of DINO and Deformable/H-DETR).

    Args:
        input_dim, hidden_dim, output_dim: widths.
        num_layers: number of Linear layers (ReLU between them, none after the last).
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        """``[..., input_dim] -> [..., output_dim]``."""
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x


def encoder_output_proposals(memory: Tensor, padding_mask: Tensor, spatial_shapes: Tensor,
                             base_wh: float = 0.05) -> tuple[Tensor, Tensor]:
    """Two-stage proposals, one per encoder token (official ``gen_encoder_output_proposals``, no learnt wh).

    Each token gets the box ``(cx, cy, w, h)`` with its cell center normalized by the **valid**
    size of its level and ``w = h = base_wh * 2**level``, as an unsigmoided logit.  Tokens on
    padding or whose box is not strictly inside ``(0.01, 0.99)`` get ``+inf`` proposals and a
    zeroed memory.

    Args:
        memory: ``[B, S, D]`` encoder output.
        padding_mask: ``[B, S]`` bool, True on padding.
        spatial_shapes: ``[L, 2]`` int64 padded ``(H_l, W_l)``.
        base_wh: box size at level 0 (normalized).

    Returns:
        ``(output_memory [B, S, D]`` dtype of memory, ``output_proposals [B, S, 4]`` logits,
        computed in float32 as the official code and cast to memory's dtype).
    """
    n = memory.shape[0]
    proposals = []
    start = 0
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        mask_l = padding_mask[:, start:start + h * w].view(n, h, w)
        valid_h = (~mask_l[:, :, 0]).sum(1)
        valid_w = (~mask_l[:, 0, :]).sum(1)
        grid_y, grid_x = torch.meshgrid(
            torch.linspace(0, h - 1, h, dtype=torch.float32, device=memory.device),
            torch.linspace(0, w - 1, w, dtype=torch.float32, device=memory.device),
            indexing="ij",
        )
        grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
        scale = torch.cat([valid_w.unsqueeze(-1), valid_h.unsqueeze(-1)], 1).view(n, 1, 1, 2)
        grid = (grid.unsqueeze(0).expand(n, -1, -1, -1) + 0.5) / scale
        wh = torch.ones_like(grid) * base_wh * (2.0 ** lvl)
        proposals.append(torch.cat((grid, wh), -1).view(n, -1, 4))
        start += h * w
    output_proposals = torch.cat(proposals, 1)
    valid = ((output_proposals > 0.01) & (output_proposals < 0.99)).all(-1, keepdim=True)
    output_proposals = torch.log(output_proposals / (1 - output_proposals))
    output_proposals = output_proposals.masked_fill(padding_mask.unsqueeze(-1), float("inf"))
    output_proposals = output_proposals.masked_fill(~valid, float("inf"))
    output_memory = memory.masked_fill(padding_mask.unsqueeze(-1), 0.0).masked_fill(~valid, 0.0)
    return output_memory, output_proposals.to(memory.dtype)


class DeformableDecoderLayer(nn.Module):
    """Deformable-DETR decoder layer, order self-attention -> deformable cross-attention -> FFN, post-norm.

    Official ``DeformableTransformerDecoderLayer`` of Deformable/H-DETR, and DINO's with
    ``module_seq=['sa', 'ca', 'ffn']``, ``decoder_sa_type='sa'``: keys ``cross_attn`` (MSDeformAttn) / ``norm1``, ``self_attn``
    (``nn.MultiheadAttention``) / ``norm2``, ``linear1`` / ``linear2`` / ``norm3``.

    Args:
        d_model: channels D.
        d_ffn: FFN width.
        n_levels, n_heads, n_points: deformable attention sizes (heads shared with self-attention).
        activation: FFN activation ``"relu"`` (DINO) or ``"gelu"``.
    """

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, n_levels: int = 4, n_heads: int = 8,
                 n_points: int = 4, activation: str = "relu"):
        super().__init__()
        if activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be 'relu' or 'gelu', got {activation!r}")
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=0.0)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = nn.ReLU() if activation == "relu" else nn.GELU()
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor,
                memory_padding_mask: Tensor | None, spatial_shapes: Tensor, level_start_index: Tensor,
                self_attn_mask: Tensor | None = None) -> Tensor:
        """One decoder layer.

        Args:
            tgt: ``[B, Q, D]`` content queries.
            query_pos: ``[B, Q, D]`` positional queries.
            reference_points: ``[B, Q, L, 4]`` reference boxes ``(cx, cy, w, h)`` in padded-map
                normalized coordinates (valid-region boxes times the valid ratios).
            memory: ``[B, S, D]`` encoder memory (values of the cross-attention).
            memory_padding_mask: ``[B, S]`` bool, True on padding.
            spatial_shapes: ``[L, 2]`` int64; level_start_index: ``[L]`` int64.
            self_attn_mask: optional ``[Q, Q]`` mask of the self-attention (None at eval).

        Returns:
            ``[B, Q, D]``.
        """
        q = (tgt + query_pos).transpose(0, 1)
        sa = self.self_attn(q, q, tgt.transpose(0, 1), attn_mask=self_attn_mask)[0].transpose(0, 1)
        tgt = self.norm2(tgt + sa)
        ca = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index,
                             memory_padding_mask)
        tgt = self.norm1(tgt + ca)
        return self.norm3(tgt + self.linear2(self.activation(self.linear1(tgt))))


class DeformableEncoder(nn.Module):
    """Stack of deformable encoder layers without a final norm.

    DINO's ``TransformerEncoder`` (deformable, 'standard') and Deformable/H-DETR's
    ``DeformableTransformerEncoder``; the encoder reference points are computed in float32 from
    the float32 valid ratios and cast to the model dtype (exact), as both official codes do.

    Args:
        num_layers: number of :class:`~pipeline.layers.deformable.DeformableEncoderLayer` (key ``layers.{i}``).
        d_model, d_ffn, n_levels, n_heads, n_points, activation: layer sizes.
    """

    def __init__(self, num_layers: int, d_model: int, d_ffn: int, n_levels: int, n_heads: int, n_points: int,
                 activation: str = "relu"):
        super().__init__()
        self.layers = nn.ModuleList([
            DeformableEncoderLayer(d_model, d_ffn, n_levels, n_heads, n_points, activation=activation)
            for _ in range(num_layers)])

    def forward(self, src: Tensor, pos: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                valid_ratios: Tensor, padding_mask: Tensor) -> list[Tensor]:
        """Run every layer.

        Args:
            src: ``[B, S, D]`` flattened input-projected features.
            pos: ``[B, S, D]`` sine position embedding + level embedding.
            spatial_shapes: ``[L, 2]`` int64; level_start_index: ``[L]`` int64.
            valid_ratios: ``[B, L, 2]`` float32 ``(w, h)`` (official ``get_valid_ratio``).
            padding_mask: ``[B, S]`` bool, True on padding.

        Returns:
            The output of every layer, ``num_layers`` tensors ``[B, S, D]``; the last is the memory.
        """
        ref = encoder_reference_points(spatial_shapes, valid_ratios).to(src.dtype)
        outs = []
        out = src
        for layer in self.layers:
            out = layer(out, pos, ref, spatial_shapes, level_start_index, padding_mask)
            outs.append(out)
        return outs


def patch_stage_shapes(height: int, width: int, num_stages: int = 4, patch_size: int = 4) -> list[tuple[int, int]]:
    """``(H_i, W_i)`` of every stage of a hierarchical backbone (FocalNet, Swin) for a ``height x width``
    input, pure arithmetic: stage 0 is ``ceil(H / patch_size)``; each later stage halves with ceiling
    (pad to even, then a stride-2 downsample), as their ``forward`` does.
    """
    h, w = -(-height // patch_size), -(-width // patch_size)
    shapes = [(h, w)]
    for _ in range(num_stages - 1):
        h, w = (h + 1) // 2, (w + 1) // 2
        shapes.append((h, w))
    return shapes


def flatten_levels(srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor],
                   level_embed: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Flatten L feature maps into the encoder's token sequence (Deformable-DETR / DINO / H-DETR).

    Args:
        srcs: L maps ``[B, D, H_l, W_l]``; masks: L ``[B, H_l, W_l]`` bool (True = padding);
        pos_embeds: L ``[B, D, H_l, W_l]``; level_embed: ``[L, D]``.

    Returns:
        ``(src [B, S, D], mask [B, S] bool, pos [B, S, D]`` (pos + level embed),
        ``spatial_shapes [L, 2]`` int64, ``level_start_index [L]`` int64,
        ``valid_ratios [B, L, 2]`` float32 ``(w, h)``).

    Raises:
        ValueError: the number of maps, masks or position embeddings is not ``level_embed``'s L.
    """
    if not (len(srcs) == len(masks) == len(pos_embeds) == level_embed.shape[0]):
        raise ValueError(f"expected {level_embed.shape[0]} levels, got {len(srcs)} srcs, "
                         f"{len(masks)} masks, {len(pos_embeds)} pos embeddings")
    src_flatten = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
    mask_flatten = torch.cat([m.flatten(1) for m in masks], 1)
    pos_flatten = torch.cat([p.flatten(2).transpose(1, 2) + level_embed[lvl].view(1, 1, -1)
                             for lvl, p in enumerate(pos_embeds)], 1)
    spatial_shapes = torch.as_tensor([tuple(s.shape[-2:]) for s in srcs], dtype=torch.long, device=src_flatten.device)
    valid_ratios = torch.stack([valid_ratios_from_mask(m) for m in masks], 1)
    return src_flatten, mask_flatten, pos_flatten, spatial_shapes, level_start_index_of(spatial_shapes), valid_ratios


def build_input_proj(channels: Sequence[int], hidden_dim: int, num_feature_levels: int) -> nn.ModuleList:
    """Deformable-DETR's ``input_proj`` (keys ``input_proj.{l}.{0,1}``), as DINO and H-DETR build it.

    One ``1x1 conv + GroupNorm(32)`` per backbone map (``channels``), then ``3x3/s2 conv + GN``
    levels on top of the last one until there are ``num_feature_levels``; convs Xavier-initialised
    with zero bias.
    """
    proj = [nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim)) for c in channels]
    in_ch = channels[-1]
    for _ in range(num_feature_levels - len(channels)):
        proj.append(nn.Sequential(nn.Conv2d(in_ch, hidden_dim, kernel_size=3, stride=2, padding=1),
                                  nn.GroupNorm(32, hidden_dim)))
        in_ch = hidden_dim
    for p in proj:
        nn.init.xavier_uniform_(p[0].weight, gain=1)
        nn.init.zeros_(p[0].bias)
    return nn.ModuleList(proj)


def check_images_and_mask(images: Tensor, mask: Tensor) -> None:
    """Check a padded batch as every detector's ``forward`` takes it.

    Args:
        images: ``[B, 3, H, W]``; mask: ``[B, H, W]`` (True = padding).

    Raises:
        ValueError: other ranks, or batch / spatial sizes that differ between the two.
    """
    if images.dim() != 4 or mask.dim() != 3 or images.shape[0] != mask.shape[0] \
            or images.shape[-2:] != mask.shape[-2:]:
        raise ValueError(f"images [B,3,H,W] and mask [B,H,W] expected, got {tuple(images.shape)} "
                         f"and {tuple(mask.shape)}")


def level_inputs(input_proj: nn.ModuleList, feats: list[Tensor], mask: Tensor, pos_embed: nn.Module,
                 num_feature_levels: int, dtype: torch.dtype) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """The encoder's L input levels from the backbone maps (official Deformable-DETR ``forward``).

    Each backbone map goes through its ``input_proj`` level; the levels beyond the backbone's are
    ``input_proj`` 3x3/s2 convs applied to the last backbone map, then to the previous level.

    Args:
        input_proj: :func:`build_input_proj`'s modules; feats: backbone maps ``[B, C_i, H_i, W_i]``;
        mask: ``[B, H, W]`` bool at the input size (True = padding); pos_embed: the backbone's
        position embedding module (``pos_embed(mask_l, dtype)``); dtype: the embedding dtype.

    Returns:
        ``(srcs, masks, pos_embeds)``: L maps ``[B, D, H_l, W_l]``, L masks ``[B, H_l, W_l]`` bool
        (nearest-interpolated), L position embeddings ``[B, D, H_l, W_l]``.
    """
    masks = [mask_to(mask, f.shape[-2:]) for f in feats]
    poss = [pos_embed(m, dtype) for m in masks]
    srcs = [input_proj[lvl](f) for lvl, f in enumerate(feats)]
    for lvl in range(len(feats), num_feature_levels):
        src = input_proj[lvl](feats[-1] if lvl == len(feats) else srcs[-1])
        m = mask_to(mask, src.shape[-2:])
        srcs.append(src)
        masks.append(m)
        poss.append(pos_embed(m, dtype))
    return srcs, masks, poss


def extract_records(out: dict, c1: Tensor, c1_mask: Tensor, encoder_layers: list[int], top_k: int) -> list[SampleRecord]:
    """One :class:`~pipeline.record.SampleRecord` per image from a padded batch forward.

    Queries are ranked by their best sigmoid class score over all columns (descending, stable
    sort, so ties keep query order) and the first ``top_k`` are kept.  Encoder tokens and ``c1``
    are cropped to the valid region of each level, whose size is the number of non-padded
    rows/columns of that level's interpolated mask.  The returned tensors are ordinary clones in
    the forward's dtype; ``extras['scores']`` holds the ``[K]`` ranking scores.

    Args:
        out: the detector forward's dict: ``pred_logits [B, Q, C]``, ``pred_boxes [B, Q, 4]``,
            ``hs_last [B, Q, D]``, ``encoder_layer_outputs`` (list of ``[B, S, D]``),
            ``spatial_shapes [L, 2]``, ``masks`` (L ``[B, H_l, W_l]`` bool), ``valid_ratios [B, L, 2]``.
        c1: ``[B, C1, H1, W1]`` the stride-4 backbone map; c1_mask: ``[B, H1, W1]`` bool (True = padding).
        encoder_layers: 1-based encoder layers to return (already validated by the caller).
        top_k: queries to keep (already validated).
    """
    dtype = out["hs_last"].dtype
    shapes = out["spatial_shapes"]
    records = []
    for b in range(out["hs_last"].shape[0]):
        scores = out["pred_logits"][b].sigmoid().max(-1).values
        order = torch.sort(scores, descending=True, stable=True).indices[:top_k]
        valid = torch.tensor([valid_hw(m[b]) for m in out["masks"]], dtype=torch.long)
        h1, w1 = valid_hw(c1_mask[b])
        records.append(SampleRecord(
            queries=out["hs_last"][b, order].clone(),
            logits=out["pred_logits"][b, order].clone(),
            boxes=out["pred_boxes"][b, order].clone(),
            query_index=order.clone(),
            encoder_tokens={k: crop_tokens(out["encoder_layer_outputs"][k - 1][b], shapes, valid).clone()
                            for k in encoder_layers},
            spatial_shapes=valid,
            level_start_index=level_start_index_of(valid),
            valid_ratios=out["valid_ratios"][b].to(dtype).clone(),
            c1=c1[b, :, :h1, :w1].clone(),
            extras={"scores": scores[order].clone()},
        ))
    return records


def frozen_or_trainable(trainable: bool):
    """The context of a detector's ``extract`` forward: ``torch.inference_mode()`` for the frozen
    detector (no autograd bookkeeping; records are cloned out of it), or a no-op context when
    ``trainable`` (online fine-tuning: the forward is recorded for backward)."""
    return contextlib.nullcontext() if trainable else torch.inference_mode()


def check_extract_args(encoder_layers: list[int], top_k: int, num_encoder_layers: int, num_queries: int) -> list[int]:
    """Validate ``extract`` arguments; returns the layers as ints.

    Raises:
        ValueError: a layer outside ``1..num_encoder_layers`` or ``top_k`` outside ``1..num_queries``.
    """
    layers = [int(k) for k in encoder_layers]
    bad = [k for k in layers if not 1 <= k <= num_encoder_layers]
    if bad:
        raise ValueError(f"encoder layers {bad} outside 1..{num_encoder_layers}")
    if not 1 <= top_k <= num_queries:
        raise ValueError(f"top_k={top_k} outside 1..{num_queries}")
    return layers
