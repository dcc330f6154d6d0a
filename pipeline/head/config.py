"""Configuration of the trainable mask head (stage two).

:class:`HeadConfig` holds every architectural, loss, matching and post-processing knob of the
head. Its defaults are the paper's final design for DINO + FocalNet-L (Mask Frozen-DETR,
Table 16 row "3 image layers / 2 box layers", with the Table 4/5/10/12/14 choices); each
ablation row of the paper is one ``HeadConfig`` with a few fields changed (see ``configs/``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Mapping

_MASK_HEADS = ("dot_product", "segmenter")
#: The head's input widths that depend on the detector: read from the cache, never from defaults.
WIDTH_FIELDS = ("c1_channels", "num_feature_levels")
_ACTIVATIONS = ("relu", "gelu")
_BLOCK_KINDS = ("deformable", "swin", "convnext")  # = pipeline.head.encoders.BLOCK_KINDS
_MASK_LOSSES = ("points", "full")
_SCORES = ("auto", "class", "iou", "mask_mean")


@dataclass
class HeadConfig:
    """All settings of the mask head, its criterion and its post-processing.

    Architecture (paper section / table in brackets):

    Attributes:
        hidden_dim: D, channels of the cached encoder tokens, queries and of the fused map F
            (256 for every DETR we use).
        c1_channels: channels of the cached backbone stage-1 map C1 (192 for FocalNet-L,
            256 for ResNet-50, 192 for Swin-L). ``None`` (the default) = read from the cache:
            ``train-head`` fills it from the cache's fingerprint (:meth:`with_widths`), ``params``
            from ``--widths DETECTOR``; a head cannot be built before it is known.
        num_feature_levels: L, levels of the cached encoder tokens (5 for DINO-FocalNet-L,
            4 for H-DETR); ``None`` = read from the cache, as ``c1_channels``. Checked against
            ``spatial_shapes`` at run time.
        image_encoder_layers: deformable encoder blocks over all levels of E (Sec. 3.2,
            Eq. 6, Table 2 / 16); 0 = no image encoder (E is used as cached).
        image_encoder_block: block kind of the image encoder (Table 2): ``"deformable"`` (over all
            levels), ``"swin"`` or ``"convnext"`` (on the finest level E1 only).
        image_encoder_window: Swin window side of the image encoder (14: the Table 2 accounting).
        image_encoder_heads, image_encoder_points: MSDeformAttn (and Swin) heads / points per level.
        image_encoder_ffn_dim: FFN hidden width of the image encoder blocks (1024).
        activation: FFN activation of every head block, ``"gelu"`` (Sec. 3.2: "Linear -> GELU
            -> Linear") or ``"relu"``.
        dropout: dropout inside the transformer blocks (0.0; the paper states none).
        neck: Eq. 14, ``C1 <- GN(PWConv(C1))`` (Table 12). Conv2d(c1_channels, hidden_dim, 1)
            + GroupNorm(32, hidden_dim); not built when ``fuse_c1=False`` (C1 unused). The
            paper's DINO row (Table 16) has no neck; our default keeps it (+49,920 parameters,
            see :class:`pipeline.head.model.MaskFrozenDetrHead`).
        fuse_c1: add (neck-ed) C1 to the up-sampled encoder map (Eq. 1/5). With ``neck=False``
            this needs ``c1_channels == hidden_dim``; the DINO Table 16 accounting is
            ``neck=False, fuse_c1=False`` (F = the encoder's own stride-4 level only).
        roi_align: Table 1's "RoIAlign" switch. ``False`` = the mask of Eq. 1 over the whole
            image: ``q_i . F^T`` at F's own stride-4 grid ``[H1, W1]`` (no RoIAlign, boxes unused),
            trained against targets at that grid and interpolated to the image when pasted (Eq. 2).
            Nothing per box exists then, so it needs ``box_encoder_layers=0``, no
            ``box_pos_embed``, no query layers, no ``mask_scoring`` and ``mask_head="dot_product"``.
        roi_size: RoIAlign output side R (Eq. 3, Table 10; 32).
        roi_sampling_ratio: bilinear samples per RoIAlign bin side (2 = Mask R-CNN's four
            regular sample points per bin; 0 = adaptive).
        box_dim: hidden width h of the box / query stack (Table 4; 128). When it differs from
            ``hidden_dim`` a channel mapper Linear(D, h) is applied to F before RoIAlign and a
            query projection Linear(D, h) to the queries; at ``box_dim == hidden_dim`` both are
            identities (Table 3 accounting).
        box_encoder_layers: blocks over the R x R RoI tokens (Sec. 3.3, Eq. 9, Table 3 / 16).
        box_encoder_block: their kind (Table 3): ``"deformable"`` (1 level, ``box_encoder_heads``
            heads, ``box_encoder_points`` points, FFN ``box_ffn_ratio * box_dim``), ``"swin"``
            (window ``box_encoder_window``, 8 in the Table 3 accounting) or ``"convnext"``.
        box_pos_embed: one learned R*R x h positional embedding added once to the RoI tokens.
        query_ffn, query_b2o, query_o2o: the query-layer components of Table 5 (FFN,
            box-to-object cross-attention Eq. 11, object-to-object self-attention Eq. 10). One
            query layer follows EACH box-encoder layer (the Table 16 accounting).
        query_heads: heads of the B2O / O2O attention.
        mask_head: ``"dot_product"`` (Eq. 4) or ``"segmenter"`` (Table 14).
        mask_scoring: Mask-Scoring-R-CNN IoU head (Eq. 12-13, Table 12).
        num_score_classes: outputs of the IoU head (80 COCO classes, contiguous index).
        score_conv_dim, score_fc_dim: widths of the IoU head (128 / 128).
        score_detach_mask: detach the predicted mask fed to the IoU head (False, as mmdet's
            Mask Scoring R-CNN).
        score: final detection score: ``"iou"`` = class score x predicted mask IoU (Eq. 13),
            ``"class"`` = class score, ``"mask_mean"`` = class score x mean of the mask
            probabilities above 0.5 (Eq. 2, the training-free baseline); ``"auto"`` = ``iou``
            with mask scoring, else ``class``.

    Loss (Appendix A "mask loss on sampled pixel points"; Mask2Former's recipe):

    Attributes:
        mask_loss: ``"points"`` (BCE + dice on N importance-sampled points, Table 12 rows 3-4)
            or ``"full"`` (BCE + dice on every pixel of the T x T target, logits bilinearly
            resized to T; Table 12 rows 1-2, "samp. pixel sup." off).
        target_size: T, side of the mask targets resampled into each box (112).
        num_points: N points sampled per instance (112 * 112 = 12544).
        oversample_ratio: k (3.0); importance_sample_ratio: beta (0.75).
        loss_bce_weight, loss_dice_weight: 5.0 / 5.0 (Mask2Former's mask / dice weights; the
            paper gives none).
        loss_iou_weight: 1.0 (Mask Scoring R-CNN's MaskIoU loss weight).

    Matching (DINO's Hungarian matcher):

    Attributes:
        cost_class, cost_bbox, cost_giou: 2.0 / 5.0 / 2.0; focal_alpha 0.25, focal_gamma 2.0.

    How many detections are kept per image is ``evaluate.top_n`` (:class:`pipeline.config.EvalConfig`).
    The deformable-attention kernel is not a head setting: it is chosen at run time (``--impl``,
    :mod:`kernels.ops`) and never compared on ``--resume``.
    """

    # image feature encoder
    hidden_dim: int = 256
    c1_channels: int | None = None
    num_feature_levels: int | None = None
    image_encoder_layers: int = 3
    image_encoder_block: str = "deformable"
    image_encoder_window: int = 14
    image_encoder_heads: int = 8
    image_encoder_points: int = 4
    image_encoder_ffn_dim: int = 1024
    activation: str = "gelu"
    dropout: float = 0.0
    neck: bool = True
    fuse_c1: bool = True
    # box feature encoder
    roi_align: bool = True
    roi_size: int = 32
    roi_sampling_ratio: int = 2
    box_dim: int = 128
    box_encoder_layers: int = 2
    box_encoder_block: str = "deformable"
    box_encoder_window: int = 8
    box_encoder_heads: int = 8
    box_encoder_points: int = 4
    box_ffn_ratio: int = 4
    box_pos_embed: bool = True
    # query feature encoder
    query_ffn: bool = True
    query_b2o: bool = True
    query_o2o: bool = False
    query_heads: int = 8
    # mask head and scoring
    mask_head: str = "dot_product"
    mask_scoring: bool = True
    num_score_classes: int = 80
    score_conv_dim: int = 128
    score_fc_dim: int = 128
    score_detach_mask: bool = False
    score: str = "auto"
    # loss
    mask_loss: str = "points"
    target_size: int = 112
    num_points: int = 112 * 112
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    loss_bce_weight: float = 5.0
    loss_dice_weight: float = 5.0
    loss_iou_weight: float = 1.0
    # matcher
    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check field values and their combinations.

        Raises:
            ValueError: naming the offending field(s).
        """
        if self.mask_head not in _MASK_HEADS:
            raise ValueError(f"mask_head must be one of {_MASK_HEADS}, got {self.mask_head!r}")
        for name, choices in (("image_encoder_block", _BLOCK_KINDS), ("box_encoder_block", _BLOCK_KINDS),
                              ("mask_loss", _MASK_LOSSES), ("score", _SCORES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.score == "iou" and not self.mask_scoring:
            raise ValueError("score='iou' needs mask_scoring=True (the IoU comes from the mask-scoring head)")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {self.activation!r}")
        for name in ("hidden_dim", "c1_channels", "num_feature_levels", "roi_size", "box_dim",
                     "target_size", "num_points", "num_score_classes", "image_encoder_window", "box_encoder_window"):
            if name in WIDTH_FIELDS and getattr(self, name) is None:
                continue
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("image_encoder_layers", "box_encoder_layers", "roi_sampling_ratio"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.hidden_dim % self.image_encoder_heads or self.hidden_dim % 2:
            raise ValueError(f"hidden_dim ({self.hidden_dim}) must be even and divisible by "
                             f"image_encoder_heads ({self.image_encoder_heads})")
        if self.box_dim % self.box_encoder_heads or self.box_dim % self.query_heads:
            raise ValueError(f"box_dim ({self.box_dim}) must be divisible by box_encoder_heads "
                             f"({self.box_encoder_heads}) and query_heads ({self.query_heads})")
        if self.neck and self.hidden_dim % 32:
            raise ValueError(f"neck uses GroupNorm(32, hidden_dim); hidden_dim={self.hidden_dim}")
        if self.fuse_c1 and not self.neck and self.c1_channels is not None and self.c1_channels != self.hidden_dim:
            raise ValueError(
                f"fuse_c1=True without a neck needs c1_channels == hidden_dim "
                f"({self.c1_channels} != {self.hidden_dim}); set neck=True or fuse_c1=False")
        if not self.roi_align:
            per_box = [name for name, on in (("box_encoder_layers", self.box_encoder_layers > 0),
                                             ("box_pos_embed", self.box_pos_embed), ("query_ffn", self.query_ffn),
                                             ("query_b2o", self.query_b2o), ("query_o2o", self.query_o2o),
                                             ("mask_scoring", self.mask_scoring),
                                             ("mask_head", self.mask_head != "dot_product")) if on]
            if per_box:
                raise ValueError(f"roi_align=False (Eq. 1: one mask per query over F's whole grid, no RoI tokens) "
                                 f"cannot have {per_box}: set box_encoder_layers=0, box_pos_embed/query_ffn/"
                                 f"query_b2o/query_o2o/mask_scoring=false, mask_head=dot_product")
        if not self.oversample_ratio >= 1.0:
            raise ValueError(f"oversample_ratio must be >= 1, got {self.oversample_ratio}")
        if not 0.0 <= self.importance_sample_ratio <= 1.0:
            raise ValueError(f"importance_sample_ratio must be in [0, 1], got {self.importance_sample_ratio}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "HeadConfig":
        """Build from a plain mapping (a YAML ``head:`` section); missing keys keep defaults.

        Raises:
            ValueError: on unknown keys (typos must not be silently ignored) or bad values.
        """
        d = dict(d or {})
        # written by checkpoints before the kernel became a run-time choice (--impl); not a head setting
        d.pop("deform_impl", None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown HeadConfig keys: {unknown}")
        return cls(**d)

    @property
    def has_widths(self) -> bool:
        """True when ``c1_channels`` and ``num_feature_levels`` are known (the head can be built)."""
        return all(getattr(self, name) is not None for name in WIDTH_FIELDS)

    def with_widths(self, c1_channels: int, num_feature_levels: int, source: str = "the cache") -> "HeadConfig":
        """A copy with the detector-dependent widths set (from a cache fingerprint or a detector).

        Args:
            c1_channels, num_feature_levels: the widths of the cached C1 map and encoder tokens.
            source: where they come from, for error messages (e.g. the cache path).

        Raises:
            ValueError: the config already sets a different value (names the field and both values).
        """
        given = {"c1_channels": int(c1_channels), "num_feature_levels": int(num_feature_levels)}
        for name, value in given.items():
            mine = getattr(self, name)
            if mine is not None and int(mine) != value:
                raise ValueError(f"head.{name}={mine} in the config, but {source} has {name}={value}; "
                                 f"remove head.{name} from the config (it is read from the cache)")
        return dataclasses.replace(self, **given)

    @property
    def final_score(self) -> str:
        """The resolved :attr:`score` (``"auto"`` -> ``"iou"`` with mask scoring, else ``"class"``)."""
        if self.score != "auto":
            return self.score
        return "iou" if self.mask_scoring else "class"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (written next to checkpoints)."""
        return dataclasses.asdict(self)
