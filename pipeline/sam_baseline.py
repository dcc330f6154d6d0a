"""The zero-training baseline on the same boxes: SAM / HQ-SAM prompted with the cached boxes.

SysCV/sam-hq reports, on FocalNet-DINO's boxes (the detector this project caches), COCO mask AP
44.4 / 48.5 / 48.9 for SAM-B/L/H and 46.7 / 49.5 / 49.9 for HQ-SAM-B/L/H; the paper's trained
4 M-parameter head reaches 54.9. ``cli.py evaluate --sam {sam,hq-sam}`` reproduces that comparison
on the user's own cache: per image the (query, class) pairs of the cached queries are ranked by
class score (the head's ranking without mask scoring, :func:`pipeline.head.postprocess`), the top
``evaluate.top_n`` keep their cached box, category and score, and SAM turns each box (xyxy,
original pixels) into a mask (``multimask_output=False``; HQ-SAM with ``hq_token_only=False``, as
sam-hq's COCO evaluation). ``--boxes gt`` prompts with the ground-truth boxes instead (score 1).
The masks are evaluated with the same COCOeval code as the head (:func:`pipeline.evaluate.evaluate_coco`).

The models come from the ``segment-anything`` / ``segment-anything-hq`` packages (optional extra
``[sam]``); weights are user-supplied files. The architecture numbers below are those packages'
``build_sam_vit_{b,l,h}`` (facts, not code).
"""

from __future__ import annotations

import logging
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import data
from .batches import CachedImages, annotation_file, category_maps, to_xyxy_pixels
from .cache import FeatureCache
from .evaluate import evaluate_coco, instances_to_coco_json
from .head import postprocess

log = logging.getLogger(__name__)

KINDS = ("sam", "hq-sam")
#: ViT image encoders of SAM: embed dim, depth, heads, global-attention blocks.
MODELS = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}
SAM_IMAGE_SIZE = 1024
RANDOM_SAM_BANNER = "RANDOM-INIT SAM (no weights): its masks are meaningless"
_PATCH_KEY = "image_encoder.patch_embed.proj.weight"


def _package(kind: str):
    name = {"sam": "segment_anything", "hq-sam": "segment_anything_hq"}[kind]
    try:
        return __import__(f"{name}.modeling", fromlist=["modeling"]), __import__(f"{name}.predictor",
                                                                                  fromlist=["predictor"])
    except ImportError as e:
        pip = {"sam": "segment-anything", "hq-sam": "segment-anything-hq (and timm, which it imports)"}[kind]
        raise ValueError(f"--sam {kind} needs the {pip} package ({e}): pip install 'mask-frozen-detr[sam]'") from None


def model_size_of(state_dict: dict) -> str | None:
    """``vit_b`` / ``vit_l`` / ``vit_h`` from the image encoder's patch embedding width, or None."""
    w = state_dict.get(_PATCH_KEY)
    if w is None:
        return None
    dim = int(w.shape[0])
    return next((m for m, a in MODELS.items() if a["embed_dim"] == dim), f"an unknown ViT (embed dim {dim})")


