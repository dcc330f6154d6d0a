"""Multi-process head training (issue 21): torchrun with gloo on the CPU equals one process at the same global batch.

``head.mask_loss=full`` makes the loss deterministic (the sampled-point loss draws its random points
per rank, so there two ranks and one process see different, equally distributed points).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from pipeline.checkpoint import load_checkpoint
from pipeline.distributed import RankBatches

from .conftest import REPO, head_sets, run_cli

SETS = head_sets(["head.mask_loss=full", "train.checkpoint_every=1"])


def test_rank_batches_split_each_global_batch():
    order = [5, 3, 0, 4, 1, 2, 6]
    ranks = [list(RankBatches(order, 3, r, 2)) for r in range(2)]
    assert ranks[0] == [[5, 3], [4, 1], [6]] and ranks[1] == [[0], [2], []]
    for g in range(3):  # the ranks' shares of each step are that step's single-process batch
        assert ranks[0][g] + ranks[1][g] == list(RankBatches(order, 3))[g]


def _losses(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_gloo_two_ranks_match_one_process_and_resume_with_one(tmp_path, small_caches):
    common = ["train-head", "--cache", small_caches["train"], *SETS, "--max-iters", 3, "--batch-size", 3,
              "--device", "cpu", "--quiet"]
    run_cli(*common, "--out", tmp_path / "single")
    # two ranks (gloo), killed after their step-2 checkpoint, then resumed by ONE process
    env = {**os.environ, "MFDETR_FAULT": "train.mid_step:3", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", str(REPO / "cli.py"), *map(str, common), "--out",
                           str(tmp_path / "ddp")], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode != 0, "the injected fault should have stopped the ranks"
    ckpt = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")
    assert ckpt["step"] == 2, proc.stdout + proc.stderr
    ddp, single = _losses(tmp_path / "ddp"), _losses(tmp_path / "single")
    assert [r["world_size"] for r in ddp] == [2, 2]
    for a, b in zip(ddp, single[:2]):  # the global batch's loss, summed over the ranks
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]) and abs(a["grad_norm"] - b["grad_norm"]) <= \
            1e-4 * b["grad_norm"]
    run_cli(*common, "--out", tmp_path / "ddp", "--resume")
    one, two = load_checkpoint(tmp_path / "single" / "head.pt"), load_checkpoint(tmp_path / "ddp" / "head.pt")
    assert one["step"] == two["step"] == 3
    for k, v in one["head"].items():
        torch.testing.assert_close(two["head"][k], v, rtol=1e-3, atol=1e-5, msg=k)
    assert any(not torch.equal(v, ckpt["head"][k]) for k, v in two["head"].items())  # step 3 trained
