"""FocalNet backbone (Yang et al., "Focal Modulation Networks", NeurIPS 2022), detection variant.

Re-implementation of ``models/dino/focal.py`` of FocalNet/FocalNet-DINO
(commit 23901e021dc6ec8f66bad47983f45a25574452cc): same module tree and parameter names
(``patch_embed.proj/norm``, ``layers.{i}.blocks.{j}.{norm1,modulation,norm2,mlp,gamma_1,gamma_2}``,
``layers.{i}.downsample``, ``norm{i}``) so that the official checkpoints load unchanged, and the
same forward arithmetic (including the zero padding of odd-sized maps before every patch
embedding).  Every architecture size is a constructor argument; nothing is read from disk.

The official FocalNet-L "fl4" entry used by DINO-FocalNet-L is::

    FocalNet(embed_dim=192, depths=(2, 2, 18, 2), focal_levels=(4, 4, 4, 4),
             focal_windows=(3, 3, 3, 3), use_conv_embed=True, use_postln=True,
             use_postln_in_modulation=False, use_layerscale=True, normalize_modulator=True)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _per_stage(value: int | Sequence[int], num_stages: int, name: str) -> list[int]:
    """Expand an int to ``num_stages`` copies (as ``build_focalnet`` does) or check a sequence's length."""
    if isinstance(value, int):
        return [value] * num_stages
    value = [int(v) for v in value]
    if len(value) != num_stages:
        raise ValueError(f"{name} has {len(value)} entries, expected one per stage ({num_stages})")
    return value


class FocalNetMlp(nn.Module):
    """Two-layer GELU MLP of a FocalNet block (official ``Mlp``: keys ``fc1``, ``fc2``).

    Args:
        in_features: input/output channels C.
        hidden_features: hidden width (``int(C * mlp_ratio)``).
    """

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., C] -> [..., C]``."""
        return self.fc2(self.act(self.fc1(x)))


class FocalModulation(nn.Module):
    """Focal modulation (official ``FocalModulation``, FocalNet paper Eq. 4-6).

    A linear layer ``f`` produces the query ``q``, the context ``ctx`` and ``focal_level + 1``
    gates; ``focal_level`` depthwise conv + GELU layers (kernel ``focal_factor * k +
    focal_window``, "same" padding, no bias) build hierarchical contexts, a global average
    pooled context is added as the last level, the gated sum is (optionally) divided by
    ``focal_level + 1`` (``normalize_modulator``), mixed by the 1x1 conv ``h`` and multiplies
    ``q``; then (optional LayerNorm ``ln``) and the output projection ``proj``.

    Args:
        dim: channels C.
        focal_level: number of focal levels.
        focal_window: kernel size of the first focal level.
        focal_factor: kernel growth per level (2 in the official code).
        use_postln_in_modulation: LayerNorm ``ln`` before ``proj`` (FocalNet-H only).
        normalize_modulator: divide the aggregated context by ``focal_level + 1``.
    """

    def __init__(self, dim: int, focal_level: int = 2, focal_window: int = 7, focal_factor: int = 2,
                 use_postln_in_modulation: bool = False, normalize_modulator: bool = False):
        super().__init__()
        self.dim = dim
        self.focal_level = focal_level
        self.focal_window = focal_window
        self.focal_factor = focal_factor
        self.use_postln_in_modulation = use_postln_in_modulation
        self.normalize_modulator = normalize_modulator
        self.f = nn.Linear(dim, 2 * dim + focal_level + 1, bias=True)
        self.h = nn.Conv2d(dim, dim, kernel_size=1, stride=1, padding=0, groups=1, bias=True)
        self.act = nn.GELU()
        self.proj = nn.Linear(dim, dim)
        self.focal_layers = nn.ModuleList()
        if use_postln_in_modulation:
            self.ln = nn.LayerNorm(dim)
        for k in range(focal_level):
            kernel = focal_factor * k + focal_window
            self.focal_layers.append(nn.Sequential(
                nn.Conv2d(dim, dim, kernel_size=kernel, stride=1, groups=dim, padding=kernel // 2, bias=False),
                nn.GELU(),
            ))

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, H, W, C]`` (channels last) -> ``[B, H, W, C]``."""
        c = x.shape[-1]
        x = self.f(x).permute(0, 3, 1, 2).contiguous()
        q, ctx, gates = torch.split(x, (c, c, self.focal_level + 1), 1)
        ctx_all = 0
        for level in range(self.focal_level):
            ctx = self.focal_layers[level](ctx)
            ctx_all = ctx_all + ctx * gates[:, level:level + 1]
        ctx_global = self.act(ctx.mean(2, keepdim=True).mean(3, keepdim=True))
        ctx_all = ctx_all + ctx_global * gates[:, self.focal_level:]
        if self.normalize_modulator:
            ctx_all = ctx_all / (self.focal_level + 1)
        out = (q * self.h(ctx_all)).permute(0, 2, 3, 1).contiguous()
        if self.use_postln_in_modulation:
            out = self.ln(out)
        return self.proj(out)


