"""The compiled ms_deform_attn kernels (C++ CPU, CUDA) against the grid_sample reference.

Parametrised over the devices whose kernel is built; the CUDA cases skip without a GPU or a
CUDA build. The CPU kernel must be built wherever the package was installed (`pip install -e .`)
unless MFDETR_NO_EXT=1 said otherwise.
"""

import os

import pytest
import torch

from kernels import ops, reference
from pipeline.layers.deformable import MSDeformAttn, level_start_index_of

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not ops.compiled_available("cpu"), reason="CPU kernel not built")),
    pytest.param("cuda", marks=pytest.mark.skipif(
        not (torch.cuda.is_available() and ops.compiled_available("cuda")), reason="no GPU or no CUDA kernel built")),
]


def make_inputs(device="cpu", dtype=torch.float64, n=2, lq=5, m=2, dh=3, points=2,
                shapes=((6, 7), (3, 4), (1, 2)), seed=0, spread=1.4):
    """Random inputs; locations spread over ``[-(spread-1)/2, 1+(spread-1)/2]`` (outside [0, 1] = padding)."""
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    s = int(spatial_shapes.prod(1).sum())
    value = torch.randn(n, s, m, dh, generator=g, dtype=torch.float64)
    loc = torch.rand(n, lq, m, len(shapes), points, 2, generator=g, dtype=torch.float64) * spread - (spread - 1) / 2
    w = torch.rand(n, lq, m, len(shapes), points, generator=g, dtype=torch.float64)
    w = w / w.sum((-1, -2), keepdim=True)
    return (value.to(device, dtype), spatial_shapes.to(device), level_start_index_of(spatial_shapes).to(device),
            loc.to(device, dtype), w.to(device, dtype))


def run_with_grads(fn, value, loc, w, grad):
    value, loc, w = (t.detach().requires_grad_(True) for t in (value, loc, w))
    out = fn(value, loc, w)
    grads = torch.autograd.grad(out, (value, loc, w), grad)
    return out, grads


def test_cpu_kernel_is_built():
    if os.environ.get("MFDETR_NO_EXT") == "1":
        pytest.skip("MFDETR_NO_EXT=1: extension deliberately not built")
    assert ops.compiled_available("cpu"), f"kernels._C missing or without a CPU kernel: {ops.COMPILED_ERROR}"
    assert "cpu" in ops.available_impls()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dh", [3, 16, 30, 32, 71])  # 16, 32: the CPU kernel's fixed-width loops
