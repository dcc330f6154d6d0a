"""Swin Transformer backbone (Liu et al., "Swin Transformer", ICCV 2021), detection variant, eval path.

Re-implementation of ``models/swin_transformer.py`` of HDETR/H-Deformable-DETR
(commit f58ceb1165da4b0cd10e9a5a30c7a77fbd33f492), the Swin-B/L detection backbone of the
official Swin object-detection code: same module tree and names (``patch_embed.proj/norm``,
``layers.{i}.blocks.{j}.{norm1, attn.relative_position_bias_table, attn.relative_position_index,
attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``layers.{i}.downsample.{norm, reduction}``,
``norm{i}`` for every output stage) so that the released H-DETR Swin-L checkpoints load
unchanged, and the same forward arithmetic: zero padding to a multiple of the patch size and of
the window size (right/bottom), cyclic shift every second block with the official -100 region
mask computed on the padded map, and odd-size padding before every patch merging.  This
detection variant never turns the shift off for small maps (unlike the classification Swin).
Absolute position embedding (``ape``) and stochastic depth are training options and are not
implemented (no parameters).

H-DETR's Swin-L: ``SwinTransformer(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48),
window_size=7, out_indices=(1, 2, 3))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _window_partition(x: Tensor, window: int) -> Tensor:
    """``[B, H, W, C]`` (H, W multiples of ``window``) -> ``[B * nW, window * window, C]`` row-major windows."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def _window_reverse(windows: Tensor, window: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`_window_partition`: ``[B * nW, window * window, C]`` -> ``[B, H, W, C]``."""
    c = windows.shape[-1]
    b = windows.shape[0] // ((h // window) * (w // window))
    x = windows.view(b, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


class WindowAttention(nn.Module):
    """Window multi-head self-attention with a learnt relative position bias (official ``WindowAttention``).

    Args:
        dim: channels C.
        window: window side (square windows).
        num_heads: heads (``dim`` divisible by it).
    """

    def __init__(self, dim: int, window: int, num_heads: int):
        super().__init__()
        self.dim, self.window, self.num_heads = dim, window, num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window - 1) + rel[..., 1])
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x [B * nW, N, C]`` (N = window²), ``mask [nW, N, N]`` (0 / -100) or None -> ``[B * nW, N, C]``."""
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(bw // nw, nw, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(bw, n, c))


class SwinMlp(nn.Module):
    """``fc1 -> GELU -> fc2`` (official ``Mlp``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., dim] -> [..., dim]``."""
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention block + MLP (official ``SwinTransformerBlock``, eval).

    Args:
        dim, num_heads, window: sizes; shift: cyclic shift (0 or ``window // 2``); mlp_ratio: MLP width / dim.
    """

    def __init__(self, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float = 4.0):
        super().__init__()
        if not 0 <= shift < window:
            raise ValueError(f"shift must be in [0, {window}), got {shift}")
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = SwinMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, h: int, w: int, attn_mask: Tensor) -> Tensor:
        """``x [B, H*W, C]``, the map size, ``attn_mask [nW, N, N]`` of the shifted windows -> ``[B, H*W, C]``."""
        b, n, c = x.shape
        if n != h * w:
            raise ValueError(f"{n} tokens for a {h}x{w} map")
        y = self.norm1(x).view(b, h, w, c)
        pad_r, pad_b = (self.window - w % self.window) % self.window, (self.window - h % self.window) % self.window
        y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = y.shape[1:3]
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(_window_partition(y, self.window), attn_mask if self.shift else None)
        y = _window_reverse(y, self.window, hp, wp)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        y = y[:, :h, :w, :].reshape(b, h * w, c)
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 patch merging: pad odd sizes, concat ``(0,0), (1,0), (0,1), (1,1)`` neighbours, LayerNorm, Linear 4C->2C."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        """``[B, H*W, C]`` -> ``[B, ceil(H/2)*ceil(W/2), 2C]``."""
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class SwinStage(nn.Module):
    """One stage: ``depth`` blocks alternating shift 0 / ``window // 2``, then an optional patch merging."""

    def __init__(self, dim: int, depth: int, num_heads: int, window: int, mlp_ratio: float, downsample: bool):
        super().__init__()
        self.window, self.shift = window, window // 2
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio) for i in range(depth))
        self.downsample = PatchMerging(dim) if downsample else None

    def shifted_window_mask(self, h: int, w: int, device: torch.device) -> Tensor:
        """``[nW, N, N]`` float32 mask (0 within a region, -100 across regions) of the padded ``h x w`` map."""
        hp, wp = math.ceil(h / self.window) * self.window, math.ceil(w / self.window) * self.window
        img = torch.zeros((1, hp, wp, 1), device=device)
        cuts = (slice(0, -self.window), slice(-self.window, -self.shift), slice(-self.shift, None))
        region = 0
        for hs in cuts:
            for ws in cuts:
                img[:, hs, ws, :] = region
                region += 1
        windows = _window_partition(img, self.window).squeeze(-1)
        diff = windows.unsqueeze(1) - windows.unsqueeze(2)
        return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)

    def forward(self, x: Tensor, h: int, w: int) -> tuple[Tensor, Tensor, int, int]:
        """``x [B, H*W, C]`` -> ``(stage output [B, H*W, C], next input [B, H'*W', C'], H', W')``."""
        mask = self.shifted_window_mask(h, w, x.device)
        for blk in self.blocks:
            x = blk(x, h, w, mask)
        if self.downsample is None:
            return x, x, h, w
        return x, self.downsample(x, h, w), (h + 1) // 2, (w + 1) // 2


