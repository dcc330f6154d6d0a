"""DINO deformable transformer (Zhang et al., "DINO: DETR with Improved DeNoising Anchor Boxes"), eval path.

Re-implementation of ``models/dino/deformable_transformer.py``, ``models/dino/utils.py`` and
``models/dino/position_encoding.py`` of FocalNet/FocalNet-DINO
(commit 23901e021dc6ec8f66bad47983f45a25574452cc) for the configuration of
``config/DINO/DINO_5scale_focalnet_large_fl4.py``: deformable encoder (post-norm, no final
norm), two-stage ``'standard'`` mixed query selection with learnt content queries
(``embed_init_tgt=True``), deformable decoder ``['sa', 'ca', 'ffn']`` with iterative box
refinement ("look forward twice" is a training-time gradient path; at eval it is the plain
iterative update) and a final decoder LayerNorm.  Denoising queries (``dn_number``) only exist
in training and are not implemented.

Parameter names equal the official ones (``transformer.level_embed``, ``transformer.encoder.layers.*``,
``transformer.decoder.{layers,norm,ref_point_head,bbox_embed,class_embed}``, ``transformer.tgt_embed``,
``transformer.enc_output[_norm]``, ``transformer.enc_out_{class,bbox}_embed``).

Dtypes: as in the official code, geometric helper tensors (sine position embeddings, valid
ratios, encoder reference points, two-stage proposals, the sine-embedding frequencies) are
computed in float32 and then cast to the model dtype.  The cast is exact, so a ``.double()``
model reproduces the official float64 run.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from pipeline.detectors.detr_common import (
    MLP,
    DeformableDecoderLayer,
    DeformableEncoder,
    encoder_output_proposals,
    flatten_levels,
    inverse_sigmoid,
    query_sine_embedding,
)
from pipeline.layers.deformable import MSDeformAttn


class DINODecoder(nn.Module):
    """DINO deformable decoder with iterative box refinement (official ``TransformerDecoder``).

    Keys: ``layers.{i}``, ``norm`` (final LayerNorm applied to every layer's output for the
    heads), ``ref_point_head`` (MLP ``2*D -> D -> D``), ``bbox_embed.{i}`` (MLP ``D -> D -> D -> 4``)
    and ``class_embed.{i}`` (Linear ``D -> num_classes``).  With ``share_heads=True`` (DINO's
    ``dec_pred_{class,bbox}_embed_share``) all layers hold the SAME head modules.

    Args:
        num_layers, d_model, d_ffn, n_levels, n_heads, n_points, activation: layer sizes.
        num_classes: logits per query.
        share_class_head, share_bbox_head: one shared head for all layers (True in DINO).
    """

    def __init__(self, num_layers: int, d_model: int, d_ffn: int, n_levels: int, n_heads: int, n_points: int,
                 num_classes: int, activation: str = "relu",
                 share_class_head: bool = True, share_bbox_head: bool = True):
        super().__init__()
        self.d_model = d_model
        self.num_layers = num_layers
        self.layers = nn.ModuleList([
            DeformableDecoderLayer(d_model, d_ffn, n_levels, n_heads, n_points, activation=activation)
            for _ in range(num_layers)])
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        bbox = MLP(d_model, d_model, 4, 3)
        cls = nn.Linear(d_model, num_classes)
        # DINO init: prior-probability bias on the classifier, zero last box layer
        nn.init.constant_(cls.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.zeros_(bbox.layers[-1].weight)
        nn.init.zeros_(bbox.layers[-1].bias)
        self.bbox_embed = nn.ModuleList(
            [bbox if share_bbox_head else copy.deepcopy(bbox) for _ in range(num_layers)])
        self.class_embed = nn.ModuleList(
            [cls if share_class_head else copy.deepcopy(cls) for _ in range(num_layers)])

    def forward(self, tgt: Tensor, memory: Tensor, memory_padding_mask: Tensor, refpoints_unsigmoid: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor, valid_ratios: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Decode.

        Args:
            tgt: ``[B, Q, D]`` initial content queries.
            memory: ``[B, S, D]``; memory_padding_mask: ``[B, S]`` bool (True = padding).
            refpoints_unsigmoid: ``[B, Q, 4]`` initial boxes as logits (cxcywh, valid-region normalized).
            spatial_shapes: ``[L, 2]`` int64; level_start_index: ``[L]`` int64.
            valid_ratios: ``[B, L, 2]`` float32 ``(w, h)``.

        Returns:
            ``(hs, references)``: ``num_layers`` tensors ``[B, Q, D]`` (each layer output AFTER
            ``norm``) and ``num_layers + 1`` boxes ``[B, Q, 4]`` (sigmoid cxcywh; ``[0]`` is the
            initial box, ``[l+1] = sigmoid(bbox_embed[l](un-normed output_l) + inverse_sigmoid(ref_l))``).
        """
        output = tgt
        reference_points = refpoints_unsigmoid.sigmoid()
        references = [reference_points]
        intermediate = []
        ratios = torch.cat([valid_ratios, valid_ratios], -1).to(memory.dtype)  # [B, L, 4]
        num_feats = self.d_model // 2
        for layer_id, layer in enumerate(self.layers):
            ref_input = reference_points[:, :, None] * ratios[:, None]  # [B, Q, L, 4]
            query_pos = self.ref_point_head(query_sine_embedding(ref_input[:, :, 0, :], num_feats))
            output = layer(output, query_pos, ref_input, memory, memory_padding_mask, spatial_shapes,
                           level_start_index)
            new_reference_points = (self.bbox_embed[layer_id](output) + inverse_sigmoid(reference_points)).sigmoid()
            reference_points = new_reference_points.detach()
            references.append(new_reference_points)
            intermediate.append(self.norm(output))
        return intermediate, references