def test_forward_backward_match_reference_float64(device, dh):
    value, shapes, starts, loc, w = make_inputs(device, dh=dh, spread=1.6)
    grad = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * dh, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(1)).to(device)
    want, want_grads = run_with_grads(lambda v, l, a: reference.ms_deform_attn(v, shapes, l, a), value, loc, w, grad)
    got, got_grads = run_with_grads(lambda v, l, a: ops.ms_deform_attn(v, shapes, starts, l, a, impl=device),
                                    value, loc, w, grad)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    for name, g, r in zip(("value", "sampling_locations", "attention_weights"), got_grads, want_grads):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    value, shapes, starts, loc, w = make_inputs(device, dh=30)
    # the same numbers laid out differently: transposed storage, and a strided slice
    value_nc = value.transpose(0, 2).contiguous().transpose(0, 2)
    loc_nc = torch.stack([loc[..., 0], loc[..., 1]], 0).movedim(0, -1)
    w_wide = torch.zeros(*w.shape[:-1], 2 * w.shape[-1], dtype=w.dtype, device=device)
    w_wide[..., ::2] = w
    w_nc = w_wide[..., ::2]
    assert not (value_nc.is_contiguous() or loc_nc.is_contiguous() or w_nc.is_contiguous())
    got = ops.ms_deform_attn(value_nc, shapes, starts, loc_nc, w_nc, impl=device)
    torch.testing.assert_close(got, reference.ms_deform_attn(value, shapes, loc, w), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("dh", [30, 32])
def test_low_precision_close_to_float64(device, dtype, tol, dh):
    """Forward and the three gradients in float32 / float16 / bfloat16 against the float64 reference
    at the same (rounded) inputs: rounding a location moves it across bilinear cells, which changes its
    gradient by far more than the kernel's arithmetic does."""
    value, shapes, starts, loc, w = (t.to(dtype).double() if t.is_floating_point() else t
                                     for t in make_inputs(device, dh=dh))
    grad = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * dh, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(1)).to(device).to(dtype).double()
    want, want_grads = run_with_grads(lambda v, l, a: reference.ms_deform_attn(v, shapes, l, a), value, loc, w, grad)
    got, got_grads = run_with_grads(
        lambda v, l, a: ops.ms_deform_attn(v.to(dtype), shapes, starts, l.to(dtype), a.to(dtype), impl=device),
        value, loc, w, grad)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
    for name, g, r in zip(("value", "sampling_locations", "attention_weights"), got_grads, want_grads):
        scale = r.abs().max().clamp_min(1.0)  # grad_locations are scaled by the map sides (up to ~10 here)
        torch.testing.assert_close(g.double() / scale, r / scale, atol=tol, rtol=tol,
                                   msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    value, shapes, starts, loc, w = make_inputs(device, n=1, lq=3, m=2, dh=5, points=2, shapes=((3, 4), (2, 2)))
    loc = loc * 0.8 + 0.1  # finite differences must not straddle a pixel-grid kink
    inputs = tuple(t.detach().requires_grad_(True) for t in (value, loc, w))
    assert torch.autograd.gradcheck(lambda v, l, a: ops.ms_deform_attn(v, shapes, starts, l, a, impl=device), inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    value, shapes, starts, loc, w = make_inputs(device, n=1, lq=4, m=2, dh=3)
    args = (value.requires_grad_(True), shapes, starts, loc.requires_grad_(True), w.requires_grad_(True))
    torch.library.opcheck(torch.ops.mfdetr.ms_deform_attn.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    value, shapes, starts, loc, w = make_inputs(device, dh=4)
    for v, l, a in ((value, loc[:, :0], w[:, :0]), (value[:0], loc[:0], w[:0]), (value[..., :0], loc, w)):
        v, l, a = (t.detach().requires_grad_(True) for t in (v, l, a))
        out = ops.ms_deform_attn(v, shapes, starts, l, a, impl=device)
        assert out.shape == (v.shape[0], l.shape[1], v.shape[2] * v.shape[3])
        out.sum().backward()
        assert v.grad.shape == v.shape and l.grad.shape == l.shape and a.grad.shape == a.shape


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_name_the_argument(device):
    value, shapes, starts, loc, w = make_inputs(device)
    with pytest.raises(ValueError, match="attention_weights"):
        ops.ms_deform_attn(value, shapes, starts, loc, w[..., :1], impl=device)
    with pytest.raises(ValueError, match="value"):
        ops.ms_deform_attn(value[0], shapes, starts, loc, w, impl=device)
    with pytest.raises(ValueError, match="spatial_shapes"):
        ops.ms_deform_attn(value, shapes[:2], starts[:2], loc, w, impl=device)
    with pytest.raises(TypeError, match="spatial_shapes"):
        ops.ms_deform_attn(value, shapes.int(), starts, loc, w, impl=device)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_traces_the_op(device):
    value, shapes, starts, loc, w = make_inputs(device, dh=8)

    def step(v, l, a):
        return ops.ms_deform_attn(v, shapes, starts, l, a, impl=device).square().sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    inputs = [t.detach().requires_grad_(True) for t in (value, loc, w)]
    want = torch.autograd.grad(step(*inputs), inputs)
    got = torch.autograd.grad(compiled(*inputs), inputs)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_module_same_with_kernel_and_reference(device):
    """MSDeformAttn (the layer the detector and head use) under the process-wide setting."""
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3).to(device)
    shapes = torch.tensor([[5, 6], [3, 3]], device=device)
    query, src = torch.randn(2, 7, 32, device=device), torch.randn(2, 39, 32, device=device)
    ref_points = torch.rand(2, 7, 2, 2, device=device)
    outs = []
    for impl in ("reference", device):
        with ops.use_impl(impl):
            outs.append(attn(query, ref_points, src, shapes, level_start_index_of(shapes)))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)


def test_impl_setting_and_errors(monkeypatch):
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.set_impl("fast")
    assert ops.resolve_impl("reference", torch.device("cpu")) == "reference"
    expected = "cpu" if ops.compiled_available("cpu") else "reference"
    assert ops.resolve_impl("auto", torch.device("cpu")) == expected
    with ops.use_impl("reference"):
        assert ops.get_impl() == "reference"
        assert ops.describe_impl()["resolved"]["cpu"] == "reference"
    if not ops.compiled_available("cuda"):
        with pytest.raises(RuntimeError, match="pip install -e"):
            ops.set_impl("cuda")
    if ops.compiled_available("cpu"):
        with pytest.raises(ValueError, match="tensors are on meta"):
            ops.resolve_impl("cpu", torch.device("meta"))
    monkeypatch.setattr(ops, "_C", None)  # as if the extension were not built
    assert ops.resolve_impl("auto", torch.device("cpu")) == "reference"
    with pytest.raises(RuntimeError, match="pip install -e"):
        ops.resolve_impl("cpu", torch.device("cpu"))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_encoder_layer_step(device):
    """A head encoder block (MSDeformAttn + FFN) compiled whole (fullgraph) on the kernel: same loss and grads."""
    from pipeline.layers.deformable import DeformableEncoderLayer, encoder_reference_points

    torch.manual_seed(0)
    layer = DeformableEncoderLayer(d_model=32, d_ffn=64, n_levels=2, n_heads=4, n_points=2,
                                   activation="gelu").to(device)
    shapes = torch.tensor([[6, 5], [3, 3]], device=device)
    starts = level_start_index_of(shapes)
    src = torch.randn(1, 39, 32, device=device)
    ref = encoder_reference_points(shapes, torch.ones(1, 2, 2, device=device))

    def step():
        with ops.use_impl(device):
            loss = layer(src, None, ref, shapes, starts).square().mean()
        return loss, torch.autograd.grad(loss, list(layer.parameters()))

    want = step()
    compiled_layer = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with ops.use_impl(device):
        loss = compiled_layer(src, None, ref, shapes, starts).square().mean()
    grads = torch.autograd.grad(loss, list(layer.parameters()))
    torch.testing.assert_close(loss, want[0], atol=1e-6, rtol=1e-6)
    for g, r in zip(grads, want[1]):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-6)
