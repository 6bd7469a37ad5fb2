"""Location tokens, mask crop/paste and token text of the mask tokenizer: pure numpy, no model.

Conventions
-----------
- Boxes in rau are pixel-edge ``box_xyxy_px`` = (x0, y0, x1, y1), x1/y1 exclusive (see
  :mod:`rau.geometry`). Location tokens are in CheXanatomy/PaliGemma order (ymin, xmin, ymax, xmax),
  integers in [0, bins - 1] (bins = 1024): token ``t`` stands for the coordinate
  ``t / (bins - 1) * side``, so 0 is the image's top/left edge and ``bins - 1`` its bottom/right
  edge, and a round trip moves an edge by at most half a bin (side / 2046 px).
- A mask is cropped to the box *as decoded from its location tokens* (:func:`mask_loc_tokens`, so
  encoder and decoder use the very same box) and resampled to ``size`` x ``size`` coverage
  (:func:`crop_to_box`); decoding pastes a grid of probabilities back into the box
  (:func:`paste_probs`, :func:`paste_from_box`).
- Token text of one structure is ``<locNNNN>`` x 4 then ``<segNNN>`` x n_codes
  (:func:`tokens_to_string`); :func:`parse_mask_tokens` never raises on model output and returns a
  ``reason`` instead. Bad *arguments* (a mask that is not 2D, an image size that is not positive)
  raise :class:`~rau.errors.RauInputError`.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rau.errors import RauInputError
from rau.geometry import Box, box_to_norm, mask_to_box, norm_to_box

N_LOC = 4
# Token numbers longer than this are out of range whatever the config (and int() of huge digit
# strings is slow or refused), so they are rejected before conversion.
_MAX_DIGITS = 6
_TOKEN = re.compile(r"<(loc|seg)(\d+)>", re.IGNORECASE)
_SPACE = re.compile(r"\s*")


# --------------------------------------------------------------------------------------------
# Argument checks (raise RauInputError: these are caller errors, not model output)
# --------------------------------------------------------------------------------------------


def check_hw(hw: Any, arg: str = "hw") -> tuple[int, int]:
    """``hw`` as (H, W) positive ints, else RauInputError naming ``arg``."""
    try:
        h, w = (int(v) for v in hw)
        ok = h > 0 and w > 0 and all(float(v) == int(v) for v in hw)
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise RauInputError(f"{arg}: expected the image size (H, W) as two positive integers, got {hw!r}")
    return h, w


def _check_bins(bins: Any) -> int:
    if isinstance(bins, bool) or not isinstance(bins, numbers.Integral) or not 2 <= bins <= 10000:
        raise RauInputError(f"bins: expected an integer in [2, 10000] (CheXanatomy uses 1024), got {bins!r}")
    return int(bins)


def _check_box(box: Any, arg: str = "box") -> Box:
    try:
        vals = tuple(float(v) for v in box)
    except (TypeError, ValueError):
        vals = ()
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals) or vals[2] <= vals[0] or vals[3] <= vals[1]:
        raise RauInputError(
            f"{arg}: expected a pixel-edge box (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {box!r}"
        )
    return vals  # type: ignore[return-value]


def check_mask(mask: Any, arg: str = "mask") -> np.ndarray:
    """``mask`` as a non-empty (H, W) bool array, else RauInputError naming ``arg``."""
    arr = np.asarray(mask)
    if arr.ndim != 2 or arr.size == 0:
        raise RauInputError(f"{arg}: expected a 2D (H, W) mask, got shape {arr.shape}")
    return arr.astype(bool) if arr.dtype != bool else arr


# --------------------------------------------------------------------------------------------
# Location tokens, crop and paste
# --------------------------------------------------------------------------------------------


def box_to_loc_tokens(box_xyxy_px: Box, hw: tuple[int, int], bins: int = 1024) -> tuple[int, int, int, int]:
    """Pixel-edge (x0, y0, x1, y1) of an (H, W) image -> (ymin, xmin, ymax, xmax) in [0, bins - 1].

    Coordinates outside the image are clipped. Token t means ``t / (bins - 1) * side`` pixels."""
    hw = check_hw(hw)
    bins = _check_bins(bins)
    x0, y0, x1, y1 = _check_box(box_xyxy_px, "box_xyxy_px")
    nx0, ny0, nx1, ny1 = box_to_norm((x0, y0, x1, y1), hw, bins - 1)
    return (ny0, nx0, ny1, nx1)


def loc_tokens_to_box(tokens: Sequence[int], hw: tuple[int, int], bins: int = 1024) -> Box:
    """(ymin, xmin, ymax, xmax) tokens -> pixel-edge (x0, y0, x1, y1) floats (inverse up to half a bin).

    Raises RauInputError on tokens that are not 4 integers in [0, bins - 1]; an inverted box is
    returned as is (callers that parse model output use :meth:`MaskTokenizer.decode` instead)."""
    hw = check_hw(hw)
    bins = _check_bins(bins)
    reason = int_sequence_reason(tokens, N_LOC, bins, "loc")
    if reason is not None:
        raise RauInputError(f"tokens: {reason}")
    ymin, xmin, ymax, xmax = (int(t) for t in tokens)
    return norm_to_box((xmin, ymin, xmax, ymax), hw, bins - 1)


def _area_weights(edges: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """(len(edges) - 1, hi - lo): overlap of interval [edges[i], edges[i + 1]] with unit cell
    [k, k + 1] for k in [lo, hi), divided by the interval length (rows average the cells)."""
    k = np.arange(lo, hi, dtype=np.float64)[None, :]
    a, b = edges[:-1, None], edges[1:, None]
    return np.clip(np.minimum(b, k + 1) - np.maximum(a, k), 0.0, None) / (b - a)


def _span(lo: float, hi: float, n: int) -> tuple[int, int]:
    """Integer cells [i0, i1) of [0, n) that the interval [lo, hi) touches."""
    return int(min(max(math.floor(lo), 0), n)), int(min(max(math.ceil(hi), 0), n))


def crop_to_box(mask: np.ndarray, box: Box, size: int = 64) -> np.ndarray:
    """(H, W) bool mask -> (size, size) float32 in [0, 1]: the fraction of each cell of the box's
    size x size grid covered by the mask (area resampling; exact coverage of the pixelated mask).

    ``box`` is pixel-edge (x0, y0, x1, y1) and may be fractional or reach outside the image
    (outside counts as background)."""
    mask = check_mask(mask)
    x0, y0, x1, y1 = _check_box(box)
    h, w = mask.shape
    r0, r1 = _span(y0, y1, h)
    c0, c1 = _span(x0, x1, w)
    if r1 <= r0 or c1 <= c0:
        return np.zeros((size, size), np.float32)
    ay = _area_weights(np.linspace(y0, y1, size + 1), r0, r1)
    ax = _area_weights(np.linspace(x0, x1, size + 1), c0, c1)
    sub = mask[r0:r1, c0:c1].astype(np.float64)
    return (ay @ sub @ ax.T).astype(np.float32)


def _paste_weights(lo: float, hi: float, n_dst: int, n_grid: int) -> tuple[int, int, np.ndarray]:
    """Destination pixels [p0, p1) along one axis and their (p1 - p0, n_grid) weights on the grid.

    Box larger than the grid along the axis: linear interpolation between cell centres (edge cells
    replicated up to the box edge, pixels whose centre is outside the box get 0). Otherwise: the
    average of the grid over the pixel's extent (area)."""
    p0, p1 = _span(lo, hi, n_dst)
    p = np.arange(p0, p1, dtype=np.float64)
    scale = (hi - lo) / n_grid  # pixels per grid cell
    if scale > 1.0:
        centre = p + 0.5
        c = np.clip((centre - lo) / scale - 0.5, 0.0, n_grid - 1.0)
        j0 = np.minimum(np.floor(c).astype(int), n_grid - 2)
        frac = c - j0
        weights = np.zeros((p.size, n_grid))
        rows = np.arange(p.size)
        weights[rows, j0] = 1.0 - frac
        weights[rows, j0 + 1] = frac
        weights[(centre <= lo) | (centre >= hi)] = 0.0
        return p0, p1, weights
    edges = np.stack([(p - lo) / scale, (p + 1.0 - lo) / scale], axis=1)  # pixel extent in grid units
    j = np.arange(n_grid, dtype=np.float64)[None, :]
    overlap = np.clip(np.minimum(edges[:, 1:], j + 1) - np.maximum(edges[:, :1], j), 0.0, None)
    return p0, p1, overlap / (edges[:, 1:] - edges[:, :1])