class DINOTransformer(nn.Module):
    """DINO deformable transformer with two-stage mixed query selection (official ``DeformableTransformer``).

    Keys: ``level_embed [L, D]``, ``encoder``, ``decoder``, ``tgt_embed [num_queries, D]``,
    ``enc_output``, ``enc_output_norm``, ``enc_out_bbox_embed`` (MLP), ``enc_out_class_embed``
    (Linear) (separate copies: ``two_stage_{class,bbox}_embed_share=False``).

    Args:
        d_model: hidden dim D (256).
        nhead: attention heads.
        num_queries: decoder queries (900 in DINO-FocalNet-L).
        num_encoder_layers, num_decoder_layers: depths (6, 6).
        dim_feedforward: FFN width (2048).
        num_feature_levels: L (5).
        enc_n_points, dec_n_points: deformable sampling points (4, 4).
        num_classes: logits (91 for COCO).
        activation: FFN activation ("relu").
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_queries: int = 900, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, num_feature_levels: int = 5,
                 enc_n_points: int = 4, dec_n_points: int = 4, num_classes: int = 91, activation: str = "relu"):
        super().__init__()
        self.d_model = d_model
        self.num_queries = num_queries
        self.num_feature_levels = num_feature_levels
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self.encoder = DeformableEncoder(num_encoder_layers, d_model, dim_feedforward, num_feature_levels, nhead,
                                         enc_n_points, activation)
        self.decoder = DINODecoder(num_decoder_layers, d_model, dim_feedforward, num_feature_levels, nhead,
                                   dec_n_points, num_classes, activation)
        self.tgt_embed = nn.Embedding(num_queries, d_model)
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        self.reset_parameters()
        self.enc_out_bbox_embed = copy.deepcopy(self.decoder.bbox_embed[0])
        self.enc_out_class_embed = copy.deepcopy(self.decoder.class_embed[0])

    def reset_parameters(self) -> None:
        """Official ``_reset_parameters``: xavier-uniform for every >1-D weight, then the deformable
        attention init, normal ``level_embed`` and ``tgt_embed``."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)
        nn.init.normal_(self.tgt_embed.weight)
        for bbox in self.decoder.bbox_embed:
            nn.init.zeros_(bbox.layers[-1].weight)
            nn.init.zeros_(bbox.layers[-1].bias)

    def forward(self, srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor]) -> dict:
        """Encoder, two-stage query selection and decoder.

        Args:
            srcs: L maps ``[B, D, H_l, W_l]`` (input-projected features).
            masks: L masks ``[B, H_l, W_l]`` bool (True = padding).
            pos_embeds: L sine embeddings ``[B, D, H_l, W_l]``.

        Returns:
            dict with
            ``spatial_shapes [L, 2]`` int64, ``level_start_index [L]`` int64,
            ``valid_ratios [B, L, 2]`` float32 ``(w, h)``, ``mask_flatten [B, S]`` bool,
            ``encoder_input [B, S, D]``, ``encoder_pos [B, S, D]`` (pos + level embed),
            ``encoder_layer_outputs`` (list of ``[B, S, D]``, one per layer), ``memory [B, S, D]``,
            ``enc_output_memory [B, S, D]`` (``enc_output_norm(enc_output(masked memory))``),
            ``output_proposals [B, S, 4]`` (logits, +inf where invalid),
            ``enc_outputs_class_unselected [B, S, C]``, ``enc_outputs_bbox_delta_unselected [B, S, 4]``,
            ``topk_indices [B, Q]`` int64 (``topk`` of the max class logit; may select padded tokens),
            ``init_box_proposal [B, Q, 4]`` (sigmoid of the selected proposals),
            ``hs_enc [B, Q, D]``, ``enc_outputs_class [B, Q, C]``, ``enc_outputs_coord [B, Q, 4]`` (sigmoid cxcywh),
            ``hs [n_dec, B, Q, D]`` (after the final decoder norm), ``references [n_dec+1, B, Q, 4]``.

        Raises:
            ValueError: wrong number of levels, or fewer tokens than queries.
        """
        src_flatten, mask_flatten, pos_flatten, spatial_shapes, level_start_index, valid_ratios = flatten_levels(
            srcs, masks, pos_embeds, self.level_embed)
        num_tokens = mask_flatten.shape[1]
        if num_tokens < self.num_queries:
            raise ValueError(f"{num_tokens} encoder tokens is fewer than num_queries={self.num_queries}; "
                             "the input image is too small")

        enc_outs = self.encoder(src_flatten, pos_flatten, spatial_shapes, level_start_index, valid_ratios,
                                mask_flatten)
        memory = enc_outs[-1]

        output_memory, output_proposals = encoder_output_proposals(memory, mask_flatten, spatial_shapes)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        class_unselected = self.enc_out_class_embed(output_memory)
        delta_unselected = self.enc_out_bbox_embed(output_memory)
        coord_unselected = delta_unselected + output_proposals  # logits
        topk_indices = torch.topk(class_unselected.max(-1)[0], self.num_queries, dim=1)[1]
        refpoint_unsig = torch.gather(coord_unselected, 1, topk_indices.unsqueeze(-1).expand(-1, -1, 4))
        init_box_proposal = torch.gather(output_proposals, 1, topk_indices.unsqueeze(-1).expand(-1, -1, 4)).sigmoid()
        hs_enc = torch.gather(output_memory, 1, topk_indices.unsqueeze(-1).expand(-1, -1, self.d_model))
        hs, references = self.decode(memory, mask_flatten, refpoint_unsig.detach(), spatial_shapes,
                                     level_start_index, valid_ratios)
        return {
            "spatial_shapes": spatial_shapes,
            "level_start_index": level_start_index,
            "valid_ratios": valid_ratios,
            "mask_flatten": mask_flatten,
            "encoder_input": src_flatten,
            "encoder_pos": pos_flatten,
            "encoder_layer_outputs": enc_outs,
            "memory": memory,
            "enc_output_memory": output_memory,
            "output_proposals": output_proposals,
            "enc_outputs_class_unselected": class_unselected,
            "enc_outputs_bbox_delta_unselected": delta_unselected,
            "topk_indices": topk_indices,
            "init_box_proposal": init_box_proposal,
            "hs_enc": hs_enc,
            "enc_outputs_class": self.enc_out_class_embed(hs_enc),
            "enc_outputs_coord": refpoint_unsig.sigmoid(),
            "hs": hs,
            "references": references,
        }

    def decode(self, memory: Tensor, mask_flatten: Tensor, refpoint_unsig: Tensor, spatial_shapes: Tensor,
               level_start_index: Tensor, valid_ratios: Tensor) -> tuple[Tensor, Tensor]:
        """The decoder from given initial boxes, with the learnt content queries ``tgt_embed``.

        The part of :meth:`forward` after the two-stage selection (official
        ``DeformableTransformer.forward`` from ``self.decoder(...)`` on, ``embed_init_tgt=True``).
        Exposed so that the decoder can be checked on its own, from another run's initial boxes.

        Args:
            memory: ``[B, S, D]`` encoder output; mask_flatten: ``[B, S]`` bool (True = padding).
            refpoint_unsig: ``[B, Q, 4]`` initial boxes as logits (cxcywh, valid-region normalized;
                ``+inf`` for invalid proposals, as the official code lets them through).
            spatial_shapes: ``[L, 2]`` int64; level_start_index: ``[L]`` int64;
            valid_ratios: ``[B, L, 2]`` float32 ``(w, h)``.

        Returns:
            ``(hs [n_dec, B, Q, D]`` after the final decoder norm, ``references [n_dec+1, B, Q, 4]`` sigmoid).

        Raises:
            ValueError: ``Q`` differs from ``num_queries``.
        """
        bs, num_queries = refpoint_unsig.shape[:2]
        if num_queries != self.num_queries:
            raise ValueError(f"refpoint_unsig has {num_queries} queries, the decoder has {self.num_queries}")
        tgt = self.tgt_embed.weight[None].expand(bs, -1, -1)
        hs, references = self.decoder(tgt, memory, mask_flatten, refpoint_unsig, spatial_shapes,
                                      level_start_index, valid_ratios)
        return torch.stack(hs), torch.stack(references)
