"""HeadConfig: defaults = the paper's final DINO-FocalNet-L design; bad values fail loudly."""

import pytest

from pipeline.head import HeadConfig, build_head


def test_defaults_are_the_final_dino_design():
    cfg = HeadConfig()
    assert (cfg.image_encoder_layers, cfg.box_encoder_layers) == (3, 2)  # Table 16
    assert cfg.box_dim == 128 and cfg.roi_size == 32  # Tables 4, 10
    assert cfg.query_ffn and cfg.query_b2o and not cfg.query_o2o  # Table 5
    assert cfg.neck and cfg.mask_scoring and cfg.mask_head == "dot_product"  # Tables 12, 14
    assert cfg.num_feature_levels is None and cfg.c1_channels is None  # the cache's, never a default
    assert cfg.num_points == 12544 and cfg.target_size == 112


def test_from_dict_roundtrip_and_unknown_keys():
    cfg = HeadConfig.from_dict({"box_dim": 64, "mask_head": "segmenter"})
    assert HeadConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown HeadConfig keys"):
        HeadConfig.from_dict({"box_dims": 64})


@pytest.mark.parametrize("bad", [
    {"mask_head": "conv"},
    {"activation": "silu"},
    {"box_dim": 100},  # not divisible by 8 heads
    {"neck": False, "fuse_c1": True, "c1_channels": 192, "num_feature_levels": 5},  # C1 cannot be added to a 256-d map
    {"importance_sample_ratio": 1.5},
    {"image_encoder_layers": -1},
])
def test_invalid_configs_raise(bad):
    with pytest.raises(ValueError):
        build_head(HeadConfig.from_dict(bad))


def test_widths_come_from_the_cache():
    with pytest.raises(ValueError, match="c1_channels / head.num_feature_levels are not set"):
        build_head(HeadConfig.from_dict({"box_dim": 64}))
    cfg = HeadConfig.from_dict({"box_dim": 64})
    assert not cfg.has_widths
    resolved = cfg.with_widths(256, 4, source="cache.zarr")
    assert resolved.has_widths and (resolved.c1_channels, resolved.num_feature_levels) == (256, 4)
    assert resolved.box_dim == 64 and cfg.c1_channels is None  # a copy
    assert HeadConfig.from_dict({"c1_channels": 256}).with_widths(256, 4).num_feature_levels == 4
    with pytest.raises(ValueError, match=r"head.c1_channels=192 in the config, but cache.zarr has c1_channels=256"):
        HeadConfig.from_dict({"c1_channels": 192}).with_widths(256, 4, source="cache.zarr")
    build_head(resolved)  # builds once the widths are known
