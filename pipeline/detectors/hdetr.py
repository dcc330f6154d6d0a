"""Frozen H-Deformable-DETR (Jia et al., "DETRs with Hybrid Matching", CVPR 2023) with ResNet-50 or Swin-L, eval path.

Re-implementation of ``models/deformable_detr.py::DeformableDETR``, ``models/deformable_transformer.py``
and ``models/backbone.py`` of HDETR/H-Deformable-DETR (commit f58ceb1165da4b0cd10e9a5a30c7a77fbd33f492)
for the released configurations ``..._hybrid_branch_lambda1_group6_t1500_dp0_mqs_lft_deformable_detr_plus_
iterative_bbox_refinement_plus_plus_two_stage`` (R50, Swin-L, Swin-L n900): two-stage Deformable DETR with
iterative box refinement, mixed query selection (learnt content queries ``query_embed``, positional
queries from the selected proposals), look-forward-twice (a training-time gradient path: at eval
the references are the plain iterative update) and the hybrid branch's extra one-to-many queries.

Eval, as ``engine.evaluate`` runs it: only the ``num_queries_one2one`` one-to-one queries are used
(``query_embed.weight[:Q]``, two-stage top-``Q``, no self-attention mask); the one-to-many rows of
``query_embed`` exist only so that the released file loads.  Quirks kept from the official code:

* the two-stage top-k ranks the encoder tokens by **class column 0** (``enc_outputs_class[..., 0]``),
  not by the best class as DINO does;
* the decoder's positional query is computed once, from the selected proposals
  (``pos_trans_norm(pos_trans(get_proposal_pos_embed(.)))[..., :D]``), not per layer;
* there is no final decoder norm: the heads read every layer's raw output, and the last layer's
  ``pred_boxes`` equal the decoder's last reference bit for bit;
* ``class_embed.{0..6}`` / ``bbox_embed.{0..6}`` are per layer (index 6 is the two-stage encoder head)
  and are registered a second time as ``transformer.decoder.{class,bbox}_embed.*`` (tied keys).

Backbones (``backbone.0.body``): torchvision's ResNet-50 with ``FrozenBatchNorm2d`` (the official code
builds the same torchvision module; 4 buffers per norm) whose layer2..4 (strides 8/16/32) feed the
encoder and whose ``layer1`` (res2, stride 4, 256 channels) is the mask head's ``C1``; or Swin-L
(:mod:`pipeline.detectors.swin`) with ``out_indices=(1, 2, 3)`` and stage 0 (stride 4, 192 channels,
no norm) as ``C1``.  A 4th encoder level is a 3x3/stride-2 conv on the last map.

Dtypes: the sine position embedding, valid ratios, encoder reference points, two-stage proposals and
their validity test, and the proposal sine-embedding frequencies are float32 islands, as in the
official float64 run (see ``../shared/detector/README.md``, H-DETR section).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d

from pipeline.detectors.base import KeyReport
from pipeline.record import SampleRecord
from pipeline.detectors.checkpoint import load_checkpoint as _load_checkpoint_file
from pipeline.detectors.detr_common import (
    COCO_CATEGORY_IDS,
    MLP,
    DeformableDecoderLayer,
    DeformableEncoder,
    PositionEmbeddingSine,
    build_input_proj,
    check_extract_args,
    check_images_and_mask,
    encoder_output_proposals,
    extract_records,
    frozen_or_trainable,
    flatten_levels,
    inverse_sigmoid,
    level_inputs,
    mask_to,
    patch_stage_shapes,
    query_sine_embedding,
)
from pipeline.detectors.swin import SwinTransformer
from pipeline.layers.deformable import MSDeformAttn

#: Keys the official H-DETR loader leaves out of its unexpected-key warning: buffers that the ``thop``
#: profiler attaches to every module (``total_ops``, ``total_params``) and that a released file may hold.
PROFILER_KEY_SUFFIXES: tuple[str, ...] = ("total_params", "total_ops")


class ResNet50Body(nn.Module):
    """torchvision ResNet-50 with ``FrozenBatchNorm2d``, returning res2..res5 (official ``Backbone('resnet50')``).

    The parameters live under ``body`` (torchvision's ``IntermediateLayerGetter``: ``conv1``, ``bn1``,
    ``layer1..4``; no ``fc``), exactly as the official ``BackboneBase.body``.
    """

    num_channels = (256, 512, 1024, 2048)

    def __init__(self):
        super().__init__()
        resnet = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
        self.body = IntermediateLayerGetter(
            resnet, return_layers={"layer1": "res2", "layer2": "res3", "layer3": "res4", "layer4": "res5"})

    def forward(self, x: Tensor) -> list[Tensor]:
        """``[B, 3, H, W]`` -> ``[res2, res3, res4, res5]``, strides 4/8/16/32, channels 256/512/1024/2048."""
        return list(self.body(x).values())

    @staticmethod
    def feature_shapes(height: int, width: int) -> list[tuple[int, int]]:
        """``(H_i, W_i)`` of res2..res5: the stem (7x7/s2/p3 conv, 3x3/s2/p1 max-pool) and every stride-2
        stage halve with rounding up."""
        h, w = height, width
        shapes = []
        for i in range(5):
            h, w = (h + 1) // 2, (w + 1) // 2
            if i >= 1:
                shapes.append((h, w))
        return shapes


class SwinBody(nn.Module):
    """Swin backbone under ``body`` (official ``TransformerBackbone``); returns every stage's map."""

    def __init__(self, embed_dim: int, depths: Sequence[int], num_heads: Sequence[int], window_size: int):
        super().__init__()
        self.body = SwinTransformer(embed_dim=embed_dim, depths=depths, num_heads=num_heads,
                                    window_size=window_size, out_indices=(1, 2, 3))
        self.num_channels = tuple(self.body.num_features)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``[B, 3, H, W]`` -> 4 maps, strides 4/8/16/32 (stage 0 un-normed, 1..3 through ``norm{i}``)."""
        return self.body(x)

    def feature_shapes(self, height: int, width: int) -> list[tuple[int, int]]:
        """``(H_i, W_i)`` of the 4 stages."""
        return patch_stage_shapes(height, width, self.body.num_layers)


class HDETRDecoder(nn.Module):
    """Deformable decoder with iterative box refinement and a fixed positional query (official
    ``DeformableTransformerDecoder``, ``return_intermediate=True``, ``look_forward_twice=True``).

    Keys: ``layers.{i}``, then ``bbox_embed.{0..n}`` and ``class_embed.{0..n}`` (``n = num_layers``;
    the extra one is the two-stage encoder head), as the official model assigns them.

    Args:
        num_layers, d_model, d_ffn, n_levels, n_heads, n_points: layer sizes.
        num_classes: logits per query.
    """

    def __init__(self, num_layers: int, d_model: int, d_ffn: int, n_levels: int, n_heads: int, n_points: int,
                 num_classes: int):
        super().__init__()
        self.num_layers = num_layers
        self.layers = nn.ModuleList(
            DeformableDecoderLayer(d_model, d_ffn, n_levels, n_heads, n_points) for _ in range(num_layers))
        bbox = MLP(d_model, d_model, 4, 3)
        cls = nn.Linear(d_model, num_classes)
        nn.init.constant_(cls.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.zeros_(bbox.layers[-1].weight)
        nn.init.zeros_(bbox.layers[-1].bias)
        self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox) for _ in range(num_layers + 1))
        self.class_embed = nn.ModuleList(copy.deepcopy(cls) for _ in range(num_layers + 1))

    def forward(self, tgt: Tensor, reference_points: Tensor, memory: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, valid_ratios: Tensor, query_pos: Tensor,
                memory_padding_mask: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Decode.

        Args:
            tgt: ``[B, Q, D]`` content queries.
            reference_points: ``[B, Q, 4]`` initial boxes, sigmoid cxcywh normalized to the valid image.
            memory: ``[B, S, D]``; spatial_shapes ``[L, 2]`` int64; level_start_index ``[L]`` int64;
            valid_ratios: ``[B, L, 2]`` float32 ``(w, h)``.
            query_pos: ``[B, Q, D]`` positional queries (the same for every layer).
            memory_padding_mask: ``[B, S]`` bool, True on padding.

        Returns:
            ``(hs, references)``: ``num_layers`` raw layer outputs ``[B, Q, D]`` (no final norm) and
            ``num_layers + 1`` boxes ``[B, Q, 4]``: ``[0]`` the initial boxes, ``[l+1] =
            sigmoid(bbox_embed[l](hs[l]) + inverse_sigmoid(references[l]))``.
        """
        output = tgt
        references = [reference_points]
        hs = []
        ratios = torch.cat([valid_ratios, valid_ratios], -1).to(memory.dtype)
        for lid, layer in enumerate(self.layers):
            ref_input = reference_points[:, :, None] * ratios[:, None]
            output = layer(output, query_pos, ref_input, memory, memory_padding_mask, spatial_shapes,
                           level_start_index)
            new_reference_points = (self.bbox_embed[lid](output) + inverse_sigmoid(reference_points)).sigmoid()
            reference_points = new_reference_points.detach()
            hs.append(output)
            references.append(new_reference_points)
        return hs, references


