"""CLI commands a user runs before/around the main job: check-weights, params, env; dask workers."""

from __future__ import annotations

import argparse

import numpy as np
import torch
import zarr

from pipeline.detectors import build_detector

from .conftest import COCO_ROOT, REPO, SMALL_EXTRACT, run_cli


def test_check_weights_reports_ok_and_mismatch(tmp_path):
    torch.manual_seed(0)
    model = build_detector("dino-focalnet", preset="golden-small")
    sd = model.state_dict()
    good = tmp_path / "official_like.pth"
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
                "lr_scheduler": {"last_epoch": 11}, "epoch": 11,
                "args": argparse.Namespace(backbone="focalnet_L_384_22k_fl4", lr=1e-4)}, good)
    proc = run_cli("check-weights", "--preset", "golden-small", "--weights", good)
    assert proc.stdout.strip().endswith("OK") and "missing keys: 0" in proc.stdout
    bad_sd = dict(sd)
    bad_sd["transformer.level_embed"] = torch.zeros(4, 256)
    bad_sd.pop("transformer.tgt_embed.weight")
    bad_sd["extra.head.weight"] = torch.zeros(3)
    bad = tmp_path / "other_model.pth"
    torch.save({"model": bad_sd}, bad)
    proc = run_cli("check-weights", "--preset", "golden-small", "--weights", bad, check=False)
    assert proc.returncode == 1
    for key in ("transformer.level_embed", "transformer.tgt_embed.weight", "extra.head.weight", "MISMATCH"):
        assert key in proc.stdout, key


def test_params_counts_paper_table16_row():
    out = run_cli("params", "--widths", "dino-focalnet", "--set", "head.neck=false", "--set", "head.fuse_c1=false",
                  "--set", "head.image_encoder_layers=2").stdout
    assert "(3.24 M)" in out  # Table 16, 2 image / 2 box layers
    assert "(4.08 M)" in run_cli("params", "--widths", "dino-focalnet").stdout  # default: Table 16 (3, 2) + C1 neck


def test_params_of_the_hdetr_r50_head_is_the_papers():
    out = run_cli("params", "--config", REPO / "configs" / "mfdetr_hdetr_r50.yaml", "--widths", "hdetr-r50").stdout
    assert "c1_channels=256, num_feature_levels=4" in out
    total = int(out.strip().splitlines()[-1].split()[1].replace(",", ""))
    assert total == 3_261_712 and abs(total / 3.26e6 - 1) < 0.03  # paper Table 12/14: 3.26 M
    proc = run_cli("params", "--config", REPO / "configs" / "mfdetr_hdetr_r50.yaml", check=False)
    assert proc.returncode == 2 and "--widths DETECTOR" in proc.stderr
    proc = run_cli("params", "--widths", "hdetr-r50", "--set", "head.c1_channels=192", check=False)
    assert proc.returncode == 2 and "head.c1_channels=192 in the config" in proc.stderr


def test_detectors_lists_releases():
    out = run_cli("detectors").stdout
    lines = {l.split()[0] + ":" + l.split()[1]: l for l in out.splitlines()[1:] if l.split()[0] in
             ("dino-focalnet", "hdetr-r50", "hdetr-swin-l")}
    assert set(lines) == {"dino-focalnet:large", "hdetr-r50:release", "hdetr-swin-l:release", "hdetr-swin-l:n900"}
    assert "focalnet_large_fl4_o365_finetuned_on_coco.pth" in lines["dino-focalnet:large"]
    assert "r50_hybrid_branch_lambda1_group6_t1500_dp0_mqs_lft" in lines["hdetr-r50:release"]
    assert "_t1500_n900_" in lines["hdetr-swin-l:n900"]
    assert lines["hdetr-r50:release"].split()[2:6] == ["50.0", "45.7", "256", "4"]  # box AP, MB/img, C1, L
    assert "golden-small" in run_cli("detectors", "--all").stdout


def test_env_prints_versions():
    out = run_cli("env").stdout
    assert "torch" in out and "zarr" in out and "nvcc" in out and "CUDA archs compiled in" in out
    impls = next(line for line in out.splitlines() if line.startswith("ms_deform_attn implementations"))
    assert "reference" in impls
    from kernels import ops

    assert ("cpu," in impls) == ops.compiled_available("cpu")
    # an explicit kernel that is not built: a clear error naming how to build it
    if not ops.compiled_available("cuda"):
        proc = run_cli("train-head", "--cache", "nowhere.zarr", "--impl", "cuda", "--out", "nowhere", check=False)
        assert proc.returncode == 2 and "pip install -e" in proc.stderr, proc.stderr


def test_two_dask_workers_write_the_same_store(tmp_path, small_caches):
    out = tmp_path / "workers.zarr"
    run_cli("extract", *SMALL_EXTRACT, "--coco-root", COCO_ROOT, "--split", "val2017", "--max-images", 10,
            "--workers", 2, "--out", out)
    a, b = zarr.open_group(str(out), mode="r"), zarr.open_group(str(small_caches["val"]), mode="r")
    for name in ("queries", "logits", "boxes", "done", "c1", "encoder/layer_4", "encoder/layer_6"):
        assert np.array_equal(a[name][...], b[name][...]), name


def test_check_weights_hdetr_ignores_only_profiler_keys(tmp_path):
    torch.manual_seed(0)
    sd = build_detector("hdetr-r50", preset="golden-small").state_dict()
    path = tmp_path / "hdetr_official_like.pth"
    torch.save({"model": {**sd, "total_ops": torch.zeros(1, dtype=torch.float64),
                          "backbone.0.body.layer1.0.conv1.total_params": torch.zeros(1, dtype=torch.float64)},
                "optimizer": {"state": {}, "param_groups": [{"lr": 2e-4}]}, "epoch": 35,
                "args": argparse.Namespace(backbone="resnet50", num_queries_one2one=300)}, path)
    proc = run_cli("check-weights", "--detector", "hdetr-r50", "--preset", "golden-small", "--weights", path)
    assert proc.stdout.strip().endswith("OK") and "unexpected keys: 0" in proc.stdout
    assert "ignored keys (profiler keys ending in total_params / total_ops): 2" in proc.stdout
    proc = run_cli("check-weights", "--detector", "hdetr-r50", "--weights", path, check=False)  # release preset
    assert proc.returncode == 1 and "shape mismatches: 85" in proc.stdout  # the README: FFN, heads, query_embed
