"""Run a trained head over a cache and turn its masks into COCO results (then COCOeval).

Per image, independently of any batch: image features -> head on every cached query and box
(or on the ground-truth boxes with ``boxes="gt"``) -> top-100 by final score (Eq. 13) ->
masks pasted into the original image, thresholded at 0.5 -> RLE.
"""

from __future__ import annotations

import logging

import torch
from tqdm import tqdm

from kernels import ops as kernel_ops

from . import data
from .batches import CachedImages, annotation_file, category_maps, image_features, to_xyxy_pixels
from .cache import RANDOM_INIT_BANNER, CacheError, FeatureCache
from .config import Config
from .evaluate import evaluate_coco, instances_to_coco_json, paste_masks
from .head import build_head, build_matcher, build_postprocess, count_parameters
from .head.model import mask_frame_boxes, unpad_mask_logits
from .cache_requirements import check_cache_supports
from .record import SampleRecord
from .targets import limit_queries, match_image

log = logging.getLogger(__name__)


@torch.no_grad()
def predict_batch(head, postprocess, items: list[SampleRecord], maps: dict, cfg: Config, device, boxes: str = "pred",
                  matcher=None) -> list[dict]:
    """COCO result dicts (segmentation RLE, bbox xywh, score, category_id) for cached images.

    The head runs once over all boxes of the batch (flattened with a batch index); every box
    only sees its own image, so results do not depend on how images are batched.

    ``boxes="pred"``: every cached query with its predicted box, ranked by
    ``sigmoid(class logit) x predicted mask IoU`` (Eq. 13), top ``cfg.evaluate.top_n`` per image.
    ``boxes="gt"``: one prediction per non-crowd ground-truth object, using the query matched to
    it, its GT box and GT category; score = predicted mask IoU of that category (1 without
    mask scoring). Requires each record's ``gt`` and ``matcher`` (the config's,
    :func:`pipeline.head.build_matcher`; matching is :func:`pipeline.targets.match_image`, as in
    training). Masks are pasted into the boxes they span (:func:`pipeline.head.model.mask_frame_boxes`)
    by one bilinear interpolation to the original image (:func:`pipeline.evaluate.paste_masks`).
    A head without RoIAlign (``head.roi_align`` False, Table 1) gives each image's masks at F's
    stride-4 grid ``[H1, W1]``, which spans the whole (resized = original, up to scale) image: they
    are cropped out of the batch's padding and pasted into the whole-image frame, i.e. Eq. 2's
    ``interpolate(Sigmoid(q_i F^T))`` straight to the original size (as the RoIAlign path pastes
    its ``R x R`` grid straight into the original-image box), then thresholded.

    Raises:
        ValueError: unknown ``boxes`` mode.
    """
    if boxes not in ("pred", "gt"):
        raise ValueError(f"boxes must be 'pred' or 'gt', got {boxes!r}")
    items = limit_queries(items, cfg.train.num_queries)
    feats = image_features(head, items, device)
    sizes = torch.tensor([it.size for it in items], dtype=torch.float32, device=device)
    queries, sel_boxes, bidx, chosen = [], [], [], []
    for b, it in enumerate(items):
        if boxes == "pred":
            q_idx = torch.arange(len(it.queries))
            bx = it.boxes.float()
            g_idx = None
        else:
            gt = it.gt
            q_idx, g_idx = match_image(matcher, it, maps["column_of"])
            order = torch.argsort(g_idx)
            q_idx, g_idx = q_idx[order], g_idx[order]
            bx = gt["boxes_cxcywh"][g_idx]
        queries.append(it.queries.float()[q_idx])
        sel_boxes.append(bx)
        bidx.append(torch.full((len(q_idx),), b, dtype=torch.int64))
        chosen.append(g_idx)
    out = head(feats, torch.cat(queries).to(device), torch.cat(sel_boxes).to(device), sizes,
               torch.cat(bidx).to(device))
    counts = [len(q) for q in queries]
    mask_sizes = out["mask_sizes"].split(counts) if out.get("mask_sizes") is not None else [None] * len(items)
    mask_logits = [unpad_mask_logits(lg, sz) for lg, sz in zip(out["mask_logits"].split(counts), mask_sizes)]
    iou_pred = out["iou_pred"].split(counts) if out.get("iou_pred") is not None else [None] * len(items)
    col_to_cat = {col: cat for cat, col in maps["column_of"].items()}
    results = []
    for b, it in enumerate(items):
        h, w = it.orig_size
        if boxes == "pred":
            det = postprocess(it.logits.float().to(device), sel_boxes[b].to(device), mask_logits[b], iou_pred[b],
                              maps["column_to_contiguous"].to(device))
            cat_ids = torch.as_tensor([col_to_cat[int(c)] for c in det["labels"].tolist()], dtype=torch.int64)
            scores, bx, probs = det["scores"].cpu(), det["boxes"].cpu(), det["mask_probs"].cpu()
        else:
            if chosen[b].numel() == 0:
                continue
            cat_ids = it.gt["category_ids"][chosen[b]]
            bx, probs = sel_boxes[b], mask_logits[b].sigmoid().cpu()
            if iou_pred[b] is not None:
                contig = torch.as_tensor([maps["contiguous_of"][int(c)] for c in cat_ids.tolist()], dtype=torch.int64)
                scores = iou_pred[b].cpu().gather(1, contig[:, None])[:, 0].clamp(0, 1)
            else:
                scores = torch.ones(len(cat_ids))
        xyxy = to_xyxy_pixels(bx, h, w)
        frame = to_xyxy_pixels(mask_frame_boxes(head.cfg, bx), h, w)
        masks = paste_masks(probs, frame, h, w, threshold=cfg.evaluate.mask_threshold)
        results += instances_to_coco_json(it.image_id, scores, cat_ids, xyxy, masks)
    return results