class HDETRTransformer(nn.Module):
    """Two-stage deformable transformer with mixed query selection (official ``DeformableTransformer``).

    Keys: ``level_embed [L, D]``, ``encoder.layers.*``, ``decoder.*`` (see :class:`HDETRDecoder`),
    ``enc_output``, ``enc_output_norm``, ``pos_trans [2D, 2D]``, ``pos_trans_norm``.

    Args:
        d_model: D (256; the official proposal embedding hard-codes 128 features per coordinate).
        nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, num_feature_levels,
        enc_n_points, dec_n_points: sizes (8, 6, 6, 2048, 4, 4, 4 released).
        num_classes: logits (91).
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 2048, num_feature_levels: int = 4, enc_n_points: int = 4,
                 dec_n_points: int = 4, num_classes: int = 91):
        super().__init__()
        self.d_model = d_model
        self.num_feature_levels = num_feature_levels
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self.encoder = DeformableEncoder(num_encoder_layers, d_model, dim_feedforward, num_feature_levels, nhead,
                                         enc_n_points)
        self.decoder = HDETRDecoder(num_decoder_layers, d_model, dim_feedforward, num_feature_levels, nhead,
                                    dec_n_points, num_classes)
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        self.pos_trans = nn.Linear(2 * d_model, 2 * d_model)
        self.pos_trans_norm = nn.LayerNorm(2 * d_model)
        for name, p in self.named_parameters():
            if p.dim() > 1 and ".bbox_embed." not in name and ".class_embed." not in name:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor], query_embed: Tensor) -> dict:
        """Encoder, two-stage selection of ``Q = len(query_embed)`` proposals, decoder.

        Args:
            srcs: L maps ``[B, D, H_l, W_l]``; masks: L ``[B, H_l, W_l]`` bool (True = padding);
            pos_embeds: L sine embeddings ``[B, D, H_l, W_l]``.
            query_embed: ``[Q, D]`` content queries (the one-to-one rows of ``query_embed.weight``).

        Returns:
            dict with ``spatial_shapes [L, 2]``, ``level_start_index [L]``, ``valid_ratios [B, L, 2]`` float32,
            ``mask_flatten [B, S]``, ``encoder_input [B, S, D]``, ``encoder_pos [B, S, D]``,
            ``encoder_layer_outputs`` (list of ``[B, S, D]``), ``memory``, ``enc_output_memory [B, S, D]``,
            ``output_proposals [B, S, 4]`` (logits, +inf where invalid), ``enc_outputs_class_unselected [B, S, C]``,
            ``enc_outputs_bbox_delta_unselected [B, S, 4]``, ``enc_outputs_coord_unact [B, S, 4]``,
            ``topk_indices [B, Q]`` (top-Q of class column 0), ``topk_coords_unact [B, Q, 4]``,
            ``enc_outputs_class [B, Q, C]``, ``enc_outputs_coord [B, Q, 4]`` (sigmoid), ``init_box_proposal [B, Q, 4]``,
            ``decoder_query_pos [B, Q, D]``, ``hs [n_dec, B, Q, D]`` (raw), ``references [n_dec+1, B, Q, 4]``.

        Raises:
            ValueError: wrong number of levels, or fewer tokens than queries.
        """
        src_flatten, mask_flatten, pos_flatten, spatial_shapes, level_start_index, valid_ratios = flatten_levels(
            srcs, masks, pos_embeds, self.level_embed)
        num_queries = query_embed.shape[0]
        if mask_flatten.shape[1] < num_queries:
            raise ValueError(f"{mask_flatten.shape[1]} encoder tokens is fewer than {num_queries} queries; "
                             "the input image is too small")
        enc_outs = self.encoder(src_flatten, pos_flatten, spatial_shapes, level_start_index, valid_ratios,
                                mask_flatten)
        memory = enc_outs[-1]
        output_memory, output_proposals = encoder_output_proposals(memory, mask_flatten, spatial_shapes)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        head = self.decoder.num_layers
        class_unselected = self.decoder.class_embed[head](output_memory)
        delta_unselected = self.decoder.bbox_embed[head](output_memory)
        coord_unact = delta_unselected + output_proposals
        topk_indices = torch.topk(class_unselected[..., 0], num_queries, dim=1)[1]
        index4 = topk_indices.unsqueeze(-1).expand(-1, -1, 4)
        topk_coords_unact = torch.gather(coord_unact, 1, index4)
        hs, references, query_pos = self.decode(memory, mask_flatten, topk_coords_unact, spatial_shapes,
                                                level_start_index, valid_ratios, query_embed)
        return {
            "spatial_shapes": spatial_shapes, "level_start_index": level_start_index, "valid_ratios": valid_ratios,
            "mask_flatten": mask_flatten, "encoder_input": src_flatten, "encoder_pos": pos_flatten,
            "encoder_layer_outputs": enc_outs, "memory": memory, "enc_output_memory": output_memory,
            "output_proposals": output_proposals, "enc_outputs_class_unselected": class_unselected,
            "enc_outputs_bbox_delta_unselected": delta_unselected, "enc_outputs_coord_unact": coord_unact,
            "topk_indices": topk_indices, "topk_coords_unact": topk_coords_unact,
            "enc_outputs_class": torch.gather(class_unselected, 1,
                                              topk_indices.unsqueeze(-1).expand(-1, -1, class_unselected.shape[-1])),
            "enc_outputs_coord": topk_coords_unact.sigmoid(),
            "init_box_proposal": torch.gather(output_proposals, 1, index4).sigmoid(),
            "decoder_query_pos": query_pos, "hs": hs, "references": references,
        }

    def decode(self, memory: Tensor, mask_flatten: Tensor, topk_coords_unact: Tensor, spatial_shapes: Tensor,
               level_start_index: Tensor, valid_ratios: Tensor, query_embed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The part of :meth:`forward` after the two-stage selection (exposed to check the decoder on its own).

        Args:
            memory: ``[B, S, D]``; mask_flatten: ``[B, S]`` bool (True = padding).
            topk_coords_unact: ``[B, Q, 4]`` selected proposals + deltas, as logits (cxcywh, valid-image normalized).
            spatial_shapes: ``[L, 2]``; level_start_index: ``[L]``; valid_ratios: ``[B, L, 2]`` float32.
            query_embed: ``[Q, D]`` content queries.

        Returns:
            ``(hs [n_dec, B, Q, D]`` raw layer outputs, ``references [n_dec+1, B, Q, 4]`` sigmoid,
            ``query_pos [B, Q, D]``): ``query_pos`` is the first D channels of
            ``pos_trans_norm(pos_trans(get_proposal_pos_embed(topk_coords_unact)))``.

        Raises:
            ValueError: ``Q`` differs between ``topk_coords_unact`` and ``query_embed``.
        """
        bs, num_queries = topk_coords_unact.shape[:2]
        if query_embed.shape[0] != num_queries:
            raise ValueError(f"topk_coords_unact has {num_queries} queries, query_embed {query_embed.shape[0]}")
        reference_points = topk_coords_unact.sigmoid()
        proposal_embed = query_sine_embedding(reference_points, self.d_model // 2, 10000.0, order="xywh")
        query_pos = self.pos_trans_norm(self.pos_trans(proposal_embed))[..., :self.d_model]
        tgt = query_embed[None].expand(bs, -1, -1)
        hs, references = self.decoder(tgt, reference_points, memory, spatial_shapes, level_start_index,
                                      valid_ratios, query_pos, mask_flatten)
        return torch.stack(hs), torch.stack(references), query_pos


class HDETR(nn.Module):
    """H-Deformable-DETR (two-stage, box refinement, mixed selection, hybrid queries) on ResNet-50 or Swin, eval only.

    Implements the :class:`~pipeline.detectors.base.Detector` protocol.  All sizes are constructor
    arguments; the presets (:data:`PRESETS_R50`, :data:`PRESETS_SWIN_L`) give the released models.

    Args:
        backbone: ``"resnet50"`` or ``"swin"``.
        hidden_dim, nheads, dim_feedforward, enc_layers, dec_layers, num_feature_levels,
        enc_n_points, dec_n_points: transformer sizes (256, 8, 2048, 6, 6, 4, 4, 4 released).
        num_queries_one2one: one-to-one queries, the only ones used at eval (300 released; 900 for Swin-L n900).
        num_queries_one2many: hybrid-branch queries (1500), rows of ``query_embed`` unused at eval.
        num_classes: logits (91; column c is COCO category id c).
        swin_embed_dim, swin_depths, swin_num_heads, swin_window_size: Swin sizes (192, (2,2,18,2),
            (6,12,24,48), 7 for Swin-L); ignored for ResNet-50.
        category_ids: real dataset category ids among the logit columns (COCO's 80 by default).

    Raises:
        ValueError: unknown backbone, fewer feature levels than backbone outputs, category ids outside
            ``[0, num_classes)``, or ``hidden_dim != 256`` (the official proposal embedding fixes 2 x 256).
    """

    def __init__(self, backbone: str = "resnet50", hidden_dim: int = 256, nheads: int = 8, dim_feedforward: int = 2048,
                 enc_layers: int = 6, dec_layers: int = 6, num_feature_levels: int = 4, enc_n_points: int = 4,
                 dec_n_points: int = 4, num_queries_one2one: int = 300, num_queries_one2many: int = 1500,
                 num_classes: int = 91, swin_embed_dim: int = 192, swin_depths: Sequence[int] = (2, 2, 18, 2),
                 swin_num_heads: Sequence[int] = (6, 12, 24, 48), swin_window_size: int = 7,
                 category_ids: Sequence[int] = COCO_CATEGORY_IDS):
        super().__init__()
        if backbone not in ("resnet50", "swin"):
            raise ValueError(f"backbone must be 'resnet50' or 'swin', got {backbone!r}")
        if hidden_dim != 256:
            raise ValueError(f"hidden_dim must be 256 (the official get_proposal_pos_embed fixes 128 features "
                             f"per coordinate), got {hidden_dim}")
        bad = [c for c in category_ids if not 0 <= int(c) < num_classes]
        if bad:
            raise ValueError(f"category ids {bad} are outside the {num_classes} logit columns")
        if num_feature_levels < 3:
            raise ValueError(f"num_feature_levels={num_feature_levels} < 3 backbone outputs")
        self._config = dict(
            backbone=backbone, hidden_dim=hidden_dim, nheads=nheads, dim_feedforward=dim_feedforward,
            enc_layers=enc_layers, dec_layers=dec_layers, num_feature_levels=num_feature_levels,
            enc_n_points=enc_n_points, dec_n_points=dec_n_points, num_queries_one2one=num_queries_one2one,
            num_queries_one2many=num_queries_one2many, num_classes=num_classes, swin_embed_dim=swin_embed_dim,
            swin_depths=[int(d) for d in swin_depths], swin_num_heads=[int(h) for h in swin_num_heads],
            swin_window_size=swin_window_size, category_ids=[int(c) for c in category_ids])
        self.name = "hdetr-r50" if backbone == "resnet50" else "hdetr-swin-l"  # the registry name
        self.hidden_dim = hidden_dim
        self.num_classes = num_classes
        self.num_queries = num_queries_one2one
        self.num_queries_one2one = num_queries_one2one
        self.num_queries_one2many = num_queries_one2many
        self.num_encoder_layers = enc_layers
        self.num_decoder_layers = dec_layers
        self.num_feature_levels = num_feature_levels
        self._category_ids = tuple(int(c) for c in category_ids)

        # registration order = the official one: transformer, class_embed, bbox_embed, query_embed, input_proj, backbone
        self.transformer = HDETRTransformer(hidden_dim, nheads, enc_layers, dec_layers, dim_feedforward,
                                            num_feature_levels, enc_n_points, dec_n_points, num_classes)
        self.class_embed = self.transformer.decoder.class_embed
        self.bbox_embed = self.transformer.decoder.bbox_embed
        self.query_embed = nn.Embedding(num_queries_one2one + num_queries_one2many, hidden_dim)
        body = ResNet50Body() if backbone == "resnet50" else SwinBody(
            swin_embed_dim, swin_depths, swin_num_heads, swin_window_size)
        self.c1_channels = body.num_channels[0]
        channels = list(body.num_channels[1:])
        self.input_proj = build_input_proj(channels, hidden_dim, num_feature_levels)
        # backbone.0 = the body, backbone.1 = Deformable-DETR's sine position embedding (no weights)
        self.backbone = nn.ModuleList([
            body, PositionEmbeddingSine(hidden_dim // 2, 10000.0, 10000.0, normalize=True, offset=0.5)])

    # ------------------------------------------------------------------ protocol helpers
    def config(self) -> dict:
        """JSON-serialisable constructor arguments (lists instead of tuples)."""
        return dict(self._config)

    def class_to_category_id(self) -> dict[int, int]:
        """Logit column -> dataset category id for the real classes (identity on ``category_ids``)."""
        return {c: c for c in self._category_ids}

    def feature_shapes(self, height: int, width: int) -> tuple[Tensor, tuple[int, int]]:
        """Shapes :meth:`forward` produces for an UNPADDED ``height x width`` image (pure arithmetic).

        Returns:
            ``(spatial_shapes [L, 2] int64, (H1, W1))``: encoder levels (strides 8, 16, 32, 64 for the
            released 4 levels) and the stride-4 ``C1`` map.

        Raises:
            ValueError: non-positive size.
        """
        if height <= 0 or width <= 0:
            raise ValueError(f"image size must be positive, got {height}x{width}")
        stages = self.backbone[0].feature_shapes(height, width)
        shapes = list(stages[1:])
        h, w = shapes[-1]
        for _ in range(self.num_feature_levels - len(shapes)):
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
            shapes.append((h, w))
        return torch.tensor(shapes, dtype=torch.long), stages[0]

    def load_checkpoint(self, path: str, strict: bool = True) -> KeyReport:
        """Load an official checkpoint file (see :func:`pipeline.detectors.checkpoint.load_checkpoint`).

        Keys ending in ``total_params`` / ``total_ops`` (``thop`` profiler buffers, which the official
        loader also ignores) are dropped when the model lacks them and listed in ``report.ignored``;
        every other key is checked strictly.

        Raises:
            CheckpointError: unreadable file, or (``strict``) missing / unexpected / mis-shaped keys.
        """
        return _load_checkpoint_file(self, path, strict=strict, ignore_suffixes=PROFILER_KEY_SUFFIXES)

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor, mask: Tensor) -> dict:
        """Official H-DETR eval forward (one-to-one queries) on a padded batch, with intermediate tensors.

        Args:
            images: ``[B, 3, H, W]`` ImageNet-normalised RGB, zero-padded; cast to the parameter dtype.
            mask: ``[B, H, W]`` bool, True on padding.

        Returns:
            dict with everything of :meth:`HDETRTransformer.forward` plus ``c1 [B, C1, H/4, W/4]`` and
            ``c1_mask`` (ResNet res2 / Swin stage 0), ``backbone_features`` (the 3 maps fed to the encoder,
            strides 8/16/32), ``masks`` (L interpolated masks), ``srcs``, ``pos_embeds`` (L maps each),
            ``all_pred_logits [n_dec, B, Q, C]``, ``all_pred_boxes [n_dec, B, Q, 4]`` (sigmoid cxcywh,
            normalized to the valid image), ``pred_logits``, ``pred_boxes`` (last layer), ``hs_last [B, Q, D]``.

        Raises:
            ValueError: bad shapes.
        """
        check_images_and_mask(images, mask)
        dtype = self.input_proj[0][0].weight.dtype
        images = images.to(dtype)
        mask = mask.to(torch.bool)
        body, pos_embed = self.backbone[0], self.backbone[1]
        stages = body(images)
        c1, feats = stages[0], stages[1:]
        srcs, masks, poss = level_inputs(self.input_proj, feats, mask, pos_embed, self.num_feature_levels, dtype)
        out = self.transformer(srcs, masks, poss, self.query_embed.weight[:self.num_queries_one2one])
        logits, boxes = self.predict(out["hs"], out["references"])
        out.update(c1=c1, c1_mask=mask_to(mask, c1.shape[-2:]), backbone_features=feats, masks=masks, srcs=srcs,
                   pos_embeds=poss, all_pred_logits=logits, all_pred_boxes=boxes, pred_logits=logits[-1],
                   pred_boxes=boxes[-1], hs_last=out["hs"][-1])
        return out

    def predict(self, hs: Tensor, references: Tensor) -> tuple[Tensor, Tensor]:
        """Per-layer class and box heads (official ``DeformableDETR.forward`` after the transformer).

        Args:
            hs: ``[n_dec, B, Q, D]`` raw decoder outputs.
            references: ``[n_dec+1, B, Q, 4]`` sigmoid cxcywh boxes.

        Returns:
            ``(logits [n_dec, B, Q, C], boxes [n_dec, B, Q, 4])``: ``class_embed[l](hs[l])`` and
            ``sigmoid(bbox_embed[l](hs[l]) + inverse_sigmoid(references[l]))`` (= ``references[l+1]``).
        """
        logits = torch.stack([self.class_embed[i](hs[i]) for i in range(hs.shape[0])])
        boxes = torch.stack([(self.bbox_embed[i](hs[i]) + inverse_sigmoid(references[i])).sigmoid()
                             for i in range(hs.shape[0])])
        return logits, boxes

    def extract(self, images: Tensor, mask: Tensor, encoder_layers: list[int], top_k: int,
                trainable: bool = False) -> list[SampleRecord]:
        """Frozen forward (under ``torch.inference_mode``; with ``trainable`` under autograd) -> one :class:`~pipeline.record.SampleRecord` per image.

        As :meth:`pipeline.detectors.dino_focalnet.DINOFocalNet.extract` (see
        :func:`pipeline.detectors.detr_common.extract_records`); ``c1`` is ResNet's res2 / Swin's stage 0.

        Raises:
            ValueError: a layer outside ``1..enc_layers`` or ``top_k`` outside ``1..num_queries_one2one``.
        """
        layers = check_extract_args(encoder_layers, top_k, self.num_encoder_layers, self.num_queries)
        with frozen_or_trainable(trainable):
            out = self.forward(images, mask)
        return extract_records(out, out["c1"], out["c1_mask"], layers, top_k)


_R50 = dict(backbone="resnet50", hidden_dim=256, nheads=8, dim_feedforward=2048, enc_layers=6, dec_layers=6,
            num_feature_levels=4, enc_n_points=4, dec_n_points=4, num_queries_one2one=300, num_queries_one2many=1500,
            num_classes=91)
_SWIN_L = dict(_R50, backbone="swin", swin_embed_dim=192, swin_depths=(2, 2, 18, 2), swin_num_heads=(6, 12, 24, 48),
               swin_window_size=7)

#: ``release`` = the released R50 model (``r50_hybrid_branch_lambda1_group6_t1500_dp0_mqs_lft_..._two_stage``,
#: 36 epochs); ``golden-small`` = the reduced model of ``golden_hdetr_r50_small.pt`` (FFN 32, 4 heads, 100 + 500 queries).
PRESETS_R50: dict[str, dict] = {
    "release": _R50,
    "golden-small": dict(_R50, nheads=4, dim_feedforward=32, num_queries_one2one=100, num_queries_one2many=500),
}
#: ``release`` = ``drop_path0.5_swin_large_hybrid_branch_lambda1_group6_t1500_dp0_mqs_lft_..._two_stage``
#: (300 + 1500 queries); ``n900`` = its ``_t1500_n900_`` sibling (900 + 1500); ``tiny-test`` = a reduced
#: Swin (embed 32, depths 1/1/2/1, 2 heads per stage, FFN 32, 4 heads, 20 + 10 queries) for fast tests.
PRESETS_SWIN_L: dict[str, dict] = {
    "release": _SWIN_L,
    "n900": dict(_SWIN_L, num_queries_one2one=900),
    "tiny-test": dict(_SWIN_L, swin_embed_dim=32, swin_depths=(1, 1, 2, 1), swin_num_heads=(2, 2, 2, 2),
                      nheads=4, dim_feedforward=32, num_queries_one2one=20, num_queries_one2many=10),
}


_TRICKS = "hybrid_branch_lambda1_group6_t1500{n900}_dp0_mqs_lft_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage_36eps.pth"
#: Released checkpoints per preset (HDETR/H-Deformable-DETR v0.1 release assets) and their COCO val box AP
#: as the repository's README gives it (ImageNet pre-training). The paper's H-DETR models were
#: Objects365-pretrained: 52.2 (R50) and 62.3 (Swin-L) box AP (paper Sec. 3.1 / Table 6).
RELEASES_R50: dict[str, dict] = {
    "release": {"checkpoint": "r50_" + _TRICKS.format(n900=""), "box_ap": 50.0,
                "box_ap_source": "H-Deformable-DETR README (36 epochs); the paper's Objects365 model: 52.2"},
}
RELEASES_SWIN_L: dict[str, dict] = {
    "release": {"checkpoint": "drop_path0.5_swin_large_" + _TRICKS.format(n900=""), "box_ap": 57.1,
                "box_ap_source": "H-Deformable-DETR README (36 epochs); the paper's Objects365 model: 62.3"},
    "n900": {"checkpoint": "drop_path0.5_swin_large_" + _TRICKS.format(n900="_n900"), "box_ap": 57.4,
             "box_ap_source": "H-Deformable-DETR README (36 epochs, 900 queries)"},
}


def _build(presets: dict[str, dict], preset: str, overrides: dict) -> HDETR:
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(presets)}")
    return HDETR(**{**presets[preset], **overrides})


def build_hdetr_r50(preset: str = "release", **overrides) -> HDETR:
    """Build H-DETR + ResNet-50 from a preset of :data:`PRESETS_R50` plus keyword overrides.

    Works under ``with torch.device('meta'):``.

    Raises:
        ValueError: unknown preset.  TypeError: unknown override keyword.
    """
    return _build(PRESETS_R50, preset, overrides)


def build_hdetr_swin_l(preset: str = "release", **overrides) -> HDETR:
    """Build H-DETR + Swin-L from a preset of :data:`PRESETS_SWIN_L` plus keyword overrides.

    Raises:
        ValueError: unknown preset.  TypeError: unknown override keyword.
    """
    return _build(PRESETS_SWIN_L, preset, overrides)
