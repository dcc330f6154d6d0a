"""Every ablation row of the paper from configs/ablations/: ▲#params and ▲FLOPs against the
paper's tables, the FLOP formulas of the sampling operators, and two different ablations plus the
training-free baseline run from ONE cache of real images (the session's small cache; no detector
is built here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.ablations import DEFAULT_TARGETS, config_cost, load_targets, paper_row
from pipeline.config import load_config
from pipeline.train import train

from .conftest import COCO_ROOT, REPO, run_cli, skip_or_fail_without

ABLATIONS = sorted((REPO / "configs" / "ablations").glob("*.yaml"))
TOLERANCE = 0.03
#: rows whose ▲#params we do not reproduce within TOLERANCE, with why (none today; the Table 5
#: O2O row is the closest call, -2.7 %, and says why in its YAML's paper.excuse).
EXCUSED: dict[tuple[int, str], str] = {}
FLOPS_TOLERANCE = 0.03
#: ... or this many G: the paper prints 2 decimals, and Table 1's 0.53 G row is 0.02 G (+3.9 %) below
#: ours because the paper counts its element-wise C1 + up(E) sum (0.01 G), which flop_counter does not
FLOPS_ABS_TOLERANCE_G = 0.03
#: rows whose ▲FLOPs the paper's convention (pipeline.flops "paper", the mean val2017 image,
#: 100 / 300 boxes) does not reproduce within the tolerance, with why (none today). `params --all` prints all 43.
FLOPS_EXCUSED: dict[str, str] = {}
#: rows held to a wider tolerance, with why: Table 1's RoIAlign-off rows are Eq. 1's q . F^T at F's
#: stride-4 grid, 100 x 256 x 200 x 282 = 1.44 G, 3.1 % / 3.7 % (0.05 G) under the printed 1.49 / 1.50 G;
#: the rest is probably element-wise work on the 1/4 map the paper's counter saw (its 0.01 G "1/4 feat."
#: step is the C1 + up(E) sum), which flop_counter counts 0
FLOPS_ROW_TOLERANCE: dict[str, float] = {"t1_roialign_off_quarter_off": 0.05, "t1_roialign_off_quarter_on": 0.05}
#: one row per block kind and table (the 43-row check is `params --all`, ~10 min on a CPU)
FLOPS_ROWS = ("t1_roialign_on_quarter_off", "t1_roialign_off_quarter_off", "t1_roialign_off_quarter_on", "t2_convnext1",
              "t2_swin1", "t2_deformable1", "t3_swin1", "t3_deformable1", "t4_hidden64", "t14_segmenter", "t16_img2_box2")


@pytest.fixture(scope="module")
def targets():
    skip_or_fail_without(DEFAULT_TARGETS, "paper targets (shared/papers/ablation-targets.json)")
    return load_targets()


def test_every_paper_row_with_params_has_a_config_within_3_percent(targets):
    covered, report = set(), []
    for path in ABLATIONS:
        cfg = load_config(path)
        assert cfg.paper is not None and cfg.widths is not None, f"{path.name}: needs paper: and widths:"
        row = paper_row(cfg, targets)  # raises unless the row text is the JSON's exactly
        covered.add((cfg.paper["table"], cfg.paper["row"]))
        if row.get("params_delta_M") is None:
            continue
        ours = config_cost(cfg, flops=False)["params_delta_M"]
        paper = row["params_delta_M"]
        rel = 0.0 if paper == ours == 0 else abs(ours / paper - 1) if paper else float("inf")
        report.append(f"{path.name}: ours {ours:.4f} M, paper {paper} M ({rel:+.2%})")
        if (cfg.paper["table"], cfg.paper["row"]) in EXCUSED:
            continue
        assert rel <= TOLERANCE, f"{path.name}: ▲#params {ours:.4f} M vs the paper's {paper} M ({rel:.2%})"
        if rel > 0.01:
            assert "excuse" in cfg.paper, f"{path.name}: off by {rel:.2%}; say why in paper.excuse"
    print("\n".join(report))
    stated = {key for key, row in targets.items() if row.get("params_delta_M") is not None}
    assert len(stated) == 43
    assert stated - covered - set(EXCUSED) == set(), "paper rows with ▲#params and no config"


def test_params_json_reports_params_flops_widths_and_modules(targets):
    out = json.loads(run_cli("params", "--config", REPO / "configs" / "ablations" / "t12_final.yaml", "--json").stdout)
    assert out["widths"] == {"detector": "hdetr-r50", "c1_channels": 256, "num_feature_levels": 4}
    assert out["params"] == 3_261_712 and sum(out["modules"].values()) == out["params"]
    assert out["paper"]["params_delta_M"] == 3.26 and out["paper"]["table"] == 12
    # the paper's convention: the mean first-100 val2017 image, 100 boxes, deformable sampling 0
    assert out["image_size"] == [800, 1128] and out["num_boxes"] == 100 and out["flops_convention"] == "paper"
    assert abs(out["flops_delta_G"] / 82.09 - 1) < FLOPS_TOLERANCE
    assert out["flops_by_module_G"]["mask_scoring"] == pytest.approx(5.01, abs=0.02)  # paper: 5.02 G
    assert set(out["flops_by_module_G"]) <= set(out["modules"]) | {"roi_align"}
    assert sum(out["flops_by_module_G"].values()) == pytest.approx(out["flops_delta_G"], rel=1e-6)
    # 100 boxes x 32 x 32 bins x 2 x 2 samples x 128 channels x (4 + 1) multiply-adds (+ the 128 x 256 mapper on F)
    assert out["flops_by_module_G"]["roi_align"] >= 100 * 1024 * 4 * 128 * 5 / 1e9


def test_flop_formulas_of_sampling_ops_do_not_depend_on_the_kernel():
    from kernels import ops
    from pipeline.flops import flop_counts

    value, shapes, start = torch.randn(1, 100, 8, 32), torch.tensor([[5, 10], [5, 10]]), torch.tensor([0, 50])
    loc, weights = torch.rand(1, 7, 8, 2, 4, 2), torch.rand(1, 7, 8, 2, 4)
    c1, e = torch.randn(1, 16, 20, 30), torch.randn(1, 16, 10, 15)
    boxes = torch.tensor([[0, 1.0, 2.0, 11.0, 9.0], [0, 0.0, 0.0, 29.0, 19.0]])
    impls = [i for i in ops.available_impls() if i != "auto"]
    assert "reference" in impls
    for impl in impls:
        # Deformable DETR Eq. 3: 7 queries x 8 heads x 32 channels x 2 levels x 4 points x (4 bilinear + 1 weight)
        attn = lambda: ops.ms_deform_attn(value, shapes, start, loc, weights, impl=impl)  # noqa: E731
        assert flop_counts(attn, impl=impl, convention="all")[0] * 1e9 == pytest.approx(7 * 8 * 32 * 2 * 4 * 5)
        if impl != "reference":  # the paper's counter could not see the custom op
            assert flop_counts(attn, impl=impl)[0] == 0
        # RoIAlign: 2 boxes x 4 x 4 bins x 2 x 2 samples x 16 channels x (4 + 1)
        roi = lambda r: ops.fused_roi_align(c1, e, boxes, 4, 1.0, r, impl=impl)  # noqa: E731
        assert flop_counts(lambda: roi(2), impl=impl)[0] * 1e9 == pytest.approx(2 * 16 * 4 * 16 * 5)
        # adaptive: ceil(10 / 4) x ceil(7 / 4) = 6 and ceil(29 / 4) x ceil(19 / 4) = 40 samples per bin
        assert flop_counts(lambda: roi(0), impl=impl)[0] * 1e9 == pytest.approx((6 + 40) * 16 * 16 * 5)
    with pytest.raises(ValueError, match="convention"):
        flop_counts(lambda: None, convention="fvcore")


def test_paper_image_size_is_the_mean_resized_area_of_the_first_100_val_images():
    from pipeline.ablations import mean_resized_area
    from pipeline.head.cost import PAPER_IMAGE_SIZE

    ann = COCO_ROOT / "annotations" / "instances_val2017.json"
    skip_or_fail_without(ann, "COCO val2017 annotations")
    area = mean_resized_area(ann, 100)
    h, w = PAPER_IMAGE_SIZE
    assert h == 800 and abs(h * w / area - 1) < 1e-3, area


def test_flops_of_paper_rows_within_tolerance(targets):
    report = []
    for name in FLOPS_ROWS:
        cfg = load_config(REPO / "configs" / "ablations" / f"{name}.yaml")
        paper = paper_row(cfg, targets)["flops_delta_G"]
        cost = config_cost(cfg)
        ours = cost["flops_delta_G"]
        if not cfg.head.roi_align:  # Eq. 1 at F's grid: 100 boxes x 256 channels x the 200 x 282 C1 map of 800 x 1128
            assert cost["c1_size"] == [200, 282]
            assert cost["flops_by_module_G"] == pytest.approx({"mask_head": 100 * 256 * 200 * 282 / 1e9})
        rel = ours / paper - 1
        report.append(f"{name}: ours {ours:.2f} G, paper {paper} G ({rel:+.2%})")
        close = abs(rel) <= FLOPS_ROW_TOLERANCE.get(name, FLOPS_TOLERANCE) or abs(ours - paper) <= FLOPS_ABS_TOLERANCE_G
        if name in FLOPS_EXCUSED:
            assert not close, f"{name} is excused but matches ({rel:+.2%}): drop its excuse"
            assert "flops_excuse" in cfg.paper, f"{name}: say why in paper.flops_excuse"
            continue
        assert close, f"{name}: ▲FLOPs {ours:.2f} G vs the paper's {paper} G ({rel:+.2%})"
    print("\n".join(report))


def _small(path: Path, extra=()):
    """An ablation config shrunk for the golden-small cache (16-channel C1, 5 levels): no C1
    fusion (a 16-channel C1 cannot be added without a neck), 16 x 16 RoIs, few loss points."""
    return load_config(path, ["head.fuse_c1=false", "head.roi_size=16", "head.num_points=256", "head.target_size=32",
                              "train.max_iters=3", "train.batch_size=2", "train.log_every=1", *extra])


def test_two_ablations_train_from_one_cache_and_the_baseline_evaluates(tmp_path, small_caches, monkeypatch):
    import pipeline.detectors

    def no_detector(*args, **kwargs):
        raise AssertionError("stage two built a detector")

    for name in list(pipeline.detectors.DETECTORS):  # any detector construction in this process fails the test
        monkeypatch.setitem(pipeline.detectors.DETECTORS, name, no_detector)
    losses = {}
    # and a head without RoIAlign (Eq. 1 at F's grid; box_dim 128 gives it a trainable channel mapper + query projection)
    for name, extra in (("t2_swin1", ["head.image_encoder_window=7"]), ("t3_convnext1", []),
                        ("t1_roialign_off_quarter_off", ["head.box_dim=128"])):
        cfg = _small(REPO / "configs" / "ablations" / f"{name}.yaml", extra)
        result = train(cfg, small_caches["train"], tmp_path / name, device="cpu", progress=False)
        assert result["step"] == 3
        lines = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [l["loss"] for l in lines if "loss" in l]
        assert len(losses[name]) == 3 and all(torch.isfinite(torch.tensor(losses[name])))
        ckpt = torch.load(tmp_path / name / "head.pt", weights_only=True)
        assert ckpt["config"]["paper"]["table"] == int(name[1])
    assert any(k.startswith("image_encoder.layers.0.attn.relative_position_bias_table")
               for k in torch.load(tmp_path / "t2_swin1" / "head.pt", weights_only=True)["head"])
    assert any(k.startswith("box_encoder.layers.0.block.0")  # the 7x7 depth-wise conv of a ConvNeXt block
               for k in torch.load(tmp_path / "t3_convnext1" / "head.pt", weights_only=True)["head"])
    # the training-free baseline (Table 1, RoIAlign on, C1 fusion off): evaluated from the cache, no training
    run_cli("evaluate", "--head", "baseline", "--config", REPO / "configs" / "ablations" / "t1_roialign_on_quarter_off.yaml",
            "--cache", small_caches["val"], "--device", "cpu", "--out", tmp_path / "baseline")
    metrics = json.loads((tmp_path / "baseline" / "metrics.json").read_text())
    results = json.loads((tmp_path / "baseline" / "coco_instances_results.json").read_text())
    assert "segm" in metrics and results and all(0.0 <= r["score"] <= 1.0 for r in results)
    # Table 1 RoIAlign off: masks at F's stride-4 grid, pasted into the whole original image (Eq. 2)
    from pipeline.cache import FeatureCache
    from pipeline.inference import baseline_head, evaluate_cache

    cfg = load_config(REPO / "configs" / "ablations" / "t1_roialign_off_quarter_off.yaml",
                      ["evaluate.top_n=20"])  # each mask is pasted over the whole image: few keep the test short
    metrics = evaluate_cache(baseline_head(cfg, small_caches["val"]), cfg, small_caches["val"], tmp_path / "off",
                             progress=False)
    results = json.loads((tmp_path / "off" / "coco_instances_results.json").read_text())
    assert "segm" in metrics and results and all(0.0 <= r["score"] <= 1.0 for r in results)
    cache = FeatureCache.open(small_caches["val"])
    sizes = {int(cache.image_ids[n]): cache.read(n, cfg.train.encoder_layer).orig_size for n in cache.done_indices()}
    assert all(tuple(r["segmentation"]["size"]) == tuple(sizes[r["image_id"]]) for r in results)
    # a trainable config is not a baseline
    proc = run_cli("evaluate", "--head", "baseline", "--config", REPO / "configs" / "ablations" / "t2_convnext1.yaml",
                   "--set", "head.fuse_c1=false", "--cache", small_caches["val"], "--device", "cpu",
                   "--out", tmp_path / "nope", check=False)
    assert proc.returncode == 2 and "trainable parameters" in proc.stderr


def test_configs_needing_what_the_cache_lacks_are_refused_before_training(tmp_path, small_caches):
    base = REPO / "configs" / "ablations" / "t16_img2_box2.yaml"
    cases = [(["--set", "train.encoder_layer=2"], "--encoder-layers 2,4,6"),  # the cache stores layers 4 and 6
             (["--set", "train.num_queries=300"], "--top-k 300"),  # it stores 30 queries per image
             (["--set", "head.num_feature_levels=4"], "--detector dino-focalnet")]  # a 5-level cache
    for extra, flag in cases:
        out = tmp_path / flag.split()[0].strip("-")
        proc = run_cli("train-head", "--config", base, *extra, "--cache", small_caches["train"], "--device", "cpu",
                       "--max-iters", 1, "--out", out, check=False)
        assert proc.returncode == 2 and flag in proc.stderr, proc.stderr
        assert not (out / "checkpoint.pt").exists() and not (out / "metrics.jsonl").exists()
    proc = run_cli("train-head", "--config", REPO / "configs" / "ablations" / "t2_none.yaml", "--set", "head.fuse_c1=false",
                   "--cache", small_caches["train"], "--device", "cpu", "--out", tmp_path / "zero", check=False)
    assert proc.returncode == 2 and "evaluate --head baseline" in proc.stderr
    # fewer queries than stored is fine: the best-scored ones are used
    cfg = _small(REPO / "configs" / "ablations" / "t16_img2_box2.yaml", ["train.num_queries=10", "train.max_iters=1"])
    assert train(cfg, small_caches["train"], tmp_path / "ten", device="cpu", progress=False)["step"] == 1


def test_sweep_trains_each_config_once_and_writes_the_papers_table(tmp_path, small_caches):
    configs = [REPO / "configs" / "ablations" / "t1_roialign_on_quarter_off.yaml",
               REPO / "configs" / "ablations" / "t16_img2_box2.yaml"]
    overrides = ["head.fuse_c1=false", "head.roi_size=16", "head.num_points=256", "head.target_size=32",
                 "train.max_iters=2", "train.batch_size=2"]
    sets = []
    for s in overrides:
        sets += ["--set", s]
    args = ["sweep", "--cache", small_caches["train"], "--val-cache", small_caches["val"], "--no-flops",
            "--device", "cpu", "--out", tmp_path / "sweep", *sets]
    for c in configs:
        args += ["--configs", c]
    run_cli(*args)
    table = (tmp_path / "sweep" / "table.md").read_text()
    assert "RANDOM-INIT" in table
    lines = {l.split("|")[1].strip(): l for l in table.splitlines() if l.startswith("| t")}
    assert set(lines) == {"t1_roialign_on_quarter_off", "t16_img2_box2"}
    t16 = [c.strip() for c in lines["t16_img2_box2"].split("|")[1:-1]]
    # our ▲#params: the config as run (16 x 16 RoIs shrink the positional embedding and the IoU head's
    # first Linear) at its widths: (DINO-FocalNet-L's, not the small cache's); then the paper's row
    as_run = config_cost(load_config(configs[1], overrides), flops=False)["params_delta_M"]
    assert t16[9] == f"{as_run:.2f}" == "2.95" and t16[-1] == "3.24" and t16[10] == "54.9"
    assert not (tmp_path / "sweep" / "t1_roialign_on_quarter_off" / "head.pt").exists()  # evaluated, not trained
    head = tmp_path / "sweep" / "t16_img2_box2" / "head.pt"
    stamp = head.stat().st_mtime_ns
    out = run_cli(*args).stdout  # second run: everything finished, nothing redone
    assert head.stat().st_mtime_ns == stamp and "t16_img2_box2" in out
    # the same --out with another schedule is refused (its finished runs would not be comparable)
    proc = run_cli(*[a if a != "train.max_iters=2" else "train.max_iters=3" for a in args], check=False)
    assert proc.returncode == 2 and "was run with another config" in proc.stderr
