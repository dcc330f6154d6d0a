"""The deformable-attention reference against a direct per-point bilinear loop, and its gradients."""

import pytest
import torch

from kernels import ops, reference


def naive_ms_deform_attn(value, spatial_shapes, locations, weights):
    """Loop over every sample: bilinear interpolation with zero padding, pixel centers at +0.5."""
    n, s, m, dh = value.shape
    _, lq, _, num_levels, num_points, _ = locations.shape
    out = value.new_zeros(n, lq, m, dh)
    starts = [0]
    for h, w in spatial_shapes.tolist()[:-1]:
        starts.append(starts[-1] + h * w)
    for b in range(n):
        for q in range(lq):
            for head in range(m):
                for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
                    for p in range(num_points):
                        x = locations[b, q, head, lvl, p, 0] * w - 0.5
                        y = locations[b, q, head, lvl, p, 1] * h - 0.5
                        x0, y0 = int(torch.floor(x)), int(torch.floor(y))
                        acc = value.new_zeros(dh)
                        for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                            if 0 <= yy < h and 0 <= xx < w:
                                wt = (1 - abs(x - xx)) * (1 - abs(y - yy))
                                acc = acc + wt * value[b, starts[lvl] + yy * w + xx, head]
                        out[b, q, head] += weights[b, q, head, lvl, p] * acc
    return out.reshape(n, lq, m * dh)


def _inputs(dtype=torch.float64, n=2, lq=5, m=2, dh=3, points=2, shapes=((6, 7), (3, 4), (1, 2))):
    g = torch.Generator().manual_seed(0)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    s = int(spatial_shapes.prod(1).sum())
    value = torch.randn(n, s, m, dh, generator=g, dtype=dtype)
    # include locations outside [0, 1] (zero padding) and on borders
    loc = torch.rand(n, lq, m, len(shapes), points, 2, generator=g, dtype=dtype) * 1.4 - 0.2
    w = torch.rand(n, lq, m, len(shapes), points, generator=g, dtype=dtype)
    w = w / w.sum((-1, -2), keepdim=True)
    return value, spatial_shapes, loc, w


def test_reference_matches_direct_bilinear_loop():
    value, shapes, loc, w = _inputs()
    got = reference.ms_deform_attn(value, shapes, loc, w)
    want = naive_ms_deform_attn(value, shapes, loc, w)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_low_precision_close_to_float64(dtype, tol):
    value, shapes, loc, w = _inputs()
    want = reference.ms_deform_attn(value, shapes, loc, w)
    got = reference.ms_deform_attn(value.to(dtype), shapes, loc.to(dtype), w.to(dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def test_gradcheck_float64():
    value, shapes, loc, w = _inputs(n=1, lq=2, m=1, dh=2, points=1, shapes=((3, 4), (2, 2)))
    value.requires_grad_(True)
    w.requires_grad_(True)
    loc = (loc * 0.8 + 0.1).requires_grad_(True)  # away from pixel-grid kinks
    assert torch.autograd.gradcheck(lambda v, l, a: reference.ms_deform_attn(v, shapes, l, a), (value, loc, w))


def test_empty_queries_and_wrapper_checks():
    value, shapes, loc, w = _inputs()
    out = ops.ms_deform_attn(value, shapes, torch.tensor([0, 42, 54]), loc[:, :0], w[:, :0])
    assert out.shape == (2, 0, 6)
    with pytest.raises(ValueError, match="impl"):
        ops.ms_deform_attn(value, shapes, torch.tensor([0, 42, 54]), loc, w, impl="cuda-magic")
    with pytest.raises(ValueError, match="level_start_index"):
        ops.ms_deform_attn(value, shapes, torch.tensor([0, 42]), loc, w)
    with pytest.raises(ValueError, match="spatial_shapes"):
        ops.ms_deform_attn(value, shapes[:2], torch.tensor([0, 42]), loc[..., :2, :, :], w[..., :2, :])
    with pytest.raises(ValueError, match="attention_weights"):
        reference.ms_deform_attn(value, shapes, loc, w[..., :1])
