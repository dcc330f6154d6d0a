"""Online mode (issue 21): the detector in the training loop feeds the same head, targets and loss.

Two real COCO images, the reduced DINO-FocalNet (``golden-small``, random weights from a seed) at a
small test-time size, and the reduced head: one step online equals one step from a float32 cache of
the same images, and a partial fine-tune changes the encoder and decoder only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import load_checkpoint
from pipeline.config import load_config
from pipeline.extract import ExtractOptions, run_extract
from pipeline.online import OnlineSource, trainable_parameters
from pipeline.train import train

from .conftest import COCO_ROOT, REPO, SMALL_HEAD, head_sets, require_coco, run_cli

CONFIG = REPO / "configs" / "mfdetr_dino_focalnet_l.yaml"
DETECTOR = dict(detector="dino-focalnet", preset="golden-small", random_init=True, seed=0, min_size=160,
                max_size=240, encoder_layers=[4], top_k=30)
DETECTOR_FLAGS = ["--detector", "dino-focalnet", "--preset", "golden-small", "--random-init", "--min-size", 160,
                  "--max-size", 240, "--encoder-layers", 4, "--top-k", 30]


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_online_step_equals_cached_step_with_frozen_detector(tmp_path):
    """Same images, seed and views (the epoch's seeded view per image: the cache's stored one vs live)."""
    require_coco()
    cache = tmp_path / "train.zarr"
    run_extract(ExtractOptions(out=cache, coco_root=COCO_ROOT, split="train2017", max_images=2, dtype="float32",
                               views=["orig", "hflip"], **DETECTOR))
    cfg = load_config(CONFIG, list(SMALL_HEAD) + ["train.max_iters=1", "train.batch_size=2", "train.seed=2"])
    train(cfg, cache, tmp_path / "cached", device="cpu", progress=False)
    run_cli("train-head", "--online", *DETECTOR_FLAGS, "--coco-root", COCO_ROOT, "--split", "train2017",
            "--max-images", 2, "--views", "orig,hflip", "--config", CONFIG, *head_sets(["train.seed=2"]),
            "--max-iters", 1, "--batch-size", 2, "--device", "cpu", "--quiet", "--out", tmp_path / "online")
    cached, online = (load_checkpoint(tmp_path / name / "head.pt") for name in ("cached", "online"))
    assert online["step"] == cached["step"] == 1
    assert sorted(online["head"]) == sorted(cached["head"])
    for k, v in cached["head"].items():
        torch.testing.assert_close(online["head"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    # the step did train: AdamW moments are non-zero and the same on both sides
    moments = [s["exp_avg"] for s in cached["optimizer"]["state"].values()]
    assert moments and any(bool(m.abs().sum() > 0) for m in moments)
    (c,), (o,) = _metrics(tmp_path / "cached"), _metrics(tmp_path / "online")
    assert abs(c["loss"] - o["loss"]) < 1e-5 and abs(c["grad_norm"] - o["grad_norm"]) < 1e-3 * c["grad_norm"]
    from pipeline.views import view_choices

    assert sorted(view_choices(2, 0, 2, 2)) == [0, 1]  # with seed 2 this epoch mixes both views
    # the online head is usable as a cached one: the fingerprint is extract's, plus how it was trained
    assert {k: v for k, v in online["fingerprint"].items() if k not in ("online", "dtype")} == \
        {k: v for k, v in cached["fingerprint"].items() if k != "dtype"}
    assert online["fingerprint"]["online"] == {"finetune": "none"}


@pytest.fixture(scope="module")
def partial_run(tmp_path_factory):
    """One step of --finetune partial on one real image: the source (its detector fine-tuned in place),
    the detector parameters before the step, and the run's train() result."""
    require_coco()
    tmp_path = tmp_path_factory.mktemp("partial")
    source = OnlineSource(ExtractOptions(out=tmp_path / "unused", coco_root=COCO_ROOT, split="train2017",
                                         max_images=1, **DETECTOR), finetune="partial")
    before = {k: p.detach().clone() for k, p in source.detector.named_parameters()}
    cfg = load_config(CONFIG, list(SMALL_HEAD) + ["train.max_iters=1", "train.batch_size=1", "train.lr=1e-3"])
    result = train(cfg, None, tmp_path / "run", device="cpu", progress=False, source=source)
    return {"source": source, "before": before, "result": result, "cfg": cfg}


