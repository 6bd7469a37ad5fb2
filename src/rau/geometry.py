"""Pure geometry: boxes from masks, box conversions between image and model spaces.

Box convention (see :mod:`rau.data.annotated`): ``box_xyxy_px`` = (x0, y0, x1, y1), pixel-edge
coordinates of the ORIGINAL image, x1/y1 exclusive. VLMs see resized images:

- Qwen2.5-VL answers in absolute pixels of its RESIZED input (``smart_resize``: both sides rounded
  to multiples of 28, total pixels clamped), so a box must be scaled by (orig / resized) per axis.
- Qwen2-VL / Qwen3-VL answer in ``norm1000`` coordinates (0..1000 over the image).
- CheXanatomy-style location tokens use 1024 bins.
"""

from __future__ import annotations

import math

import numpy as np

Box = tuple[float, float, float, float]


def mask_to_box(mask: np.ndarray) -> Box | None:
    """Tight box of a (H, W) bool mask in pixel-edge xyxy; None for an empty mask."""
    mask = np.asarray(mask, dtype=bool)
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


def clip_box(box: Box, height: int, width: int) -> Box | None:
    """Clip to the image; None if nothing of positive area is left."""
    x0, y0, x1, y1 = box
    x0, x1 = sorted((min(max(x0, 0.0), width), min(max(x1, 0.0), width)))
    y0, y1 = sorted((min(max(y0, 0.0), height), min(max(y1, 0.0), height)))
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        return None
    return (float(x0), float(y0), float(x1), float(y1))


def box_area(box: Box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def box_iou(a: Box | None, b: Box | None) -> float:
    """IoU of two xyxy boxes; 0 if either is None; 1 if both are None (nothing to find, nothing found)."""
    if a is None and b is None:
        return 1.0
    if a is None or b is None:
        return 0.0
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = box_area(a) + box_area(b) - inter
    return float(inter / union) if union > 0 else 0.0


def scale_box(box: Box, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> Box:
    """Map a pixel-edge box from an image of size from_hw=(H, W) to one of size to_hw."""
    sy = to_hw[0] / from_hw[0]
    sx = to_hw[1] / from_hw[1]
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def qwen_smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> tuple[int, int]:
    """(H, W) that Qwen2-VL/Qwen2.5-VL resize an image to: multiples of ``factor`` (patch 14 x merge 2),
    aspect ratio kept, total pixels within [min_pixels, max_pixels]. Same rule as the transformers
    image processor; kept here so box conversion needs no model import."""
    if height <= 0 or width <= 0:
        raise ValueError(f"height/width must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be below 200, got {height}x{width}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return int(h_bar), int(w_bar)


def box_to_norm(box: Box, hw: tuple[int, int], bins: int = 1000) -> tuple[int, int, int, int]:
    """Pixel-edge box of an (H, W) image -> integer coordinates on [0, bins] (norm1000 by default)."""
    h, w = hw
    vals = (box[0] / w, box[1] / h, box[2] / w, box[3] / h)
    return tuple(int(min(bins, max(0, round(v * bins)))) for v in vals)  # type: ignore[return-value]


def norm_to_box(coords: tuple[float, float, float, float], hw: tuple[int, int], bins: int = 1000) -> Box:
    """Inverse of :func:`box_to_norm` (up to rounding)."""
    h, w = hw
    x0, y0, x1, y1 = coords
    return (x0 / bins * w, y0 / bins * h, x1 / bins * w, y1 / bins * h)


def box_center(box: Box) -> tuple[float, float]:
    return ((box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0)