def paste_probs(mask64: np.ndarray, box: Box, hw: tuple[int, int]) -> np.ndarray:
    """(S, S) float grid -> (H, W) float32: the grid resampled into ``box``, 0 outside it."""
    h, w = check_hw(hw)
    x0, y0, x1, y1 = _check_box(box)
    grid = np.asarray(mask64, dtype=np.float64)
    if grid.ndim != 2 or grid.shape[0] != grid.shape[1] or grid.shape[0] < 2:
        raise RauInputError(f"mask64: expected a square (S, S) grid with S >= 2, got shape {grid.shape}")
    out = np.zeros((h, w), np.float32)
    r0, r1, wy = _paste_weights(y0, y1, h, grid.shape[0])
    c0, c1, wx = _paste_weights(x0, x1, w, grid.shape[1])
    if r1 > r0 and c1 > c0:
        out[r0:r1, c0:c1] = wy @ grid @ wx.T
    return out


def paste_from_box(mask64: np.ndarray, box: Box, hw: tuple[int, int], threshold: float = 0.5) -> np.ndarray:
    """(S, S) float/bool grid (e.g. 64 x 64 probabilities) -> (H, W) bool, resampled into ``box``
    (bilinear where the box is larger than the grid, area otherwise) and thresholded (>= 0.5)."""
    return paste_probs(mask64, box, hw) >= threshold


