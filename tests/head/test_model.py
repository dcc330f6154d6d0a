"""Forward shapes, per-image independence, box geometry, gradients and dtypes of the head."""

import ast
from pathlib import Path

import pytest
import torch

from torchvision.ops import roi_align

import pipeline.head
from kernels import ops
from pipeline.head import HeadConfig, build_head
from pipeline.head.model import ImageFeatures

from ._synthetic import DINO_WIDTHS, fake_image, random_boxes

SMALL = {**DINO_WIDTHS, "image_encoder_layers": 1, "box_encoder_layers": 1, "roi_size": 8}  # fast variants


def _encode(head, sizes, seed=0):
    return [head.encode_image(*fake_image(h, w, seed=seed + i)) for i, (h, w) in enumerate(sizes)]


@pytest.fixture(scope="module")
def default_head():
    torch.manual_seed(0)
    head, criterion, post = build_head(HeadConfig.from_dict(DINO_WIDTHS))
    return head.eval(), criterion, post


def test_encode_image_shape_and_dtype(default_head):
    head, _, _ = default_head
    tokens, shapes, start, c1 = fake_image(70, 90)
    f = head.encode_image(tokens, shapes, start, c1)
    assert f.size == tuple(c1.shape[1:]) and f.c1.shape == (256, *c1.shape[1:])
    hf, wf = shapes[0].tolist()  # finest level (stride 8 here)
    assert f.e.shape == (256, hf, wf) and f.dtype == torch.float32
    assert f.materialize().shape == (256, c1.shape[1], c1.shape[2])


@pytest.mark.parametrize("impl", ops.available_impls())
def test_fused_pooling_equals_roi_align_of_mapped_sum(impl):
    """The head pools mapper(Neck(C1)) + up(W E) with the fused kernel; that equals torchvision's
    roi_align of mapper(F) on the materialised F (the composition of Eq. 5 and Eq. 3 as written)."""
    torch.manual_seed(0)
    head, _, _ = build_head(HeadConfig.from_dict({**SMALL, "box_dim": 128}))
    head = head.double()
    f = head.encode_image(*fake_image(40, 52))
    boxes = torch.tensor([[3.0, 4.5, 30.2, 20.0], [-5.0, -2.0, 12.0, 60.0], [10.0, 10.0, 10.0, 10.0]],
                         dtype=torch.float64)
    with ops.use_impl(impl):
        got = head._pool(f, boxes)
    mapped = head.channel_mapper(f.materialize().permute(1, 2, 0)).permute(2, 0, 1)
    want = roi_align(mapped[None], [boxes], output_size=8, spatial_scale=1.0,
                     sampling_ratio=head.cfg.roi_sampling_ratio, aligned=True)
    assert got.shape == (3, 128, 8, 8)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_forward_shapes_different_image_sizes(default_head):
    head, _, _ = default_head
    feats = _encode(head, [(64, 96), (80, 56)])
    m = 5
    out = head(feats, torch.randn(m, 256), random_boxes(m), torch.tensor([[64.0, 96.0], [80.0, 56.0]]),
               torch.tensor([1, 0, 1, 1, 0]))
    assert out["mask_logits"].shape == (m, 32, 32)
    assert out["iou_pred"].shape == (m, 80)
    assert torch.isfinite(out["mask_logits"]).all() and torch.isfinite(out["iou_pred"]).all()


def test_forward_empty(default_head):
    head, _, _ = default_head
    feats = _encode(head, [(64, 64)])
    out = head(feats, torch.zeros(0, 256), torch.zeros(0, 4), torch.tensor([[64.0, 64.0]]),
               torch.zeros(0, dtype=torch.int64))
    assert out["mask_logits"].shape == (0, 32, 32) and out["iou_pred"].shape == (0, 80)


def test_image_without_boxes_in_batch(default_head):
    head, _, _ = default_head
    feats = _encode(head, [(64, 64), (48, 80), (64, 64)])
    out = head(feats, torch.randn(3, 256), random_boxes(3), torch.tensor([[64.0, 64], [48, 80], [64, 64]]),
               torch.tensor([0, 2, 0]))
    assert out["mask_logits"].shape == (3, 32, 32)