def test_partial_finetune_updates_exactly_encoder_and_decoder(partial_run):
    source, before, result = partial_run["source"], partial_run["before"], partial_run["result"]
    detector = source.detector
    expected = {k for k in before if k.startswith(("transformer.encoder.", "transformer.decoder."))}
    assert set(trainable_parameters(detector, "partial")) == expected
    assert set(trainable_parameters(detector, "full")) == set(before)
    changed = {k for k, p in detector.named_parameters() if not torch.equal(p.detach(), before[k])}
    assert changed and changed <= expected, sorted(changed - expected)
    assert any(k.startswith("transformer.encoder.") for k in changed)
    assert any(k.startswith("transformer.decoder.") for k in changed)
    assert not any(k.startswith(("backbone.", "input_proj.")) for k in changed)
    # every encoder/decoder tensor the head's loss reaches moved (AdamW moves each one with a gradient)
    reached = {k for k, p in source.trainable.items() if p.grad is not None and bool(p.grad.abs().sum() > 0)}
    assert reached == changed
    # the detector's lr is 1/10 of the head's, and its fine-tuned weights are in the checkpoint
    ckpt = load_checkpoint(result["head"])
    groups = ckpt["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["head", "detector"]
    assert abs(groups[1]["lr"] - 0.1 * groups[0]["lr"]) < 1e-12
    assert sorted(ckpt["detector"]) == sorted(expected)
    k = sorted(changed)[0]
    torch.testing.assert_close(ckpt["detector"][k], dict(detector.named_parameters())[k].detach())


def test_finetuned_run_is_evaluated_on_its_own_detectors_features(partial_run, tmp_path):
    """extract --finetuned RUN/head.pt runs the run's fine-tuned detector; evaluate pairs the head with
    that cache only (the original detector's cache is refused, and a frozen head on the fine-tuned one)."""
    from pipeline.cache import CacheError, FeatureCache
    from pipeline.checkpoint import load_head, save_checkpoint
    from pipeline.inference import evaluate_cache

    head_pt, cfg = partial_run["result"]["head"], partial_run["cfg"]
    ckpt = load_checkpoint(head_pt)
    assert ckpt["fingerprint"]["finetuned"]["finetune"] == "partial"
    val = dict(coco_root=COCO_ROOT, split="val2017", max_images=1, dtype="float32", **DETECTOR)
    run_cli("extract", *DETECTOR_FLAGS, "--finetuned", head_pt, "--coco-root", COCO_ROOT, "--split", "val2017",
            "--max-images", 1, "--dtype", "float32", "--out", tmp_path / "val_ft.zarr")
    run_extract(ExtractOptions(out=tmp_path / "val.zarr", **val))
    ft, orig = FeatureCache.open(tmp_path / "val_ft.zarr"), FeatureCache.open(tmp_path / "val.zarr")
    assert ft.fingerprint["finetuned"] == ckpt["fingerprint"]["finetuned"]
    assert ft.fingerprint["finetuned_from"] == {"checkpoint": str(Path(head_pt).resolve()), "step": 1}
    assert "finetuned" not in orig.fingerprint and ft.info()["finetuned"] == ckpt["fingerprint"]["finetuned"]
    # the loaded parameters took effect: other features than the original detector's ...
    a, b = ft.read(0, 4), orig.read(0, 4)
    assert a.image_id == b.image_id and not torch.allclose(a.queries, b.queries, atol=1e-3)
    # ... and the features the run's own detector computes (OnlineSource with the fine-tuned state)
    live = OnlineSource(ExtractOptions(out=tmp_path / "unused", **{k: v for k, v in val.items() if k != "dtype"}),
                        finetune="partial")
    live.load_state_dict(ckpt["detector"])
    (rec,) = live.records([live.dataset([0], 4)[0]], 4)
    assert torch.equal(rec.query_index.cpu(), a.query_index)
    torch.testing.assert_close(rec.queries.detach(), a.queries, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rec.encoder_tokens[4].detach(), a.encoder_tokens[4], rtol=1e-4, atol=1e-5)

    run_cli("evaluate", "--cache", tmp_path / "val_ft.zarr", "--checkpoint", head_pt, "--device", "cpu", "--quiet",
            "--out", tmp_path / "eval")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert "AP" in metrics["segm"] and "AP" in metrics["bbox"]
    head, _, head_cfg, _ = load_head(head_pt)  # what `evaluate --checkpoint` does, on the original detector's cache
    with pytest.raises(CacheError, match="finetuned: expected .*--finetuned RUN/head.pt"):
        evaluate_cache(head, head_cfg, tmp_path / "val.zarr", tmp_path / "eval_orig", device="cpu",
                       expected_fingerprint=ckpt["fingerprint"], progress=False)
    # the converse: a head of the original detector (no fine-tuned state) is refused on the fine-tuned cache
    frozen = {k: v for k, v in torch.load(head_pt, weights_only=True).items() if k != "detector"}
    save_checkpoint(tmp_path / "frozen.pt", **frozen)
    frozen_fp = load_checkpoint(tmp_path / "frozen.pt")["fingerprint"]
    FeatureCache.open(tmp_path / "val.zarr", expected=frozen_fp)
    with pytest.raises(CacheError, match="finetuned: expected null"):
        FeatureCache.open(tmp_path / "val_ft.zarr", expected=frozen_fp)
    # checkpoints that cannot be loaded are refused by name before anything is written
    bad = dict(frozen, detector={("x." + k): v for k, v in ckpt["detector"].items()})
    save_checkpoint(tmp_path / "renamed.pt", **bad)
    for path, message in ((tmp_path / "frozen.pt", "holds no fine-tuned detector parameters"),
                          (tmp_path / "renamed.pt", "detector parameters do not match dino-focalnet")):
        with pytest.raises(ValueError, match=message) as err:
            run_extract(ExtractOptions(out=tmp_path / "never.zarr", finetuned=path, **val))
        assert str(path) in str(err.value) and not (tmp_path / "never.zarr").exists()
    with pytest.raises(ValueError, match="the run fine-tuned another detector.*checkpoint_sha256"):
        run_extract(ExtractOptions(out=tmp_path / "never.zarr", finetuned=head_pt, **{**val, "seed": 1}))
    # train-head --online --finetune with --val-cache names the two commands instead
    with pytest.raises(ValueError, match="--finetuned .*head.pt") as err:
        train(cfg, None, tmp_path / "run2", val_cache=tmp_path / "val.zarr", device="cpu", progress=False, source=live)
    assert "cli.py evaluate --cache VAL_FT.zarr --checkpoint" in str(err.value)