def move_into_box(mask: np.ndarray, box: Box, hw: tuple[int, int], size: int = 128) -> np.ndarray:
    """(h, w) non-empty bool mask (e.g. a reference's) -> (H, W) float32 soft mask: its tight box
    mapped onto ``box`` of an (H, W) image (scale and shift per axis; area-sampled on a size x size
    grid, :func:`crop_to_box` then :func:`paste_probs`). A localizer's box turned into the prior
    of a segmenter that reads masks. RauInputError on an empty mask."""
    mask = check_mask(mask)
    src = mask_to_box(mask)
    if src is None:
        raise RauInputError("mask: empty; there is no shape to move into the box")
    return paste_probs(crop_to_box(mask, src, size), box, hw)


def mask_loc_tokens(mask: np.ndarray, bins: int = 1024) -> tuple[tuple[int, int, int, int], Box]:
    """Location tokens of a non-empty mask's tight box, and the box they decode to.

    A box thinner than one bin is widened to one bin so the decoded box is never empty."""
    mask = check_mask(mask)
    box = mask_to_box(mask)
    if box is None:
        raise RauInputError("mask: is empty; a structure needs at least one pixel to be tokenized")
    hw = mask.shape
    ymin, xmin, ymax, xmax = box_to_loc_tokens(box, hw, bins)
    ymin, ymax = _widen(ymin, ymax, bins)
    xmin, xmax = _widen(xmin, xmax, bins)
    loc = (ymin, xmin, ymax, xmax)
    return loc, loc_tokens_to_box(loc, hw, bins)


def _widen(lo: int, hi: int, bins: int) -> tuple[int, int]:
    if hi > lo:
        return lo, hi
    return (lo, lo + 1) if lo + 1 < bins else (lo - 1, lo)


# --------------------------------------------------------------------------------------------
# Token text and sequence validation (never raise)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskTokens:
    """One structure as tokens: ``loc`` = (ymin, xmin, ymax, xmax) in [0, bins - 1]; ``codes`` =
    grid x grid (16) codebook indices, row-major over the latent grid."""

    loc: tuple[int, ...]
    codes: tuple[int, ...]

    def to_string(self) -> str:
        return tokens_to_string(self)


@dataclass
class ParsedMaskTokens:
    """Result of parsing token text: ``tokens`` or None with the ``reason``."""

    tokens: MaskTokens | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.tokens is not None


@dataclass
class DecodedMask:
    """Result of decoding tokens: ``mask`` (H, W) bool or None with the ``reason``;
    ``box_xyxy_px`` is the box the location tokens decode to (None when they are unusable)."""

    mask: np.ndarray | None = None
    box_xyxy_px: Box | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.mask is not None


