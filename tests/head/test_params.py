"""Parameter counts against the paper's ▲#params column (shared/papers/params-reconstruction.md)."""

import pytest

from pipeline.head import HeadConfig, build_head, count_parameters, parameter_table

from ._synthetic import DINO_WIDTHS, HDETR_R50_WIDTHS

# Table 16 (DINO + FocalNet-L): 5-level image encoder, no C1 neck, 128-d box/query stack.
TABLE16 = [((2, 2), 3.24, 3_244_752), ((2, 3), 3.62, 3_620_656), ((3, 2), 4.03, 4_026_288),
           ((3, 3), 4.40, 4_402_192), ((4, 4), 5.56, 5_559_632)]
NECK_192 = 192 * 256 + 256 + 2 * 256  # PWConv(192, 256) + GroupNorm(32, 256) = 49,920


@pytest.mark.parametrize("layers,printed,exact", TABLE16)
def test_table16_rows_without_neck(layers, printed, exact):
    head, _, _ = build_head(HeadConfig.from_dict({**DINO_WIDTHS, "neck": False, "fuse_c1": False, "image_encoder_layers": layers[0],
                             "box_encoder_layers": layers[1]}))
    n = count_parameters(head)
    assert round(n / 1e6, 2) == printed
    assert n == exact


def test_default_config_total():
    head, _, _ = build_head(HeadConfig.from_dict(DINO_WIDTHS))
    n = count_parameters(head)
    print(f"default head parameters: {n:,}")
    assert NECK_192 == 49_920
    assert n == 4_026_288 + NECK_192 == 4_076_208
    table = parameter_table(head)
    assert sum(c for _, c in table) == n
    assert dict(table) == {"neck": 49_920, "image_encoder": 3 * 781_536, "channel_mapper": 32_896,
                           "query_proj": 32_896, "box_pos_embed": 131_072, "box_encoder": 2 * 177_632,
                           "query_encoder": 2 * (66_304 + 131_968), "mask_head": 0, "mask_scoring": 733_008}


HDETR = HDETR_R50_WIDTHS
BASE_T2 = {**HDETR, "neck": False, "box_dim": 256, "box_encoder_layers": 0, "box_pos_embed": False,
           "query_ffn": False, "query_b2o": False, "mask_scoring": False}
T4 = {**HDETR, "neck": False, "image_encoder_layers": 2, "query_ffn": False, "query_b2o": False,
      "mask_scoring": False}


@pytest.mark.parametrize("overrides,printed", [
    ({**BASE_T2, "image_encoder_layers": 1}, 0.76),  # Table 2
    ({**BASE_T2, "image_encoder_layers": 2}, 1.51),
    ({**BASE_T2, "image_encoder_layers": 3}, 2.27),
    ({**BASE_T2, "image_encoder_layers": 2, "box_pos_embed": True, "box_encoder_layers": 1}, 2.46),  # Table 3
    ({**BASE_T2, "image_encoder_layers": 2, "box_pos_embed": True, "box_encoder_layers": 2}, 3.14),
    ({**BASE_T2, "image_encoder_layers": 2, "box_pos_embed": True, "box_encoder_layers": 3}, 3.82),
    ({**T4, "box_dim": 128}, 2.07),  # Table 4
    ({**T4, "box_dim": 96}, 1.87),
    ({**T4, "box_dim": 64}, 1.71),
    ({**T4, "query_ffn": True}, 2.33),  # Table 5
    ({**T4, "query_ffn": True, "query_b2o": True}, 2.46),
    ({**HDETR, "image_encoder_layers": 2, "mask_scoring": False}, 2.53),  # Table 12
    ({**HDETR, "image_encoder_layers": 2}, 3.26),
    ({**HDETR, "image_encoder_layers": 2, "mask_head": "segmenter"}, 3.29),  # Table 14
])
def test_hdetr_ablation_rows(overrides, printed):
    head, _, _ = build_head(HeadConfig.from_dict(overrides))
    assert round(count_parameters(head) / 1e6, 2) == printed


def test_hdetr_default_exact():
    head, _, _ = build_head(HeadConfig.from_dict({**HDETR, "image_encoder_layers": 2}))
    assert count_parameters(head) == 3_261_712


def test_block_registry_counts_are_the_papers_blocks():
    """params-reconstruction.md: Swin 795,592 (window 14) / 791,560 (window 8), ConvNeXt 539,136 at 256-d;
    Swin blocks alternate unshifted / shifted windows."""
    from pipeline.head.encoders import build_blocks

    def count(m):
        return sum(p.numel() for p in m.parameters())

    swin = build_blocks("swin", 2, 256, window=14)
    assert [count(b) for b in swin] == [795_592, 795_592]
    assert [b.attn.shift_size for b in swin] == [[0, 0], [7, 7]]
    assert count(build_blocks("swin", 1, 256, window=8)[0]) == 791_560
    assert count(build_blocks("convnext", 1, 256)[0]) == 539_136
    assert count(build_blocks("deformable", 1, 256, n_levels=4, d_ffn=1024)[0]) == 756_864
    with pytest.raises(ValueError, match="unknown encoder block kind"):
        build_blocks("resnet", 1, 256)
