"""Pictures of predictions: instance overlays (detectron2 ``Visualizer`` style) and mask probability maps.

Only PIL, numpy and scipy; matplotlib is used for the probability colour map. Nothing here
knows models or caches: inputs are an RGB image, masks, boxes and labels in original pixels.
"""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage


def palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` well-separated RGB colours (golden-ratio hue steps, fixed saturation/value), deterministic."""
    out = []
    for k in range(n):
        h = (0.13 + k * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(h, 0.75, 0.95)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def draw_instances(image: Image.Image, masks: np.ndarray | None, boxes_xyxy: np.ndarray, labels: list[str],
                   scores: np.ndarray, score_threshold: float = 0.5, alpha: float = 0.5) -> Image.Image:
    """Draw instances on an image as detectron2's ``Visualizer.draw_instance_predictions`` does.

    Per instance with ``score >= score_threshold`` (drawn from the lowest to the highest score,
    so the best is on top): the mask filled with its colour at ``alpha`` and outlined, the box
    outlined, and ``"<label> <score %>"`` on a dark tag at the box's top-left corner.

    Args:
        image: RGB PIL image, original pixels ``W x H``.
        masks: ``[N, H, W]`` bool (original pixels) or None for boxes only.
        boxes_xyxy: ``[N, 4]`` float, xyxy, original pixels.
        labels: N class names.
        scores: ``[N]`` float in [0, 1].
        score_threshold: drawing threshold only (the results json keeps everything).
        alpha: mask fill opacity.

    Returns:
        a new RGB PIL image of the same size.

    Raises:
        ValueError: inconsistent N or a mask of another size than the image.
    """
    n = len(scores)
    if len(boxes_xyxy) != n or len(labels) != n or (masks is not None and len(masks) != n):
        raise ValueError(f"inconsistent counts: scores {n}, boxes {len(boxes_xyxy)}, labels {len(labels)}"
                         + (f", masks {len(masks)}" if masks is not None else ""))
    w, h = image.size
    if masks is not None and n and tuple(masks.shape[1:]) != (h, w):
        raise ValueError(f"masks are {tuple(masks.shape[1:])} (h, w), the image is {(h, w)}")
    canvas = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    keep = [k for k in np.argsort(np.asarray(scores), kind="stable") if scores[k] >= score_threshold]
    colors = palette(n)
    for k in keep:
        if masks is not None:
            m = np.asarray(masks[k], dtype=bool)
            col = np.asarray(colors[k], dtype=np.float32)
            canvas[m] = canvas[m] * (1 - alpha) + col * alpha
            edge = m & ~ndimage.binary_erosion(m, iterations=1)
            canvas[edge] = col
    out = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(out)
    size = max(10, int(round(min(h, w) / 45)))
    font = _font(size)
    line = max(1, int(round(min(h, w) / 300)))
    for k in keep:
        x0, y0, x1, y1 = (float(v) for v in boxes_xyxy[k])
        draw.rectangle([x0, y0, x1, y1], outline=colors[k], width=line)
        text = f"{labels[k]} {100 * float(scores[k]):.0f}%"
        tb = draw.textbbox((x0, y0), text, font=font)
        ty = y0 - (tb[3] - tb[1]) - 2 if y0 - (tb[3] - tb[1]) - 2 >= 0 else y0
        tb = draw.textbbox((x0 + 1, ty), text, font=font)
        draw.rectangle([tb[0] - 1, tb[1] - 1, tb[2] + 1, tb[3] + 1], fill=(0, 0, 0))
        draw.text((x0 + 1, ty), text, fill=(255, 255, 255), font=font)
    return out


def probability_panel(image: Image.Image, mask_probs: np.ndarray, box_xyxy, title: str,
                      min_side: int = 160) -> Image.Image:
    """One instance's mask probabilities in its box (the paper's Figures 4 and 8): three tiles.

    Tiles, left to right: the image crop at the box; the ``R x R`` probability map in the
    ``viridis`` colour map (0 dark blue .. 1 yellow), resized to the crop; the crop with the map
    blended at 50 %. The crop is upscaled (nearest) so its shorter side is at least ``min_side``
    pixels; a title line on top.

    Args:
        image: RGB PIL image, original pixels.
        mask_probs: ``[R, R]`` float probabilities in the box frame (``aligned=True`` RoIAlign
            convention: the map spans the box exactly).
        box_xyxy: 4 floats, xyxy, original pixels.
        title: text above the tiles.

    Returns:
        RGB PIL image.
    """
    from matplotlib import colormaps

    w, h = image.size
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    x0, y0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
    x1, y1 = min(w, max(x0 + 1, int(np.ceil(x1)))), min(h, max(y0 + 1, int(np.ceil(y1))))
    crop = image.crop((x0, y0, x1, y1))
    cw, ch = crop.size
    scale = max(1.0, min_side / max(1, min(cw, ch)))
    tw, th = int(round(cw * scale)), int(round(ch * scale))
    crop = crop.resize((tw, th), Image.NEAREST)
    probs = np.clip(np.asarray(mask_probs, dtype=np.float32), 0, 1)
    heat = (colormaps["viridis"](probs)[..., :3] * 255).astype(np.uint8)
    heat = Image.fromarray(heat, "RGB").resize((tw, th), Image.BILINEAR)
    blend = Image.blend(crop.convert("RGB"), heat, 0.5)
    pad, top = 4, 18
    out = Image.new("RGB", (3 * tw + 4 * pad, th + top + pad), (255, 255, 255))
    for k, tile in enumerate((crop, heat, blend)):
        out.paste(tile, (pad + k * (tw + pad), top))
    ImageDraw.Draw(out).text((pad, 2), title, fill=(0, 0, 0), font=_font(12))
    return out


def paste_probability_maps(image: Image.Image, mask_probs: np.ndarray, boxes_xyxy: np.ndarray) -> Image.Image:
    """All instances' probability maps pasted into their boxes over a dimmed image (the image's size).

    Each ``R x R`` map is bilinearly resized to its (integer-rounded) box; where boxes overlap the
    larger probability wins; shown in ``viridis`` blended 60 % over the image at 40 % brightness.

    Args:
        image: RGB PIL image ``W x H``.
        mask_probs: ``[N, R, R]`` float probabilities.
        boxes_xyxy: ``[N, 4]`` xyxy, original pixels.

    Returns:
        RGB PIL image ``W x H``.
    """
    from matplotlib import colormaps

    w, h = image.size
    field = np.zeros((h, w), dtype=np.float32)
    covered = np.zeros((h, w), dtype=bool)
    for probs, box in zip(mask_probs, boxes_xyxy):
        x0, y0 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
        x1, y1 = min(w, int(np.ceil(box[2]))), min(h, int(np.ceil(box[3])))
        if x1 <= x0 or y1 <= y0:
            continue
        tile = Image.fromarray(np.asarray(probs, dtype=np.float32), "F").resize((x1 - x0, y1 - y0), Image.BILINEAR)
        field[y0:y1, x0:x1] = np.maximum(field[y0:y1, x0:x1], np.asarray(tile))
        covered[y0:y1, x0:x1] = True
    base = np.asarray(image.convert("RGB"), dtype=np.float32) * 0.4
    heat = colormaps["viridis"](np.clip(field, 0, 1))[..., :3] * 255
    base[covered] = base[covered] * 0.4 + heat[covered] * 0.6
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
