"""What the head sees: per-instance mask probability maps inside their boxes, from a cache.

``cli.py visualize`` reads one image's record from the cache, runs the trained head on every
cached query and box, keeps the top instances by final score (Eq. 13, as ``evaluate`` ranks
them) and writes, per instance, the image crop / probability map / blend panel
(:func:`pipeline.overlays.probability_panel`; the paper's Figures 4 and 8) plus one image-sized
PNG with every kept map pasted into its box.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from . import data
from .batches import annotation_file, category_maps, image_features, to_xyxy_pixels
from .cache import RANDOM_INIT_BANNER, CacheError, FeatureCache
from .head import PostProcess
from .head.model import mask_frame_boxes, unpad_mask_logits


def default_image_dir(ann_file: Path) -> Path:
    """``<root>/<split>/`` for ``<root>/annotations/instances_<split>.json`` (the COCO layout)."""
    m = re.fullmatch(r"instances_(.+)\.json", ann_file.name)
    return ann_file.parent.parent / m.group(1) if m else ann_file.parent


@torch.no_grad()
def visualize_image(head, cfg, cache_path: str | Path, image_id: int, out_dir: str | Path, *, top: int = 10,
                    device="cpu", ann_file=None, image_dir=None, expected_fingerprint: dict | None = None,
                    postprocess=None) -> dict:
    """Write the probability-map PNGs of one cached image.

    Files: ``<out_dir>/<image_id>_probs.png`` (the original image's size, every kept map in its
    box) and ``<out_dir>/<image_id>_<rank>_<class>.png`` per kept instance (rank 1 = best).

    Args:
        head: trained head (:func:`pipeline.checkpoint.load_head`).
        cfg: its resolved config (``train.encoder_layer`` is read from the cache).
        image_id: dataset image id (must be completely extracted in the cache).
        top: instances drawn, by final score.
        image_dir: folder of the image files (default: ``<root>/<split>/`` beside the cache's
            annotation file).
        expected_fingerprint: the head's training-cache fingerprint; a foreign cache is refused.
        postprocess: the head's :class:`pipeline.head.PostProcess` (its final score, Eq. 2 / Eq. 13);
            default: DETR's.

    Returns:
        ``{"image_id", "instances": [{"rank", "category_id", "name", "score", "box_xyxy", "png"}],
        "probs_png", "banner"}`` (also written as ``<out_dir>/<image_id>_instances.json``).

    Raises:
        CacheError: the image is not in the cache or not extracted; foreign cache.
        DataError: the image file is missing or corrupt.
    """
    from .overlays import paste_probability_maps, probability_panel

    cache = FeatureCache.open(cache_path, expected=expected_fingerprint)
    try:
        i = cache.index_of(int(image_id))
    except (KeyError, ValueError, CacheError):
        raise CacheError(f"{cache_path}: image id {image_id} is not in the cache "
                         f"(it holds {len(cache)} images, e.g. {[int(x) for x in cache.image_ids[:5]]})") from None
    ann = annotation_file(cache.fingerprint, ann_file)
    coco = data.load_coco(ann, require_annotations=False)
    maps = category_maps(cache.fingerprint, coco)
    item = cache.read(i, cfg.train.encoder_layer)
    info = coco.imgs[int(image_id)]
    img_dir = Path(image_dir) if image_dir is not None else default_image_dir(ann)
    image = data.load_image(img_dir / info["file_name"], expected_size=(int(info["width"]), int(info["height"])))
    head.eval()
    feats = image_features(head, [item], device)
    boxes = item.boxes.float()
    k = len(boxes)
    out = head(feats, item.queries.float().to(device), boxes.to(device),
               torch.tensor([item.size], dtype=torch.float32, device=device),
               torch.zeros(k, dtype=torch.int64, device=device))
    mask_logits = unpad_mask_logits(out["mask_logits"], out.get("mask_sizes"))  # F's grid without RoIAlign
    det = (postprocess or PostProcess())(item.logits.float().to(device), boxes.to(device), mask_logits,
                                         out.get("iou_pred"), maps["column_to_contiguous"].to(device), top_n=top)
    h, w = item.orig_size
    xyxy = to_xyxy_pixels(det["boxes"].cpu(), h, w).numpy()
    frame = to_xyxy_pixels(mask_frame_boxes(head.cfg, det["boxes"].cpu()), h, w).numpy()  # what the maps span
    probs = det["mask_probs"].float().cpu().numpy()
    col_to_cat = {col: cat for cat, col in maps["column_of"].items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    instances = []
    for r in range(len(probs)):
        cat = col_to_cat[int(det["labels"][r])]
        name = coco.cats[cat]["name"] if cat in coco.cats else str(cat)
        score = float(det["scores"][r])
        png = out_dir / f"{image_id}_{r + 1:02d}_{re.sub(r'[^A-Za-z0-9]+', '-', name)}.png"
        probability_panel(image, probs[r], frame[r], f"#{r + 1} {name} {score:.2f}").save(png)
        instances.append({"rank": r + 1, "category_id": cat, "name": name, "score": score,
                          "box_xyxy": [float(v) for v in xyxy[r]], "png": str(png)})
    probs_png = out_dir / f"{image_id}_probs.png"
    paste_probability_maps(image, probs, frame).save(probs_png)
    result = {"image_id": int(image_id), "instances": instances, "probs_png": str(probs_png),
              "banner": RANDOM_INIT_BANNER if cache.fingerprint.get("random_init") else None}
    (out_dir / f"{image_id}_instances.json").write_text(json.dumps(result, indent=1))
    return result
