"""Online feature source: the detector runs inside the head's training loop (paper Sec. 4, Table 11).

The paper trains the mask head with the detector in every step; the cache (``cli.py extract``)
replaces that by one frozen pass. This module is the comparison point and Table 11's fine-tuning
rows: it hands :func:`pipeline.train.train` the same :class:`~pipeline.record.SampleRecord` s a
cache would, produced on the fly by the detector's own ``extract`` (``pipeline/detectors``) from
the same preprocessing as stage one, so the head, targets, loss and evaluation are the cached
mode's; only where the features come from differs.

``--finetune``:

- ``none``: the frozen detector runs under ``torch.inference_mode`` (no autograd state; the
  record's tensors are cloned out of it), exactly what ``extract`` computes;
- ``partial``: the Transformer encoder and decoder (``transformer.encoder``/``transformer.decoder``)
  are trained with the head, the backbone and input projections stay frozen (Table 11, "partial");
- ``full``: every detector parameter is trained (Table 11, "full").

Fine-tuned parameters get the learning rate ``train.lr * DETECTOR_LR_FACTOR`` (1/10 of the
head's, paper Table 11 caption), in a second parameter group of the head's AdamW and schedule. The
detector stays in ``eval()`` mode (no dropout, frozen normalisation statistics), as the head sees
it when cached. Gradients reach it through the record's queries, encoder tokens and ``C1``; the
logits and boxes the matcher reads are detached (matching is not differentiable).

Stage two (``pipeline/train.py``, ``pipeline/head``) never imports this module; ``cli.py
train-head --online`` builds the source and passes it in.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from . import data
from .batches import ground_truth
from .extract import ExtractOptions, check_images_before_compute, make_fingerprint
from .frozen_detector import build_frozen_detector
from .record import SampleRecord
from .views import parse_views, plan_view, view_ground_truth, view_image

log = logging.getLogger(__name__)

#: ``--finetune`` choices (paper Table 11: frozen, encoder + decoder, whole detector).
FINETUNE_MODES = ("none", "partial", "full")

#: Detector learning rate relative to the head's when fine-tuning (paper Table 11 caption: 1/10).
DETECTOR_LR_FACTOR = 0.1


@dataclass
class LiveImage:
    """One decoded, preprocessed training image waiting for the detector.

    Attributes:
        image: ``[3, h, w]`` float32, ImageNet-normalised RGB at the test-time size
            (:func:`pipeline.views.view_image`; for ``orig`` the cache's preprocessing).
        image_id: dataset image id; orig_size: ``(height, width)`` pixels of the view's frame
            (the original image for ``orig``).
        gt: :func:`pipeline.batches.ground_truth` of the image in that frame (non-crowd objects).
    """

    image: torch.Tensor
    image_id: int
    orig_size: tuple[int, int]
    gt: dict


class LiveImages(Dataset):
    """Torch dataset of :class:`LiveImage` (decoded in DataLoader workers, like ``extract``'s).

    Item ``n * V + v`` is view ``views[v]`` (:mod:`pipeline.views`; ``orig`` = the cache's
    preprocessing) of the image ``image_ids[indices[n]]``, its ground truth in the view's frame,
    as a multi-view cache holds it. The annotation file is opened lazily in each worker process,
    so the dataset pickles into spawned workers.
    """

    def __init__(self, ann_file: Path, image_dir: Path, image_ids: list[int], indices: list[int],
                 min_size: int, max_size: int, views: list[str] = ("orig",)):
        self.ann_file, self.image_dir = str(ann_file), str(image_dir)
        self.image_ids, self.indices, self.views = list(image_ids), list(indices), list(views)
        self.min_size, self.max_size = min_size, max_size
        self._coco = None

    def __len__(self) -> int:
        return len(self.indices) * len(self.views)

    def __getitem__(self, p: int) -> LiveImage:
        if self._coco is None:
            self._coco = data.load_coco(self.ann_file)
        n, v = divmod(p, len(self.views))
        image_id = self.image_ids[self.indices[n]]
        info = self._coco.imgs[image_id]
        w, h = int(info["width"]), int(info["height"])
        pil = data.load_image(Path(self.image_dir) / info["file_name"], expected_size=(w, h))
        plan = plan_view(self.views[v], image_id, w, h, self.min_size, self.max_size)
        return LiveImage(view_image(pil, plan), image_id, plan.frame_size,
                         view_ground_truth(ground_truth(self._coco, image_id), plan))


class OnlineSource:
    """The detector as stage two's feature source (see the module docstring).

    It offers what :func:`pipeline.train.train` asks of a feature source: ``fingerprint`` (what
    ``extract`` would record with the same flags, so a head trained online evaluates on a
    cache from the same detector), ``encoder_layers``, ``feature_widths``, ``image_ids``,
    ``candidate_indices()``, ``ann_file``, ``dataset(indices, encoder_layer)``,
    ``records(items, encoder_layer)``, ``parameter_groups(lr)``, ``state_dict()`` /
    ``load_state_dict()``, ``num_views`` (``opts.views``: live augmentation) and ``label``.

    Args:
        opts: ``extract``'s options (detector, weights or ``random_init``, dataset, resize,
            ``encoder_layers``, ``top_k``, ``levels``, ``precision``, ``device``); ``out``,
            ``dtype``, ``codec`` and the batching/worker options are unused.
        finetune: one of :data:`FINETUNE_MODES`.

    Raises:
        ValueError: unknown ``finetune``, ``top_k`` or encoder layers out of range, missing weights.
        data.DataError: bad dataset or missing image files (before the detector is built).
        CheckpointError: the weights are not the detector's.
    """

    kind = "online"

    def __init__(self, opts: ExtractOptions, finetune: str = "none"):
        if finetune not in FINETUNE_MODES:
            raise ValueError(f"--finetune must be one of {', '.join(FINETUNE_MODES)}, got {finetune!r}")
        self.opts, self.finetune = opts, finetune
        self.ann_file, self.image_dir = data.resolve_dataset(opts.coco_root, opts.split, opts.ann_file, opts.image_dir)
        coco = data.load_coco(self.ann_file)
        self.image_ids = data.select_image_ids(coco, opts.image_ids, opts.max_images)
        check_images_before_compute(coco, self.image_ids, self.image_dir, skip_bad_images=False)
        self.detector, sha = build_frozen_detector(opts)
        if not 1 <= opts.top_k <= self.detector.num_queries:
            raise ValueError(f"--top-k must be in 1..{self.detector.num_queries}, got {opts.top_k}")
        bad = [k for k in opts.encoder_layers if not 1 <= k <= self.detector.num_encoder_layers]
        if bad:
            raise ValueError(f"--encoder-layers {bad} out of range 1..{self.detector.num_encoder_layers}")
        self.fingerprint = make_fingerprint(opts, self.detector, sha, self.ann_file)
        self.fingerprint["online"] = {"finetune": finetune}
        self.encoder_layers = self.fingerprint["encoder_layers"]
        self.feature_widths = self.fingerprint["feature_widths"]
        self.levels = self.fingerprint["levels"]
        self.views = parse_views(opts.views)  # live augmentation: the cache's view rules, drawn per epoch
        self.num_views = len(self.views)
        self.device = torch.device(opts.device)
        self.dtype = next(self.detector.parameters()).dtype
        self.trainable = trainable_parameters(self.detector, finetune)
        for p in self.trainable.values():
            p.requires_grad_(True)
        self.label = f"--online {opts.detector}"
        log.info("online source: %s, %d images, finetune=%s (%d trainable detector tensors)", opts.detector,
                 len(self.image_ids), finetune, len(self.trainable))

    def candidate_indices(self) -> list[int]:
        """Positions in :attr:`image_ids` that can be trained on (all: nothing is pre-extracted)."""
        return list(range(len(self.image_ids)))

    def dataset(self, indices: list[int], encoder_layer: int) -> LiveImages:
        """The images at ``indices`` with their ground truth (decoded, not yet through the detector)."""
        return LiveImages(self.ann_file, self.image_dir, self.image_ids, indices, self.opts.min_size,
                          self.opts.max_size, self.views)

    def records(self, items: list[LiveImage], encoder_layer: int) -> list[SampleRecord]:
        """Run the detector on each image (batch 1: no padding, as ``extract`` at ``--batch-size 1``).

        Returns one :class:`~pipeline.record.SampleRecord` per image, as
        :meth:`pipeline.cache.FeatureCache.read` returns it (``encoder_layer`` only, the stored
        ``levels``, ``image_id``/``size``/``orig_size`` set) in the detector's dtype, ``gt``
        attached. ``queries``, ``encoder_tokens`` and ``c1`` stay on the detector's device (with
        gradients when fine-tuning); ``logits`` and ``boxes`` are detached onto the CPU for the matcher.
        """
        out = []
        trainable = self.finetune != "none"
        for it in items:
            x = it.image[None].to(self.device, self.dtype)
            mask = torch.zeros((1,) + tuple(x.shape[2:]), dtype=torch.bool, device=self.device)
            rec = self.detector.extract(x, mask, [encoder_layer], int(self.opts.top_k), trainable=trainable)[0]
            rec = rec.select_levels(self.levels)
            out.append(dataclasses.replace(
                rec, logits=rec.logits.detach().float().cpu(), boxes=rec.boxes.detach().float().cpu(),
                query_index=rec.query_index.cpu(), spatial_shapes=rec.spatial_shapes.cpu(),
                level_start_index=rec.level_start_index.cpu(), valid_ratios=rec.valid_ratios.detach().cpu(),
                image_id=int(it.image_id), size=tuple(int(s) for s in x.shape[2:]), orig_size=tuple(it.orig_size),
                gt=it.gt, extras={}))
        return out

    def parameter_groups(self, lr: float) -> list[dict]:
        """AdamW parameter groups of the fine-tuned detector parameters (lr ``lr * DETECTOR_LR_FACTOR``;
        empty when frozen)."""
        if not self.trainable:
            return []
        return [{"params": list(self.trainable.values()), "lr": lr * DETECTOR_LR_FACTOR, "name": "detector"}]

    def state_dict(self) -> dict | None:
        """The fine-tuned detector parameters ``{name: tensor}`` (None when frozen): saved in checkpoints."""
        if not self.trainable:
            return None
        return {k: p.detach().clone() for k, p in self.trainable.items()}

    def load_state_dict(self, state: dict | None) -> None:
        """Restore :meth:`state_dict` (``--resume``).

        Raises:
            ValueError: the checkpoint's fine-tuned parameters are not this source's.
        """
        if not self.trainable:
            return
        if state is None or sorted(state) != sorted(self.trainable):
            raise ValueError("--resume: the checkpoint's fine-tuned detector parameters do not match --finetune "
                             f"{self.finetune}")
        with torch.no_grad():
            for k, p in self.trainable.items():
                p.copy_(state[k])


def trainable_parameters(detector: torch.nn.Module, finetune: str) -> dict[str, torch.nn.Parameter]:
    """The detector parameters a fine-tuning mode trains, by name (paper Table 11).

    ``none`` -> ``{}``; ``partial`` -> those of ``detector.transformer.encoder`` and
    ``detector.transformer.decoder`` (DINO and H-DETR alike; the decoder's class/box heads are part
    of it); ``full`` -> every parameter. Names are ``detector.named_parameters()`` names (a tied
    parameter appears once).

    Raises:
        ValueError: unknown mode, or a ``partial`` detector without ``transformer.encoder/decoder``.
    """
    if finetune not in FINETUNE_MODES:
        raise ValueError(f"--finetune must be one of {', '.join(FINETUNE_MODES)}, got {finetune!r}")
    named = dict(detector.named_parameters(remove_duplicate=True))
    if finetune == "none":
        return {}
    if finetune == "full":
        return named
    transformer = getattr(detector, "transformer", None)
    if transformer is None or not hasattr(transformer, "encoder") or not hasattr(transformer, "decoder"):
        raise ValueError(f"--finetune partial: {type(detector).__name__} has no transformer.encoder/decoder")
    wanted = {id(p) for m in (transformer.encoder, transformer.decoder) for p in m.parameters()}
    return {k: p for k, p in named.items() if id(p) in wanted}
