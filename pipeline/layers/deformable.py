"""Multi-scale deformable attention layers shared by the detectors and the mask head.

Parameter names follow Deformable DETR / DINO (``sampling_offsets``, ``attention_weights``,
``value_proj``, ``output_proj``; encoder layers ``self_attn``, ``norm1``, ``linear1``,
``linear2``, ``norm2``) so that official checkpoints load unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels import ops


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Deformable DETR, Zhu et al. 2020, Eq. 3).

    Same parameters and forward as ``models/dino/ops/modules/ms_deform_attn.py`` of the
    official DINO code (= Deformable-DETR's ``MSDeformAttn``).

    Args:
        d_model: channels D of queries and values (divisible by ``n_heads``).
        n_levels: number of feature levels L.
        n_heads: attention heads M.
        n_points: sampling points P per head and level.

    The kernel (compiled or reference) is not part of the module: it is the process-wide run-time
    setting of :mod:`kernels.ops` (``--impl`` / ``MFDETR_IMPL``).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable-DETR initialisation: offsets start on a ring of directions, uniform weights."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        input_spatial_shapes: Tensor,
        input_level_start_index: Tensor,
        input_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from each query to P points per head and level around its reference point.

        Args:
            query: ``[N, Lq, D]``.
            reference_points: ``[N, Lq, L, 2]`` ``(x, y)`` in ``[0, 1]`` (padding region
                included, as Deformable DETR), or ``[N, Lq, L, 4]`` boxes ``(cx, cy, w, h)``.
            input_flatten: ``[N, S, D]`` flattened multi-scale values.
            input_spatial_shapes: ``[L, 2]`` int64 ``(H_l, W_l)``.
            input_level_start_index: ``[L]`` int64.
            input_padding_mask: ``[N, S]`` bool, True on padding (values zeroed), or None.

        Returns:
            ``[N, Lq, D]``.

        Raises:
            ValueError: if ``reference_points`` has a last dimension other than 2 or 4.
        """
        n, lq, _ = query.shape
        s = input_flatten.shape[1]
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, s, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(n, lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(n, lq, self.n_heads, self.n_levels * self.n_points)
        weights = F.softmax(weights, -1).view(n, lq, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            # reference + offset / (W_l, H_l), element for element as the official code, with both
            # broadcast operands laid out contiguously over (L, P, 2) first: broadcasting an int64
            # [L, 1, 2] normaliser against the innermost dims made this one of the slowest steps
            normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
            normalizer = normalizer[:, None, :].expand(self.n_levels, self.n_points, 2).to(offsets.dtype).contiguous()
            reference = reference_points[:, :, None, :, None, :].expand(n, lq, 1, self.n_levels, self.n_points, 2)
            locations = reference.contiguous() + offsets / normalizer
        elif reference_points.shape[-1] == 4:
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                f"reference_points last dim must be 2 or 4, got {tuple(reference_points.shape)}"
            )
        out = ops.ms_deform_attn(value, input_spatial_shapes, input_level_start_index, locations, weights)
        return self.output_proj(out)


class DeformableEncoderLayer(nn.Module):
    """Post-norm deformable encoder block: MSDeformAttn -> add & LayerNorm -> FFN -> add & LayerNorm.

    Deformable DETR's ``DeformableTransformerEncoderLayer`` (keys ``self_attn``, ``norm1``,
    ``linear1``, ``linear2``, ``norm2``); the paper's image / box feature encoder block
    (Sec. 3.2, Eq. 6: "MSDeformAttn -> LayerNorm -> FFN -> LayerNorm").

    Args:
        d_model: channels D.
        d_ffn: FFN hidden width.
        n_levels, n_heads, n_points: see :class:`MSDeformAttn`.
        activation: ``"relu"`` (Deformable DETR / DINO) or ``"gelu"`` (the paper's head FFN).
        dropout: dropout after attention and inside the FFN (0 at eval).
    """

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, n_levels: int = 4, n_heads: int = 8,
                 n_points: int = 4, activation: str = "relu", dropout: float = 0.0):
        super().__init__()
        if activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be 'relu' or 'gelu', got {activation!r}")
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = nn.ReLU() if activation == "relu" else nn.GELU()
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor | None, reference_points: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """``src [N, S, D]``, ``pos [N, S, D]`` or None, ``reference_points [N, S, L, 2]`` -> ``[N, S, D]``."""
        query = src if pos is None else src + pos
        src = self.norm1(src + self.dropout1(
            self.self_attn(query, reference_points, src, spatial_shapes, level_start_index, padding_mask)))
        src = self.norm2(src + self.dropout3(self.linear2(self.dropout2(self.activation(self.linear1(src))))))
        return src


def valid_ratios_from_mask(mask: Tensor) -> Tensor:
    """Deformable DETR ``get_valid_ratio``: ``mask [N, H, W]`` (True = pad) -> ``[N, 2]`` ``(w, h)`` ratios."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1)
    valid_w = (~mask[:, 0, :]).sum(1)
    return torch.stack([valid_w.to(torch.float32) / w, valid_h.to(torch.float32) / h], -1)


def encoder_reference_points(spatial_shapes: Tensor, valid_ratios: Tensor) -> Tensor:
    """Reference points of every token of a flattened multi-scale map (Deformable DETR encoder).

    Token centers ``(x + 0.5, y + 0.5)`` normalized by the valid size of their own level,
    then scaled by every level's valid ratio.

    Args:
        spatial_shapes: ``[L, 2]`` int64 ``(H_l, W_l)``.
        valid_ratios: ``[N, L, 2]`` float ``(w, h)``.

    Returns:
        ``[N, S, L, 2]`` ``(x, y)`` in the dtype of ``valid_ratios``.
    """
    dtype, device = valid_ratios.dtype, valid_ratios.device
    points = []
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        ref_y, ref_x = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, dtype=dtype, device=device),
            torch.linspace(0.5, w - 0.5, w, dtype=dtype, device=device),
            indexing="ij",
        )
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
        points.append(torch.stack((ref_x, ref_y), -1))
    ref = torch.cat(points, 1)
    return ref[:, :, None] * valid_ratios[:, None]


def level_start_index_of(spatial_shapes: Tensor) -> Tensor:
    """``[L, 2]`` ``(H_l, W_l)`` -> ``[L]`` int64 start offsets of each level in the flattened tokens."""
    sizes = spatial_shapes.prod(1)
    return torch.cat((sizes.new_zeros((1,)), sizes.cumsum(0)[:-1]))
