"""Experiment configs: every shipped YAML builds a head; overrides and errors name what is wrong."""

import pytest

from pipeline.config import ConfigError, load_config, save_config
from pipeline.head import HeadConfig, build_head, count_parameters

from .conftest import REPO

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_builds(path):
    cfg = load_config(path)
    head_cfg = cfg.head
    assert not head_cfg.has_widths  # the detector-dependent widths come from the cache, never from a config
    for widths in ({"c1_channels": 192, "num_feature_levels": 5}, {"c1_channels": 256, "num_feature_levels": 4}):
        assert count_parameters(build_head(head_cfg.with_widths(**widths))[0]) > 0


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
    assert cfg.head.image_encoder_layers == 3  # from the base file
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