class FocalNetBlock(nn.Module):
    """One FocalNet block (official ``FocalModulationBlock``).

    Post-LN variant (``use_postln=True``, FocalNet-L/XL/H)::

        x = x + gamma_1 * norm1(modulation(x))
        x = x + gamma_2 * norm2(mlp(x))

    Pre-LN variant: ``x + gamma_1 * modulation(norm1(x))``, ``x + gamma_2 * mlp(norm2(x))``.
    ``gamma_1/gamma_2`` are ``[C]`` layer-scale parameters when ``use_layerscale`` (else 1.0).
    Drop-path is omitted (identity at eval).

    Args:
        dim: channels C.
        mlp_ratio: MLP hidden width / C.
        focal_level, focal_window, use_postln_in_modulation, normalize_modulator:
            see :class:`FocalModulation`.
        use_postln: post-LN (True) or pre-LN (False) residual branches.
        use_layerscale: learnable per-channel residual scales.
        layerscale_value: their initial value (1e-4 in the official code).
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, focal_level: int = 2, focal_window: int = 9,
                 use_postln: bool = False, use_postln_in_modulation: bool = False,
                 normalize_modulator: bool = False, use_layerscale: bool = False,
                 layerscale_value: float = 1e-4):
        super().__init__()
        self.dim = dim
        self.use_postln = use_postln
        self.use_layerscale = use_layerscale
        self.norm1 = nn.LayerNorm(dim)
        self.modulation = FocalModulation(dim, focal_level=focal_level, focal_window=focal_window,
                                          use_postln_in_modulation=use_postln_in_modulation,
                                          normalize_modulator=normalize_modulator)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FocalNetMlp(dim, int(dim * mlp_ratio))
        if use_layerscale:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(layerscale_value)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(layerscale_value)))
        else:
            self.gamma_1 = 1.0
            self.gamma_2 = 1.0

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        """``x [B, H*W, C]`` tokens of an ``height x width`` map (row-major) -> ``[B, H*W, C]``.

        Raises:
            ValueError: if the token count is not ``height * width``.
        """
        b, n, c = x.shape
        if n != height * width:
            raise ValueError(f"FocalNetBlock got {n} tokens for a {height}x{width} map")
        shortcut = x
        if not self.use_postln:
            x = self.norm1(x)
        x = self.modulation(x.view(b, height, width, c)).view(b, n, c)
        if self.use_postln:
            x = self.norm1(x)
        x = shortcut + self.gamma_1 * x
        if self.use_postln:
            return x + self.gamma_2 * self.norm2(self.mlp(x))
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class FocalNetPatchEmbed(nn.Module):
    """Patch embedding / downsampling (official ``PatchEmbed``: keys ``proj``, ``norm``).

    The input is first zero-padded on the right/bottom to a multiple of ``patch_size`` (as the
    official code does even with conv embedding).  With ``use_conv_embed`` the projection is an
    overlapping conv: 7x7 / stride 4 / padding 2 for the stem, 3x3 / stride 2 / padding 1 for
    the between-stage downsampling; otherwise a ``patch_size`` x ``patch_size`` conv with that
    stride.  Output size is ``ceil(H / patch_size) x ceil(W / patch_size)`` in all these cases.

    Args:
        patch_size: 4 for the stem, 2 for downsampling.
        in_chans: input channels.
        embed_dim: output channels.
        use_norm: LayerNorm over channels after the projection (``patch_norm``).
        use_conv_embed: overlapping conv embedding (FocalNet-L/XL/H).
        is_stem: stem (True) or downsampling (False) kernel for the conv embedding.
    """

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96, use_norm: bool = True,
                 use_conv_embed: bool = False, is_stem: bool = False):
        super().__init__()
        self.patch_size = int(patch_size)
        self.embed_dim = embed_dim
        if use_conv_embed:
            kernel, stride, padding = (7, 4, 2) if is_stem else (3, 2, 1)
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel, stride=stride, padding=padding)
        else:
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if use_norm else None

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, C_in, H, W]`` -> ``[B, embed_dim, ceil(H/p), ceil(W/p)]``."""
        h, w = x.shape[-2:]
        p = self.patch_size
        if w % p != 0:
            x = F.pad(x, (0, p - w % p))
        if h % p != 0:
            x = F.pad(x, (0, 0, 0, p - h % p))
        x = self.proj(x)
        if self.norm is not None:
            hh, ww = x.shape[-2:]
            x = self.norm(x.flatten(2).transpose(1, 2)).transpose(1, 2).view(-1, self.embed_dim, hh, ww)
        return x


