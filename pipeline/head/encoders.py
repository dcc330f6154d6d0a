"""The three trainable encoders of the head: image (Sec. 3.2), box (Sec. 3.3), query (Sec. 3.4).

The image and box encoders are stacks of one block kind chosen from a registry
(:data:`BLOCK_KINDS`, Tables 2 and 3): ``deformable`` (the shared post-norm
:class:`pipeline.layers.deformable.DeformableEncoderLayer`), ``swin`` (torchvision's
``SwinTransformerBlock``: pre-norm window attention with a relative-position bias, every
second block shifted by half a window) and ``convnext`` (torchvision's ``CNBlock``: 7x7
depth-wise conv -> LayerNorm -> FFN 4x -> layer scale). The library blocks are used as they
are (a well-kept implementation; their parameter counts are the paper's, see
``shared/papers/params-reconstruction.md``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchvision.models.convnext import CNBlock
from torchvision.models.swin_transformer import SwinTransformerBlock

from pipeline.layers.deformable import DeformableEncoderLayer, encoder_reference_points

#: Block kinds of the image and box feature encoders (Tables 2, 3): one registry for both.
BLOCK_KINDS = ("deformable", "swin", "convnext")


def build_blocks(kind: str, num_layers: int, dim: int, *, n_levels: int = 1, n_heads: int = 8, n_points: int = 4,
                 d_ffn: int | None = None, window: int = 7, activation: str = "gelu",
                 dropout: float = 0.0) -> nn.ModuleList:
    """``num_layers`` encoder blocks of one kind at width ``dim`` (the registry of :data:`BLOCK_KINDS`).

    Args:
        kind: ``"deformable"`` (MSDeformAttn over ``n_levels`` levels, ``n_heads`` heads,
            ``n_points`` points, FFN ``d_ffn``, post-norm), ``"swin"`` (window ``window``,
            ``n_heads`` heads, MLP ratio 4, block ``i`` shifted by ``window // 2`` when ``i`` is odd)
            or ``"convnext"`` (7x7 depth-wise conv, LayerNorm, FFN 4x, layer scale 1e-6).
        num_layers: blocks (0 = an empty list).
        dim: channels.
        d_ffn: FFN width of the deformable block (default ``4 * dim``); swin / convnext use 4x.
        activation, dropout: of the deformable block (swin / convnext: GELU, no dropout).

    Returns:
        ``nn.ModuleList``. Parameters per block at dim 256: deformable 756,864 (4 levels) /
        781,536 (5 levels) / 682,848 (1 level); swin 795,592 (window 14) / 791,560 (window 8);
        convnext 539,136.

    Raises:
        ValueError: unknown ``kind``.
    """
    if kind == "deformable":
        d_ffn = 4 * dim if d_ffn is None else d_ffn
        return nn.ModuleList(DeformableEncoderLayer(dim, d_ffn, n_levels, n_heads, n_points, activation=activation,
                                                    dropout=dropout) for _ in range(num_layers))
    if kind == "swin":
        return nn.ModuleList(SwinTransformerBlock(dim, n_heads, [window, window],
                                                  [0 if i % 2 == 0 else window // 2] * 2, mlp_ratio=4.0)
                             for i in range(num_layers))
    if kind == "convnext":
        return nn.ModuleList(CNBlock(dim, layer_scale=1e-6, stochastic_depth_prob=0.0) for _ in range(num_layers))
    raise ValueError(f"unknown encoder block kind {kind!r}; expected one of {BLOCK_KINDS}")


def apply_map_blocks(blocks: nn.ModuleList, x: Tensor) -> Tensor:
    """Run swin / convnext blocks over maps ``[B, H, W, C]`` -> ``[B, H, W, C]`` (channels last).

    Swin blocks take channels-last input (windows padded to a multiple of the window size and
    cropped back by torchvision); ConvNeXt blocks take ``[B, C, H, W]``.
    """
    for block in blocks:
        if isinstance(block, CNBlock):
            x = block(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        else:
            x = block(x)
    return x


def sine_position_embedding(height: int, width: int, dim: int, *, temperature: float = 10000.0,
                            dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """Parameter-free 2-D sine positional embedding of one unpadded map.

    Deformable DETR's ``PositionEmbeddingSine(normalize=True)``: token centres ``y + 0.5``,
    ``x + 0.5`` normalized by the map size to ``(0, 2*pi)``; the first ``dim/2`` channels
    encode y, the last ``dim/2`` encode x, alternating sin / cos.

    Args:
        height, width: map size in tokens.
        dim: output channels (even).

    Returns:
        ``[height * width, dim]`` row-major (y, x), dtype ``dtype``.

    Raises:
        ValueError: if ``dim`` is odd.
    """
    if dim % 2:
        raise ValueError(f"dim must be even, got {dim}")
    npf = dim // 2
    scale = 2.0 * math.pi
    y = (torch.arange(height, dtype=torch.float64, device=device) + 0.5) / height * scale
    x = (torch.arange(width, dtype=torch.float64, device=device) + 0.5) / width * scale
    dim_t = torch.arange(npf, dtype=torch.float64, device=device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / npf)
    pos_y = y[:, None] / dim_t  # [H, npf]
    pos_x = x[:, None] / dim_t  # [W, npf]
    pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), -1).flatten(1)
    pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), -1).flatten(1)
    pos = torch.cat((pos_y[:, None, :].expand(height, width, npf),
                     pos_x[None, :, :].expand(height, width, npf)), -1)
    return pos.reshape(height * width, dim).to(dtype)


class Neck(nn.Module):
    """Eq. 14 (Appendix A, Table 12): ``C1 <- GN(PWConv(C1))``.

    ``Conv2d(in_channels, out_channels, 1)`` with bias + ``GroupNorm(32, out_channels)``:
    ``in*out + out + 2*out`` parameters (49,920 for 192 -> 256; 66,304 for 256 -> 256).
    """

    def __init__(self, in_channels: int, out_channels: int, num_groups: int = 32):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.norm = nn.GroupNorm(num_groups, out_channels)

    def forward(self, c1: Tensor) -> Tensor:
        """``[C_in, H, W]`` -> ``[C_out, H, W]`` (one image)."""
        return self.norm(self.proj(c1[None]))[0]


class ImageEncoder(nn.Module):
    """Image feature encoder F_e of Eq. 5-6 (Table 2): a stack of one block kind.

    ``deformable`` blocks run over ALL levels of the cached encoder tokens E of one image; ``swin``
    and ``convnext`` blocks run on the finest level only (E1, the map F is built from; Table 2's
    note), with no positional embedding, and leave the other levels as cached.

    Deformable blocks use a parameter-free sine
    positional embedding per level (no level embedding: the Table 16 parameter count leaves no
    room for one) and Deformable-DETR reference points with valid ratio 1 (cached tokens are
    unpadded). Each block is MSDeformAttn -> LN -> FFN(GELU) -> LN; 781,536 parameters per
    block at D=256, 5 levels, FFN 1024 (756,864 at 4 levels).

    Args:
        d_model, d_ffn, n_levels, n_heads, n_points, activation, dropout: see
            :class:`DeformableEncoderLayer`.
        num_layers: blocks (0 = identity).
        kind: block kind (:data:`BLOCK_KINDS`); window: swin window side (14: Table 2 accounting).
    """

    def __init__(self, num_layers: int, d_model: int = 256, d_ffn: int = 1024, n_levels: int = 5,
                 n_heads: int = 8, n_points: int = 4, activation: str = "gelu", dropout: float = 0.0,
                 kind: str = "deformable", window: int = 14):
        super().__init__()
        self.d_model, self.n_levels, self.kind = d_model, n_levels, kind
        self.layers = build_blocks(kind, num_layers, d_model, n_levels=n_levels, n_heads=n_heads, n_points=n_points,
                                   d_ffn=d_ffn, window=window, activation=activation, dropout=dropout)

    def forward(self, tokens: Tensor, spatial_shapes: Tensor, level_start_index: Tensor) -> Tensor:
        """Refine the flattened multi-scale tokens of one image.

        Args:
            tokens: ``[S, D]`` levels concatenated in ``spatial_shapes`` order, row-major.
            spatial_shapes: ``[L, 2]`` int64 ``(H_l, W_l)``.
            level_start_index: ``[L]`` int64.

        Returns:
            ``[S, D]`` same dtype as ``tokens``.

        Raises:
            ValueError: if ``L`` differs from ``n_levels`` or ``S`` from the shapes.
        """
        if spatial_shapes.shape[0] != self.n_levels:
            raise ValueError(f"spatial_shapes has {spatial_shapes.shape[0]} levels, the image encoder "
                             f"was built for num_feature_levels={self.n_levels}")
        if int(spatial_shapes.prod(1).sum()) != tokens.shape[0]:
            raise ValueError(f"tokens has {tokens.shape[0]} rows, spatial_shapes {spatial_shapes.tolist()} "
                             f"imply {int(spatial_shapes.prod(1).sum())}")
        if not self.layers:
            return tokens
        if self.kind != "deformable":
            finest = int(torch.argmax(spatial_shapes.prod(1)))
            h, w = spatial_shapes[finest].tolist()
            start = int(level_start_index[finest])
            level = tokens[start:start + h * w].reshape(1, h, w, -1)
            level = apply_map_blocks(self.layers, level).reshape(h * w, -1)
            return torch.cat((tokens[:start], level, tokens[start + h * w:]), 0)
        dtype, device = tokens.dtype, tokens.device
        pos = torch.cat([sine_position_embedding(int(h), int(w), self.d_model, dtype=dtype, device=device)
                         for h, w in spatial_shapes.tolist()], 0)[None]
        ratios = torch.ones(1, spatial_shapes.shape[0], 2, dtype=dtype, device=device)
        ref = encoder_reference_points(spatial_shapes, ratios)
        src = tokens[None]
        for layer in self.layers:
            src = layer(src, pos, ref, spatial_shapes, level_start_index)
        return src[0]


class BoxEncoder(nn.Module):
    """Box feature encoder F_b of Eq. 9 (Sec. 3.3, Tables 3-4): blocks of one kind over RoI tokens.

    ``deformable``: a single-level DeformableEncoderLayer over the ``R x R`` tokens of one box
    (177,632 parameters at h=128, 8 heads, 4 points, FFN 512); ``swin`` (window 8: a 32 x 32 RoI
    is 4 x 4 windows) and ``convnext`` blocks see the tokens as an ``R x R`` map. The learned
    positional embedding is owned by the head (``box_pos_embed``) and added once before the
    first block.

    Args:
        num_layers: blocks; d_model: h; d_ffn: FFN width; roi_size: R; kind: :data:`BLOCK_KINDS`;
            window: swin window side; others as :class:`DeformableEncoderLayer`.
    """

    def __init__(self, num_layers: int, d_model: int = 128, d_ffn: int = 512, roi_size: int = 32,
                 n_heads: int = 8, n_points: int = 4, activation: str = "gelu", dropout: float = 0.0,
                 kind: str = "deformable", window: int = 8):
        super().__init__()
        self.roi_size, self.kind = roi_size, kind
        self.layers = build_blocks(kind, num_layers, d_model, n_levels=1, n_heads=n_heads, n_points=n_points,
                                   d_ffn=d_ffn, window=window, activation=activation, dropout=dropout)

    def geometry(self, dtype: torch.dtype, device) -> tuple[Tensor, Tensor, Tensor]:
        """``(spatial_shapes [1, 2], level_start_index [1], reference_points [1, R*R, 1, 2])``."""
        shapes = torch.tensor([[self.roi_size, self.roi_size]], dtype=torch.int64, device=device)
        start = torch.zeros(1, dtype=torch.int64, device=device)
        ref = encoder_reference_points(shapes, torch.ones(1, 1, 2, dtype=dtype, device=device))
        return shapes, start, ref

    def layer(self, index: int, tokens: Tensor, geometry: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """Apply block ``index`` to ``tokens [M, R*R, h]`` -> ``[M, R*R, h]``."""
        if self.kind != "deformable":
            m, r = tokens.shape[0], self.roi_size
            return apply_map_blocks(self.layers[index:index + 1], tokens.reshape(m, r, r, -1)).reshape(m, r * r, -1)
        shapes, start, ref = geometry
        return self.layers[index](tokens, None, ref.expand(tokens.shape[0], -1, -1, -1), shapes, start)


class QueryLayer(nn.Module):
    """One query-encoder layer (Sec. 3.4, Table 5), applied after each box-encoder block.

    Order (a DETR decoder layer): O2O self-attention among the queries of one image (Eq. 10)
    -> B2O cross-attention from each query to its own box's ``R x R`` tokens (Eq. 11) -> FFN;
    each followed by residual + LayerNorm. Parameters at h=128, 8 heads, FFN 512: B2O 66,304,
    FFN 131,968, O2O 66,304 (the paper's O2O row, 2.53 M, is not reproduced by this standard
    layout: it gives 2.46 M; see shared/papers/params-reconstruction.md).

    Args:
        d_model: h; n_heads: attention heads; d_ffn: FFN width;
        use_o2o, use_b2o, use_ffn: which components exist; activation, dropout.
    """

    def __init__(self, d_model: int = 128, n_heads: int = 8, d_ffn: int = 512, *, use_o2o: bool = False,
                 use_b2o: bool = True, use_ffn: bool = True, activation: str = "gelu", dropout: float = 0.0):
        super().__init__()
        self.o2o = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True) if use_o2o else None
        self.norm_o2o = nn.LayerNorm(d_model) if use_o2o else None
        self.b2o = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True) if use_b2o else None
        self.norm_b2o = nn.LayerNorm(d_model) if use_b2o else None
        if use_ffn:
            self.linear1 = nn.Linear(d_model, d_ffn)
            self.activation = nn.GELU() if activation == "gelu" else nn.ReLU()
            self.linear2 = nn.Linear(d_ffn, d_model)
            self.norm_ffn = nn.LayerNorm(d_model)
        self.use_ffn = use_ffn
        self.dropout = nn.Dropout(dropout)

    def forward(self, query: Tensor, box_tokens: Tensor) -> Tensor:
        """Update the queries of ONE image.

        Args:
            query: ``[M, h]`` one query per box.
            box_tokens: ``[M, R*R, h]`` the tokens of each query's own box.

        Returns:
            ``[M, h]``.
        """
        if self.o2o is not None:
            q = query[None]
            query = self.norm_o2o(query + self.dropout(self.o2o(q, q, q, need_weights=False)[0][0]))
        if self.b2o is not None:
            q = query[:, None]
            out = self.b2o(q, box_tokens, box_tokens, need_weights=False)[0][:, 0]
            query = self.norm_b2o(query + self.dropout(out))
        if self.use_ffn:
            ffn = self.linear2(self.dropout(self.activation(self.linear1(query))))
            query = self.norm_ffn(query + self.dropout(ffn))
        return query


def upsample_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear ``interpolate`` (align_corners=False) of ``[C, H, W]`` to ``size``; identity if equal."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
