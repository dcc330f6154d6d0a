"""Stage two on real caches: learning, exact resume after SIGKILL, stale-cache refusal, CLI flow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pipeline.cache import FeatureCache
from pipeline.config import ConfigError, load_config
from pipeline.head import build_head
from pipeline.inference import evaluate_cache
from pipeline.checkpoint import load_checkpoint
from pipeline.train import train

from .conftest import COCO_ROOT, REPO, SMALL_EXTRACT, SMALL_HEAD, head_sets, run_cli

CONFIG = REPO / "configs" / "mfdetr_dino_focalnet_l.yaml"


def test_short_gt_box_run_beats_untrained_head(tmp_path, small_caches):
    run = tmp_path / "run"
    run_cli("train-head", "--cache", small_caches["train"], "--val-cache", small_caches["val"], "--config", CONFIG,
            *head_sets(["train.lr=1e-3", "train.checkpoint_every=1000"]), "--boxes", "gt", "--max-iters", 60,
            "--batch-size", 2, "--device", "cpu", "--out", run)
    trained = json.loads((run / "eval" / "metrics.json").read_text())
    cfg = load_config(CONFIG, list(SMALL_HEAD))
    torch.manual_seed(0)
    widths = FeatureCache.open(small_caches["val"]).feature_widths
    assert widths == {"c1_channels": 16, "num_feature_levels": 5}  # the golden-small DINO's, from the fingerprint
    untrained_head = build_head(cfg.head.with_widths(**widths))[0]
    untrained = evaluate_cache(untrained_head, cfg, small_caches["val"], tmp_path / "untrained", boxes="gt",
                               progress=False)
    assert "RANDOM-INIT" in trained["banner"]
    print("trained", trained["segm"]["AP"], "untrained", untrained["segm"]["AP"])
    assert trained["segm"]["AP"] > untrained["segm"]["AP"] + 5.0
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [l["loss"] for l in lines if "loss" in l]
    assert len(losses) == 60 and sum(losses[-10:]) < sum(losses[:10])


def test_sigkill_and_resume_gives_same_weights(tmp_path, small_caches):
    common = ["train-head", "--cache", small_caches["train"], "--config", CONFIG,
              *head_sets(["train.checkpoint_every=2"]), "--max-iters", 8, "--batch-size", 2, "--device", "cpu"]
    run_cli(*common, "--out", tmp_path / "straight")
    killed = tmp_path / "killed"
    args = [sys.executable, str(REPO / "cli.py"), *map(str, common), "--out", str(killed)]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        ck = killed / "checkpoint.pt"
        if ck.is_file():
            try:
                if load_checkpoint(ck)["step"] >= 4:
                    break
            except ValueError:
                pass
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "head.pt").exists()
    saved = load_checkpoint(killed / "checkpoint.pt")["step"]
    assert 4 <= saved < 8
    again = run_cli(*common, "--resume", "--out", killed)
    # the resume really continued from the checkpoint (fixed seeds would hide a restart from step 0)
    assert f"resumed at step {saved}; trained {8 - saved} more step(s)" in again.stdout
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()
             if "eval" not in json.loads(line)]
    assert steps == sorted(set(steps)) and steps[-1] == 8  # every logged step once, none repeated
    a = load_checkpoint(tmp_path / "straight" / "head.pt")
    b = load_checkpoint(killed / "head.pt")
    assert a["step"] == b["step"] == 8
    for k in a["head"]:
        assert torch.equal(a["head"][k], b["head"][k]), k


def test_evaluate_cli_and_stale_cache_refused(tmp_path, small_caches):
    run = tmp_path / "run"
    # one spawned DataLoader worker that opens the store itself
    run_cli("train-head", "--cache", small_caches["train"], "--config", CONFIG, *head_sets(["train.num_workers=1"]),
            "--max-iters", 2, "--batch-size", 2, "--device", "cpu", "--out", run)
    res = run_cli("evaluate", "--cache", small_caches["val"], "--checkpoint", run / "head.pt", "--device", "cpu",
                  "--out", run / "eval")
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(metrics["segm"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert "RANDOM-INIT" in res.stdout
    results = json.loads((run / "eval" / "coco_instances_results.json").read_text())
    assert results and isinstance(results[0]["segmentation"]["counts"], str)
    # the image without annotations gets predictions (false positives, as COCOeval counts them)
    assert any(r["image_id"] == 58636 for r in results)
    assert max(sum(1 for r in results if r["image_id"] == i) for i in {r["image_id"] for r in results}) <= 100
    # test-dev style: an image-info file without annotations; --format-only writes results, no metrics
    info = json.loads((COCO_ROOT / "annotations" / "instances_val2017.json").read_text())
    info.pop("annotations")
    info["images"] = sorted(info["images"], key=lambda im: im["id"])[10:12]
    (tmp_path / "image_info.json").write_text(json.dumps(info))
    run_cli("extract", *SMALL_EXTRACT, "--ann-file", tmp_path / "image_info.json", "--image-dir",
            COCO_ROOT / "val2017", "--out", tmp_path / "testdev.zarr")
    run_cli("evaluate", "--cache", tmp_path / "testdev.zarr", "--checkpoint", run / "head.pt", "--device", "cpu",
            "--format-only", "--out", run / "testdev")
    dev_results = json.loads((run / "testdev" / "coco_instances_results.json").read_text())
    assert {r["image_id"] for r in dev_results} == {im["id"] for im in info["images"]}
    assert not (run / "testdev" / "metrics.json").exists()
    # a head trained on one detector's cache is refused on a cache with another fingerprint
    ckpt = torch.load(run / "head.pt", weights_only=True)
    ckpt["fingerprint"]["checkpoint_sha256"] = "0" * 64
    torch.save(ckpt, run / "other.pt")
    proc = run_cli("evaluate", "--cache", small_caches["val"], "--checkpoint", run / "other.pt", "--device", "cpu",
                   "--out", run / "eval2", check=False)
    assert proc.returncode == 2 and "checkpoint_sha256" in proc.stderr


def test_results_do_not_depend_on_batch_size(tmp_path, small_caches):
    outs = []
    for bs in (1, 3):
        run = tmp_path / f"bs{bs}"
        cfg = load_config(CONFIG, list(SMALL_HEAD) + [f"evaluate.batch_size={bs}"])
        torch.manual_seed(0)
        widths = FeatureCache.open(small_caches["val"]).feature_widths
        head = build_head(cfg.head.with_widths(**widths))[0]
        evaluate_cache(head, cfg, small_caches["val"], run, progress=False)
        outs.append(json.loads((run / "coco_instances_results.json").read_text()))
    assert outs[0] == outs[1]


def test_help_is_complete():
    import click

    import cli

    for name, cmd in cli.main.commands.items():
        assert cmd.help and len(cmd.help) > 30, f"{name} has no description"
        for p in cmd.params:
            if isinstance(p, click.Option):
                assert p.help, f"{name} {p.opts} has no help text"
        out = run_cli(name, "--help").stdout
        assert out.startswith(f"Usage: cli.py {name}"), name


def test_hdetr_r50_extract_then_train_head_reads_widths_from_the_cache(tmp_path):
    """``extract --detector hdetr-r50 --random-init`` on real COCO, then ``train-head`` with the H-DETR config."""
    from .conftest import require_coco

    require_coco()
    cache = tmp_path / "hdetr.zarr"
    run_cli("extract", "--detector", "hdetr-r50", "--random-init", "--min-size", "160", "--max-size", "240",
            "--encoder-layers", "4", "--top-k", "30", "--coco-root", COCO_ROOT, "--split", "train2017",
            "--max-images", 3, "--out", cache)
    fp = FeatureCache.open(cache).fingerprint
    assert fp["detector"] == "hdetr-r50" and fp["feature_widths"] == {"c1_channels": 256, "num_feature_levels": 4}
    assert fp["detector_config"]["num_queries_one2one"] == 300  # the release preset
    rec = FeatureCache.open(cache).read(0, encoder_layer=4)
    assert rec.c1.shape[0] == 256 and rec.spatial_shapes.shape == (4, 2)
    run = tmp_path / "run"
    small = ["head.image_encoder_layers=1", "head.box_dim=64", "head.box_encoder_layers=1", "head.num_points=1024"]
    run_cli("train-head", "--cache", cache, "--config", REPO / "configs" / "mfdetr_hdetr_r50.yaml",
            *[a for s in small for a in ("--set", s)], "--max-iters", 2, "--batch-size", 2, "--device", "cpu",
            "--out", run)
    ckpt = load_checkpoint(run / "head.pt")
    assert ckpt["step"] == 2
    assert (ckpt["config"]["head"]["c1_channels"], ckpt["config"]["head"]["num_feature_levels"]) == (256, 4)
    assert ckpt["head"]["neck.proj.weight"].shape == (256, 256, 1, 1)  # the C1 neck on ResNet res2
    # a config that contradicts the cache is refused, naming both values
    cfg = load_config(REPO / "configs" / "mfdetr_hdetr_r50.yaml", ["head.c1_channels=192"])
    with pytest.raises(ConfigError, match=r"head.c1_channels=192 in the config, but .*hdetr.zarr has c1_channels=256"):
        train(cfg, cache, tmp_path / "bad", device="cpu", progress=False)


def test_resume_with_another_impl_continues(tmp_path, small_caches, monkeypatch):
    """--impl is not part of the run's identity: a run stopped under the reference resumes on the kernel."""
    from kernels import ops
    from pipeline import train as train_module

    if not ops.compiled_available("cpu"):
        pytest.skip("CPU kernel not built")
    cfg = load_config(CONFIG, list(SMALL_HEAD) + ["train.checkpoint_every=1", "train.max_iters=2",
                                                  "train.batch_size=2"])
    real_save = train_module.save_checkpoint

    def save_then_stop(path, **payload):  # the run dies right after its step-1 checkpoint
        real_save(path, **payload)
        if payload["step"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_stop)
    try:
        train_module.train(cfg, small_caches["train"], tmp_path / "run", device="cpu", progress=False,
                           impl="reference")
    except KeyboardInterrupt:
        pass
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 1
    result = train_module.train(cfg, small_caches["train"], tmp_path / "run", device="cpu", progress=False,
                                resume=True, impl="cpu")
    straight = train_module.train(cfg, small_caches["train"], tmp_path / "straight", device="cpu", progress=False,
                                  impl="cpu")
    assert result["step"] == straight["step"] == 2
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["impl"]) for r in records] == [(1, "reference"), (2, "cpu")]
    # the resumed run continued the same training: its losses are the uninterrupted run's, up to the
    # kernels' float32 rounding (weights are not compared: Adam's first steps turn rounding-level
    # gradient differences of near-zero entries into lr-sized ones)
    losses = {}
    for name in ("run", "straight"):
        lines = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [l["loss"] for l in lines if "loss" in l]
    assert len(losses["run"]) == len(losses["straight"]) == 2
    torch.testing.assert_close(losses["run"], losses["straight"], atol=1e-4, rtol=1e-4)