class FocalNetStage(nn.Module):
    """One FocalNet stage (official ``BasicLayer``): ``blocks`` then an optional ``downsample``.

    Args:
        dim: channels of the stage.
        depth: number of blocks.
        downsample: add a :class:`FocalNetPatchEmbed` (patch 2, ``dim -> 2*dim``) at the end.
        use_conv_embed, patch_norm: passed to the downsampling embed.
        **block_kw: passed to every :class:`FocalNetBlock`.
    """

    def __init__(self, dim: int, depth: int, downsample: bool, use_conv_embed: bool, patch_norm: bool,
                 **block_kw):
        super().__init__()
        self.blocks = nn.ModuleList([FocalNetBlock(dim, **block_kw) for _ in range(depth)])
        self.downsample = (FocalNetPatchEmbed(patch_size=2, in_chans=dim, embed_dim=2 * dim, use_norm=patch_norm,
                                              use_conv_embed=use_conv_embed, is_stem=False)
                           if downsample else None)

    def forward(self, x: Tensor, height: int, width: int) -> tuple[Tensor, Tensor | None, int, int]:
        """``x [B, H*W, C]`` -> ``(stage output [B, H*W, C], downsampled [B, H'*W', 2C] or None, H', W')``.

        ``H' = ceil(H / 2)``, ``W' = ceil(W / 2)`` (unchanged when there is no downsampling).
        """
        for blk in self.blocks:
            x = blk(x, height, width)
        if self.downsample is None:
            return x, None, height, width
        down = self.downsample(x.transpose(1, 2).reshape(x.shape[0], x.shape[-1], height, width))
        return x, down.flatten(2).transpose(1, 2), (height + 1) // 2, (width + 1) // 2