def build_sam(kind: str, model: str, weights: str | Path | None = None, image_size: int = SAM_IMAGE_SIZE):
    """Build SAM or HQ-SAM (eval, frozen) from the installed package's modules.

    Args:
        kind: ``sam`` or ``hq-sam``.
        model: ``vit_b``, ``vit_l`` or ``vit_h``.
        weights: the official checkpoint file (a bare state_dict, read with ``weights_only=True``);
            None = random weights (the current torch seed; for testing the path).
        image_size: the encoder's square input in pixels (1024 for every released weight file; a
            smaller size only with random weights, to test quickly on a CPU).

    Returns:
        the package's ``Sam`` module.

    Raises:
        ValueError: unknown kind/model; weights of another model size (the message names the size
            the file holds); a file that is not a SAM state_dict; missing / unexpected keys;
            ``image_size`` other than 1024 with weights; the package not installed.
    """
    if kind not in KINDS:
        raise ValueError(f"--sam must be one of {KINDS}, got {kind!r}")
    if model not in MODELS:
        raise ValueError(f"--sam-model must be one of {sorted(MODELS)}, got {model!r}")
    if weights is not None and image_size != SAM_IMAGE_SIZE:
        raise ValueError(f"SAM weights are for {SAM_IMAGE_SIZE}-pixel inputs; image_size={image_size} only "
                         "with random weights")
    if image_size % 16:
        raise ValueError(f"SAM image_size must be a multiple of 16, got {image_size}")
    state = None
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise ValueError(f"--sam-weights {path} not found")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised with the file named
            raise ValueError(f"--sam-weights {path}: cannot be read as a state_dict: {e}") from None
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        held = model_size_of(state) if isinstance(state, dict) else None
        if held is None:
            raise ValueError(f"--sam-weights {path}: not a SAM checkpoint (no {_PATCH_KEY})")
        if held != model:
            raise ValueError(f"--sam-weights {path} holds {held}, not --sam-model {model}: pass --sam-model {held} "
                             "or the matching file")
    modeling, _ = _package(kind)
    a = MODELS[model]
    emb = image_size // 16
    decoder_kw = dict(num_multimask_outputs=3, transformer=modeling.TwoWayTransformer(depth=2, embedding_dim=256,
                                                                                      mlp_dim=2048, num_heads=8),
                      transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256)
    decoder = (modeling.MaskDecoderHQ(vit_dim=a["embed_dim"], **decoder_kw) if kind == "hq-sam"
               else modeling.MaskDecoder(**decoder_kw))
    sam = modeling.Sam(
        image_encoder=modeling.ImageEncoderViT(
            depth=a["depth"], embed_dim=a["embed_dim"], img_size=image_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=a["num_heads"], patch_size=16,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=list(a["global_attn_indexes"]), window_size=14,
            out_chans=256),
        prompt_encoder=modeling.PromptEncoder(embed_dim=256, image_embedding_size=(emb, emb),
                                              input_image_size=(image_size, image_size), mask_in_chans=16),
        mask_decoder=decoder, pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    if state is not None:
        missing, unexpected = sam.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"--sam-weights {weights} does not fit {kind} {model}: missing keys {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                             f"{' ...' if len(unexpected) > 5 else ''} (an HQ-SAM file needs --sam hq-sam)")
    return sam.eval().requires_grad_(False)


@torch.no_grad()
def sam_masks(predictor, kind: str, image: np.ndarray, boxes_xyxy: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """SAM masks for box prompts on one image.

    Args:
        predictor: the package's ``SamPredictor`` around the model.
        image: ``[H, W, 3]`` uint8 RGB, original pixels.
        boxes_xyxy: ``[N, 4]`` float xyxy, original pixels.
        chunk: boxes per decoder call.

    Returns:
        ``[N, H, W]`` bool masks (SAM's logits > 0 after its upsampling to the original size).
    """
    h, w = image.shape[:2]
    if len(boxes_xyxy) == 0:
        return torch.zeros((0, h, w), dtype=torch.bool)
    predictor.set_image(image, image_format="RGB")
    extra = {"hq_token_only": False} if kind == "hq-sam" else {}
    out = []
    for s in range(0, len(boxes_xyxy), chunk):
        b = predictor.transform.apply_boxes_torch(boxes_xyxy[s:s + chunk].float(), (h, w)).to(predictor.device)
        masks, _, _ = predictor.predict_torch(None, None, b, multimask_output=False, **extra)
        out.append(masks[:, 0].cpu())
    return torch.cat(out)


def evaluate_sam(cfg, cache_path, out_dir, *, kind: str = "sam", model: str = "vit_b", weights=None,
                 random_init: bool = False, image_size: int = SAM_IMAGE_SIZE, boxes: str = "pred", device="cpu",
                 ann_file=None, image_dir=None, progress: bool = True, max_images: int | None = None,
                 precision_out: dict | None = None, seed: int = 0) -> dict:
    """SAM / HQ-SAM masks on the cached boxes of every extracted image, evaluated like the head.

    Writes ``coco_instances_results.json`` and ``metrics.json`` (with ``"mask_source"``:
    ``"<kind> <model>"``, the banner(s) of a random-init detector and/or SAM) to ``out_dir``.

    Args:
        cfg: a :class:`pipeline.config.Config` (``evaluate.top_n`` is used).
        boxes: ``pred`` (cached top boxes, cached class scores) or ``gt`` (ground-truth boxes, score 1).
        weights / random_init: the SAM weights file, or random weights from ``seed`` (one is required).
        image_dir: the image files (default ``<root>/<split>/`` beside the cache's annotation file).
        max_images: evaluate only the first N extracted images (a quick check).

    Returns:
        the metrics dict of :func:`pipeline.evaluate.evaluate_coco`.

    Raises:
        ValueError: no weights and no ``random_init``; see :func:`build_sam`. CacheError / DataError:
            unusable cache, missing images.
    """
    from .cache import RANDOM_INIT_BANNER
    from .visualize import default_image_dir

    if boxes not in ("pred", "gt"):
        raise ValueError(f"boxes must be 'pred' or 'gt', got {boxes!r}")
    if weights is None and not random_init:
        raise ValueError("--sam needs --sam-weights FILE (the official SAM / HQ-SAM checkpoint); pass --random-init "
                         "to test the path with random weights")
    if random_init:
        warnings.warn(RANDOM_SAM_BANNER, stacklevel=2)
        torch.manual_seed(seed)
    sam = build_sam(kind, model, None if random_init else weights, image_size).to(device)
    _, predictor_mod = _package(kind)
    predictor = predictor_mod.SamPredictor(sam)
    cache = FeatureCache.open(cache_path)
    ann = annotation_file(cache.fingerprint, ann_file)
    coco = data.load_coco(ann, require_annotations=True)
    maps = category_maps(cache.fingerprint, coco)
    img_dir = Path(image_dir) if image_dir is not None else default_image_dir(ann)
    indices = cache.done_indices()[:max_images] if max_images else cache.done_indices()
    dataset = CachedImages(cache_path, indices, cache.encoder_layers[0], ann, with_gt=(boxes == "gt"))
    col_to_cat = {col: cat for cat, col in maps["column_of"].items()}
    results = []
    for n in tqdm(range(len(dataset)), desc=f"{kind} {model}", unit="img", disable=not progress, dynamic_ncols=True):
        it = dataset[n]
        h, w = it.orig_size
        info = coco.imgs[it.image_id]
        image = np.asarray(data.load_image(img_dir / info["file_name"], expected_size=(w, h)))
        if boxes == "pred":
            k = len(it.boxes)
            det = postprocess(it.logits.float(), it.boxes.float(), torch.zeros(k, 1, 1), None,
                              maps["column_to_contiguous"], top_n=cfg.evaluate.top_n)
            uniq, inverse = torch.unique(det["query_index"], return_inverse=True)
            xyxy_u = to_xyxy_pixels(it.boxes.float()[uniq], h, w)
            masks = sam_masks(predictor, kind, image, xyxy_u)[inverse]
            xyxy = xyxy_u[inverse]
            cat_ids = torch.as_tensor([col_to_cat[int(c)] for c in det["labels"].tolist()], dtype=torch.int64)
            scores = det["scores"]
        else:
            gt = it.gt
            xyxy = gt["boxes_xyxy"]
            masks = sam_masks(predictor, kind, image, xyxy)
            cat_ids, scores = gt["category_ids"], torch.ones(len(xyxy))
        results += instances_to_coco_json(it.image_id, scores, cat_ids, xyxy, masks)
    banners = ([RANDOM_INIT_BANNER] if cache.fingerprint.get("random_init") else []) + \
              ([RANDOM_SAM_BANNER] if random_init else [])
    image_ids = [int(cache.image_ids[i]) for i in indices]
    return evaluate_coco(coco, results, out_dir, banner="; ".join(banners) or None, image_ids=image_ids,
                         extra={"mask_source": f"{kind} {model}", "boxes": boxes}, precision_out=precision_out)