def test_results_do_not_depend_on_batch_composition(default_head):
    head, _, _ = default_head
    fa, fb = _encode(head, [(64, 96), (88, 72)])
    qa, ba = torch.randn(4, 256), random_boxes(4, seed=1)
    qb, bb = torch.randn(3, 256), random_boxes(3, seed=2)
    with torch.no_grad():
        alone = head([fa], qa, ba, torch.tensor([[64.0, 96.0]]), torch.zeros(4, dtype=torch.int64))
        # image a second in the batch, its boxes interleaved with image b's
        q = torch.cat((qb[:1], qa[:2], qb[1:], qa[2:]))
        b = torch.cat((bb[:1], ba[:2], bb[1:], ba[2:]))
        bi = torch.tensor([0, 1, 1, 0, 0, 1, 1])
        batch = head([fb, fa], q, b, torch.tensor([[88.0, 72.0], [64.0, 96.0]]), bi)
    sel = bi == 1
    assert torch.equal(batch["mask_logits"][sel], alone["mask_logits"])
    assert torch.equal(batch["iou_pred"][sel], alone["iou_pred"])


@pytest.mark.parametrize("fuse_c1", [False, True])
def test_roi_geometry_box_frame(fuse_c1):
    """A parameter-free head (Table 1 baseline) reads F = x-ramp; the logits are the bin centres.

    F is given as the encoder term (no C1 fusion: plain RoIAlign of up(e)) or as the C1 term with a
    zero encoder term (the fused kernel)."""
    cfg = {**DINO_WIDTHS, "c1_channels": 256, "image_encoder_layers": 0, "neck": False, "fuse_c1": fuse_c1, "box_dim": 256,
           "box_encoder_layers": 0,
           "box_pos_embed": False, "query_ffn": False, "query_b2o": False, "mask_scoring": False, "roi_size": 8}
    head, _, _ = build_head(HeadConfig.from_dict(cfg))
    assert sum(p.numel() for p in head.parameters()) == 0
    h1, w1, img_h, img_w = 20, 30, 80.0, 120.0
    feat = torch.zeros(256, h1, w1, dtype=torch.float64)
    feat[0] = torch.arange(w1, dtype=torch.float64) + 0.5  # value = continuous x at pixel centres
    feat[1] = (torch.arange(h1, dtype=torch.float64) + 0.5)[:, None]
    box = torch.tensor([[0.5, 0.4, 0.4, 0.3]], dtype=torch.float64)  # cxcywh normalized
    head = head.double()
    q = torch.zeros(2, 256, dtype=torch.float64)
    q[0, 0] = 1.0
    q[1, 1] = 1.0
    feats = ImageFeatures(feat, torch.zeros(256, 5, 8, dtype=torch.float64), (h1, w1)) if fuse_c1 else \
        ImageFeatures(None, feat, (h1, w1))
    out = head([feats], q, box.expand(2, 4), torch.tensor([[img_h, img_w]]), torch.zeros(2, dtype=torch.int64))
    x0, x1 = (0.5 - 0.2) * w1, (0.5 + 0.2) * w1
    y0, y1 = (0.4 - 0.15) * h1, (0.4 + 0.15) * h1
    centres_x = x0 + (torch.arange(8, dtype=torch.float64) + 0.5) * (x1 - x0) / 8
    centres_y = y0 + (torch.arange(8, dtype=torch.float64) + 0.5) * (y1 - y0) / 8
    torch.testing.assert_close(out["mask_logits"][0], centres_x[None].expand(8, 8))
    torch.testing.assert_close(out["mask_logits"][1], centres_y[:, None].expand(8, 8))


def test_gradients_reach_every_parameter():
    """Default architecture: one backward of the full loss reaches every parameter (no unused ones)."""
    torch.manual_seed(1)
    head, criterion, _ = build_head(HeadConfig.from_dict({**DINO_WIDTHS, "num_points": 1024}))  # fewer loss points; same architecture
    head.train()
    feats = _encode(head, [(48, 64), (56, 48)])
    m = 4
    out = head(feats, torch.randn(m, 256), random_boxes(m), torch.tensor([[48.0, 64.0], [56.0, 48.0]]),
               torch.tensor([0, 1, 0, 1]))
    targets = {"masks": (torch.rand(m, 112, 112) > 0.5).float(), "labels": torch.randint(0, 80, (m,))}
    losses = criterion(out, targets, generator=torch.Generator().manual_seed(0))
    losses["loss"].backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().sum() == 0]
    assert missing == []


