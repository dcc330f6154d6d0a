"""CLI commands a user runs before/around the main job: check-weights, params, env; dask workers."""

from __future__ import annotations

import argparse

import numpy as np
import torch
import zarr

from pipeline.detectors import build_detector

from .conftest import COCO_ROOT, SMALL_EXTRACT, run_cli


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
    out = run_cli("params", "--set", "head.neck=false", "--set", "head.fuse_c1=false",
                  "--set", "head.image_encoder_layers=2").stdout
    assert "(3.24 M)" in out  # Table 16, 2 image / 2 box layers
    assert "(4.08 M)" in run_cli("params").stdout  # default: Table 16 (3, 2) + C1 neck


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
