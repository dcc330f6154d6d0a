"""Detector + trained head on new images (no cache): COCO results json and one overlay PNG per image.

``cli.py predict`` runs, per image: decode -> the same test-time preprocessing as ``extract`` ->
frozen detector -> the per-image record the cache would hold (:func:`pipeline.cache.as_stored`, the
features rounded as the training cache stores them) -> the evaluation path of
:func:`pipeline.inference.predict_batch` (top-N by Eq. 13, masks pasted at 0.5, RLE) -> an overlay
drawn by :func:`pipeline.overlays.draw_instances`. Stage two never asks where its record came
from, so a head behaves here exactly as in ``evaluate``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_util
from tqdm import tqdm

from . import data
from .cache import RANDOM_INIT_BANNER, as_stored, fingerprint_diff
from .checkpoint import load_head
from .evaluate import write_json_atomic
from .frozen_detector import DetectorOptions, build_frozen_detector

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
RESULTS_FILE = "coco_instances_results.json"
IMAGES_FILE = "images.json"


def list_images(inputs: list[str | Path]) -> list[Path]:
    """Image files named by ``inputs``: files as given, folders expanded (sorted, by suffix).

    Raises:
        FileNotFoundError: an input that does not exist; ValueError: no image found.
    """
    out = []
    for p in map(Path, inputs):
        if p.is_dir():
            out += sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"input {p} does not exist")
    if not out:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {[str(p) for p in inputs]}")
    return out


class _Categories:
    """The minimal COCO-like object :func:`pipeline.batches.category_maps` reads (``.cats``)."""

    def __init__(self, categories: list[dict]):
        self.cats = {int(c["id"]): dict(c) for c in categories}


def training_categories(fingerprint: dict, ann_file: str | Path | None = None) -> list[dict]:
    """The category list (``id``, ``name``) the head was trained with.

    Read from ``ann_file`` or else the annotation file recorded in the training cache's
    fingerprint; if neither can be read, the detector's category ids named ``"class <id>"``
    (a warning is logged: for a COCO-trained detector those ids are COCO's, so only the names
    are missing).
    """
    path = Path(ann_file) if ann_file is not None else Path(fingerprint.get("ann_file", ""))
    if path.is_file():
        with open(path) as f:
            cats = json.load(f).get("categories") or []
        if cats:
            return [{"id": int(c["id"]), "name": str(c.get("name", c["id"]))} for c in cats]
    log.warning("annotation file %s not readable: class names unknown, using 'class <id>' (pass --ann-file)", path)
    ids = sorted({int(v) for v in fingerprint["class_to_category_id"].values()})
    return [{"id": i, "name": f"class {i}"} for i in ids]


@dataclass(kw_only=True)
class PredictOptions(DetectorOptions):
    """Options of ``cli.py predict`` (see its ``--help``); the detector fields are :class:`DetectorOptions`'
    (``device`` defaults to ``auto`` here)."""

    inputs: list[Path]
    checkpoint: Path
    out: Path
    min_size: int | None = None
    max_size: int | None = None
    score_threshold: float = 0.5
    top_n: int | None = None
    ann_file: Path | None = None
    device: str = "auto"
    progress: bool = True
    overrides: list[str] = field(default_factory=list)


def run_predict(opts: PredictOptions) -> dict:
    """Predict every image of ``opts.inputs``; write results json, ``images.json`` and overlay PNGs.

    Files in ``opts.out``: ``coco_instances_results.json`` (COCO results: RLE str counts, bbox
    xywh original pixels, dataset category ids), ``images.json`` (a COCO dataset with the
    ``images`` (id, file_name, width, height) and ``categories`` and no annotations, so that
    ``COCO("images.json").loadRes(results)`` works), ``<image stem>.png`` (overlay, the image's
    size), ``summary.json``. An image that cannot be decoded is reported by name and skipped.

    A checkpoint of a run that fine-tuned its detector (``train-head --online --finetune``)
    runs that fine-tuned detector: its parameters are loaded over ``--weights``
    (:func:`pipeline.frozen_detector.load_finetuned`).

    Raises:
        ValueError: the detector (name, architecture, weights, fine-tuning) is not the one whose
            cache the head was trained on; no weights without ``random_init``; bad inputs.
    """
    from kernels import ops as kernel_ops

    from .batches import category_maps
    from .inference import predict_batch
    from .overlays import draw_instances
    from .train import resolve_device

    if not 0.0 <= opts.score_threshold <= 1.0:
        raise ValueError(f"--score-threshold must be in [0, 1], got {opts.score_threshold}")
    kernel_ops.configure(opts.impl)
    device = resolve_device(opts.device)
    overrides = list(opts.overrides) + ([f"evaluate.top_n={int(opts.top_n)}"] if opts.top_n is not None else [])
    head, postprocess, cfg, ckpt = load_head(opts.checkpoint, overrides, device=device)
    fp = ckpt["fingerprint"]
    pre = fp["preprocessing"]
    min_size = pre["min_size"] if opts.min_size is None else opts.min_size
    max_size = pre["max_size"] if opts.max_size is None else opts.max_size
    if (min_size, max_size) != (pre["min_size"], pre["max_size"]):
        log.warning("--min-size/--max-size %d/%d differ from the training cache's %d/%d: the head sees features "
                    "of another scale", min_size, max_size, pre["min_size"], pre["max_size"])
    images = list_images(opts.inputs)
    if "detector" in ckpt:  # a run that fine-tuned its detector: run that detector (frozen_detector.load_finetuned)
        opts = dataclasses.replace(opts, finetuned=opts.checkpoint)
    detector, sha = build_frozen_detector(opts, device)
    found = {"detector": opts.detector, "detector_config": detector.config(), "checkpoint_sha256": sha,
             **(detector.finetuned_fingerprint or {})}
    diff = fingerprint_diff(fp, found, keys=("detector", "detector_config", "checkpoint_sha256", "finetuned"))
    if diff:
        raise ValueError(f"{opts.checkpoint} was trained on features of another detector: "
                         + "; ".join(diff) + " (pass the detector, --preset and --weights/--seed of its cache)")
    categories = training_categories(fp, opts.ann_file)
    maps = category_maps(fp, _Categories(categories))
    names = {int(c["id"]): c["name"] for c in categories}
    layer = cfg.train.encoder_layer
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = next(detector.parameters()).dtype
    results, image_recs, failed, pngs = [], [], {}, []
    t0 = time.time()
    bar = tqdm(images, desc="predict", unit="img", disable=not opts.progress, dynamic_ncols=True)
    for n, path in enumerate(bar, start=1):
        try:
            image = data.load_image(path)
        except data.DataError as e:
            log.error("cannot decode %s (skipped, the others go on): %s", path.name, e)
            failed[str(path)] = str(e)
            continue
        w, h = image.size
        x = data.preprocess(image, min_size, max_size).to(device, dtype)
        mask = torch.zeros((1,) + x.shape[1:], dtype=torch.bool, device=device)
        with torch.inference_mode():
            ex = detector.extract(x[None], mask, [layer], fp["top_k"])[0]
        rec = dataclasses.replace(as_stored(ex, fp, layer), image_id=n, orig_size=(h, w), size=tuple(x.shape[1:]))
        dets = predict_batch(head, postprocess, [rec], maps, cfg, device, "pred")
        image_recs.append({"id": n, "file_name": str(path), "width": w, "height": h})
        results += dets
        png = out / f"{path.stem}.png"
        if png in pngs:
            png = out / f"{path.stem}_{n}.png"
        masks = (np.stack([mask_util.decode(d["segmentation"]) for d in dets]).astype(bool) if dets
                 else np.zeros((0, h, w), dtype=bool))
        boxes = np.asarray([[d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2], d["bbox"][1] + d["bbox"][3]]
                            for d in dets], dtype=np.float64).reshape(-1, 4)
        draw_instances(image, masks, boxes, [names.get(d["category_id"], str(d["category_id"])) for d in dets],
                       np.asarray([d["score"] for d in dets]), opts.score_threshold).save(png)
        pngs.append(png)
    seconds = time.time() - t0
    write_json_atomic(out / RESULTS_FILE, results)
    write_json_atomic(out / IMAGES_FILE, {"images": image_recs, "categories": categories, "annotations": []})
    summary = {"images": len(image_recs), "failed": failed, "detections": len(results),
               "results": str(out / RESULTS_FILE), "images_json": str(out / IMAGES_FILE),
               "overlays": [str(p) for p in pngs], "seconds": round(seconds, 2),
               "random_init": bool(opts.random_init), "banner": RANDOM_INIT_BANNER if opts.random_init else None}
    write_json_atomic(out / "summary.json", summary)
    return summary
