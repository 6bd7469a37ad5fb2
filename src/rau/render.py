"""Drawing annotations: contours + structure names in a fixed colour per structure.

Used for the reference image the VLM sees (its annotation drawn on it) and for result overlays.
Pure functions on arrays; only :func:`save_png` touches the disk.
"""

from __future__ import annotations

import colorsys
import hashlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from rau.geometry import Box


# Distinct, colour-blind-friendlier hues first (Okabe-Ito + extras); names beyond them get hashed hues.
PALETTE = [(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
           (204, 121, 167), (0, 210, 210), (255, 80, 80), (120, 255, 120), (160, 120, 255), (255, 170, 220)]


def structure_color(name: str, names: list[str] | None = None) -> tuple[int, int, int]:
    """RGB colour of a structure. With ``names`` (every structure of the picture), colours follow the
    sorted names through :data:`PALETTE`, so the same set of structures gets the same colours in every
    picture (reference and target overlays match); otherwise a stable hue from the name's hash."""
    if names is not None:
        order = sorted(set(names))
        if name in order and order.index(name) < len(PALETTE):
            return PALETTE[order.index(name)]
    h = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    r, g, b = colorsys.hsv_to_rgb(h, 0.85, 1.0)
    return (int(r * 255), int(g * 255), int(b * 255))


def to_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W) float in [0, 1] or uint8 -> (H, W, 3) uint8."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(image[..., None], 3, axis=2)


def contour(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """(H, W) bool outline of a mask, ``width`` pixels thick, inside the mask."""
    mask = np.asarray(mask, dtype=bool)
    return mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)


def _label_anchor(mask: np.ndarray) -> tuple[int, int]:
    # The mask pixel closest to its centroid: stays on thin curved structures (vessels).
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    i = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
    return int(xs[i]), int(ys[i])


def draw_annotation(
    image: np.ndarray,
    masks: dict[str, np.ndarray],
    *,
    boxes: dict[str, Box | None] | None = None,
    names: bool = True,
    fill_alpha: float = 0.25,
    line_width: int | None = None,
    palette_names: list[str] | None = None,
) -> np.ndarray:
    """Draw masks (tinted fill + contour), optional boxes and structure names on an image.

    Args:
        image: (H, W) float32 in [0, 1] or uint8.
        masks: structure -> (H, W) bool.
        boxes: structure -> pixel-edge xyxy box (drawn as a rectangle), optional.
        names: write each structure's name next to it.
        palette_names: every structure of a set of pictures shown side by side, so that each
            structure gets the same colour in all of them (default: the structures of this one).
    Returns:
        (H, W, 3) uint8 RGB.
    """
    rgb = to_rgb(image).astype(np.float32)
    h, w = rgb.shape[:2]
    lw = line_width or max(1, round(max(h, w) / 256))
    names_all = palette_names or list(masks) + [n for n in (boxes or {}) if n not in masks]
    for name, mask in masks.items():
        if mask is None or not mask.any():
            continue
        colour = np.array(structure_color(name, names_all), dtype=np.float32)
        rgb[mask] = (1 - fill_alpha) * rgb[mask] + fill_alpha * colour
        rgb[contour(mask, lw)] = colour
    pil = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    font = ImageFont.load_default(size=max(10, round(max(h, w) / 40)))
    for name, box in (boxes or {}).items():
        if box is not None:
            draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], outline=structure_color(name, names_all), width=lw)
    if names:
        for name, mask in masks.items():
            if mask is None or not mask.any():
                continue
            x, y = _label_anchor(mask)
            draw.text((x, y), name, fill=structure_color(name, names_all), font=font, anchor="mm",
                      stroke_width=max(1, lw), stroke_fill=(0, 0, 0))
    return np.asarray(pil)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write an image atomically (temp file + rename)."""
    import io

    from rau.atomic import write_bytes

    buf = io.BytesIO()
    Image.fromarray(np.asarray(array)).save(buf, format="PNG")
    return write_bytes(path, buf.getvalue())