class PatchEmbed(nn.Module):
    """Pad to a multiple of ``patch`` (right/bottom), ``patch x patch`` stride-``patch`` conv, LayerNorm."""

    def __init__(self, patch: int = 4, in_chans: int = 3, embed_dim: int = 96, patch_norm: bool = True):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x: Tensor) -> Tensor:
        """``[B, 3, H, W]`` -> ``[B, C, ceil(H/patch), ceil(W/patch)]``."""
        h, w = x.shape[-2:]
        if w % self.patch:
            x = F.pad(x, (0, self.patch - w % self.patch))
        if h % self.patch:
            x = F.pad(x, (0, 0, 0, self.patch - h % self.patch))
        x = self.proj(x)
        if self.norm is not None:
            b, c, hh, ww = x.shape
            x = self.norm(x.flatten(2).transpose(1, 2)).transpose(1, 2).view(b, c, hh, ww)
        return x


class SwinTransformer(nn.Module):
    """Swin backbone returning every stage's map (official ``SwinTransformer`` of the detection code).

    Args:
        embed_dim: stage-0 channels (192 for Swin-L); stage i has ``embed_dim * 2**i``.
        depths: blocks per stage ((2, 2, 18, 2) for Swin-L).
        num_heads: heads per stage ((6, 12, 24, 48) for Swin-L).
        window_size: attention window side (7).
        mlp_ratio: MLP width / channels (4).
        patch_size: patch embedding stride (4).
        patch_norm: LayerNorm after the patch embedding (True).
        out_indices: stages given a ``norm{i}`` LayerNorm and returned as detector features ((1, 2, 3) in H-DETR).

    Raises:
        ValueError: ``depths`` and ``num_heads`` of different lengths, or an out index outside the stages.
    """

    def __init__(self, embed_dim: int = 192, depths: Sequence[int] = (2, 2, 18, 2),
                 num_heads: Sequence[int] = (6, 12, 24, 48), window_size: int = 7, mlp_ratio: float = 4.0,
                 patch_size: int = 4, patch_norm: bool = True, out_indices: Sequence[int] = (1, 2, 3)):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} differ in length")
        if any(not 0 <= i < len(depths) for i in out_indices):
            raise ValueError(f"out_indices {tuple(out_indices)} outside stages 0..{len(depths) - 1}")
        self.num_layers = len(depths)
        self.out_indices = tuple(int(i) for i in out_indices)
        self.num_features = [embed_dim * 2 ** i for i in range(self.num_layers)]
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim, patch_norm)
        self.layers = nn.ModuleList(
            SwinStage(self.num_features[i], depths[i], num_heads[i], window_size, mlp_ratio,
                      downsample=i < self.num_layers - 1) for i in range(self.num_layers))
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))

    def forward(self, x: Tensor) -> list[Tensor]:
        """``[B, 3, H, W]`` -> one ``[B, C_i, H_i, W_i]`` map per stage (stride ``patch * 2**i``).

        Stages in ``out_indices`` are passed through their ``norm{i}``; the others are returned
        as the blocks left them (no norm), e.g. stage 0 = the stride-4 ``C1`` of the mask head.
        """
        x = self.patch_embed(x)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        outs = []
        for i, stage in enumerate(self.layers):
            out, x, nh, nw = stage(x, h, w)
            if i in self.out_indices:
                out = getattr(self, f"norm{i}")(out)
            outs.append(out.view(-1, h, w, self.num_features[i]).permute(0, 3, 1, 2).contiguous())
            h, w = nh, nw
        return outs
