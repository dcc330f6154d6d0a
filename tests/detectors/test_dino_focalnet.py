"""DINO-FocalNet against the official model's reference data (../shared/detector).

1. the full-size model's state_dict equals the official manifest (keys, shapes, dtypes, ties);
2. the reduced 'golden-small' model reproduces the official forward (float32 and float64);
3. ``extract()`` is consistent with the forward (ranking, cropping) and ``feature_shapes`` is exact;
4. checkpoint files shaped like the official release load safely; wrong ones fail clearly.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json

import pytest
import torch
from torch import Tensor

from pipeline.detectors import DETECTORS, build_detector
from pipeline.detectors.base import Detector
from pipeline.detectors.checkpoint import CheckpointError, file_sha256, load_checkpoint, read_state_dict
from pipeline.detectors.dino_focalnet import COCO_CATEGORY_IDS, DINOFocalNet, build_dino_focalnet

ATOL = RTOL = 1e-4  # float32 vs the official float32 run (README's suggestion)


def checksum(t: torch.Tensor) -> torch.Tensor:
    """Per-image ``[sum, sum|x|, sum x^2]`` in float64, as the golden script computes it."""
    x = t.double().reshape(t.shape[0], -1)
    return torch.stack([x.sum(1), x.abs().sum(1), (x * x).sum(1)], 1)


def close(ours, ref, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(ours.to(ref.dtype), ref, atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------- 1. manifest
def test_full_size_state_dict_matches_official_manifest(shared_dir):
    manifest = json.loads((shared_dir / "manifest_dino_focalnet_l.json").read_text())
    with torch.device("meta"):
        model = build_dino_focalnet("large")
    ours = {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
    ref = {k: (shape, dtype) for k, shape, dtype in manifest["state_dict"]}
    assert len(ours) == len(ref) == manifest["num_state_dict_keys"] == 869
    assert sorted(set(ref) - set(ours)) == [] and sorted(set(ours) - set(ref)) == []
    assert {k: v for k, v in ours.items() if ref[k] != v} == {}
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"] == 228_122_422
    assert sum(b.numel() for b in model.buffers()) == manifest["num_buffers"] == 0
    # the official tied keys are one tensor in our model too (and nothing else is tied)
    owner = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owner[name] = id(p)
    for key, first in manifest["tied_keys"]:
        assert owner[key] == owner[first], (key, first)
    assert len(owner) - len(set(owner.values())) == len(manifest["tied_keys"]) == 88


def test_registry_config_and_categories():
    with pytest.raises(ValueError, match="dino-focalnet"):
        build_detector("no-such-detector")
    assert "dino-focalnet" in DETECTORS
    with pytest.raises(ValueError, match="preset"):
        build_dino_focalnet("huge")
    with torch.device("meta"):
        model = build_detector("dino-focalnet", preset="golden-small")
        cfg = json.loads(json.dumps(model.config()))
        again = DINOFocalNet(**cfg)
    assert isinstance(model, Detector)
    assert model.name == "dino-focalnet" and model.hidden_dim == 256 and model.num_classes == 91
    assert model.num_encoder_layers == 6 and model.num_queries == 100
    assert again.config() == model.config()
    assert {k: tuple(v.shape) for k, v in again.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapping = model.class_to_category_id()
    assert len(mapping) == 80 and all(k == v for k, v in mapping.items())
    assert set(mapping) == set(COCO_CATEGORY_IDS)
    assert not {0, 12, 26, 29, 30, 45, 66, 68, 69, 71, 83} & set(mapping)
    assert min(mapping) == 1 and max(mapping) == 90
    with pytest.raises(ValueError, match="outside"):
        with torch.device("meta"):
            build_dino_focalnet("golden-small", category_ids=[1, 91])


# ----------------------------------------------------------------------------- 2. golden
def test_golden_float32_matches_official(golden, golden_forward):
    o, out = golden["outputs"], golden_forward
    ti = o["token_index"]
    # backbone and input projection (taps before the encoder)
    for i, ref in enumerate(o["backbone_features"]):
        close(out["backbone_features"][i], ref["tensor"])
        assert torch.equal(out["masks"][i], ref["mask"])
    for lvl in range(5):
        close(checksum(out["srcs"][lvl]), o["transformer_srcs_checksum"][lvl], atol=1e-3, rtol=1e-5)
        assert torch.equal(out["masks"][lvl], o["transformer_masks"][lvl])
    assert torch.equal(out["spatial_shapes"], o["spatial_shapes"])
    assert torch.equal(out["level_start_index"], o["level_start_index"])
    assert torch.equal(out["mask_flatten"], o["mask_flatten"])
    close(out["valid_ratios"], o["valid_ratios"], atol=0, rtol=0)
    close(out["encoder_input"][:, ti], o["encoder_input_subset"])
    close(checksum(out["encoder_pos"]), o["encoder_pos_checksum"], atol=1e-3, rtol=1e-5)
    # encoder: every layer (subset + checksums); memory = last layer
    enc = torch.stack(out["encoder_layer_outputs"])
    close(enc[:, :, ti], o["enc_layer_outputs_subset"])
    close(torch.stack([checksum(e) for e in enc]), o["enc_layer_outputs_checksum"], atol=1e-3, rtol=1e-5)
    close(checksum(out["memory"]), o["memory_checksum"], atol=1e-3, rtol=1e-5)
    # two-stage selection
    close(out["enc_output_memory"][:, ti], o["enc_output_memory_subset"])
    close(out["enc_outputs_class_unselected"][:, ti], o["enc_outputs_class_unselected_subset"])
    close(checksum(out["enc_outputs_class_unselected"]), o["enc_outputs_class_unselected_checksum"],
          atol=1e-3, rtol=1e-5)
    close(out["enc_outputs_bbox_delta_unselected"][:, ti], o["enc_outputs_bbox_delta_unselected_subset"])
    assert torch.equal(out["topk_indices"], o["topk_indices"])
    close(out["enc_outputs_class"], o["enc_outputs_class"])
    close(out["enc_outputs_coord"], o["enc_outputs_coord"])
    close(out["init_box_proposal"], o["init_box_proposal"])
    close(checksum(out["hs_enc"]), o["hs_enc_checksum"], atol=1e-3, rtol=1e-5)
    # decoder
    close(out["references"], o["references"])
    close(out["hs"][:, :, :32], o["hs_qsubset"])
    close(torch.stack([checksum(h) for h in out["hs"]]), o["hs_checksum"], atol=1e-2, rtol=1e-5)
    close(out["hs_last"], o["hs_last"])
    close(out["pred_logits"], o["pred_logits"])
    close(out["pred_boxes"], o["pred_boxes"])
    close(out["all_pred_logits"][:-1, :, :32], o["aux_pred_logits_qsubset"])
    close(out["all_pred_boxes"][:-1], o["aux_pred_boxes"])


# Float64 against the official float64 run: what each tap is compared with, and why.
#
# The official code keeps DINO's two-stage proposals in float32 under ``.double()`` (a float32
# ``linspace`` grid in ``gen_encoder_output_proposals``), and so do we. Their last step,
# ``log(x / (1 - x))``, is a float32 ``log`` that torch hands to MKL's vector math, whose rounding
# depends on the instruction set MKL dispatches to: at x = 0.4 it gives -0.40546515583992004 on the
# AVX2/AVX-512 paths and -0.40546518564224243 on the SSE4.2 path (``MKL_ENABLE_INSTRUCTIONS=SSE4_2``
# selects the latter, which is where the fixture was made). So on any CPU:
#   * everything before the proposals (backbone, encoder, two-stage class scores) is float64 in
#     both runs: checksums at rtol 1e-12, and the top-k selection (from the class scores) exact;
#   * the proposals may differ from the official ones by one float32 ulp (a few % of them do on
#     AVX machines). The fixture stores ``enc_outputs_coord = sigmoid(delta + proposal)`` in
#     float64, so the official proposal of each selected token is ``logit(enc_outputs_coord) - delta``
#     (recovered to ~1e-14; our ``delta`` is upstream, hence float64-exact);
#   * our decoder and heads started from the OFFICIAL initial boxes must give the official outputs
#     to float64 precision (1e-10): this, not the end-to-end comparison, is what guards our decoder;
#   * end to end, the one-ulp difference propagates: ``enc_outputs_coord`` moves by at most
#     ulp / 4 (the slope of the sigmoid), the decoder outputs by at most DECODER_GAIN * ulp.
F32_PROPOSAL_ULP = 2.0 ** -21  # float32 spacing in [4, 8): valid proposals have |logit| < logit(0.99) = 4.595
# Observed on this fixture: pred_logits move by 3.7e-7, i.e. ~0.8 ulp (pred_boxes 3.9e-8) when
# 18 of 480 selected proposals move by one ulp; six refinement layers are given 20x that.
DECODER_GAIN = 20.0
F64_ATOL = 1e-10


def _float32_spacing(x: Tensor) -> Tensor:
    """One float32 ulp at each (finite) element of ``x``, as float64."""
    x = x.float().abs()
    return (torch.nextafter(x, torch.full_like(x, float("inf"))) - x).double()


def test_golden_float64_matches_official(golden, golden_model):
    model = copy.deepcopy(golden_model).double()
    images, mask = golden["inputs"]["images"].double(), golden["inputs"]["mask"]
    with torch.inference_mode():
        out = model(images, mask)
    o = golden["outputs_float64"]
    assert out["pred_logits"].dtype == out["pred_boxes"].dtype == out["hs_last"].dtype == torch.float64
    # 1. before the proposals: float64 throughout
    enc = torch.stack(out["encoder_layer_outputs"])
    close(torch.stack([checksum(e) for e in enc]), o["enc_layer_outputs_checksum"], atol=1e-8, rtol=1e-12)
    close(checksum(out["memory"]), o["memory_checksum"], atol=1e-8, rtol=1e-12)
    assert torch.equal(out["topk_indices"], o["topk_indices"])
    # 2. the float32 island: each selected proposal within one float32 ulp of the official one
    index = out["topk_indices"].unsqueeze(-1).expand(-1, -1, 4)
    delta = torch.gather(out["enc_outputs_bbox_delta_unselected"], 1, index)
    ours = torch.gather(out["output_proposals"], 1, index)
    official_unact = torch.logit(o["enc_outputs_coord"])  # +inf where the proposal is invalid (+inf)
    finite = torch.isfinite(ours)
    assert torch.equal(finite, torch.isfinite(official_unact)) and finite.any()
    assert ours.dtype == torch.float64 and torch.equal(ours[finite].float().double(), ours[finite])
    gap = (official_unact - delta - ours)[finite].abs()
    spacing = _float32_spacing(ours[finite])
    assert bool((gap <= spacing + 1e-12).all()), f"proposal off by {(gap / spacing).max():.3g} float32 ulp"
    assert float(ours[finite].abs().max()) < 4.6  # so that one ulp <= F32_PROPOSAL_ULP
    # 3. our decoder and heads from the official initial boxes: float64 exact
    with torch.inference_mode():
        hs, references = model.transformer.decode(out["memory"], out["mask_flatten"], official_unact,
                                                  out["spatial_shapes"], out["level_start_index"],
                                                  out["valid_ratios"])
        logits, boxes = model.predict(hs, references)
    close(logits[-1], o["pred_logits"], atol=F64_ATOL, rtol=F64_ATOL)
    close(boxes[-1], o["pred_boxes"], atol=F64_ATOL, rtol=F64_ATOL)
    # 4. end to end: the one-ulp island propagated
    close(out["enc_outputs_coord"], o["enc_outputs_coord"], atol=F64_ATOL + F32_PROPOSAL_ULP / 4, rtol=0)
    for key in ("pred_logits", "pred_boxes"):
        close(out[key], o[key], atol=F64_ATOL + DECODER_GAIN * F32_PROPOSAL_ULP, rtol=0)


# ----------------------------------------------------------------------------- 3. extract / shapes
def _valid_counts(mask: torch.Tensor) -> list[int]:
    return [int((~mask[:, 0]).sum()), int((~mask[0, :]).sum())]


def test_extract_consistent_with_forward(golden, golden_model, golden_forward):
    images, mask = golden["inputs"]["images"], golden["inputs"]["mask"]
    out = golden_forward
    layers, top_k = [1, 4, 6], 30
    records = golden_model.extract(images, mask, layers, top_k)
    assert len(records) == 2
    padded = out["spatial_shapes"]
    for b, rec in enumerate(records):
        scores = out["pred_logits"][b].sigmoid().max(-1).values
        expected = torch.sort(scores, descending=True, stable=True).indices[:top_k]
        assert torch.equal(rec.query_index, expected)
        assert torch.all(rec.extras["scores"][:-1] >= rec.extras["scores"][1:])
        assert torch.equal(rec.queries, out["hs_last"][b, expected])
        assert torch.equal(rec.logits, out["pred_logits"][b, expected])
        assert torch.equal(rec.boxes, out["pred_boxes"][b, expected])
        assert rec.queries.shape == (top_k, 256) and rec.logits.shape == (top_k, 91) and rec.boxes.shape == (top_k, 4)
        # valid shapes from the golden (official) masks of every level
        valid = torch.tensor([_valid_counts(m[b]) for m in golden["outputs"]["transformer_masks"]])
        assert torch.equal(rec.spatial_shapes, valid)
        sizes = valid.prod(1)
        assert torch.equal(rec.level_start_index, torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]]))
        assert torch.equal(rec.valid_ratios, golden["outputs"]["valid_ratios"][b])
        assert sorted(rec.encoder_tokens) == layers
        for k in layers:
            full = out["encoder_layer_outputs"][k - 1][b]
            tokens = rec.encoder_tokens[k]
            assert tokens.shape == (int(sizes.sum()), 256)
            start_full, start_crop = 0, 0
            for (H, W), (h, w) in zip(padded.tolist(), valid.tolist()):
                level = full[start_full:start_full + H * W].view(H, W, -1)[:h, :w].reshape(h * w, -1)
                assert torch.equal(tokens[start_crop:start_crop + h * w], level)
                start_full += H * W
                start_crop += h * w
        h1, w1 = valid[0].tolist()
        assert torch.equal(rec.c1, out["backbone_features"][0][b, :, :h1, :w1])
        assert rec.c1.shape == (16, h1, w1)
        for t in (rec.queries, rec.logits, rec.boxes, rec.valid_ratios, rec.c1, *rec.encoder_tokens.values()):
            assert t.dtype == torch.float32 and not t.is_inference()
    # image 0 is unpadded (valid == padded); image 1 is padded: 128x176 inside 160x208
    assert torch.equal(records[0].spatial_shapes, padded)
    assert records[1].spatial_shapes.tolist() == [[32, 44], [16, 22], [8, 11], [4, 6], [3, 4]]
    with pytest.raises(ValueError, match="encoder layers"):
        golden_model.extract(images, mask, [0], 5)
    with pytest.raises(ValueError, match="top_k"):
        golden_model.extract(images, mask, [6], 101)


@pytest.mark.parametrize("hw", [(160, 208), (61, 83), (97, 45), (130, 67), (33, 129)])
def test_feature_shapes_match_forward(golden_model, hw):
    h, w = hw
    shapes, c1_hw = golden_model.feature_shapes(h, w)
    if hw == (160, 208):
        assert shapes.tolist() == [[40, 52], [20, 26], [10, 13], [5, 7], [3, 4]]
    g = torch.Generator().manual_seed(h * 1000 + w)
    images = torch.randn(1, 3, h, w, generator=g)
    mask = torch.zeros(1, h, w, dtype=torch.bool)
    with torch.inference_mode():
        out = golden_model(images, mask)
    assert torch.equal(out["spatial_shapes"], shapes)
    assert tuple(out["backbone_features"][0].shape[-2:]) == c1_hw
    assert out["encoder_layer_outputs"][0].shape[1] == int(shapes.prod(1).sum())
    assert out["valid_ratios"].eq(1).all()


# ----------------------------------------------------------------------------- 4. checkpoints
class _NotAllowed:
    """A class a weights-only unpickler must refuse."""


def _official_like(sd: dict) -> dict:
    return {
        "model": sd,
        "optimizer": {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(3)}},
                      "param_groups": [{"lr": 1e-4, "weight_decay": 1e-4, "params": [0]}]},
        "lr_scheduler": {"step_size": 11, "gamma": 0.1, "base_lrs": [1e-4], "last_epoch": 12, "_last_lr": [1e-5]},
        "epoch": 11,
        "args": argparse.Namespace(modelname="dino", backbone="focalnet_L_384_22k_fl4", num_queries=100,
                                   lr_backbone_names=["backbone.0"], dn_number=100),
    }


@pytest.fixture(scope="module")
def small_pair():
    """Two 'golden-small' models with different random weights."""
    torch.manual_seed(0)
    a = build_dino_focalnet("golden-small").eval()
    torch.manual_seed(1)
    b = build_dino_focalnet("golden-small").eval()
    return a, b


def _same_weights(m1, m2) -> bool:
    s1, s2 = m1.state_dict(), m2.state_dict()
    return s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_official_checkpoint_layout_loads_weights_only(tmp_path, small_pair):
    src, dst = small_pair
    path = tmp_path / "checkpoint0011.pth"
    torch.save(_official_like(src.state_dict()), path)
    with pytest.raises(Exception, match="Namespace"):  # plain weights_only=True refuses the args
        torch.load(path, map_location="cpu", weights_only=True)
    target = copy.deepcopy(dst)
    assert not _same_weights(src, target)
    report = target.load_checkpoint(str(path))
    assert report.ok and report.missing == report.unexpected == report.mismatched == []
    assert len(report.aliases_checked) == 88
    assert report.num_params == sum(p.numel() for p in src.parameters())
    assert _same_weights(src, target)
    # float16 file -> float32 model, and a float64 model
    sd16 = {k: v.half() for k, v in src.state_dict().items()}
    torch.save({"model": sd16}, tmp_path / "half.pth")
    target64 = copy.deepcopy(dst).double()
    load_checkpoint(target64, tmp_path / "half.pth")
    assert target64.transformer.level_embed.dtype == torch.float64
    assert torch.equal(target64.transformer.level_embed, sd16["transformer.level_embed"].double())


def test_numpy_values_in_args_are_plain_data(tmp_path, small_pair):
    import numpy as np

    src, dst = small_pair
    ckpt = _official_like(src.state_dict())
    ckpt["args"].np_scalar, ckpt["args"].np_array, ckpt["args"].np_dtype = np.float64(0.1), np.arange(3), np.dtype("f4")
    path = tmp_path / "numpy_args.pth"
    torch.save(ckpt, path)
    target = copy.deepcopy(dst)
    assert target.load_checkpoint(str(path)).ok and _same_weights(src, target)


def test_bare_and_module_prefixed_and_single_alias_load(tmp_path, small_pair):
    src, dst = small_pair
    sd = src.state_dict()
    torch.save(sd, tmp_path / "bare.pth")
    torch.save({"model": {"module." + k: v for k, v in sd.items()}}, tmp_path / "ddp.pth")
    only_one_name = {k: v for k, v in sd.items() if not k.startswith("transformer.decoder.class_embed.")
                     and not k.startswith("transformer.decoder.bbox_embed.")}
    torch.save(only_one_name, tmp_path / "untied.pth")
    for name in ("bare.pth", "ddp.pth", "untied.pth"):
        target = copy.deepcopy(dst)
        report = target.load_checkpoint(str(tmp_path / name))
        assert report.ok, (name, report.format())
        assert _same_weights(src, target), name
    assert read_state_dict(tmp_path / "ddp.pth").keys() == sd.keys()


def test_tied_aliases_with_different_values_are_rejected(tmp_path, small_pair):
    src, dst = small_pair
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    sd["class_embed.3.bias"] += 1.0
    path = tmp_path / "bad_tie.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match="class_embed.3.bias") as err:
        copy.deepcopy(dst).load_checkpoint(str(path))
    assert str(path) in str(err.value)


def test_checkpoint_of_another_model_is_rejected(tmp_path, small_pair):
    src, dst = small_pair
    sd = dict(src.state_dict())
    sd["transformer.level_embed"] = torch.zeros(4, 256)  # a 4-scale model
    del sd["input_proj.4.0.weight"], sd["input_proj.4.1.bias"]
    sd["backbone.0.layers.0.blocks.0.extra.weight"] = torch.zeros(3)
    path = tmp_path / "other_model.pth"
    torch.save(_official_like(sd), path)
    target = copy.deepcopy(dst)
    with pytest.raises(CheckpointError) as err:
        target.load_checkpoint(str(path))
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    for needle in (str(path), "transformer.level_embed", "(4, 256)", "(5, 256)", "input_proj.4.0.weight",
                   "input_proj.4.1.bias", "backbone.0.layers.0.blocks.0.extra.weight", "MISMATCH"):
        assert needle in msg, needle
    assert _same_weights(dst, target)  # strict failure loads nothing
    report = target.load_checkpoint(str(path), strict=False)
    assert report.missing == ["input_proj.4.0.weight", "input_proj.4.1.bias"]
    assert report.unexpected == ["backbone.0.layers.0.blocks.0.extra.weight"]
    assert report.mismatched == [("transformer.level_embed", (4, 256), (5, 256))]
    assert torch.equal(target.transformer.encoder.layers[0].linear1.weight,
                       src.transformer.encoder.layers[0].linear1.weight)
    assert torch.equal(target.transformer.level_embed, dst.transformer.level_embed)  # mis-shaped: not loaded


def test_unreadable_files_give_clear_errors(tmp_path, small_pair):
    text = tmp_path / "weights.pth"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint") as err:
        small_pair[1].load_checkpoint(str(text))
    assert str(text) in str(err.value)
    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "args": _NotAllowed()}, evil)
    with pytest.raises(CheckpointError, match="_NotAllowed") as err:
        read_state_dict(evil)
    assert str(evil) in str(err.value)
    with pytest.raises(CheckpointError, match="no 'model' state_dict"):
        torch.save({"epoch": 3}, tmp_path / "empty.pth")
        read_state_dict(tmp_path / "empty.pth")
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "missing.pth")


def test_file_sha256(tmp_path):
    data = bytes(range(256)) * 5000
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert file_sha256(path, chunk_size=1000) == hashlib.sha256(data).hexdigest()