class FocalNet(nn.Module):
    """FocalNet backbone returning normalised multi-stage feature maps (official ``FocalNet``).

    Args:
        embed_dim: channels of stage 0 (stage i has ``embed_dim * 2**i``); 192 for L.
        depths: blocks per stage; ``(2, 2, 18, 2)`` for L.
        mlp_ratio: MLP width ratio (4).
        focal_levels: per-stage focal levels (int = same for all stages); 4 for "fl4".
        focal_windows: per-stage first focal kernel size (int = same for all); 3 for "fl4".
        use_conv_embed: overlapping conv stem/downsampling (True for L).
        use_postln: post-LN blocks (True for L).
        use_postln_in_modulation: LayerNorm inside the modulation (False for L, True for H).
        use_layerscale: layer-scale gammas (True for L).
        layerscale_value: initial gamma value.
        normalize_modulator: divide the context by ``focal_level + 1`` (True for "fl4").
        patch_norm: LayerNorm after every patch embedding (True).
        out_indices: stages whose outputs are returned, each through its own LayerNorm
            ``norm{i}`` (``(0, 1, 2, 3)`` for DINO).
        in_chans: image channels (3).
        patch_size: stem stride (4).

    Attributes:
        num_features: channels of every stage, ``[embed_dim * 2**i]``.
    """

    def __init__(self, embed_dim: int = 192, depths: Sequence[int] = (2, 2, 18, 2), mlp_ratio: float = 4.0,
                 focal_levels: int | Sequence[int] = 4, focal_windows: int | Sequence[int] = 3,
                 use_conv_embed: bool = True, use_postln: bool = True, use_postln_in_modulation: bool = False,
                 use_layerscale: bool = True, layerscale_value: float = 1e-4, normalize_modulator: bool = True,
                 patch_norm: bool = True, out_indices: Sequence[int] = (0, 1, 2, 3), in_chans: int = 3,
                 patch_size: int = 4):
        super().__init__()
        depths = [int(d) for d in depths]
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.out_indices = tuple(int(i) for i in out_indices)
        if any(i < 0 or i >= self.num_layers for i in self.out_indices):
            raise ValueError(f"out_indices {self.out_indices} out of range for {self.num_layers} stages")
        levels = _per_stage(focal_levels, self.num_layers, "focal_levels")
        windows = _per_stage(focal_windows, self.num_layers, "focal_windows")
        self.patch_embed = FocalNetPatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                                              use_norm=patch_norm, use_conv_embed=use_conv_embed, is_stem=True)
        self.layers = nn.ModuleList()
        for i in range(self.num_layers):
            self.layers.append(FocalNetStage(
                dim=embed_dim * 2 ** i, depth=depths[i], downsample=i < self.num_layers - 1,
                use_conv_embed=use_conv_embed, patch_norm=patch_norm, mlp_ratio=mlp_ratio,
                focal_level=levels[i], focal_window=windows[i], use_postln=use_postln,
                use_postln_in_modulation=use_postln_in_modulation, normalize_modulator=normalize_modulator,
                use_layerscale=use_layerscale, layerscale_value=layerscale_value))
        self.num_features = [embed_dim * 2 ** i for i in range(self.num_layers)]
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official ``init_weights(None)``: Linear weights trunc-normal(std 0.02), biases 0, LayerNorm 1/0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, images: Tensor) -> list[Tensor]:
        """Backbone features of a (padded) image batch.

        Args:
            images: ``[B, in_chans, H, W]`` float.

        Returns:
            One ``[B, C_i, H_i, W_i]`` map per ``out_indices`` entry (same dtype as the input),
            ``norm{i}`` applied; stride ``4 * 2**i`` with ``H_0 = ceil(H/4)``,
            ``H_{i+1} = ceil(H_i/2)`` (see :func:`pipeline.detectors.detr_common.patch_stage_shapes`).
        """
        x = self.patch_embed(images)
        height, width = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        outs = []
        for i, stage in enumerate(self.layers):
            x_out, x, new_h, new_w = stage(x, height, width)
            if i in self.out_indices:
                y = getattr(self, f"norm{i}")(x_out)
                outs.append(y.reshape(-1, height, width, self.num_features[i]).permute(0, 3, 1, 2).contiguous())
            height, width = new_h, new_w
        return outs
