"""pipeline/data.py on the real COCO subset in ../shared/data/coco."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CocoDetectionInputs,
    DataError,
    category_mapping,
    collate_padded,
    format_category_mapping,
    gt_instances,
    load_coco,
    load_image,
    preprocess,
    resize_shape,
    resolve_dataset,
    select_image_ids,
)

from .conftest import COCO_ROOT, require_coco
EMPTY_VAL_IMAGES = (58636, 226111)

needs_coco = pytest.mark.usefixtures("coco_required")


@pytest.fixture(scope="module")
def val():
    require_coco()
    ann, img_dir = resolve_dataset(COCO_ROOT, "val2017")
    return load_coco(ann), img_dir, ann


# ------------------------------------------------------------------------------- resize_shape


@pytest.mark.parametrize(
    "wh, expected",
    [
        # w >= h: shorter side h -> 800, ow = int(800 * w / h)
        ((640, 480), (800, 1066)),  # int(800 * 640 / 480) = int(1066.67)
        ((480, 640), (1066, 800)),
        ((640, 427), (800, 1199)),  # int(800 * 640 / 427) = int(1199.06)
        ((500, 375), (800, 1066)),
        ((612, 612), (800, 800)),
        # longer side would exceed 1333: size = int(round(1333 * 333 / 640)) = int(round(693.6)) = 694
        ((640, 333), (694, 1333)),  # ow = int(694 * 640 / 333) = int(1333.8) = 1333
        # size = int(round(1333 * 200 / 1000)) = 267; ow = int(267 * 1000 / 200) = 1335 (> max_size, as official)
        ((1000, 200), (267, 1335)),
        # shorter side already equals the target: unchanged
        ((1200, 800), (800, 1200)),
        ((800, 1000), (1000, 800)),
    ],
)
def test_resize_shape_matches_detr(wh, expected):
    assert resize_shape(*wh, min_size=800, max_size=1333) == expected


def test_resize_shape_no_max_and_errors():
    assert resize_shape(1000, 200, 800, None) == (800, 4000)
    with pytest.raises(ValueError):
        resize_shape(0, 10)


# ------------------------------------------------------------------------------- preprocessing


@needs_coco
def test_preprocess_shape_dtype_normalisation(val):
    coco, img_dir, _ = val
    image_id = select_image_ids(coco)[0]
    info = coco.imgs[image_id]
    img = load_image(img_dir / info["file_name"], (info["width"], info["height"]))
    assert img.mode == "RGB" and img.size == (info["width"], info["height"])
    x = preprocess(img, 800, 1333)
    h, w = resize_shape(info["width"], info["height"])
    assert x.shape == (3, h, w) and x.dtype == torch.float32
    # undo the normalisation: values are PIL-bilinear-resized pixels / 255
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    raw = x * std + mean
    ref = torch.from_numpy(np.array(img.resize((w, h), Image.BILINEAR))).permute(2, 0, 1).float() / 255
    assert torch.allclose(raw, ref, atol=1e-5)
    assert raw.min() >= -1e-6 and raw.max() <= 1 + 1e-6

    # bit-exact against torchvision's DETR-style eval transform (F.resize on PIL + to_tensor + normalize)
    import torchvision.transforms.functional as TF

    tv = TF.normalize(TF.to_tensor(TF.resize(img, [h, w])), IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(x, tv)


def test_preprocess_small_scale_and_gray():
    img = Image.fromarray(np.arange(40 * 30, dtype=np.uint8).reshape(30, 40) % 251, mode="L")
    x = preprocess(img, min_size=15, max_size=100)
    assert x.shape == (3, 15, 20)
    assert torch.allclose(x[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0], x[1] * IMAGENET_STD[1] + IMAGENET_MEAN[1], atol=1e-5)


def test_exif_orientation_transposes(tmp_path):
    arr = np.zeros((40, 60, 3), dtype=np.uint8)
    arr[:10, :, 0] = 255  # red band at the top of the stored pixels
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif.tobytes(), quality=95)
    with Image.open(path) as raw:
        assert raw.size == (60, 40)
    out = load_image(path)
    assert out.size == (40, 60)  # transposed
    a = np.asarray(out)
    assert a[:, -5:, 0].mean() > 200 and a[:, :5, 0].mean() < 50  # top band is now on the right
    # the annotation frame is the displayed one
    load_image(path, expected_size=(40, 60))
    with pytest.raises(DataError, match="rotated.jpg"):
        load_image(path, expected_size=(60, 40))


# ------------------------------------------------------------------------------- dataset / collate


@needs_coco
def test_dataset_and_collate_padding(val):
    coco, img_dir, _ = val
    ids = select_image_ids(coco, max_images=3)
    ds = CocoDetectionInputs(coco, img_dir, ids, min_size=200, max_size=333)
    items = [ds[i] for i in range(len(ds))]
    for it, image_id in zip(items, ids):
        info = coco.imgs[image_id]
        assert it["image_id"] == image_id and it["file_name"] == info["file_name"]
        assert it["orig_size"] == (info["height"], info["width"])
        assert it["size"] == resize_shape(info["width"], info["height"], 200, 333)
        assert tuple(it["image"].shape[1:]) == it["size"]
    batch = collate_padded(items)
    hmax = max(it["size"][0] for it in items)
    wmax = max(it["size"][1] for it in items)
    assert batch["images"].shape == (3, 3, hmax, wmax) and batch["mask"].shape == (3, hmax, wmax)
    assert batch["mask"].dtype == torch.bool
    assert batch["image_ids"] == ids
    for i, it in enumerate(items):
        h, w = it["size"]
        assert batch["sizes"][i].tolist() == [h, w]
        assert batch["orig_sizes"][i].tolist() == list(it["orig_size"])
        assert batch["padding"][i].tolist() == [hmax - h, wmax - w]
        assert torch.equal(batch["images"][i, :, :h, :w], it["image"])
        assert not batch["mask"][i, :h, :w].any()
        assert batch["mask"][i, h:, :].all() and batch["mask"][i, :, w:].all()
        assert (batch["images"][i, :, h:, :] == 0).all() and (batch["images"][i, :, :, w:] == 0).all()
    b8 = collate_padded(items, size_divisibility=32)
    assert b8["images"].shape[-2] % 32 == 0 and b8["images"].shape[-1] % 32 == 0
    with pytest.raises(ValueError):
        collate_padded([])


# ------------------------------------------------------------------------------- ids, categories, GT


@needs_coco
def test_ids_and_categories_identical_to_file(val):
    coco, _, ann = val
    raw = json.loads(ann.read_text())
    assert select_image_ids(coco) == sorted(im["id"] for im in raw["images"])
    mapping = category_mapping(coco)
    assert mapping["category_ids"] == sorted(c["id"] for c in raw["categories"])
    assert len(mapping["category_ids"]) == 80 and mapping["category_ids"][0] == 1 and mapping["category_ids"][-1] == 90
    assert mapping["id_to_index"][90] == 79 and mapping["id_to_index"][1] == 0
    assert mapping["id_to_name"] == {c["id"]: c["name"] for c in raw["categories"]}
    assert "0 -> id   1 person" in format_category_mapping(mapping)
    # selection
    assert select_image_ids(coco, image_ids=[139, 58636, 139]) == [139, 58636]
    assert select_image_ids(coco, max_images=5) == sorted(im["id"] for im in raw["images"])[:5]
    with pytest.raises(DataError, match="123456789"):
        select_image_ids(coco, image_ids=[139, 123456789])
    with pytest.raises(DataError):
        select_image_ids(coco, max_images=0)


@needs_coco
def test_gt_instances(val):
    coco, _, _ = val
    for image_id in EMPTY_VAL_IMAGES:
        gt = gt_instances(coco, image_id)
        H, W = coco.imgs[image_id]["height"], coco.imgs[image_id]["width"]
        assert gt["boxes_xyxy"].shape == (0, 4) and gt["boxes_cxcywh_norm"].shape == (0, 4)
        assert gt["category_ids"].shape == (0,) and gt["iscrowd"].shape == (0,)
        assert gt["masks"].shape == (0, H, W)

    crowd_img = next(a["image_id"] for a in coco.dataset["annotations"] if a["iscrowd"])
    gt = gt_instances(coco, crowd_img)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[crowd_img]))
    G = len(anns)
    H, W = gt["orig_size"]
    assert gt["ann_ids"].tolist() == [a["id"] for a in anns]
    assert gt["category_ids"].tolist() == [a["category_id"] for a in anns]
    assert gt["category_ids"].dtype == torch.int64
    assert gt["iscrowd"].tolist() == [bool(a["iscrowd"]) for a in anns] and gt["iscrowd"].any()
    assert gt["masks"].shape == (G, H, W) and gt["masks"].dtype == torch.uint8
    x, y, w, h = anns[0]["bbox"]
    assert torch.allclose(gt["boxes_xyxy"][0], torch.tensor([x, y, x + w, y + h]))
    assert torch.allclose(
        gt["boxes_cxcywh_norm"][0], torch.tensor([(x + w / 2) / W, (y + h / 2) / H, w / W, h / H]), atol=1e-6
    )
    lazy = gt_instances(coco, crowd_img, load_masks=False)
    assert callable(lazy["masks"]) and torch.equal(lazy["masks"](), gt["masks"])
    assert (gt["masks"].flatten(1).sum(1) > 0).all()
    with pytest.raises(DataError):
        gt_instances(coco, 123456789)


# ------------------------------------------------------------------------------- bad inputs


@needs_coco
def test_resolve_dataset_errors(tmp_path):
    with pytest.raises(DataError, match="val2017") as e:
        resolve_dataset(COCO_ROOT, "val2019")
    assert "train2017" in str(e.value) and "val2019" in str(e.value)
    with pytest.raises(DataError, match="not both"):
        resolve_dataset(COCO_ROOT, "val2017", ann_file="a.json", image_dir="x")
    with pytest.raises(DataError, match="no dataset"):
        resolve_dataset()
    with pytest.raises(DataError, match="go together"):
        resolve_dataset(coco_root=COCO_ROOT)
    missing = tmp_path / "nope.json"
    with pytest.raises(DataError, match="nope.json"):
        resolve_dataset(ann_file=missing, image_dir=tmp_path)
    with pytest.raises(DataError, match="no_images_here"):
        resolve_dataset(ann_file=COCO_ROOT / "annotations" / "instances_val2017.json", image_dir=tmp_path / "no_images_here")
    with pytest.raises(DataError, match="no_root"):
        resolve_dataset(tmp_path / "no_root", "val2017")
    ann, d = resolve_dataset(ann_file=COCO_ROOT / "annotations" / "instances_val2017.json", image_dir=COCO_ROOT / "val2017")
    assert ann.is_file() and d.is_dir()


@needs_coco
def test_missing_and_truncated_image(val, tmp_path):
    coco, img_dir, _ = val
    image_id = select_image_ids(coco)[0]
    info = coco.imgs[image_id]
    with pytest.raises(DataError, match="not found.*does_not_exist.jpg"):
        load_image(tmp_path / "does_not_exist.jpg")
    data = (img_dir / info["file_name"]).read_bytes()
    cut = tmp_path / info["file_name"]
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=info["file_name"]) as e:
        load_image(cut, (info["width"], info["height"]))
    assert "truncated" in str(e.value)
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="garbage.jpg"):
        load_image(garbage)
    # through the dataset: missing file in the image dir
    ds = CocoDetectionInputs(coco, tmp_path / "empty_dir", [image_id])
    with pytest.raises(DataError, match=info["file_name"]):
        ds[0]


@needs_coco
def test_annotation_size_disagrees_with_image(val, tmp_path):
    _, img_dir, ann = val
    raw = json.loads(ann.read_text())
    im = raw["images"][0]
    im["width"] += 7
    bad = tmp_path / "instances_bad.json"
    bad.write_text(json.dumps(raw))
    coco = load_coco(bad)
    ds = CocoDetectionInputs(coco, img_dir, [im["id"]])
    with pytest.raises(DataError, match=im["file_name"]) as e:
        ds[0]
    assert f"{im['width']} x {im['height']}" in str(e.value)


@needs_coco
@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_annotation_file_missing_key(val, tmp_path, key):
    _, _, ann = val
    raw = json.loads(ann.read_text())
    del raw[key]
    bad = tmp_path / f"no_{key}.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(DataError, match=f"no_{key}.json") as e:
        load_coco(bad)
    assert repr(key) in str(e.value)


def test_annotation_file_not_json(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [')
    with pytest.raises(DataError, match="broken.json.*JSON|JSON.*broken.json"):
        load_coco(bad)
    with pytest.raises(DataError, match="absent.json"):
        load_coco(tmp_path / "absent.json")
    lst = tmp_path / "list.json"
    lst.write_text("[]")
    with pytest.raises(DataError, match="list.json"):
        load_coco(lst)


def test_annotation_record_missing_field(tmp_path):
    bad = tmp_path / "fields.json"
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 4}], "annotations": [], "categories": []}))
    with pytest.raises(DataError, match="fields.json.*height"):
        load_coco(bad)