@pytest.mark.parametrize("overrides", [
    {**SMALL, "mask_head": "segmenter"},
    {**SMALL, "query_o2o": True},
    {**SMALL, "image_encoder_layers": 0, "box_encoder_layers": 0},
    {**SMALL, "mask_scoring": False, "query_ffn": False, "query_b2o": False},
    {**SMALL, "num_feature_levels": 4, "c1_channels": 256, "neck": False},
])
def test_ablation_variants_run(overrides):
    head, criterion, _ = build_head(HeadConfig.from_dict(overrides))
    levels = overrides.get("num_feature_levels", 5)
    c1ch = overrides.get("c1_channels", 192)
    feats = [head.encode_image(*fake_image(48, 64, levels=levels, c1_channels=c1ch))]
    m, r = 3, overrides["roi_size"]
    out = head(feats, torch.randn(m, 256), random_boxes(m), torch.tensor([[48.0, 64.0]]),
               torch.zeros(m, dtype=torch.int64))
    assert out["mask_logits"].shape == (m, r, r)
    assert ("iou_pred" in out) == overrides.get("mask_scoring", True)
    targets = {"masks": torch.rand(m, 112, 112), "labels": torch.randint(0, 80, (m,))}
    criterion(out, targets)["loss"].backward()


def test_float64_matches_float32():
    torch.manual_seed(0)
    head32, criterion, _ = build_head(HeadConfig.from_dict(SMALL))
    head64, _, _ = build_head(HeadConfig.from_dict(SMALL))
    head64.load_state_dict(head32.state_dict())
    head64 = head64.double()
    img = fake_image(48, 64)
    q, b = torch.randn(3, 256), random_boxes(3)
    sizes, bi = torch.tensor([[48.0, 64.0]]), torch.zeros(3, dtype=torch.int64)
    f64 = head64.encode_image(*img)
    assert f64.dtype == torch.float64
    out64 = head64([f64], q, b, sizes, bi)
    out32 = head32([head32.encode_image(*img)], q, b, sizes, bi)
    assert out64["mask_logits"].dtype == torch.float64 and out64["iou_pred"].dtype == torch.float64
    torch.testing.assert_close(out64["mask_logits"].float(), out32["mask_logits"], rtol=1e-4, atol=1e-4)
    targets = {"masks": torch.rand(3, 112, 112, dtype=torch.float64), "labels": torch.tensor([0, 5, 79])}
    losses = criterion(out64, targets, generator=torch.Generator().manual_seed(0))
    assert losses["loss"].dtype == torch.float64
    losses["loss"].backward()


def test_input_errors(default_head):
    head, _, _ = default_head
    tokens, shapes, start, c1 = fake_image(48, 64, levels=4)
    with pytest.raises(ValueError, match="levels"):
        head.encode_image(tokens, shapes, start, c1)
    tokens, shapes, start, c1 = fake_image(48, 64, c1_channels=256)
    with pytest.raises(ValueError, match="channels"):
        head.encode_image(tokens, shapes, start, c1)
    feats = [ImageFeatures(torch.zeros(256, 12, 16), torch.zeros(256, 6, 8), (12, 16))]
    with pytest.raises(ValueError, match="batch_index"):
        head(feats, torch.randn(2, 256), random_boxes(2), torch.tensor([[48.0, 64.0]]), torch.tensor([0, 1]))


