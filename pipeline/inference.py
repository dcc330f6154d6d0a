"""Run a trained head over a cache and turn its masks into COCO results (then COCOeval).

Per image, independently of any batch: image features -> head on every cached query and box
(or on the ground-truth boxes with ``boxes="gt"``) -> top-100 by final score (Eq. 13) ->
masks pasted into the original image, thresholded at 0.5 -> RLE.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm import tqdm

from . import data
from .batches import CachedImages, annotation_file, category_maps, ground_truth, to_xyxy_pixels
from .cache import FeatureCache
from .config import Config
from .evaluate import evaluate_coco, instances_to_coco_json, paste_masks
from .head import HeadConfig, HungarianMatcher, build_head

log = logging.getLogger(__name__)

RANDOM_INIT_BANNER = "RANDOM-INIT DETECTOR: these numbers are meaningless (no official weights were used)"


@torch.no_grad()
def predict_image(head, postprocess, item: dict, maps: dict, cfg: Config, device, boxes: str = "pred",
                  matcher=None) -> list[dict]:
    """COCO result dicts (segmentation RLE, bbox xywh, score, category_id) for one cached image.

    ``boxes="pred"``: every cached query with its predicted box, ranked by
    ``sigmoid(class logit) x predicted mask IoU`` (Eq. 13), top ``cfg.evaluate.top_n``.
    ``boxes="gt"``: one prediction per non-crowd ground-truth object, using the query matched to
    it, its GT box and GT category; score = predicted mask IoU of that category (1 without
    mask scoring). Requires ``item["gt"]``.
    """
    feats = [head.encode_image(item["tokens"].to(device, torch.float32), item["spatial_shapes"].to(device),
                               item["level_start_index"].to(device), item["c1"].to(device, torch.float32))]
    h, w = item["orig_size"]
    sizes = torch.tensor([item["size"]], dtype=torch.float32, device=device)
    if boxes == "pred":
        q = item["queries"].float()
        b = item["boxes"].float()
        out = head(feats, q.to(device), b.to(device), sizes, torch.zeros(len(q), dtype=torch.int64, device=device))
        det = postprocess(item["logits"].float().to(device), b.to(device), out["mask_logits"], out.get("iou_pred"),
                          maps["column_to_contiguous"].to(device), top_n=cfg.evaluate.top_n)
        cat_ids = det["labels"].cpu()
        col_to_cat = {col: cat for cat, col in maps["column_of"].items()}
        cat_ids = torch.as_tensor([col_to_cat[int(c)] for c in cat_ids.tolist()], dtype=torch.int64)
        scores, sel_boxes, probs = det["scores"].cpu(), det["boxes"].cpu(), det["mask_probs"].cpu()
    elif boxes == "gt":
        gt = item["gt"]
        if gt["category_ids"].numel() == 0:
            return []
        labels = torch.as_tensor([maps["column_of"][int(c)] for c in gt["category_ids"].tolist()])
        q_idx, g_idx = matcher.match(item["logits"].float(), item["boxes"].float(), labels, gt["boxes_cxcywh"])
        order = torch.argsort(g_idx)
        q_idx, g_idx = q_idx[order], g_idx[order]
        sel_boxes = gt["boxes_cxcywh"][g_idx]
        out = head(feats, item["queries"].float()[q_idx].to(device), sel_boxes.to(device), sizes,
                   torch.zeros(len(q_idx), dtype=torch.int64, device=device))
        cat_ids = gt["category_ids"][g_idx]
        probs = out["mask_logits"].sigmoid().cpu()
        if out.get("iou_pred") is not None:
            contig = torch.as_tensor([maps["contiguous_of"][int(c)] for c in cat_ids.tolist()])
            scores = out["iou_pred"].cpu().gather(1, contig[:, None])[:, 0].clamp(0, 1)
        else:
            scores = torch.ones(len(g_idx))
    else:
        raise ValueError(f"boxes must be 'pred' or 'gt', got {boxes!r}")
    xyxy = to_xyxy_pixels(sel_boxes, h, w)
    masks = paste_masks(probs, xyxy, h, w, threshold=cfg.evaluate.mask_threshold)
    return instances_to_coco_json(item["image_id"], scores, cat_ids, xyxy, masks)


def evaluate_cache(head, cfg: Config, cache_path, out_dir, *, device="cpu", boxes: str = "pred",
                   ann_file=None, format_only: bool = False, expected_fingerprint: dict | None = None,
                   progress: bool = True) -> dict:
    """Predict every extracted image of ``cache_path`` and evaluate with COCOeval.

    Writes ``<out_dir>/coco_instances_results.json`` and ``<out_dir>/metrics.json`` (atomically).

    Args:
        head: a head from :func:`pipeline.head.build_head` (weights loaded).
        expected_fingerprint: fingerprint of the cache the head was trained on; a cache from
            another detector, checkpoint or preprocessing is refused.
        format_only: write results without ground truth (test-dev); no metrics.

    Returns:
        the metrics dict of :func:`pipeline.evaluate.evaluate_coco`.

    Raises:
        CacheError: stale/foreign cache or missing annotation file.
    """
    cache = FeatureCache.open(cache_path, expected=expected_fingerprint)
    ann = annotation_file(cache.fingerprint, ann_file)
    coco = data.load_coco(ann)
    maps = category_maps(cache.fingerprint, coco)
    postprocess = build_head(HeadConfig.from_dict(cfg.head))[2]
    matcher = HungarianMatcher()
    layer = cfg.train.encoder_layer
    indices = cache.done_indices()
    dataset = CachedImages(cache_path, indices, layer, ann, with_gt=(boxes == "gt"))
    head.eval()
    results = []
    for n in tqdm(range(len(dataset)), desc="evaluate", unit="img", disable=not progress, dynamic_ncols=True):
        results += predict_image(head, postprocess, dataset[n], maps, cfg, device, boxes, matcher)
    banner = RANDOM_INIT_BANNER if cache.fingerprint.get("random_init") else None
    if cache.skipped:
        log.warning("%d images were skipped at extraction and are not evaluated: %s", len(cache.skipped),
                    sorted(cache.skipped))
    image_ids = [int(cache.image_ids[i]) for i in indices]
    return evaluate_coco(coco, results, out_dir, banner=banner, format_only=format_only, image_ids=image_ids)
