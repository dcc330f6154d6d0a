"""COCO-format input: dataset layout, annotation loading, image decoding, the detector's
test-time preprocessing, batching with recorded padding, and ground truth for training.

Coordinate conventions used throughout (and in the docstrings below):

* **original pixels**: the frame of the decoded image (after EXIF orientation), which is the frame
  of the annotation file's ``width``/``height`` and of its boxes and polygons.
* **resized pixels**: the frame of the preprocessed tensor fed to the detector
  (:func:`resize_shape`), before batch padding.
* boxes are ``xyxy`` (corners), ``cxcywh`` (center + size) or COCO ``xywh`` (top-left + size);
  ``_norm`` means divided by the image ``(w, h)`` so the whole image is ``[0, 1]``.

Image ids and category ids are always kept exactly as written in the annotation file; the only
contiguous index is the one :func:`category_mapping` builds explicitly.

The preprocessing reproduces DETR / DINO's evaluation transform
(``facebookresearch/detr`` ``datasets/coco.py`` ``make_coco_transforms('val')``:
``RandomResize([800], max_size=1333)`` + ``ToTensor`` + ``Normalize``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

REQUIRED_KEYS = ("images", "annotations", "categories")
_IMAGE_FIELDS = ("id", "file_name", "width", "height")
_ANN_FIELDS = ("id", "image_id", "category_id", "bbox")
_CAT_FIELDS = ("id", "name")


class DataError(ValueError):
    """Bad input data: a missing/corrupt file, a malformed annotation file or bad selection.

    The message always names the offending file (or field / id) and what was expected.
    """


# --------------------------------------------------------------------------------------------
# Dataset layout and annotation file
# --------------------------------------------------------------------------------------------


def available_splits(coco_root: str | Path) -> list[str]:
    """Splits that have an ``annotations/instances_{split}.json`` under ``coco_root`` (sorted)."""
    ann_dir = Path(coco_root) / "annotations"
    if not ann_dir.is_dir():
        return []
    return sorted(p.name[len("instances_") : -len(".json")] for p in ann_dir.glob("instances_*.json"))


def resolve_dataset(
    coco_root: str | Path | None = None,
    split: str | None = None,
    ann_file: str | Path | None = None,
    image_dir: str | Path | None = None,
) -> tuple[Path, Path]:
    """Resolve where a COCO-format dataset lives.

    Exactly one of two forms must be given:

    * ``coco_root`` + ``split``: the standard detectron2 / mmdetection layout
      ``{coco_root}/annotations/instances_{split}.json`` and images in ``{coco_root}/{split}/``;
    * ``ann_file`` + ``image_dir``: any annotation file and image folder.

    Returns:
        ``(ann_file, image_dir)`` as resolved :class:`~pathlib.Path` s; both exist.

    Raises:
        DataError: both forms or neither given, or one form only half given; ``coco_root``
            missing; unknown ``split`` (the message lists the splits found under
            ``annotations/``); the annotation file or the image folder missing (path named).
    """
    root_form = coco_root is not None or split is not None
    file_form = ann_file is not None or image_dir is not None
    if root_form and file_form:
        raise DataError(
            "give either coco_root + split or ann_file + image_dir, not both "
            f"(got coco_root={coco_root!r}, split={split!r}, ann_file={ann_file!r}, image_dir={image_dir!r})"
        )
    if not root_form and not file_form:
        raise DataError("no dataset given: pass coco_root + split, or ann_file + image_dir")

    if root_form:
        if coco_root is None or split is None:
            raise DataError(f"coco_root and split go together (got coco_root={coco_root!r}, split={split!r})")
        root = Path(coco_root).expanduser()
        if not root.is_dir():
            raise DataError(f"COCO root directory not found: {root}")
        ann = root / "annotations" / f"instances_{split}.json"
        if not ann.is_file():
            found = available_splits(root)
            raise DataError(
                f"unknown split {split!r}: {ann} does not exist; splits found under "
                f"{root / 'annotations'}: {', '.join(found) if found else '(none)'}"
            )
        img_dir = root / split
        if not img_dir.is_dir():
            raise DataError(f"image directory for split {split!r} not found: {img_dir}")
        return ann.resolve(), img_dir.resolve()

    if ann_file is None or image_dir is None:
        raise DataError(f"ann_file and image_dir go together (got ann_file={ann_file!r}, image_dir={image_dir!r})")
    ann = Path(ann_file).expanduser()
    img_dir = Path(image_dir).expanduser()
    if not ann.is_file():
        raise DataError(f"annotation file not found: {ann}")
    if not img_dir.is_dir():
        raise DataError(f"image directory not found: {img_dir}")
    return ann.resolve(), img_dir.resolve()


def _check_records(ann_file: Path, key: str, records: list, fields: Sequence[str]) -> None:
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{ann_file}: {key}[{i}] is a {type(rec).__name__}, expected an object")
        missing = [f for f in fields if f not in rec]
        if missing:
            raise DataError(f"{ann_file}: {key}[{i}] lacks field(s) {', '.join(missing)}")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)


def _check_bbox(where: str, bbox) -> bool:
    """Raise on a malformed COCO ``xywh`` box; return False for a zero-area or negative one (a counted skip)."""
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        raise DataError(f"{where}: bbox {bbox!r} is not [x, y, width, height] of 4 finite numbers")
    return bbox[2] > 0 and bbox[3] > 0


def _valid_polygons(where: str, seg, height: int, width: int) -> int:
    """Check one annotation's ``segmentation``; return how many of its polygons are unusable.

    Unusable = fewer than 3 points or an odd number of coordinates (pycocotools would read a
    4-number polygon as a box): the caller drops them, as detectron2 does. Raises on what cannot
    be repaired: non-numeric coordinates, a malformed RLE, or an RLE of another size than its image.
    """
    if isinstance(seg, list):
        for k, poly in enumerate(seg):
            if not isinstance(poly, list) or not all(_is_number(v) for v in poly):
                raise DataError(f"{where}: segmentation polygon {k} is not a list of finite numbers")
        return sum(len(poly) < 6 or len(poly) % 2 == 1 for poly in seg)
    if isinstance(seg, dict):
        size = seg.get("size")
        if "counts" not in seg or not isinstance(size, list) or len(size) != 2:
            raise DataError(f"{where}: RLE segmentation needs 'counts' and 'size' [height, width]")
        if [int(size[0]), int(size[1])] != [height, width]:
            raise DataError(f"{where}: RLE size {size} differs from its image's [height, width] = "
                            f"[{height}, {width}]")
        return 0
    raise DataError(f"{where}: segmentation is a {type(seg).__name__}; expected polygons (a list) or an RLE (a dict)")


def load_coco(ann_file: str | Path, require_annotations: bool = True) -> COCO:
    """Read and validate a COCO instances json, return a pycocotools ``COCO`` over it.

    With ``require_annotations=False`` an image-info file without ``annotations`` (COCO
    test-dev's ``image_info_test-dev2017.json``) is accepted as having none: extraction and
    ``--format-only`` evaluation need only ``images`` and ``categories``.

    The file is parsed once here (so that errors can name it) and handed to pycocotools;
    image ids, category ids and annotations stay exactly as in the file, except the unusable
    polygons dropped below.

    Validation: the file is valid JSON, a top-level object with list-valued ``images``,
    ``annotations`` and ``categories``; every image has ``id, file_name, width, height``, every
    annotation ``id, image_id, category_id, bbox``, every category ``id, name``; image ids are
    unique; annotations refer to listed images and categories; every ``bbox`` is 4 finite numbers
    (zero-area and negative boxes are counted in a warning: training drops them); polygons have
    at least 3 points (smaller ones are dropped with a counted warning, and an annotation left
    without polygons with them, as detectron2 does), and an RLE has its image's size.

    Raises:
        DataError: file missing or unreadable, not valid JSON, a required key missing
            (the message names the file and the key), a record lacking a field, or a malformed
            box or segmentation (the message names the annotation id and what was expected).
    """
    path = Path(ann_file)
    try:
        with open(path, "rb") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise DataError(f"annotation file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"annotation file is not valid JSON: {path} ({exc})") from None
    except OSError as exc:
        raise DataError(f"cannot read annotation file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise DataError(f"annotation file {path}: top level is a {type(data).__name__}, expected an object")
    if not require_annotations and "annotations" not in data:
        data["annotations"] = []
    for key in REQUIRED_KEYS:
        if key not in data:
            raise DataError(f"annotation file {path} has no {key!r} key (a COCO instances file needs {', '.join(REQUIRED_KEYS)})")
        if not isinstance(data[key], list):
            raise DataError(f"annotation file {path}: {key!r} is a {type(data[key]).__name__}, expected a list")
    _check_records(path, "images", data["images"], _IMAGE_FIELDS)
    _check_records(path, "annotations", data["annotations"], _ANN_FIELDS)
    _check_records(path, "categories", data["categories"], _CAT_FIELDS)
    img_ids = [im["id"] for im in data["images"]]
    if len(set(img_ids)) != len(img_ids):
        dup = sorted({i for i in img_ids if img_ids.count(i) > 1})[:10]
        raise DataError(f"annotation file {path}: duplicate image ids {dup}")
    images = {im["id"]: im for im in data["images"]}
    cat_set = {c["id"] for c in data["categories"]}
    empty_boxes, dropped_polygons, kept = 0, 0, []
    for ann in data["annotations"]:
        where = f"annotation file {path}: annotation {ann['id']}"
        if ann["image_id"] not in images:
            raise DataError(f"{where} refers to unknown image_id {ann['image_id']}")
        if ann["category_id"] not in cat_set:
            raise DataError(f"{where} refers to unknown category_id {ann['category_id']}")
        empty_boxes += not _check_bbox(where, ann["bbox"])
        if "segmentation" in ann:
            im = images[ann["image_id"]]
            bad = _valid_polygons(where, ann["segmentation"], int(im["height"]), int(im["width"]))
            if bad:
                dropped_polygons += bad
                ann = dict(ann, segmentation=[q for q in ann["segmentation"] if len(q) >= 6 and len(q) % 2 == 0])
                if not ann["segmentation"]:
                    logger.debug("%s: no polygon of >= 3 points left; annotation dropped", where)
                    continue
        kept.append(ann)
    if empty_boxes:
        logger.warning("%s: %d annotation(s) with a zero-area or negative box; they are not used for training "
                       "(as DETR drops them)", path, empty_boxes)
    if dropped_polygons:
        logger.warning("%s: dropped %d polygon(s) of fewer than 3 points and %d annotation(s) left without a "
                       "polygon (as detectron2 does)", path, dropped_polygons, len(data["annotations"]) - len(kept))
        data["annotations"] = kept

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
        coco.createIndex()
    logger.info("%s: %d images, %d annotations, %d categories", path, len(data["images"]),
                len(data["annotations"]), len(data["categories"]))
    return coco


def select_image_ids(
    coco: COCO, image_ids: Iterable[int] | None = None, max_images: int | None = None
) -> list[int]:
    """Choose which images to process.

    Args:
        coco: the dataset.
        image_ids: explicit image ids (as in the file); ``None`` = every image of the file.
            Duplicates are dropped.
        max_images: keep only the first N of the sorted selection; ``None`` = all.

    Returns:
        Image ids sorted ascending (values exactly as in the file).

    Raises:
        DataError: an explicit id that the file does not list (the unknown ids are named), or
            ``max_images < 1``.
    """
    known = set(coco.imgs.keys())
    if image_ids is None:
        ids = sorted(known)
    else:
        ids = sorted({int(i) for i in image_ids})
        unknown = [i for i in ids if i not in known]
        if unknown:
            shown = ", ".join(str(i) for i in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
            raise DataError(f"{len(unknown)} image id(s) not in the annotation file: {shown}")
    if max_images is not None:
        if int(max_images) < 1:
            raise DataError(f"max_images must be >= 1, got {max_images}")
        ids = ids[: int(max_images)]
    return ids


def category_mapping(coco: COCO) -> dict:
    """The dataset's categories and an explicit contiguous index over them.

    COCO lists 80 categories with ids 1..90 (gaps); a model with C classes uses 0..C-1.

    Returns:
        dict with
          * ``category_ids``: ``list[int]`` the file's category ids, sorted ascending;
          * ``id_to_index``: ``dict[int, int]`` category id -> contiguous index ``0..C-1``
            (position in ``category_ids``);
          * ``names``: ``list[str]`` names aligned with ``category_ids``;
          * ``id_to_name``: ``dict[int, str]``.
    """
    cat_ids = sorted(coco.cats.keys())
    names = [coco.cats[c]["name"] for c in cat_ids]
    return {
        "category_ids": cat_ids,
        "id_to_index": {c: i for i, c in enumerate(cat_ids)},
        "names": names,
        "id_to_name": dict(zip(cat_ids, names)),
    }


def format_category_mapping(mapping: dict) -> str:
    """One line per category: ``index -> category_id name`` (for logs; see STYLE pitfalls)."""
    return "\n".join(
        f"{i:3d} -> id {c:3d} {n}" for i, (c, n) in enumerate(zip(mapping["category_ids"], mapping["names"]))
    )


# --------------------------------------------------------------------------------------------
# Images and preprocessing
# --------------------------------------------------------------------------------------------


def resize_shape(width: int, height: int, min_size: int = 800, max_size: int | None = 1333) -> tuple[int, int]:
    """Output size of DETR's test-time resize for an image of ``width x height`` pixels.

    Matches ``get_size_with_aspect_ratio`` in ``facebookresearch/detr`` ``datasets/transforms.py``
    (used unchanged by Deformable-DETR, DINO and H-DETR): the shorter side becomes ``min_size``
    unless the longer side would then exceed ``max_size``, in which case the shorter side becomes
    ``int(round(max_size * short / long))``; the longer side is then ``int(size * long / short)``
    (truncation, so it can end a pixel off - and even slightly above ``max_size`` - exactly as
    the official code). An image whose shorter side already equals the target keeps its size.

    Args:
        width, height: original size in pixels.
        min_size: target of the shorter side.
        max_size: cap for the longer side (``None`` = no cap).

    Returns:
        ``(new_h, new_w)`` in resized pixels.

    Raises:
        ValueError: non-positive sizes.
    """
    w, h = int(width), int(height)
    if w <= 0 or h <= 0 or min_size <= 0:
        raise ValueError(f"sizes must be positive, got width={width}, height={height}, min_size={min_size}")
    size = min_size
    if max_size is not None:
        min_original = float(min(w, h))
        max_original = float(max(w, h))
        if max_original / min_original * size > max_size:
            size = int(round(max_size * min_original / max_original))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        ow = size
        oh = int(size * h / w)
    else:
        oh = size
        ow = int(size * w / h)
    return oh, ow


def _sixteen_bit_to_8bit(im: Image.Image) -> Image.Image:
    """A 16-bit grayscale image (PIL modes ``I;16*`` / ``I``) scaled to 8 bits (``v / 257``, rounded).

    PIL's own ``convert("RGB")`` clips such values at 255 instead of scaling them, which turns
    most of a 16-bit image white. Other modes are returned unchanged.
    """
    if not (im.mode.startswith("I;16") or im.mode == "I"):
        return im
    arr = np.asarray(im, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8), mode="L")


def load_image(path: str | Path, expected_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image file fully, apply its EXIF orientation and convert it to RGB.

    Args:
        path: image file.
        expected_size: ``(width, height)`` from the annotation file, checked against the decoded
            (EXIF-oriented) image - as detectron2's ``check_image_size`` does; ``None`` = no check.

    Returns:
        ``PIL.Image`` in mode ``RGB``, fully loaded (the file is closed), original pixels.
        Grayscale, palette, CMYK and RGBA (alpha dropped) files are converted by PIL; 16-bit
        grayscale is scaled to 8 bits (:func:`_sixteen_bit_to_8bit`).

    Raises:
        DataError: file missing; unreadable, corrupt or truncated (the decode is forced with
            ``.load()`` so truncation is caught here, unless the caller set
            ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``); decoded size differs from
            ``expected_size``. The message names the file and, for size, both sizes.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            oriented = ImageOps.exif_transpose(im)
            rgb = _sixteen_bit_to_8bit(oriented).convert("RGB")
            rgb.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"corrupt or truncated image file {path}: {type(exc).__name__}: {exc}") from None
    if expected_size is not None:
        ew, eh = int(expected_size[0]), int(expected_size[1])
        if rgb.size != (ew, eh):
            raise DataError(
                f"image {path} decodes to width x height = {rgb.size[0]} x {rgb.size[1]} "
                f"(after EXIF orientation) but the annotation file says {ew} x {eh}"
            )
    return rgb


def to_normalized_tensor(pil_image: Image.Image) -> Tensor:
    """``ToTensor`` + ImageNet ``Normalize`` of an RGB PIL image.

    Returns:
        ``[3, h, w]`` float32: ``(pixel / 255 - mean) / std`` with ImageNet mean/std, channel RGB.
    """
    arr = np.asarray(pil_image.convert("RGB") if pil_image.mode != "RGB" else pil_image, dtype=np.uint8)
    img = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    return img.sub_(mean).div_(std)


def preprocess(pil_image: Image.Image, min_size: int = 800, max_size: int | None = 1333) -> Tensor:
    """DETR / DINO test-time preprocessing of one RGB image.

    Resize to :func:`resize_shape` with PIL ``BILINEAR`` (what torchvision's ``F.resize`` does on a
    PIL image in DETR's eval transform: ``img.resize((w, h), BILINEAR)``, skipped when the size is
    unchanged), then ``ToTensor`` (/255) and ImageNet normalisation (:func:`to_normalized_tensor`).

    Args:
        pil_image: RGB image in original pixels (see :func:`load_image`).
        min_size, max_size: as :func:`resize_shape`.

    Returns:
        ``[3, new_h, new_w]`` float32, normalised, resized pixels.
    """
    if pil_image.mode != "RGB":
        pil_image = pil_image.convert("RGB")
    w, h = pil_image.size
    new_h, new_w = resize_shape(w, h, min_size, max_size)
    if (new_h, new_w) != (h, w):
        pil_image = pil_image.resize((new_w, new_h), Image.BILINEAR)
    return to_normalized_tensor(pil_image)


class CocoDetectionInputs(Dataset):
    """Detector inputs for selected images of a COCO-format dataset (test-time preprocessing).

    Item ``i`` is a dict:
      * ``image_id``: int, as in the annotation file;
      * ``file_name``: str, as in the annotation file;
      * ``orig_size``: ``(h, w)`` ints, original pixels (= the annotation's height/width);
      * ``size``: ``(h, w)`` ints, resized pixels (the image tensor's shape);
      * ``image``: ``[3, h, w]`` float32 normalised (:func:`preprocess`).

    ``__getitem__`` raises :class:`DataError` for a missing / corrupt / wrongly-sized image;
    whether to skip such images (``skip_bad_images``) is the caller's decision.
    """

    def __init__(
        self,
        coco: COCO,
        image_dir: str | Path,
        image_ids: Sequence[int] | None = None,
        min_size: int = 800,
        max_size: int | None = 1333,
    ):
        self.coco = coco
        self.image_dir = Path(image_dir)
        self.image_ids = list(image_ids) if image_ids is not None else select_image_ids(coco)
        self.min_size = min_size
        self.max_size = max_size

    def __len__(self) -> int:
        return len(self.image_ids)

    def path_of(self, image_id: int) -> Path:
        """Path of the image file of ``image_id``."""
        return self.image_dir / self.coco.imgs[image_id]["file_name"]

    def __getitem__(self, index: int) -> dict:
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        img = load_image(self.path_of(image_id), expected_size=(info["width"], info["height"]))
        tensor = preprocess(img, self.min_size, self.max_size)
        return {
            "image_id": image_id,
            "file_name": info["file_name"],
            "orig_size": (int(info["height"]), int(info["width"])),
            "size": (int(tensor.shape[1]), int(tensor.shape[2])),
            "image": tensor,
        }


def collate_padded(items: Sequence[dict], size_divisibility: int = 1) -> dict:
    """Batch items of :class:`CocoDetectionInputs`, zero-padding bottom/right (DETR's
    ``nested_tensor_from_tensor_list``), recording the padding so results can be cropped per image.

    Args:
        items: dicts with ``image [3, h, w]``, ``image_id``, ``file_name``, ``orig_size``, ``size``.
        size_divisibility: round the padded size up to a multiple of this (1 = DETR: the max).

    Returns:
        dict with
          * ``images``: ``[B, 3, Hmax, Wmax]`` float32, zeros in the padding (after normalisation);
          * ``mask``: ``[B, Hmax, Wmax]`` bool, True on padding;
          * ``image_ids``: ``list[int]``; ``file_names``: ``list[str]``;
          * ``orig_sizes``: ``[B, 2]`` int64 ``(h, w)`` original pixels;
          * ``sizes``: ``[B, 2]`` int64 ``(h, w)`` resized pixels (valid region);
          * ``padding``: ``[B, 2]`` int64 ``(pad_bottom, pad_right)`` in resized pixels.

    Raises:
        ValueError: empty ``items``.
    """
    if len(items) == 0:
        raise ValueError("collate_padded: empty batch")
    imgs = [it["image"] for it in items]
    hmax = max(int(t.shape[1]) for t in imgs)
    wmax = max(int(t.shape[2]) for t in imgs)
    if size_divisibility > 1:
        d = int(size_divisibility)
        hmax, wmax = -(-hmax // d) * d, -(-wmax // d) * d
    b = len(imgs)
    images = imgs[0].new_zeros((b, imgs[0].shape[0], hmax, wmax))
    mask = torch.ones((b, hmax, wmax), dtype=torch.bool)
    sizes = torch.zeros((b, 2), dtype=torch.int64)
    for i, t in enumerate(imgs):
        h, w = int(t.shape[1]), int(t.shape[2])
        images[i, :, :h, :w].copy_(t)
        mask[i, :h, :w] = False
        sizes[i, 0], sizes[i, 1] = h, w
    padding = torch.tensor([[hmax, wmax]], dtype=torch.int64) - sizes
    return {
        "images": images,
        "mask": mask,
        "image_ids": [int(it["image_id"]) for it in items],
        "file_names": [it.get("file_name", "") for it in items],
        "orig_sizes": torch.tensor([list(it["orig_size"]) for it in items], dtype=torch.int64),
        "sizes": sizes,
        "padding": padding,
    }


# --------------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------------


def gt_instances(coco: COCO, image_id: int, load_masks: bool = True) -> dict:
    """Ground-truth instances of one image, in original pixels, crowd kept and flagged.

    Boxes are converted from COCO ``xywh`` to ``xyxy``, clamped to the image, and objects whose
    clamped box is empty are dropped - as DETR's ``ConvertCocoPolysToMask`` does (DETR also drops
    crowd objects; here they are kept with ``iscrowd=True`` so the caller decides, e.g. to ignore
    them in matching as COCOeval does).

    Args:
        coco: the dataset.
        image_id: id as in the file.
        load_masks: True -> ``masks`` is a tensor; False -> a zero-argument callable producing it
            (decoding polygons / RLE is the expensive part).

    Returns:
        dict with (G objects, file order)
          * ``ann_ids``: ``[G]`` int64 annotation ids;
          * ``boxes_xyxy``: ``[G, 4]`` float32, original pixels;
          * ``boxes_cxcywh_norm``: ``[G, 4]`` float32, cxcywh divided by image ``(w, h)``;
          * ``category_ids``: ``[G]`` int64, dataset category ids (not contiguous indices);
          * ``iscrowd``: ``[G]`` bool;
          * ``area``: ``[G]`` float32, the annotation's ``area`` field (original pixels^2);
          * ``masks``: ``[G, H, W]`` uint8 {0, 1} from ``coco.annToMask`` (polygons and
            compressed/uncompressed RLE), or a callable returning it;
          * ``orig_size``: ``(H, W)``.
        An image without annotations gives G = 0 (``[0, 4]`` boxes, ``[0, H, W]`` masks).

    Raises:
        DataError: ``image_id`` not in the file.
    """
    if image_id not in coco.imgs:
        raise DataError(f"image id {image_id} not in the annotation file")
    info = coco.imgs[image_id]
    H, W = int(info["height"]), int(info["width"])
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=None))

    boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2].clamp_(min=0, max=W)
    boxes[:, 1::2].clamp_(min=0, max=H)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    kept = [a for a, k in zip(anns, keep.tolist()) if k]
    if len(kept) != len(anns):
        logger.debug("image %s: dropped %d annotation(s) with empty boxes", image_id, len(anns) - len(kept))
    boxes = boxes[keep]

    cxcywh = torch.stack(
        [(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2, boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]],
        dim=1,
    ) / torch.tensor([W, H, W, H], dtype=torch.float32)

    def make_masks() -> Tensor:
        if not kept:
            return torch.zeros((0, H, W), dtype=torch.uint8)
        return torch.from_numpy(np.stack([coco.annToMask(a) for a in kept], 0).astype(np.uint8))

    masks: Tensor | Callable[[], Tensor] = make_masks() if load_masks else make_masks
    return {
        "ann_ids": torch.tensor([a["id"] for a in kept], dtype=torch.int64),
        "boxes_xyxy": boxes,
        "boxes_cxcywh_norm": cxcywh.reshape(-1, 4),
        "category_ids": torch.tensor([a["category_id"] for a in kept], dtype=torch.int64),
        "iscrowd": torch.tensor([bool(a.get("iscrowd", 0)) for a in kept], dtype=torch.bool),
        "area": torch.tensor([float(a.get("area", 0.0)) for a in kept], dtype=torch.float32),
        "masks": masks,
        "orig_size": (H, W),
    }