def test_head_never_imports_detectors():
    """Stage two only knows cached tensors: no module of pipeline/head imports pipeline.detectors."""
    root = Path(pipeline.head.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            offenders += [f"{path.name}: {n}" for n in names if "detectors" in n]
    assert offenders == []


@pytest.mark.parametrize("impl", [i for i in ops.available_impls() if i != "reference"])
def test_torch_compiled_head_step(impl):
    """A whole training step (image encoder, fused RoIAlign, box encoder, loss, backward) under
    torch.compile equals the eager step: the custom ops trace through their fake kernels."""
    torch.manual_seed(0)
    head, criterion, _ = build_head(HeadConfig.from_dict({**SMALL, "num_points": 64}))
    img = fake_image(40, 48)
    q, b = torch.randn(3, 256), random_boxes(3)
    sizes, bi = torch.tensor([[40.0, 48.0]]), torch.zeros(3, dtype=torch.int64)
    targets = {"masks": (torch.rand(3, 112, 112) > 0.5).float(), "labels": torch.tensor([1, 7, 79])}

    def step():
        head.zero_grad()
        out = head([head.encode_image(*img)], q, b, sizes, bi)
        loss = criterion(out, targets, generator=torch.Generator().manual_seed(0))["loss"]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in head.parameters()]

    with ops.use_impl(impl):
        want_loss, want_grads = step()
        torch._dynamo.reset()
        got_loss, got_grads = torch.compile(step, backend="aot_eager")()
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_without_roi_align_logits_are_q_dot_f_at_fs_own_grid():
    """Table 1 "RoIAlign ✗" (paper Eq. 1): each box's logits are ``query_proj(q) . mapper(F)^T`` at F's
    own stride-4 grid of its image (C1's size, non-square, one per image), padded across the batch."""
    import torch.nn.functional as F

    from pipeline.head.model import MASK_PAD_LOGIT, unpad_mask_logits
    from pipeline.layers.deformable import level_start_index_of

    from ._synthetic import HDETR_R50_WIDTHS

    cfg = {**HDETR_R50_WIDTHS, "image_encoder_layers": 0, "neck": False, "fuse_c1": True, "box_dim": 128,
           "box_encoder_layers": 0, "box_pos_embed": False, "query_ffn": False, "query_b2o": False,
           "mask_scoring": False, "roi_align": False}
    torch.manual_seed(0)
    head = build_head(HeadConfig.from_dict(cfg))[0].double().eval()
    images = []
    for i, (h, w) in enumerate([(44, 76), (60, 36)]):  # H-DETR: 4 encoder levels at strides 8-64, C1 at stride 4
        tokens, shapes, _, c1 = fake_image(h, w, levels=5, c1_channels=256, seed=i)
        shapes = shapes[1:]
        images.append((tokens[-int(shapes.prod(1).sum()):], shapes, level_start_index_of(shapes), c1))
    feats = [head.encode_image(*im) for im in images]
    bi = torch.tensor([1, 0, 1, 1, 0])
    q = torch.randn(5, 256, dtype=torch.float64)
    out = head(feats, q, random_boxes(5, dtype=torch.float64), torch.tensor([[44.0, 76.0], [60.0, 36.0]]), bi)
    (h0, w0), (h1, w1) = (11, 19), (15, 9)
    assert feats[0].size == (h0, w0) and feats[1].size == (h1, w1)
    assert out["mask_logits"].shape == (5, 15, 19) and out["mask_logits"].dtype == torch.float64
    assert out["mask_sizes"].tolist() == [[h1, w1], [h0, w0], [h1, w1], [h1, w1], [h0, w0]]
    # image 1, computed directly from the cached tensors: F = C1 + bilinear(E_finest) [Eq. 1]
    tokens, shapes, _, c1 = images[1]
    hf, wf = shapes[0].tolist()
    e = tokens[:hf * wf].double().t().reshape(256, hf, wf)
    f_map = c1.double() + F.interpolate(e[None], size=(h1, w1), mode="bilinear", align_corners=False)[0]
    mapper, proj = head.channel_mapper, head.query_proj
    mapped = torch.einsum("hd,dyx->hyx", mapper.weight, f_map) + mapper.bias[:, None, None]
    want = torch.einsum("mh,hyx->myx", q[bi == 1] @ proj.weight.t() + proj.bias, mapped)
    got = unpad_mask_logits(out["mask_logits"][bi == 1], out["mask_sizes"][bi == 1])
    assert got.shape == (3, h1, w1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert (out["mask_logits"][bi == 1][:, :, w1:] == MASK_PAD_LOGIT).all()
    assert (out["mask_logits"][bi == 1][:, h1:] == MASK_PAD_LOGIT).all()
    empty = head(feats, q[:0], random_boxes(0), torch.tensor([[44.0, 76.0], [60.0, 36.0]]), bi[:0])
    assert empty["mask_logits"].shape == (0, 0, 0) and empty["mask_sizes"].shape == (0, 2)
    # nothing per box exists without RoIAlign: RoI-token components are refused by name
    with pytest.raises(ValueError, match="box_encoder_layers"):
        HeadConfig.from_dict({**cfg, "box_encoder_layers": 1})
