"""HeadConfig: defaults = the paper's final DINO-FocalNet-L design; bad values fail loudly."""

import pytest

from pipeline.head import HeadConfig, build_head


def test_defaults_are_the_final_dino_design():
    cfg = HeadConfig()
    assert (cfg.image_encoder_layers, cfg.box_encoder_layers) == (3, 2)  # Table 16
    assert cfg.box_dim == 128 and cfg.roi_size == 32  # Tables 4, 10
    assert cfg.query_ffn and cfg.query_b2o and not cfg.query_o2o  # Table 5
    assert cfg.neck and cfg.mask_scoring and cfg.mask_head == "dot_product"  # Tables 12, 14
    assert cfg.num_feature_levels == 5 and cfg.c1_channels == 192
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
    {"neck": False, "fuse_c1": True, "c1_channels": 192},  # C1 cannot be added to a 256-d map
    {"importance_sample_ratio": 1.5},
    {"image_encoder_layers": -1},
])
def test_invalid_configs_raise(bad):
    with pytest.raises(ValueError):
        build_head(bad)
