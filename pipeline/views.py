"""Deterministic augmented views of a training image, for the cache and for online training.

The paper trains with flips, multi-scale resizing and crops (and large-scale jitter, Table 13).
A cache made by one frozen pass would freeze that away, so ``extract --views orig,hflip,short640``
stores V *views* of each training image, and ``train-head`` draws one view per image per epoch
(seeded, :func:`view_choices`); ``train-head --online --views ...`` applies the same views live.

A view name is ``+``-joined tokens (order does not matter):

- ``orig``: the image as extracted (no token changes anything);
- ``hflip``: mirrored left-right;
- ``short<S>``: the test-time resize with shorter side ``S`` pixels (instead of ``--min-size``;
  the ``--max-size`` cap still applies), e.g. ``short640``;
- ``scale<F>``: the test-time size times ``F``; for ``F > 1`` a window of the test-time size is
  cropped from the enlarged image at an offset seeded by the image id and the view name (the
  scale-and-crop of large-scale jitter), for ``F < 1`` the whole image is shrunk (LSJ pads it; the
  cache keeps only the valid region anyway).

``lsj`` expands to :data:`LSJ_VIEWS`, a fixed set standing for LSJ's continuous scale range
(Ghiasi et al. 2021: scale 0.1-2.0, crop, flip) as discrete views.

Every view is one :class:`ViewPlan`: flip, then a crop box in (flipped) original pixels (the
view's *frame*, whose size is the record's ``orig_size``), then a bilinear resize of that frame to
the detector input ``size``. :func:`view_image` applies it to the image and
:func:`view_ground_truth` to the ground truth (boxes and masks), so both stay consistent.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import torch
from PIL import Image

from . import data

#: ``lsj`` = these views (scale-and-crop above 1, shrink below, half of them mirrored).
LSJ_VIEWS = ("scale0.5", "hflip+scale0.75", "scale1.25", "hflip+scale1.5", "scale2.0")

_TOKEN = re.compile(r"^(orig|hflip|short(\d+)|scale(\d+(?:\.\d+)?))$")


@dataclass(frozen=True)
class ViewPlan:
    """How one view of one image is made (all integers are pixels).

    Attributes:
        name: the view's name. flip: mirror left-right first.
        crop: ``(x0, y0, x1, y1)`` box in the (flipped) original image: the view's frame.
        size: ``(h, w)`` detector input the frame is resized to.
    """

    name: str
    flip: bool
    crop: tuple[int, int, int, int]
    size: tuple[int, int]

    @property
    def frame_size(self) -> tuple[int, int]:
        """``(h, w)`` of the frame in original pixels (the record's ``orig_size``)."""
        x0, y0, x1, y1 = self.crop
        return y1 - y0, x1 - x0


def parse_views(spec: str | list[str] | None) -> list[str]:
    """``"orig,hflip,lsj"`` -> canonical view names (``lsj`` expanded, tokens sorted, repeats dropped).

    Raises:
        ValueError: an unknown token, a scale/short of 0, or an empty list (names ``--views``).
    """
    if spec is None:
        return ["orig"]
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in (s.strip() for s in items):
        for name in (LSJ_VIEWS if item == "lsj" else [item]):
            tokens = sorted(set(name.split("+")))
            for t in tokens:
                m = _TOKEN.match(t)
                if m is None or (m.group(2) is not None and int(m.group(2)) == 0) or \
                        (m.group(3) is not None and float(m.group(3)) <= 0):
                    raise ValueError(f"--views: unknown view token {t!r} in {name!r}; expected orig, hflip, short<S> "
                                     "(S > 0 pixels), scale<F> (F > 0), joined by '+', or lsj")
            if len(tokens) > 1 and "orig" in tokens:
                tokens.remove("orig")
            canonical = "+".join(tokens)
            if canonical not in out:
                out.append(canonical)
    if not out:
        raise ValueError("--views: no view given")
    return out


def plan_view(name: str, image_id: int, width: int, height: int, min_size: int, max_size: int | None) -> ViewPlan:
    """The :class:`ViewPlan` of view ``name`` for an original ``width x height`` image.

    ``orig`` gives exactly the cache's test-time preprocessing (:func:`pipeline.data.resize_shape`).
    The crop offset of a ``scale<F>`` view with ``F > 1`` is uniform, from a generator seeded with
    CRC-32 of ``"<image_id>:<name>"`` (the same in every process and run).

    Raises:
        ValueError: an unknown view token.
    """
    (canonical,) = parse_views([name])
    tokens = canonical.split("+")
    flip = "hflip" in tokens
    short = next((int(t[5:]) for t in tokens if t.startswith("short")), min_size)
    scale = next((float(t[5:]) for t in tokens if t.startswith("scale")), 1.0)
    h, w = data.resize_shape(width, height, short, max_size)
    if scale <= 1.0:
        size = (max(1, round(h * scale)), max(1, round(w * scale))) if scale != 1.0 else (h, w)
        return ViewPlan(canonical, flip, (0, 0, int(width), int(height)), size)
    big_h, big_w = round(h * scale), round(w * scale)  # the enlarged image, input pixels
    gen = torch.Generator().manual_seed(zlib.crc32(f"{int(image_id)}:{canonical}".encode()))
    oy = int(torch.randint(big_h - h + 1, (1,), generator=gen))
    ox = int(torch.randint(big_w - w + 1, (1,), generator=gen))
    fy, fx = height / big_h, width / big_w  # original pixels per enlarged pixel
    x0, y0 = int(ox * fx), int(oy * fy)
    x1, y1 = min(int(width), max(x0 + 1, round((ox + w) * fx))), min(int(height), max(y0 + 1, round((oy + h) * fy)))
    return ViewPlan(canonical, flip, (x0, y0, x1, y1), (h, w))


def view_image(pil_image: Image.Image, plan: ViewPlan) -> torch.Tensor:
    """``[3, h, w]`` float32 normalised detector input of the view (flip, crop, PIL bilinear resize
    to ``plan.size``, ImageNet normalisation); for ``orig`` identical to :func:`pipeline.data.preprocess`."""
    if pil_image.mode != "RGB":
        pil_image = pil_image.convert("RGB")
    if plan.flip:
        pil_image = pil_image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if plan.crop != (0, 0) + pil_image.size:
        pil_image = pil_image.crop(plan.crop)
    h, w = plan.size
    if (w, h) != pil_image.size:
        pil_image = pil_image.resize((w, h), Image.BILINEAR)
    return data.to_normalized_tensor(pil_image)


def view_ground_truth(gt: dict, plan: ViewPlan) -> dict:
    """The ground truth of the view's frame (the dict of :func:`pipeline.batches.ground_truth`).

    Masks ``[G, H, W]`` are mirrored (``flip(-1)``) and cropped to the frame; ``boxes_xyxy`` (frame
    pixels) are mirrored (``x -> W - x``), shifted, clamped to the frame; ``boxes_cxcywh`` are
    normalised by the frame size. Objects whose box or mask is empty in the frame are dropped.
    ``orig`` returns ``gt`` unchanged.
    """
    if not plan.flip and plan.crop == (0, 0, gt["masks"].shape[-1], gt["masks"].shape[-2]):
        return gt
    masks, boxes = gt["masks"], gt["boxes_xyxy"].clone().reshape(-1, 4)
    W = masks.shape[-1]
    if plan.flip:
        masks = masks.flip(-1)
        boxes = torch.stack([W - boxes[:, 2], boxes[:, 1], W - boxes[:, 0], boxes[:, 3]], 1)
    x0, y0, x1, y1 = plan.crop
    masks = masks[:, y0:y1, x0:x1]
    boxes = boxes - torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype)
    fh, fw = plan.frame_size
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, fw)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, fh)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & (masks.flatten(1).sum(1) > 0)
    boxes = boxes[keep]
    cxcywh = torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2,
                          boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], 1) / torch.tensor([fw, fh, fw, fh])
    return {"boxes_cxcywh": cxcywh.reshape(-1, 4), "boxes_xyxy": boxes, "category_ids": gt["category_ids"][keep],
            "masks": masks[keep].contiguous()}


def view_choices(seed: int, epoch: int, num_images: int, num_views: int) -> list[int]:
    """The view each image (by dataset position) is trained on in ``epoch``: uniform over
    ``num_views``, from ``torch.Generator().manual_seed(seed * 7919 + epoch + 1)``; all zeros with one view."""
    if num_views <= 1:
        return [0] * num_images
    gen = torch.Generator().manual_seed(seed * 7919 + epoch + 1)
    return torch.randint(num_views, (num_images,), generator=gen).tolist()
