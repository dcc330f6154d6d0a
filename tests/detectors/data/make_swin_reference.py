"""Regenerate ``swin_official_reference.pt``: the official H-Deformable-DETR Swin on seeded weights.

Runs ``models/swin_transformer.py`` of HDETR/H-Deformable-DETR (commit f58ceb1165da4b0cd10e9a5a30c7a77fbd33f492)
at a reduced size (embed 8, depths 1/1/2/1, heads 1/2/2/4, window 7; the code path of Swin-L with
fewer channels and blocks), with timm / mmcv / mmdet stubbed (they are only used for weight
initialisation and pretrained loading), on two inputs whose sizes are not multiples of the patch
or window size, in float32 and float64. Stores float16-exact weights and every stage's output
(stage 0 un-normed = the mask head's C1; stages 1..3 through ``norm{i}``).

    python tests/detectors/data/make_swin_reference.py --repo <H-Deformable-DETR checkout> \\
        --out tests/detectors/data/swin_official_reference.pt
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch
from torch import nn

CONFIG = dict(embed_dim=8, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], window_size=7)
SIZES = [(61, 83), (37, 129)]


def _stub_imports() -> None:
    layers = types.ModuleType("timm.models.layers")
    layers.DropPath = lambda p: nn.Identity()
    layers.to_2tuple = lambda x: (x, x) if isinstance(x, int) else tuple(x)
    layers.trunc_normal_ = lambda t, std=1.0: nn.init.trunc_normal_(t, std=std)
    sys.modules.update({"timm": types.ModuleType("timm"), "timm.models": types.ModuleType("timm.models"),
                        "timm.models.layers": layers})
    mmcv_custom = types.ModuleType("mmcv_custom")
    mmcv_custom.load_checkpoint = None
    mmdet_utils = types.ModuleType("mmdet.utils")
    mmdet_utils.get_root_logger = None
    sys.modules.update({"mmcv_custom": mmcv_custom, "mmdet": types.ModuleType("mmdet"), "mmdet.utils": mmdet_utils})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repo", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    _stub_imports()
    sys.path.insert(0, str(args.repo / "models"))
    import swin_transformer  # noqa: E402  (the official file)

    torch.manual_seed(0)
    model = swin_transformer.SwinTransformer(drop_path_rate=0.0, out_indices=(1, 2, 3), use_checkpoint=False,
                                             **CONFIG)
    model.eval()
    sd = model.state_dict()
    g = torch.Generator().manual_seed(1)
    for key, value in sd.items():
        if value.is_floating_point():
            noise = torch.randn(value.shape, generator=g)
            value = 1 + 0.1 * noise if key.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight")) \
                else noise * (0.5 / max(1, value.shape[-1]) ** 0.5 if value.dim() > 1 else 0.05)
            sd[key] = value.half().float()
    model.load_state_dict(sd)
    stage0 = {}
    model.layers[0].register_forward_hook(lambda m, i, o: stage0.__setitem__("x", o[0]))
    inputs, outputs = [], {}
    for h, w in SIZES:
        inputs.append(torch.randn(1, 3, h, w, generator=g))
    for dtype, key in ((torch.float32, "float32"), (torch.float64, "float64")):
        model.to(dtype)
        outs = []
        for x in inputs:
            with torch.no_grad():
                out = model(x.to(dtype))
            h0, w0 = -(-x.shape[-2] // 4), -(-x.shape[-1] // 4)
            c1 = stage0["x"].view(1, h0, w0, -1).permute(0, 3, 1, 2).contiguous()
            outs.append([c1] + [out[str(i)] for i in (1, 2, 3)])
        outputs[key] = outs
    torch.save({"config": CONFIG, "state_dict": {k: v.half() if v.is_floating_point() else v for k, v in sd.items()},
                "inputs": inputs, "outputs": outputs,
                "source": "HDETR/H-Deformable-DETR@f58ceb1165da4b0cd10e9a5a30c7a77fbd33f492 models/swin_transformer.py"},
               args.out)


if __name__ == "__main__":
    main()