def int_sequence_reason(values: Any, n: int, upper: int, name: str) -> str | None:
    """None if ``values`` is a sequence of ``n`` integers in [0, upper), else why not (never raises)."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or not hasattr(values, "__iter__"):
        return f"{name}: expected a sequence of {n} integers, got {type(values).__name__}"
    try:
        items = list(values)
    except (TypeError, ValueError):  # e.g. a 0-d numpy array
        return f"{name}: expected a sequence of {n} integers, got {type(values).__name__}"
    if len(items) != n:
        return f"{name}: expected {n} tokens, got {len(items)}"
    for i, v in enumerate(items):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
            return f"{name}[{i}]: expected an integer token id, got {v!r}"
        if not 0 <= int(v) < upper:
            return f"{name}[{i}]: id {int(v)} is out of range [0, {upper - 1}]"
    return None


def _box_tokens_reason(loc: Sequence[int]) -> str | None:
    ymin, xmin, ymax, xmax = (int(v) for v in loc)
    if ymax <= ymin or xmax <= xmin:
        return f"loc: inverted or empty box (ymin, xmin, ymax, xmax) = {(ymin, xmin, ymax, xmax)}"
    return None


def box_tokens_reason(loc: Sequence[int], bins: int) -> str | None:
    """Why 4 location tokens on ``bins`` bins are not a box (None when they are one)."""
    return int_sequence_reason(loc, N_LOC, bins, "loc") or _box_tokens_reason(loc)


def tokens_to_string(tokens: MaskTokens) -> str:
    """``<locNNNN>`` x 4 then ``<segNNN>`` x n, no separators."""
    return "".join(f"<loc{int(v):04d}>" for v in tokens.loc) + "".join(f"<seg{int(c):03d}>" for c in tokens.codes)


def _token_run(text: str, start: int) -> list[tuple[str, str]]:
    """Consecutive tokens (only whitespace between) from ``start``: [(kind, digits), ...]."""
    run, pos = [], start
    while True:
        match = _TOKEN.match(text, _SPACE.match(text, pos).end())
        if match is None:
            return run
        run.append((match.group(1).lower(), match.group(2)))
        pos = match.end()


def _leading(run: list[tuple[str, str]], kind: str, start: int) -> list[str]:
    out = []
    for k, digits in run[start:]:
        if k != kind:
            break
        out.append(digits)
    return out


def parse_mask_tokens(text: Any, *, n_codes: int = 16, bins: int = 1024, codebook_size: int = 512) -> ParsedMaskTokens:
    """Token text -> :class:`ParsedMaskTokens`; never raises.

    The first ``<loc..>``/``<seg..>`` token starts the object; from there exactly 4 ``<loc>`` then
    exactly ``n_codes`` ``<seg>`` tokens must follow (whitespace between tokens is allowed, text
    before and after the object is ignored). Ids must be in range and the box must not be
    inverted or empty."""
    if not isinstance(text, str):
        return ParsedMaskTokens(None, f"expected token text, got {type(text).__name__}")
    first = _TOKEN.search(text)
    if first is None:
        return ParsedMaskTokens(None, "no <locNNNN>/<segNNN> tokens in the text")
    run = _token_run(text, first.start())
    locs = _leading(run, "loc", 0)
    if len(locs) != N_LOC:
        return ParsedMaskTokens(None, f"expected {N_LOC} <loc> tokens first, got {len(locs)}")
    segs = _leading(run, "seg", N_LOC)
    if len(segs) != n_codes:
        return ParsedMaskTokens(None, f"expected {n_codes} <seg> tokens after the <loc> tokens, got {len(segs)}")
    loc = tuple(int(d) if len(d) <= _MAX_DIGITS else 10**_MAX_DIGITS for d in locs)
    codes = tuple(int(d) if len(d) <= _MAX_DIGITS else 10**_MAX_DIGITS for d in segs)
    reason = (
        int_sequence_reason(loc, N_LOC, bins, "loc")
        or int_sequence_reason(codes, n_codes, codebook_size, "seg")
        or _box_tokens_reason(loc)
    )
    if reason is not None:
        return ParsedMaskTokens(None, reason)
    return ParsedMaskTokens(MaskTokens(loc, codes), None)
