"""Augmented views in the cache (issue 21): deterministic views, ground truth transformed with the image."""

from __future__ import annotations

import pytest
import torch

from pipeline import data
from pipeline.batches import ground_truth
from pipeline.cache import FeatureCache
from pipeline.config import load_config
from pipeline.extract import ExtractOptions, run_extract
from pipeline.train import CachedSource, train
from pipeline.views import LSJ_VIEWS, parse_views, plan_view, view_choices, view_ground_truth, view_image

from .conftest import COCO_ROOT, REPO, SMALL_HEAD, require_coco

DETECTOR = dict(detector="dino-focalnet", preset="golden-small", random_init=True, seed=0, min_size=160,
                max_size=240, encoder_layers=[4], top_k=30)


def test_parse_views_and_lsj():
    assert parse_views("orig,hflip,short640+hflip,lsj") == ["orig", "hflip", "hflip+short640", *LSJ_VIEWS]
    for bad in ("vflip", "short0", "scale-1", ""):
        with pytest.raises(ValueError, match="--views"):
            parse_views(bad)


def test_flipped_and_cropped_views_of_a_cached_image(tmp_path):
    require_coco()
    store = tmp_path / "views.zarr"
    views = ["orig", "hflip", "scale2.0", "short128"]
    run_extract(ExtractOptions(out=store, coco_root=COCO_ROOT, split="train2017", max_images=1, views=views,
                               **DETECTOR))
    cache = FeatureCache.open(store)
    assert cache.fingerprint["views"] == ["orig", "hflip", "scale2.0", "short128"]
    assert len(cache) == 4 and len(set(cache.image_ids.tolist())) == 1 and cache.done_indices() == [0, 1, 2, 3]
    source = CachedSource(store)
    assert source.num_views == 4 and len(source.image_ids) == 1 and source.candidate_indices() == [0]
    items = [source.dataset([0], 4)[p] for p in range(4)]
    orig, flip, crop, small = items
    coco = data.load_coco(source.ann_file)
    gt = ground_truth(coco, orig.image_id)
    assert gt["masks"].shape[0] > 0
    # orig: the ground truth and the input of the plain cache
    assert torch.equal(orig.gt["masks"], gt["masks"])
    # hflip: the flipped view's masks are the original's masks flipped, boxes mirrored
    assert flip.orig_size == orig.orig_size and flip.size == orig.size
    assert torch.equal(flip.gt["masks"], orig.gt["masks"].flip(-1))
    w = orig.orig_size[1]
    b = orig.gt["boxes_xyxy"]
    torch.testing.assert_close(flip.gt["boxes_xyxy"], torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1))
    torch.testing.assert_close(flip.gt["boxes_cxcywh"][:, 0], 1 - orig.gt["boxes_cxcywh"][:, 0])
    # scale2.0: a crop of the test-time size out of the doubled image; masks are the crop of the original's
    h0, w0 = orig.orig_size
    plan = plan_view("scale2.0", orig.image_id, w0, h0, 160, 240)
    x0, y0, x1, y1 = plan.crop
    assert crop.size == orig.size and crop.orig_size == (y1 - y0, x1 - x0) and (y1 - y0) < h0
    kept = orig.gt["masks"][:, y0:y1, x0:x1]
    assert torch.equal(crop.gt["masks"], kept[kept.flatten(1).sum(1) > 0])
    assert min(small.size) == 128 and small.orig_size == orig.orig_size
    # the stored features are the detector's on the flipped image: they differ from the original's
    assert not torch.allclose(flip.tokens.float(), orig.tokens.float())
    # the view plans are deterministic and "orig" is exactly the cache's preprocessing
    pil = data.load_image(COCO_ROOT / "train2017" / coco.imgs[orig.image_id]["file_name"])
    assert plan == plan_view("scale2.0", orig.image_id, w0, h0, 160, 240)
    assert torch.equal(view_image(pil, plan_view("orig", orig.image_id, w0, h0, 160, 240)), data.preprocess(pil, 160, 240))
    assert torch.equal(view_image(pil, plan_view("hflip", orig.image_id, w0, h0, 160, 240)),
                       data.preprocess(pil, 160, 240).flip(-1))
    # train-head on the multi-view store: one seeded view per image per epoch
    cfg = load_config(REPO / "configs" / "mfdetr_dino_focalnet_l.yaml", list(SMALL_HEAD) + ["train.max_iters=2",
                                                                                          "train.batch_size=1"])
    assert train(cfg, store, tmp_path / "run", device="cpu", progress=False)["step"] == 2


def test_view_choices_are_seeded_per_epoch():
    a = [view_choices(0, e, 50, 3) for e in range(4)]
    assert a == [view_choices(0, e, 50, 3) for e in range(4)]
    assert all(set(c) == {0, 1, 2} for c in a) and a[0] != a[1]
    assert view_choices(0, 0, 5, 1) == [0] * 5


def test_view_ground_truth_of_an_empty_image():
    gt = {"boxes_cxcywh": torch.zeros(0, 4), "boxes_xyxy": torch.zeros(0, 4),
          "category_ids": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 20, 30, dtype=torch.uint8)}
    out = view_ground_truth(gt, plan_view("hflip+scale1.5", 1, 30, 20, 16, 24))
    assert out["masks"].shape[0] == 0 and out["boxes_cxcywh"].shape == (0, 4)
