"""Experiment configs: every shipped YAML builds a head; overrides and errors name what is wrong."""

import pytest

from pipeline.config import ConfigError, load_config, save_config
from pipeline.detectors import detector_widths
from pipeline.head import build_head, count_parameters

from .conftest import REPO

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_builds(path):
    cfg = load_config(path)
    head_cfg = cfg.head
    assert not head_cfg.has_widths  # the detector-dependent widths come from the cache, never from a config
    # a row built for one detector's widths (its `widths:` line) is checked with those; others with both
    choices = ([detector_widths(cfg.widths)] if cfg.widths is not None else
               [{"c1_channels": 192, "num_feature_levels": 5}, {"c1_channels": 256, "num_feature_levels": 4}])
    for widths in choices:
        head = build_head(head_cfg.with_widths(**widths))[0]
        # only a head with no trained component (the training-free baseline of Eq. 1-4) has no parameters
        h = head_cfg
        untrained = not (h.image_encoder_layers or h.box_encoder_layers or h.mask_scoring or h.box_pos_embed
                         or h.query_ffn or h.query_b2o or h.query_o2o or (h.neck and h.fuse_c1)
                         or h.box_dim != h.hidden_dim)
        assert (count_parameters(head) == 0) == untrained, path.name


def test_default_is_the_paper_recipe():
    cfg = load_config(REPO / "configs" / "mfdetr_dino_focalnet_l.yaml")
    t = cfg.train
    assert (t.lr, t.betas, t.weight_decay, t.batch_size, t.epochs) == (1.5e-4, (0.9, 0.999), 5e-5, 8, 6)
    assert t.lr_drops == (0.9, 0.95) and t.lr_drop_factor == 0.1 and t.encoder_layer == 4
    h = cfg.head
    assert (h.image_encoder_layers, h.box_encoder_layers, h.box_dim, h.roi_size) == (3, 2, 128, 32)
    assert h.num_points == 112 * 112 and h.oversample_ratio == 3 and h.importance_sample_ratio == 0.75


def test_overrides_base_and_errors(tmp_path):
    cfg = load_config(REPO / "configs" / "ablations" / "t4_hidden64.yaml", ["train.lr=1e-3", "head.roi_size=16"])
    assert cfg.head.box_dim == 64 and cfg.head.roi_size == 16 and cfg.train.lr == 1e-3
    base = load_config(REPO / "configs" / "mfdetr_hdetr_r50.yaml")  # t4_hidden64's base
    assert cfg.head.image_encoder_layers == base.head.image_encoder_layers == 2  # from the base file
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml").to_dict() == cfg.to_dict()
    with pytest.raises(ConfigError, match="unknown key.*'lrr'"):
        load_config(None, ["train.lrr=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("head:\n  box_dimm: 3\n")
    with pytest.raises(ConfigError, match="bad.yaml.*box_dimm"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="evaluate.top_n"):
        load_config(None, ["evaluate.top_n=0"])
    with pytest.raises(ConfigError, match="mask_threshold"):
        load_config(None, ["evaluate.mask_threshold=1.5"])
    with pytest.raises(ConfigError, match="unknown HeadConfig keys.*top_n"):  # one home for top_n: evaluate
        load_config(None, ["head.top_n=50"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
