"""Cached images as training / inference samples (stage two's only input).

A sample is the :class:`~pipeline.record.SampleRecord` that :meth:`pipeline.cache.FeatureCache.read`
returns with, for training, its ``gt`` set to the ground truth of that image read from the annotation file the cache was extracted from.
The detector is never built here: stage two knows only cached tensors and annotations.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torchvision.ops import box_convert

from . import data
from .cache import CacheError, FeatureCache
from .record import SampleRecord
from .utils import file_sha256


def category_maps(fingerprint: dict, coco) -> dict:
    """Class bookkeeping shared by training and evaluation.

    Returns a dict:
        ``column_of``: ``{category_id: logit column}`` (DINO: the identity on COCO ids),
        ``column_to_contiguous``: LongTensor ``[C]`` (C = logit columns), the 0-based index of the
        column's category among the dataset's sorted category ids, -1 for dummy columns,
        ``contiguous_of``: ``{category_id: 0..num_categories-1}``,
        ``num_categories``: number of dataset categories.

    Raises:
        CacheError: a dataset category has no logit column in the detector.
    """
    col_to_cat = {int(k): int(v) for k, v in fingerprint["class_to_category_id"].items()}
    column_of = {cat: col for col, cat in col_to_cat.items()}
    cat_ids = sorted(int(c) for c in coco.cats)
    missing = [c for c in cat_ids if c not in column_of]
    if missing:
        raise CacheError(f"dataset categories {missing} have no class column in detector "
                         f"{fingerprint['detector']} (it predicts category ids {sorted(column_of)})")
    contiguous_of = {c: i for i, c in enumerate(cat_ids)}
    num_columns = max(col_to_cat) + 1
    column_to_contiguous = torch.full((num_columns,), -1, dtype=torch.int64)
    for col, cat in col_to_cat.items():
        if cat in contiguous_of:
            column_to_contiguous[col] = contiguous_of[cat]
    return {"column_of": column_of, "column_to_contiguous": column_to_contiguous,
            "contiguous_of": contiguous_of, "num_categories": len(cat_ids)}


def annotation_file(fingerprint: dict, override: str | Path | None = None) -> Path:
    """The annotation file a cache was extracted from (or ``override``), checked by SHA-256.

    Raises:
        CacheError: the file is missing or its content differs from extraction time.
    """
    path = Path(override) if override is not None else Path(fingerprint["ann_file"])
    if not path.is_file():
        raise CacheError(f"annotation file {path} (recorded in the cache) not found; pass --ann-file")
    if file_sha256(path) != fingerprint["ann_sha256"]:
        raise CacheError(f"annotation file {path} differs from the one the cache was extracted from "
                         f"(sha256 {fingerprint['ann_sha256'][:12]}...)")
    return path


class CachedImages(Dataset):
    """Torch dataset over completely extracted images of a cache.

    Each worker process opens the store (and the annotation file) itself on first use, so the
    dataset can be pickled into spawned DataLoader workers.

    Item ``n`` is the :class:`~pipeline.record.SampleRecord` of :meth:`FeatureCache.read` for
    store index ``indices[n]`` (encoder layer ``encoder_layer`` only); with ``with_gt`` its ``gt`` is ``boxes_cxcywh [G, 4]`` normalized, ``boxes_xyxy [G, 4]``
    original pixels, ``category_ids [G]`` int64, ``masks [G, H, W]`` uint8 (original size) —
    non-crowd objects only, as DETR trains.
    """

    def __init__(self, cache_path: str | Path, indices: list[int], encoder_layer: int,
                 ann_file: str | Path | None = None, with_gt: bool = False):
        self.cache_path, self.indices, self.encoder_layer = str(cache_path), list(indices), int(encoder_layer)
        self.ann_file, self.with_gt = (str(ann_file) if ann_file else None), with_gt
        self._pid, self._cache, self._coco = None, None, None

    def _open(self):
        if self._pid != os.getpid():
            self._cache = FeatureCache.open(self.cache_path)
            self._coco = data.load_coco(self.ann_file) if self.with_gt else None
            self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, n: int) -> SampleRecord:
        return self.__getitems__([n])[0]

    def __getitems__(self, ns: list[int]) -> list[SampleRecord]:
        """Items ``ns`` (a whole batch: the DataLoader calls this with the sampler's batch), read
        with :meth:`FeatureCache.read_many`: one selection per array and image, all concurrent."""
        self._open()
        records = self._cache.read_many([self.indices[n] for n in ns], self.encoder_layer)
        if self.with_gt:
            for record in records:
                record.gt = ground_truth(self._coco, record.image_id)
        return records


def ground_truth(coco, image_id: int) -> dict:
    """Non-crowd ground truth of one image (see :class:`CachedImages`)."""
    gt = data.gt_instances(coco, image_id)
    keep = ~torch.as_tensor(gt["iscrowd"], dtype=torch.bool)
    masks = gt["masks"]
    masks = masks() if callable(masks) else masks
    masks = torch.as_tensor(np.asarray(masks), dtype=torch.uint8)
    info = coco.imgs[image_id]
    if masks.numel() == 0:
        masks = torch.zeros((0, int(info["height"]), int(info["width"])), dtype=torch.uint8)
    return {
        "boxes_cxcywh": torch.as_tensor(gt["boxes_cxcywh_norm"], dtype=torch.float32).reshape(-1, 4)[keep],
        "boxes_xyxy": torch.as_tensor(gt["boxes_xyxy"], dtype=torch.float32).reshape(-1, 4)[keep],
        "category_ids": torch.as_tensor(gt["category_ids"], dtype=torch.int64).reshape(-1)[keep],
        "masks": masks[keep],
    }


def collate_list(items: list[SampleRecord]) -> list[SampleRecord]:
    """Samples stay a list: images have different sizes and numbers of objects."""
    return items


def loader_options(device, num_workers: int, prefetch_factor: int = 4) -> dict:
    """DataLoader keyword arguments for reading :class:`CachedImages` onto ``device``.

    ``num_workers`` spawned worker processes each open the store themselves and decode their
    batches (zarr/Blosc) in parallel with the head's steps; on CUDA the batches are put in
    pinned memory (``SampleRecord.pin_memory``) so that :func:`image_features` copies them with
    ``non_blocking=True``, and each worker keeps ``prefetch_factor`` batches ready.

    Args:
        device: the training device (``torch.device`` or string).
        num_workers: 0 = read in the training process.
        prefetch_factor: batches each worker reads ahead (only with workers).

    Raises:
        ValueError: ``num_workers`` < 0 (names ``train.num_workers``).
    """
    if int(num_workers) < 0:
        raise ValueError(f"train.num_workers (--num-workers) must be >= 0, got {num_workers}")
    workers = int(num_workers)
    return {"collate_fn": collate_list, "num_workers": workers,
            "multiprocessing_context": "spawn" if workers else None,
            "pin_memory": torch.device(device).type == "cuda",
            "prefetch_factor": int(prefetch_factor) if workers else None}


class EpochSampler(Sampler[int]):
    """Seeded permutation of an epoch, started at an offset (for exact resume mid-epoch).

    Order of epoch ``e`` = ``torch.randperm(n, generator=manual_seed(seed + e))``.
    """

    def __init__(self, n: int, seed: int, epoch: int, start: int = 0):
        self.n, self.seed, self.epoch, self.start = n, seed, epoch, start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        return iter(order[self.start:])

    def __len__(self) -> int:
        return self.n - self.start


def to_xyxy_pixels(boxes_cxcywh: torch.Tensor, height: float, width: float) -> torch.Tensor:
    """``[N, 4]`` cxcywh normalized -> ``[N, 4]`` xyxy pixels of an image ``height x width``."""
    scale = boxes_cxcywh.new_tensor([width, height, width, height])
    return box_convert(boxes_cxcywh, "cxcywh", "xyxy") * scale


def image_features(head, items: list[SampleRecord], device, dtype=torch.float32) -> list:
    """Run the head's image-feature part on each cached image (records holding one encoder layer):
    one ``ImageFeatures`` per image (``pipeline.head.model.ImageFeatures``: F = Neck(C1) +
    interpolate(E) kept as its two terms)."""
    feats = []
    for it in items:  # non_blocking: pinned batches (loader_options on CUDA) copy while the head runs
        feats.append(head.encode_image(it.tokens.to(device, dtype, non_blocking=True),
                                       it.spatial_shapes.to(device, non_blocking=True),
                                       it.level_start_index.to(device, non_blocking=True),
                                       it.c1.to(device, dtype, non_blocking=True)))
    return feats
