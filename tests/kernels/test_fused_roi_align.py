"""kernels.fused_roi_align against roi_align of the materialised c1 + interpolate(e) (torchvision)."""

import pytest
import torch

from kernels import ops, reference

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not ops.compiled_available("cpu", "fused_roi_align"),
                                                 reason="CPU kernel not built")),
    pytest.param("cuda", marks=pytest.mark.skipif(
        not (torch.cuda.is_available() and ops.compiled_available("cuda", "fused_roi_align")),
        reason="no GPU or no CUDA kernel built")),
]


def make_inputs(device="cpu", dtype=torch.float64, b=2, c=5, hw=(13, 17), e_hw=(4, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    c1 = torch.randn(b, c, *hw, generator=g, dtype=torch.float64)
    e = torch.randn(b, c, *e_hw, generator=g, dtype=torch.float64)
    h, w = hw
    boxes = torch.tensor([
        [0, 1.2, 0.7, 9.5, 11.0],      # inside
        [1, -3.0, -2.5, 6.0, 5.0],     # partly outside (top-left)
        [1, 12.0, 8.0, w + 4.0, h + 3.0],  # partly outside (bottom-right)
        [0, 5.0, 5.0, 5.0, 5.0],       # zero area
        [1, 2.25, 3.5, 2.75, 9.0],     # thinner than a pixel
        [0, -9.0, -9.0, -4.0, -5.0],   # entirely outside
    ], dtype=torch.float64)
    return c1.to(device, dtype), e.to(device, dtype), boxes.to(device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampling_ratio,output_size", [(2, 7), (-1, (5, 4)), (0, 3)])
def test_forward_backward_match_reference_float64(device, sampling_ratio, output_size):
    c1, e, boxes = make_inputs(device)
    results = []
    for impl in ("reference", device):
        leaves = [t.detach().requires_grad_(True) for t in (c1, e)]
        out = ops.fused_roi_align(leaves[0], leaves[1], boxes, output_size, spatial_scale=1.0,
                                  sampling_ratio=sampling_ratio, impl=impl)
        grad = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1)).to(device)
        results.append((out, *torch.autograd.grad(out, leaves, grad)))
    for name, got, want in zip(("output", "grad c1", "grad e"), results[1], results[0]):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10, msg=lambda m: f"{name}: {m}")
    assert results[0][0][5].abs().max() == 0  # the box entirely outside the map


@pytest.mark.parametrize("device", DEVICES)
def test_spatial_scale_odd_channels_and_non_contiguous(device):
    c1, e, boxes = make_inputs(device, c=71, hw=(20, 26), e_hw=(5, 7))
    c1_nc = c1.transpose(2, 3).contiguous().transpose(2, 3)
    e_nc = e[:, :, :, :].permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    assert not (c1_nc.is_contiguous() or e_nc.is_contiguous())
    boxes = torch.cat((boxes[:, :1], boxes[:, 1:] * 4), 1)  # input-image pixels at stride 4
    got = ops.fused_roi_align(c1_nc, e_nc, boxes, 6, spatial_scale=0.25, sampling_ratio=2, impl=device)
    want = reference.fused_roi_align(c1, e, boxes, 6, spatial_scale=0.25, sampling_ratio=2)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_low_precision(device, dtype, tol):
    c1, e, boxes = make_inputs(device, c=30)
    want = reference.fused_roi_align(c1, e, boxes, 7, 1.0, 2)
    got = ops.fused_roi_align(c1.to(dtype), e.to(dtype), boxes.to(dtype), 7, 1.0, 2, impl=device)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_and_opcheck(device):
    c1, e, boxes = make_inputs(device, c=2, hw=(6, 7), e_hw=(3, 3))
    boxes = boxes[:3]
    leaves = tuple(t.detach().requires_grad_(True) for t in (c1, e))
    assert torch.autograd.gradcheck(
        lambda a, b: ops.fused_roi_align(a, b, boxes, 3, 1.0, 2, impl=device), leaves)
    torch.library.opcheck(torch.ops.mfdetr.fused_roi_align.default, (*leaves, boxes, 3, 2, 1.0, 2))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_bad_inputs(device):
    c1, e, boxes = make_inputs(device)
    leaves = [t.detach().requires_grad_(True) for t in (c1, e)]
    out = ops.fused_roi_align(leaves[0], leaves[1], boxes[:0], 4, impl=device)
    assert out.shape == (0, 5, 4, 4)
    out.sum().backward()
    assert leaves[0].grad.abs().max() == 0 and leaves[1].grad.shape == e.shape
    with pytest.raises(ValueError, match="boxes"):
        ops.fused_roi_align(c1, e, boxes[:, :4], 4, impl=device)
    with pytest.raises(ValueError, match="e must be"):
        ops.fused_roi_align(c1, e[:, :3], boxes, 4, impl=device)
    bad = boxes.clone()
    bad[0, 0] = 2
    with pytest.raises(ValueError, match="batch index"):
        ops.fused_roi_align(c1, e, bad, 4, impl=device)
