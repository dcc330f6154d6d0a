"""Frozen DINO + FocalNet-L detector (the stage-one detector of Mask Frozen-DETR).

Re-implementation of the eval forward of ``models/dino/dino.py::DINO`` (+ ``backbone.py::Joiner``)
of FocalNet/FocalNet-DINO (commit 23901e021dc6ec8f66bad47983f45a25574452cc), config
``config/DINO/DINO_5scale_focalnet_large_fl4.py``: the model that the released
``focalnet_large_fl4_o365_finetuned_on_coco.pth`` was saved from.  Its ``state_dict`` has the
official 869 keys (``backbone.0.*`` = FocalNet, ``backbone.1`` = the weightless sine position
embedding, ``input_proj.{0..4}``, ``transformer.*``, ``label_enc``, and the shared heads under both
``class_embed.{i}`` / ``bbox_embed.{i}`` and ``transformer.decoder.class_embed.{i}`` /
``transformer.decoder.bbox_embed.{i}``), so the release loads unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pipeline.detectors.base import KeyReport
from pipeline.record import SampleRecord
from pipeline.detectors.checkpoint import load_checkpoint as _load_checkpoint_file
from pipeline.detectors.detr_common import (
    COCO_CATEGORY_IDS,
    PositionEmbeddingSine,
    build_input_proj,
    check_extract_args,
    check_images_and_mask,
    extract_records,
    frozen_or_trainable,
    inverse_sigmoid,
    level_inputs,
    patch_stage_shapes,
)
from pipeline.detectors.dino import DINOTransformer
from pipeline.detectors.focalnet import FocalNet


class DINOFocalNet(nn.Module):
    """DINO (5-scale, two-stage mixed query selection, box refinement) on a FocalNet backbone, eval only.

    Implements the :class:`~pipeline.detectors.base.Detector` protocol.  All sizes are
    constructor arguments; the defaults are the official DINO-FocalNet-L fl4 5-scale model
    (228,122,422 unique parameters).

    Args:
        hidden_dim: transformer width D (256).
        nheads: attention heads (8).
        dim_feedforward: transformer FFN width (2048).
        enc_layers, dec_layers: encoder / decoder depths (6, 6).
        num_queries: decoder queries (900).
        num_classes: logits per query (91 = max COCO id + 1; column c is category id c).
        num_feature_levels: encoder levels (5 = 4 backbone stages + one stride-2 3x3 conv level).
        enc_n_points, dec_n_points: deformable attention points (4, 4).
        dn_labelbook_size: rows - 1 of ``label_enc`` (91; the denoising label embedding is unused at eval
            but kept so the checkpoint keys match).
        pe_temperature_h, pe_temperature_w: sine position embedding temperatures (20, 20).
        transformer_activation: FFN activation ("relu").
        embed_dim, depths, mlp_ratio, focal_levels, focal_windows, use_conv_embed, use_postln,
            use_postln_in_modulation, use_layerscale, normalize_modulator, patch_norm, out_indices:
            FocalNet options (see :class:`~pipeline.detectors.focalnet.FocalNet`).
        category_ids: the real dataset category ids among the logit columns (COCO's 80 by default).

    Raises:
        ValueError: inconsistent sizes (fewer feature levels than backbone outputs, category ids
            outside ``[0, num_classes)``).
    """

    name = "dino-focalnet"

    def __init__(self, hidden_dim: int = 256, nheads: int = 8, dim_feedforward: int = 2048, enc_layers: int = 6,
                 dec_layers: int = 6, num_queries: int = 900, num_classes: int = 91, num_feature_levels: int = 5,
                 enc_n_points: int = 4, dec_n_points: int = 4, dn_labelbook_size: int = 91,
                 pe_temperature_h: float = 20.0, pe_temperature_w: float = 20.0,
                 transformer_activation: str = "relu",
                 embed_dim: int = 192, depths: Sequence[int] = (2, 2, 18, 2), mlp_ratio: float = 4.0,
                 focal_levels: int | Sequence[int] = 4, focal_windows: int | Sequence[int] = 3,
                 use_conv_embed: bool = True, use_postln: bool = True, use_postln_in_modulation: bool = False,
                 use_layerscale: bool = True, normalize_modulator: bool = True, patch_norm: bool = True,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 category_ids: Sequence[int] = COCO_CATEGORY_IDS):
        super().__init__()
        self._config = dict(
            hidden_dim=hidden_dim, nheads=nheads, dim_feedforward=dim_feedforward, enc_layers=enc_layers,
            dec_layers=dec_layers, num_queries=num_queries, num_classes=num_classes,
            num_feature_levels=num_feature_levels, enc_n_points=enc_n_points, dec_n_points=dec_n_points,
            dn_labelbook_size=dn_labelbook_size, pe_temperature_h=float(pe_temperature_h),
            pe_temperature_w=float(pe_temperature_w), transformer_activation=transformer_activation,
            embed_dim=embed_dim, depths=[int(d) for d in depths], mlp_ratio=float(mlp_ratio),
            focal_levels=focal_levels if isinstance(focal_levels, int) else [int(v) for v in focal_levels],
            focal_windows=focal_windows if isinstance(focal_windows, int) else [int(v) for v in focal_windows],
            use_conv_embed=use_conv_embed, use_postln=use_postln, use_postln_in_modulation=use_postln_in_modulation,
            use_layerscale=use_layerscale, normalize_modulator=normalize_modulator, patch_norm=patch_norm,
            out_indices=[int(i) for i in out_indices], category_ids=[int(c) for c in category_ids])
        bad = [c for c in category_ids if not 0 <= int(c) < num_classes]
        if bad:
            raise ValueError(f"category ids {bad} are outside the {num_classes} logit columns")
        if num_feature_levels < len(out_indices):
            raise ValueError(f"num_feature_levels={num_feature_levels} < {len(out_indices)} backbone outputs")
        self.hidden_dim = hidden_dim
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.num_encoder_layers = enc_layers
        self.num_decoder_layers = dec_layers
        self.num_feature_levels = num_feature_levels
        self.c1_channels = embed_dim  # FocalNet stage-1 (stride 4) channels: 192 for L
        self._category_ids = tuple(int(c) for c in category_ids)

        # registration order = the official module order (transformer, label_enc, input_proj, backbone, heads)
        self.transformer = DINOTransformer(hidden_dim, nheads, num_queries, enc_layers, dec_layers, dim_feedforward,
                                           num_feature_levels, enc_n_points, dec_n_points, num_classes,
                                           transformer_activation)
        self.label_enc = nn.Embedding(dn_labelbook_size + 1, hidden_dim)
        focalnet = FocalNet(embed_dim=embed_dim, depths=depths, mlp_ratio=mlp_ratio, focal_levels=focal_levels,
                            focal_windows=focal_windows, use_conv_embed=use_conv_embed, use_postln=use_postln,
                            use_postln_in_modulation=use_postln_in_modulation, use_layerscale=use_layerscale,
                            normalize_modulator=normalize_modulator, patch_norm=patch_norm, out_indices=out_indices)
        self.num_backbone_outs = len(focalnet.out_indices)
        channels = [focalnet.num_features[i] for i in focalnet.out_indices]
        self.input_proj = build_input_proj(channels, hidden_dim, num_feature_levels)
        # backbone.0 = FocalNet, backbone.1 = position embedding (no weights), as the official Joiner
        self.backbone = nn.ModuleList([
            focalnet, PositionEmbeddingSine(hidden_dim // 2, pe_temperature_h, pe_temperature_w, normalize=True)])
        # the decoder's heads, registered a second time at the top level (same modules => tied keys)
        self.bbox_embed = self.transformer.decoder.bbox_embed
        self.class_embed = self.transformer.decoder.class_embed

    # ------------------------------------------------------------------ protocol helpers
    def config(self) -> dict:
        """JSON-serialisable constructor arguments (lists instead of tuples)."""
        return dict(self._config)

    def class_to_category_id(self) -> dict[int, int]:
        """Logit column -> dataset category id for the real classes (identity on ``category_ids``).

        For COCO: the 80 ids 1..90 except 12, 26, 29, 30, 45, 66, 68, 69, 71, 83; column 0 and
        the unused ids are dummy columns and are absent from the map.
        """
        return {c: c for c in self._category_ids}

    def feature_shapes(self, height: int, width: int) -> tuple[Tensor, tuple[int, int]]:
        """Shapes :meth:`forward` produces for an UNPADDED ``height x width`` image (pure arithmetic).

        Returns:
            ``(spatial_shapes [L, 2] int64 (H_l, W_l), (H1, W1))``: encoder levels (strides
            4, 8, 16, 32, 64 for the default 5 levels; each extra level is a 3x3/stride-2/pad-1
            conv, i.e. ``ceil(H/2)``) and the stride-4 ``C1`` map.

        Raises:
            ValueError: non-positive size.
        """
        if height <= 0 or width <= 0:
            raise ValueError(f"image size must be positive, got {height}x{width}")
        focal = self.backbone[0]
        stages = patch_stage_shapes(height, width, focal.num_layers)
        shapes = [stages[i] for i in focal.out_indices]
        h, w = shapes[-1]
        for _ in range(self.num_feature_levels - len(shapes)):
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
            shapes.append((h, w))
        return torch.tensor(shapes, dtype=torch.long), stages[0]

    def load_checkpoint(self, path: str, strict: bool = True) -> KeyReport:
        """Load an official checkpoint file into this model (see :func:`pipeline.detectors.checkpoint.load_checkpoint`).

        Raises:
            CheckpointError: unreadable file, or (``strict``) missing / unexpected / mis-shaped keys.
        """
        return _load_checkpoint_file(self, path, strict=strict)

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor, mask: Tensor) -> dict:
        """Official DINO eval forward on a padded batch, with intermediate tensors.

        Args:
            images: ``[B, 3, H, W]`` ImageNet-normalised RGB, zero-padded; cast to the parameter dtype.
            mask: ``[B, H, W]`` bool, True on padding.

        Returns:
            dict with everything of :meth:`DINOTransformer.forward` plus
            ``backbone_features`` (list of ``[B, C_i, H_i, W_i]``, FocalNet ``norm{i}`` outputs, stride ``4*2**i``),
            ``masks`` (list of L ``[B, H_l, W_l]`` bool, the interpolated masks of every level),
            ``srcs`` (list of L ``[B, D, H_l, W_l]`` input-projection outputs),
            ``pos_embeds`` (list of L ``[B, D, H_l, W_l]``),
            ``all_pred_logits [n_dec, B, Q, C]``, ``all_pred_boxes [n_dec, B, Q, 4]`` (sigmoid cxcywh,
            normalized to the valid image),
            ``pred_logits [B, Q, C]``, ``pred_boxes [B, Q, 4]`` (last layer), ``hs_last [B, Q, D]``.

        Raises:
            ValueError: bad shapes.
        """
        check_images_and_mask(images, mask)
        dtype = self.input_proj[0][0].weight.dtype
        images = images.to(dtype)
        mask = mask.to(torch.bool)
        focal, pos_embed = self.backbone[0], self.backbone[1]
        feats = focal(images)
        srcs, masks, poss = level_inputs(self.input_proj, feats, mask, pos_embed, self.num_feature_levels, dtype)
        out = self.transformer(srcs, masks, poss)
        logits, boxes = self.predict(out["hs"], out["references"])
        out.update(backbone_features=feats, masks=masks, srcs=srcs, pos_embeds=poss,
                   all_pred_logits=logits, all_pred_boxes=boxes, pred_logits=logits[-1], pred_boxes=boxes[-1],
                   hs_last=out["hs"][-1])
        return out

    def predict(self, hs: Tensor, references: Tensor) -> tuple[Tensor, Tensor]:
        """Class and box heads on every decoder layer (official ``DINO.forward`` after the transformer).

        Args:
            hs: ``[n_dec, B, Q, D]`` decoder outputs after the final decoder norm.
            references: ``[n_dec+1, B, Q, 4]`` sigmoid cxcywh boxes (layer ``l`` refines ``references[l]``).

        Returns:
            ``(logits [n_dec, B, Q, C], boxes [n_dec, B, Q, 4])``, boxes sigmoid cxcywh normalized to the
            valid image: ``sigmoid(bbox_embed[l](hs[l]) + inverse_sigmoid(references[l]))``.
        """
        logits = torch.stack([self.class_embed[i](hs[i]) for i in range(hs.shape[0])])
        boxes = torch.stack([(self.bbox_embed[i](hs[i]) + inverse_sigmoid(references[i])).sigmoid()
                             for i in range(hs.shape[0])])
        return logits, boxes

    def extract(self, images: Tensor, mask: Tensor, encoder_layers: list[int], top_k: int,
                trainable: bool = False) -> list[SampleRecord]:
        """Frozen forward (under ``torch.inference_mode``; with ``trainable`` under autograd) -> one :class:`~pipeline.record.SampleRecord` per image.

        Queries are ranked by their best sigmoid class score over all columns (descending, stable
        sort, so ties keep query order) and the first ``top_k`` are kept.  Encoder tokens and
        ``c1`` are cropped to the valid region of each level, whose size is the number of
        non-padded rows/columns of that level's interpolated mask.  The returned tensors are
        ordinary (non-inference) tensors in the model dtype; ``extras['scores']`` holds the ``[K]``
        ranking scores.

        Args:
            images: ``[B, 3, H, W]`` ImageNet-normalised, zero-padded.
            mask: ``[B, H, W]`` bool, True on padding.
            encoder_layers: 1-based encoder layers to return (``enc_layers`` = the memory).
            top_k: queries to keep, ``1 <= top_k <= num_queries``.
            trainable: run the forward under autograd instead of ``inference_mode``, so the
                record's tensors carry gradients back to the parameters that require them
                (online fine-tuning, paper Table 11; :mod:`pipeline.online`).

        Raises:
            ValueError: a layer outside ``1..enc_layers`` or ``top_k`` out of range.
        """
        layers = check_extract_args(encoder_layers, top_k, self.num_encoder_layers, self.num_queries)
        with frozen_or_trainable(trainable):
            out = self.forward(images, mask)
        return extract_records(out, out["backbone_features"][0], out["masks"][0], layers, top_k)


_LARGE = dict(hidden_dim=256, nheads=8, dim_feedforward=2048, enc_layers=6, dec_layers=6, num_queries=900,
              num_classes=91, num_feature_levels=5, enc_n_points=4, dec_n_points=4, dn_labelbook_size=91,
              pe_temperature_h=20.0, pe_temperature_w=20.0, embed_dim=192, depths=(2, 2, 18, 2),
              focal_levels=4, focal_windows=3, use_conv_embed=True, use_postln=True,
              use_postln_in_modulation=False, use_layerscale=True, normalize_modulator=True)

#: Named configurations: ``large`` = the official DINO-FocalNet-L fl4 5-scale model;
#: ``golden-small`` = the reduced model of ``golden_dino_focalnet_small.pt``.
PRESETS: dict[str, dict] = {
    "large": _LARGE,
    "golden-small": dict(_LARGE, nheads=4, dim_feedforward=32, num_queries=100, embed_dim=16, depths=(1, 1, 2, 1)),
}


#: Released checkpoints per preset: file name and COCO val box AP (what ``cli.py detectors`` lists).
RELEASES: dict[str, dict] = {
    "large": {"checkpoint": "focalnet_large_fl4_o365_finetuned_on_coco.pth", "box_ap": 63.2,
              "box_ap_source": "Mask Frozen-DETR paper, Table 6 (Objects365 pre-training)"},
}


def build_dino_focalnet(preset: str = "large", **overrides) -> DINOFocalNet:
    """Build :class:`DINOFocalNet` from a named preset (:data:`PRESETS`) plus keyword overrides.

    Works under ``with torch.device('meta'):`` (no data-dependent initialisation).

    Raises:
        ValueError: unknown preset.  TypeError: unknown override keyword.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    return DINOFocalNet(**{**PRESETS[preset], **overrides})