def evaluate_cache(head, cfg: Config, cache_path, out_dir, *, device="cpu", boxes: str = "pred",
                   ann_file=None, format_only: bool = False, expected_fingerprint: dict | None = None,
                   progress: bool = True, impl: str | None = None, precision_out: dict | None = None) -> dict:
    """Predict every extracted image of ``cache_path`` and evaluate with COCOeval.

    Writes ``<out_dir>/coco_instances_results.json`` and ``<out_dir>/metrics.json`` (atomically).

    Args:
        head: a head from :func:`pipeline.head.build_head` (weights loaded); its config gives the
            post-processor (:func:`pipeline.head.build_postprocess` with ``cfg.evaluate.top_n``)
            and the matcher of ``boxes="gt"`` (:func:`pipeline.head.build_matcher`).
        expected_fingerprint: fingerprint of the cache the head was trained on; a cache from
            another detector, checkpoint or preprocessing is refused.
        format_only: write results without ground truth (test-dev); no metrics.
        impl: deformable-attention kernel (:data:`kernels.ops.IMPLS`) to set for this run; None
            keeps the process's setting. Either way it is recorded in ``metrics.json`` (``"impl"``).
        precision_out: passed to :func:`pipeline.evaluate.evaluate_coco` (PR arrays for plots).

    Returns:
        the metrics dict of :func:`pipeline.evaluate.evaluate_coco`.

    Raises:
        CacheError: stale/foreign cache, a cache of augmented views (``extract --views``), or
            missing annotation file.
    """
    impl_info = kernel_ops.configure(impl) if impl is not None else kernel_ops.describe_impl()
    cache = FeatureCache.open(cache_path, expected=expected_fingerprint)
    if cache.fingerprint.get("views"):
        raise CacheError(f"{cache_path}: holds augmented training views {cache.fingerprint['views']}; evaluate a cache "
                         "extracted without --views")
    check_cache_supports(cfg, cache, cache_path)
    ann = annotation_file(cache.fingerprint, ann_file)
    coco = data.load_coco(ann, require_annotations=not format_only)
    maps = category_maps(cache.fingerprint, coco)
    postprocess = build_postprocess(head.cfg, cfg.evaluate.top_n)
    matcher = build_matcher(head.cfg)
    layer = cfg.train.encoder_layer
    indices = cache.done_indices()
    dataset = CachedImages(cache_path, indices, layer, ann, with_gt=(boxes == "gt"))
    head.eval()
    results = []
    bs = max(1, int(cfg.evaluate.batch_size))
    for start in tqdm(range(0, len(dataset), bs), desc="evaluate", unit="batch", disable=not progress,
                      dynamic_ncols=True):
        items = [dataset[n] for n in range(start, min(start + bs, len(dataset)))]
        results += predict_batch(head, postprocess, items, maps, cfg, device, boxes, matcher)
    banner = RANDOM_INIT_BANNER if cache.fingerprint.get("random_init") else None
    if cache.skipped:
        log.warning("%d images were skipped at extraction and are not evaluated: %s", len(cache.skipped),
                    sorted(cache.skipped))
    image_ids = [int(cache.image_ids[i]) for i in indices]
    return evaluate_coco(coco, results, out_dir, banner=banner, format_only=format_only, image_ids=image_ids,
                         extra={"impl": impl_info}, precision_out=precision_out)


def baseline_head(cfg: Config, cache_path):
    """The training-free baseline of Eq. 1-4 (Table 1) for a cache: ``q_i . RoIAlign(F)``.

    Builds ``cfg.head`` (e.g. ``configs/ablations/t1_*.yaml``: no encoders, ``box_dim`` =
    ``hidden_dim``, no mask scoring, ``score: mask_mean``) with the cache's widths.

    Raises:
        CacheError: unusable cache; ValueError: the config's head has trainable parameters (a
            head that needs training is not a baseline), or widths contradicting the cache.
    """
    cache = FeatureCache.open(cache_path)
    head = build_head(check_cache_supports(cfg, cache, cache_path), cfg.evaluate.top_n)[0]
    n = count_parameters(head)
    if n:
        raise ValueError(f"--head baseline: the config's head has {n:,} trainable parameters; the baseline must "
                         "have none (image_encoder_layers=0, box_encoder_layers=0, box_dim=hidden_dim, no neck, "
                         "no box_pos_embed, no query layers, no mask scoring)")
    return head.eval()
