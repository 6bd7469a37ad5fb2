"""Mask tokenizer for CheXanatomy-style outputs: a box as 4 location tokens + a mask as 16 VQ codes.

Token sequence of one structure (what a VLM is trained to emit)::

    <loc0123><loc0045><loc0800><loc0512><seg017><seg301>...<seg099>     (4 + 16 tokens)

Conventions
-----------
- Boxes in rau are pixel-edge ``box_xyxy_px`` = (x0, y0, x1, y1), x1/y1 exclusive (see
  :mod:`rau.geometry`). Location tokens are in CheXanatomy/PaliGemma order (ymin, xmin, ymax, xmax),
  integers in [0, bins - 1] (bins = 1024): token ``t`` stands for the coordinate
  ``t / (bins - 1) * side``, so 0 is the image's top/left edge and ``bins - 1`` its bottom/right
  edge, and a round trip moves an edge by at most half a bin (side / 2046 px).
- Mask tokens: the mask is cropped to the box *as decoded from its location tokens* (so encoder and
  decoder use the very same box), resized to ``size`` x ``size`` (64) as per-cell coverage (area
  resampling), and encoded by :class:`MaskVQVAE` into a ``grid`` x ``grid`` (4 x 4) latent grid; the
  16 codebook indices are read row-major (token i = latent row i // 4, column i % 4).
- Decoding pastes the decoder's 64 x 64 probabilities back into the box (bilinear when the box is
  larger than 64 px along an axis, area otherwise) and thresholds at 0.5.
- Decoding never raises on a malformed token sequence (wrong count, out-of-range ids, inverted or
  empty box, garbage text): it returns a result with ``mask=None`` and a ``reason``, like
  :mod:`rau.parsing`. Bad *arguments* (a mask that is not 2D, an image size that is not positive)
  raise :class:`~rau.errors.RauInputError`.

Entry points: :class:`MaskTokenizer` (``encode``, ``decode``, ``to_string``, ``from_string``,
``save``, ``load``), :func:`load_default` (the shipped weights in ``rau/assets/masktok``),
:func:`train_masktok` and ``python -m rau.tokens.masktok --data DIR [DIR...] --out DIR --steps N``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import numbers
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rau.atomic import write_bytes as _atomic_write
from rau.errors import CheckpointError, RauInputError
from rau.geometry import Box, box_to_norm, mask_to_box, norm_to_box

FORMAT = "rau-masktok-v1"
N_LOC = 4
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAINING_FILE = "training.json"
CHECKPOINT_FILE = "checkpoint.pt"
# Token numbers longer than this are out of range whatever the config (and int() of huge digit
# strings is slow or refused), so they are rejected before conversion.
_MAX_DIGITS = 6
_TOKEN = re.compile(r"<(loc|seg)(\d+)>", re.IGNORECASE)
_SPACE = re.compile(r"\s*")


# --------------------------------------------------------------------------------------------
# Argument checks (raise RauInputError: these are caller errors, not model output)
# --------------------------------------------------------------------------------------------


def _check_hw(hw: Any, arg: str = "hw") -> tuple[int, int]:
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


def _check_mask(mask: Any, arg: str = "mask") -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim != 2 or arr.size == 0:
        raise RauInputError(f"{arg}: expected a 2D (H, W) mask, got shape {arr.shape}")
    return arr.astype(bool) if arr.dtype != bool else arr


# --------------------------------------------------------------------------------------------
# Pure geometry: location tokens, crop and paste
# --------------------------------------------------------------------------------------------


def box_to_loc_tokens(box_xyxy_px: Box, hw: tuple[int, int], bins: int = 1024) -> tuple[int, int, int, int]:
    """Pixel-edge (x0, y0, x1, y1) of an (H, W) image -> (ymin, xmin, ymax, xmax) in [0, bins - 1].

    Coordinates outside the image are clipped. Token t means ``t / (bins - 1) * side`` pixels."""
    hw = _check_hw(hw)
    bins = _check_bins(bins)
    x0, y0, x1, y1 = _check_box(box_xyxy_px, "box_xyxy_px")
    nx0, ny0, nx1, ny1 = box_to_norm((x0, y0, x1, y1), hw, bins - 1)
    return (ny0, nx0, ny1, nx1)


def loc_tokens_to_box(tokens: Sequence[int], hw: tuple[int, int], bins: int = 1024) -> Box:
    """(ymin, xmin, ymax, xmax) tokens -> pixel-edge (x0, y0, x1, y1) floats (inverse up to half a bin).

    Raises RauInputError on tokens that are not 4 integers in [0, bins - 1]; an inverted box is
    returned as is (callers that parse model output use :meth:`MaskTokenizer.decode` instead)."""
    hw = _check_hw(hw)
    bins = _check_bins(bins)
    reason = _int_sequence_reason(tokens, N_LOC, bins, "loc")
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
    mask = _check_mask(mask)
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
    h, w = _check_hw(hw)
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


def mask_loc_tokens(mask: np.ndarray, bins: int = 1024) -> tuple[tuple[int, int, int, int], Box]:
    """Location tokens of a non-empty mask's tight box, and the box they decode to.

    A box thinner than one bin is widened to one bin so the decoded box is never empty."""
    mask = _check_mask(mask)
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


def _int_sequence_reason(values: Any, n: int, upper: int, name: str) -> str | None:
    """None if ``values`` is a sequence of ``n`` integers in [0, upper), else why not."""
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
    return _int_sequence_reason(loc, N_LOC, bins, "loc") or _box_tokens_reason(loc)


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
        _int_sequence_reason(loc, N_LOC, bins, "loc")
        or _int_sequence_reason(codes, n_codes, codebook_size, "seg")
        or _box_tokens_reason(loc)
    )
    if reason is not None:
        return ParsedMaskTokens(None, reason)
    return ParsedMaskTokens(MaskTokens(loc, codes), None)


# --------------------------------------------------------------------------------------------
# The VQ-VAE
# --------------------------------------------------------------------------------------------


@dataclass
class MaskTokConfig:
    """Architecture and VQ settings.

    size: crop side (64); grid: latent grid side (4 -> 16 tokens); channels: encoder widths, one
    per stride-2 stage, so ``size / grid == 2 ** len(channels)``; codebook_size K (<= 1000, ids are
    written with 3 digits); code_dim D; bins: location bins (1024); beta: commitment weight;
    decay: EMA decay of the codebook; dead_threshold: EMA usage count below which a code is
    re-seeded from the batch's latents; dice_weight: soft-Dice term added to the BCE loss."""

    size: int = 64
    grid: int = 4
    channels: tuple[int, ...] = (16, 32, 64, 96)
    codebook_size: int = 512
    code_dim: int = 32
    bins: int = 1024
    beta: float = 0.25
    decay: float = 0.99
    dead_threshold: float = 1.0
    dice_weight: float = 1.0

    def __post_init__(self) -> None:
        self.channels = tuple(self.channels)
        _require_int(self, "size", 8, 1024)
        _require_int(self, "grid", 1, 64)
        _require_int(self, "codebook_size", 2, 1000)
        _require_int(self, "code_dim", 1, 4096)
        _require_int(self, "bins", 2, 10000)
        if not self.channels or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in self.channels):
            raise RauInputError(f"channels: expected positive integers, one per stride-2 stage, got {self.channels!r}")
        if self.size != self.grid * 2 ** len(self.channels):
            raise RauInputError(
                f"channels: {len(self.channels)} stride-2 stages map size {self.size} to "
                f"{self.size / 2 ** len(self.channels):g}, not grid {self.grid}; use "
                f"log2(size / grid) stages"
            )
        for name, lo, hi in (("beta", 0.0, 100.0), ("decay", 0.0, 0.99999), ("dead_threshold", 0.0, 1e6), ("dice_weight", 0.0, 100.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                raise RauInputError(f"{name}: expected a number in [{lo}, {hi}], got {v!r}")

    @property
    def n_codes(self) -> int:
        return self.grid * self.grid


def _require_int(cfg: Any, name: str, lo: int, hi: int) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise RauInputError(f"{name}: expected an integer in [{lo}, {hi}], got {v!r}")


class _Stack(nn.Module):
    """Convs without normalisation (deterministic, batch-size independent)."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _encoder(cfg: MaskTokConfig) -> nn.Module:
    layers: list[nn.Module] = []
    cin = 1
    for c in cfg.channels:
        layers += [nn.Conv2d(cin, c, 4, 2, 1), nn.SiLU()]
        cin = c
    layers += [nn.Conv2d(cin, cin, 3, 1, 1), nn.SiLU(), nn.Conv2d(cin, cfg.code_dim, 1)]
    return _Stack(layers)


def _decoder(cfg: MaskTokConfig) -> nn.Module:
    widths = list(cfg.channels[::-1]) + [1]
    layers: list[nn.Module] = [nn.Conv2d(cfg.code_dim, widths[0], 3, 1, 1), nn.SiLU(),
                               nn.Conv2d(widths[0], widths[0], 3, 1, 1), nn.SiLU()]
    for a, b in zip(widths[:-1], widths[1:]):
        layers.append(nn.ConvTranspose2d(a, b, 4, 2, 1))
        if b != 1:
            layers.append(nn.SiLU())
    return _Stack(layers)


class EMAQuantizer(nn.Module):
    """Vector quantizer with an EMA-updated codebook (K, D) and dead-code re-seeding.

    Buffers: ``embed`` (K, D) codebook; ``cluster_size`` (K,) EMA of how many latents each code
    takes per batch; ``embed_sum`` (K, D) EMA of their sum; ``initialized`` (1,) 0/1."""

    def __init__(self, codebook_size: int, code_dim: int, decay: float, dead_threshold: float):
        super().__init__()
        self.decay = decay
        self.dead_threshold = dead_threshold
        self.register_buffer("embed", torch.zeros(codebook_size, code_dim))
        self.register_buffer("cluster_size", torch.zeros(codebook_size))
        self.register_buffer("embed_sum", torch.zeros(codebook_size, code_dim))
        self.register_buffer("initialized", torch.zeros(1))

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """(N, D) latents -> (N,) nearest code ids (squared L2)."""
        dist = (z * z).sum(1, keepdim=True) - 2.0 * z @ self.embed.T + (self.embed * self.embed).sum(1)[None]
        return dist.argmin(1)

    def _pick(self, z: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
        return z[torch.randint(z.shape[0], (n,), generator=generator)]

    @torch.no_grad()
    def update(self, z: torch.Tensor, ids: torch.Tensor, generator: torch.Generator | None, restart: bool) -> None:
        """EMA codebook step on (N, D) latents ``z`` assigned to ``ids``; then re-seed dead codes."""
        onehot = F.one_hot(ids, self.embed.shape[0]).type(z.dtype)
        self.cluster_size.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(onehot.T @ z, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        k = self.embed.shape[0]
        smoothed = (self.cluster_size + 1e-5) / (n + k * 1e-5) * n
        self.embed.copy_(self.embed_sum / smoothed[:, None])
        if restart:
            dead = self.cluster_size < self.dead_threshold
            n_dead = int(dead.sum())
            if n_dead:
                fresh = self._pick(z, n_dead, generator)
                self.embed[dead] = fresh
                self.embed_sum[dead] = fresh
                self.cluster_size[dead] = 1.0

    @torch.no_grad()
    def init_from(self, z: torch.Tensor, generator: torch.Generator | None) -> None:
        """Seed the codebook with random latents of the first batch."""
        fresh = self._pick(z, self.embed.shape[0], generator)
        self.embed.copy_(fresh)
        self.embed_sum.copy_(fresh)
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(1.0)


@dataclass
class VQOutput:
    """logits (B, 1, S, S); codes (B, grid*grid) row-major; commit: commitment loss (scalar);
    perplexity: exp(entropy) of the batch's code usage."""

    logits: torch.Tensor
    codes: torch.Tensor
    commit: torch.Tensor
    perplexity: float


class MaskVQVAE(nn.Module):
    """(B, 1, 64, 64) coverage in [0, 1] -> (B, 16) code ids -> (B, 1, 64, 64) logits.

    Encoder: len(channels) stride-2 4x4 convs + a 3x3 conv + 1x1 to D; quantizer: :class:`EMAQuantizer`;
    decoder: two 3x3 convs + mirrored 4x4 stride-2 transposed convs to one logit channel."""

    def __init__(self, config: MaskTokConfig):
        super().__init__()
        self.config = config
        self.encoder = _encoder(config)
        self.decoder = _decoder(config)
        self.quantizer = EMAQuantizer(config.codebook_size, config.code_dim, config.decay, config.dead_threshold)

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) -> (B, g*g, D) latents, row-major over the grid."""
        z = self.encoder(x * 2.0 - 1.0)
        return z.flatten(2).transpose(1, 2)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) coverage -> (B, g*g) long code ids."""
        z = self.latents(x)
        b, n, d = z.shape
        return self.quantizer.lookup(z.reshape(b * n, d)).reshape(b, n)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, g*g) code ids -> (B, 1, S, S) logits."""
        q = self.quantizer.embed[codes]  # (B, n, D)
        return self._decode_latents(q)

    def _decode_latents(self, q: torch.Tensor) -> torch.Tensor:
        g = self.config.grid
        return self.decoder(q.transpose(1, 2).reshape(q.shape[0], -1, g, g))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None, restart: bool = False) -> VQOutput:
        """Training/eval pass with straight-through quantisation; updates the EMA codebook in
        training mode (``generator`` drives initialisation and dead-code re-seeding)."""
        z = self.latents(x)
        b, n, d = z.shape
        flat = z.reshape(b * n, d)
        quant = self.quantizer
        if self.training and not bool(quant.initialized.item()):
            quant.init_from(flat.detach(), generator)
        ids = quant.lookup(flat.detach())
        q = quant.embed[ids]
        commit = F.mse_loss(flat, q.detach())
        if self.training:
            quant.update(flat.detach(), ids, generator, restart)
        st = (flat + (q - flat).detach()).reshape(b, n, d)
        counts = torch.bincount(ids, minlength=quant.embed.shape[0]).float()
        p = counts / counts.sum()
        perplexity = float(torch.exp(-(p * torch.log(p + 1e-10)).sum()))
        return VQOutput(self._decode_latents(st), ids.reshape(b, n), commit, perplexity)


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------


class MaskTokenizer:
    """Masks <-> CheXanatomy tokens with a trained :class:`MaskVQVAE` (eval mode, CPU).

    Example::

        tok = load_default()
        t = tok.encode(mask)                     # MaskTokens(loc=(ymin, xmin, ymax, xmax), codes=16 ids)
        text = tok.to_string(t)                  # '<loc0123>...<seg045>...'
        out = tok.decode_string(text, mask.shape)  # DecodedMask(mask=(H, W) bool | None, reason=...)
    """

    def __init__(self, model: MaskVQVAE, training: dict[str, Any] | None = None):
        self.model = model.eval()
        self.training = training or {}

    @property
    def config(self) -> MaskTokConfig:
        return self.model.config

    def __repr__(self) -> str:
        c = self.config
        return f"MaskTokenizer(K={c.codebook_size}, tokens={c.n_codes}, size={c.size}, params={n_parameters(self.model)})"

    # ---- encode / decode
    def encode(self, mask: np.ndarray) -> MaskTokens:
        """(H, W) bool mask -> MaskTokens. Empty mask -> RauInputError."""
        loc, box = mask_loc_tokens(mask, self.config.bins)
        crop = crop_to_box(_check_mask(mask), box, self.config.size)
        return MaskTokens(loc, self.encode_crops(crop[None])[0])

    def encode_crops(self, crops: np.ndarray) -> list[tuple[int, ...]]:
        """(B, S, S) coverage crops -> B tuples of code ids."""
        x = torch.as_tensor(np.asarray(crops, np.float32))[:, None]
        with torch.no_grad():
            codes = self.model.encode(x)
        return [tuple(int(c) for c in row) for row in codes.tolist()]

    def decode_crop(self, codes: Sequence[int]) -> np.ndarray:
        """Valid code ids -> (S, S) float32 probabilities of the box's grid."""
        with torch.no_grad():
            logits = self.model.decode_codes(torch.as_tensor([list(codes)], dtype=torch.long))
        return torch.sigmoid(logits)[0, 0].numpy()

    def decode(self, loc: Sequence[int], codes: Sequence[int], hw: tuple[int, int]) -> DecodedMask:
        """Tokens -> DecodedMask with the (H, W) bool mask, or mask=None and a reason (never raises
        on malformed tokens; ``hw`` that is not a positive (H, W) raises RauInputError)."""
        hw = _check_hw(hw)
        cfg = self.config
        reason = box_tokens_reason(loc, cfg.bins) or _int_sequence_reason(codes, cfg.n_codes, cfg.codebook_size, "codes")
        if reason is not None:
            return DecodedMask(None, None, reason)
        box = loc_tokens_to_box(loc, hw, cfg.bins)
        mask = paste_from_box(self.decode_crop(codes), box, hw)
        if not mask.any():
            return DecodedMask(None, box, "decoded mask is empty (the box is smaller than a pixel or the codes decode to background)")
        return DecodedMask(mask, box, None)

    def decode_tokens(self, tokens: MaskTokens, hw: tuple[int, int]) -> DecodedMask:
        return self.decode(tokens.loc, tokens.codes, hw)

    # ---- text
    def to_string(self, tokens: MaskTokens) -> str:
        return tokens_to_string(tokens)

    def from_string(self, text: Any) -> ParsedMaskTokens:
        """Token text -> ParsedMaskTokens (never raises); see :func:`parse_mask_tokens`."""
        cfg = self.config
        return parse_mask_tokens(text, n_codes=cfg.n_codes, bins=cfg.bins, codebook_size=cfg.codebook_size)

    def decode_string(self, text: Any, hw: tuple[int, int]) -> DecodedMask:
        """Token text -> DecodedMask (never raises on the text)."""
        parsed = self.from_string(text)
        if parsed.tokens is None:
            _check_hw(hw)
            return DecodedMask(None, None, parsed.reason)
        return self.decode_tokens(parsed.tokens, hw)

    # ---- persistence
    def save(self, directory: str | Path, training: dict[str, Any] | None = None) -> Path:
        """Write ``model.safetensors``, ``config.json`` (with the weights' sha256) and, when there is
        training info, ``training.json``. Each file is written atomically."""
        from safetensors.torch import save

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().clone() for k, v in self.model.state_dict().items()}
        blob = save(state, metadata={"format": FORMAT})
        _atomic_write(directory / WEIGHTS_FILE, blob)
        config = {"format": FORMAT, "config": asdict(self.config), "weights_sha256": hashlib.sha256(blob).hexdigest()}
        _atomic_write(directory / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
        info = training if training is not None else self.training
        if info:
            _atomic_write(directory / TRAINING_FILE, (json.dumps(info, indent=2) + "\n").encode())
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> MaskTokenizer:
        """Load a folder written by :meth:`save`; CheckpointError (one line) when it is missing,
        truncated, corrupted or does not match its config."""
        directory = Path(directory)
        hint = f"expected a folder with {CONFIG_FILE} and {WEIGHTS_FILE} written by MaskTokenizer.save"
        if not directory.is_dir():
            raise CheckpointError(f"tokenizer: {directory} is not a folder; {hint}")
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise CheckpointError(f"tokenizer: {directory} has no {name}; {hint}")
        training = directory / TRAINING_FILE
        return _from_bytes(
            (directory / CONFIG_FILE).read_bytes(),
            (directory / WEIGHTS_FILE).read_bytes(),
            training.read_bytes() if training.is_file() else None,
            str(directory),
        )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{exc.__class__.__name__}: {text[:200]}" if text else exc.__class__.__name__


def _from_bytes(config_bytes: bytes, weights: bytes, training: bytes | None, where: str) -> MaskTokenizer:
    fix = "re-save the tokenizer or copy the folder again"
    try:
        raw = json.loads(config_bytes.decode("utf-8"))
        if raw.get("format") != FORMAT:
            raise ValueError(f"format {raw.get('format')!r} is not {FORMAT!r}")
        config = MaskTokConfig(**raw["config"])
    except (ValueError, TypeError, KeyError, AttributeError, RauInputError) as exc:
        raise CheckpointError(f"tokenizer: {where}/{CONFIG_FILE} is not a valid mask tokenizer config ({_one_line(exc)}); {fix}") from None
    expected = raw.get("weights_sha256")
    if expected is not None and hashlib.sha256(weights).hexdigest() != expected:
        raise CheckpointError(
            f"tokenizer: {where}/{WEIGHTS_FILE} does not match the checksum in {CONFIG_FILE} (truncated or corrupted); {fix}"
        )
    model = MaskVQVAE(config)
    try:
        from safetensors.torch import load

        state = load(weights)
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # safetensors raises its own error types on truncated headers
        raise CheckpointError(f"tokenizer: cannot load {where}/{WEIGHTS_FILE} ({_one_line(exc)}); {fix}") from None
    if not all(bool(torch.isfinite(t).all()) for t in model.state_dict().values()):
        raise CheckpointError(f"tokenizer: {where}/{WEIGHTS_FILE} holds NaN or infinite weights; {fix}")
    info = None
    if training is not None:
        try:
            info = json.loads(training.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            info = None  # training.json is documentation only
    return MaskTokenizer(model, info)


def load_default() -> MaskTokenizer:
    """The shipped tokenizer (``rau/assets/masktok``), read through importlib.resources."""
    from importlib.resources import files

    folder = files("rau").joinpath("assets").joinpath("masktok")
    try:
        config_bytes = folder.joinpath(CONFIG_FILE).read_bytes()
        weights = folder.joinpath(WEIGHTS_FILE).read_bytes()
    except (FileNotFoundError, NotADirectoryError, OSError):
        raise CheckpointError(
            "tokenizer: the shipped weights rau/assets/masktok/{config.json,model.safetensors} are missing; "
            "reinstall rau or train one with python -m rau.tokens.masktok"
        ) from None
    training_file = folder.joinpath(TRAINING_FILE)
    training = training_file.read_bytes() if training_file.is_file() else None
    return _from_bytes(config_bytes, weights, training, "rau/assets/masktok")




# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class CropSet:
    """crops: (N, S, S) float16 coverage crops; sources: per root, how many masks it gave."""

    crops: torch.Tensor
    sources: dict[str, int] = field(default_factory=dict)


def collect_crops(roots: Sequence[str | Path], *, size: int = 64, bins: int = 1024, progress: bool = True) -> CropSet:
    """Every non-empty mask of every image of each dataset folder, cropped to its (loc-quantised)
    box and resampled to size x size. Order: roots as given, images in dataset order, structures
    sorted by name (deterministic)."""
    from tqdm.auto import tqdm

    from rau.data.dataset import load_dataset

    crops: list[np.ndarray] = []
    sources: dict[str, int] = {}
    for root in roots:
        ds = load_dataset(root, arg="--data")
        before = len(crops)
        for entry in tqdm(ds.entries, desc=f"masks {Path(root).name}", disable=not progress, leave=False):
            ann = ds.load(entry)
            for name in sorted(ann.masks):
                mask = ann.masks[name]
                if mask.any():
                    _, box = mask_loc_tokens(mask, bins)
                    crops.append(crop_to_box(mask, box, size))
        sources[str(root)] = len(crops) - before
    if not crops:
        raise RauInputError(f"--data: {', '.join(map(str, roots))} hold no non-empty masks")
    return CropSet(torch.from_numpy(np.stack(crops)).to(torch.float16), sources)


def augment(x: torch.Tensor, generator: torch.Generator, jitter: float = 0.05, flip: bool = True) -> torch.Tensor:
    """Seeded augmentation of (B, 1, S, S) crops: half of them see their box jittered (each edge
    moved by up to ``jitter`` of the box side), and each is flipped left-right with p = 0.5 (so
    left and right structures share shapes)."""
    b = x.shape[0]
    d = (torch.rand(b, 4, generator=generator) * 2 - 1) * jitter
    d = d * (torch.rand(b, 1, generator=generator) < 0.5)
    sign = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0) if flip else torch.ones(b)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = (1 + d[:, 1] - d[:, 0]) * sign
    theta[:, 0, 2] = d[:, 0] + d[:, 1]
    theta[:, 1, 1] = 1 + d[:, 3] - d[:, 2]
    theta[:, 1, 2] = d[:, 2] + d[:, 3]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over the first 5 % (max 100 steps), then cosine decay to 5 % of ``lr``."""
    warm = max(1, min(100, steps // 20))
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _losses(out: VQOutput, target: torch.Tensor, cfg: MaskTokConfig) -> dict[str, torch.Tensor]:
    bce = F.binary_cross_entropy_with_logits(out.logits, target)
    prob = torch.sigmoid(out.logits).flatten(1)
    t = target.flatten(1)
    soft_dice = 1 - (2 * (prob * t).sum(1) + 1) / (prob.sum(1) + t.sum(1) + 1)
    loss = bce + cfg.dice_weight * soft_dice.mean() + cfg.beta * out.commit
    return {"loss": loss, "bce": bce, "soft_dice": soft_dice.mean(), "commit": out.commit}


def _hard_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) Dice between logits > 0 and target >= 0.5 (1 when both are empty)."""
    p, t = (logits > 0).flatten(1).float(), (target >= 0.5).flatten(1).float()
    total = p.sum(1) + t.sum(1)
    return torch.where(total > 0, 2 * (p * t).sum(1) / total.clamp(min=1), torch.ones_like(total))


def _step_generator(seed: int, step: int) -> torch.Generator:
    # One generator per step, derived from (seed, step): a resumed run draws exactly what an
    # uninterrupted one would, with no RNG state to checkpoint.
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


@dataclass
class TrainArgs:
    steps: int
    batch_size: int
    lr: float
    seed: int
    jitter: float
    flip: bool
    restart_until: float

    def check(self) -> None:
        for name, lo in (("steps", 1), ("batch_size", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise RauInputError(f"{name}: expected an integer >= {lo}, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise RauInputError(f"lr: expected a learning rate in (0, 1), e.g. 2e-3, got {self.lr!r}")
        if not 0 <= self.jitter < 0.5:
            raise RauInputError(f"jitter: expected a box fraction in [0, 0.5), got {self.jitter!r}")


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    _atomic_write(path, buf.getvalue())


def _load_checkpoint(path: Path, run: dict[str, Any]) -> dict[str, Any]:
    fix = f"delete {path} to start over, or pass resume=False / --no-resume"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors on a damaged file
        raise CheckpointError(f"resume: cannot read {path} ({_one_line(exc)}); {fix}") from None
    if not isinstance(state, dict) or "run" not in state:
        raise CheckpointError(f"resume: {path} is not a mask tokenizer training checkpoint; {fix}")
    if state["run"] != run:
        diff = sorted(k for k in set(run) | set(state["run"]) if run.get(k) != state["run"].get(k))
        raise CheckpointError(f"resume: {path} belongs to a run with other settings ({', '.join(diff)}); {fix}, or use another --out")
    return state


def train_masktok(
    dataset_roots: Sequence[str | Path],
    out_dir: str | Path,
    *,
    steps: int = 1500,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    resume: bool = True,
    device: str = "cpu",
    config: MaskTokConfig | None = None,
    checkpoint_every: int = 100,
    jitter: float = 0.05,
    flip: bool = True,
    restart_until: float = 0.9,
    command: str | None = None,
    progress: bool = True,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> MaskTokenizer:
    """Train a :class:`MaskVQVAE` on the masks of ``dataset_roots`` and write the tokenizer folder.

    Every ``checkpoint_every`` steps the full training state goes atomically to
    ``out_dir/checkpoint.pt``; with ``resume`` a restarted run continues from it and ends with the
    same weights as an uninterrupted one (per-step seeded RNG; same device and thread count).
    Dead codes are re-seeded during the first ``restart_until`` fraction of the steps.
    ``callback(step, metrics)`` runs after each step (step counts from 1). The final folder
    (``model.safetensors``, ``config.json``, ``training.json``) is written to ``out_dir``."""
    from tqdm.auto import tqdm

    config = config or MaskTokConfig()
    args = TrainArgs(steps, batch_size, lr, seed, jitter, flip, restart_until)
    args.check()
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise RauInputError(f"checkpoint_every: expected an integer >= 1, got {checkpoint_every!r}")
    data = collect_crops(dataset_roots, size=config.size, bins=config.bins, progress=progress)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = {"config": asdict(config) | {"channels": list(config.channels)}, "args": asdict(args),
           "data": {str(Path(k).resolve()): v for k, v in data.sources.items()}}
    model, opt, state = _init_training(config, run, out_dir / CHECKPOINT_FILE, seed, lr, resume)
    model.to(device).train()
    crops = data.crops.to(device)
    bar = tqdm(total=steps, initial=state["step"], desc="masktok", unit="step", disable=not progress)
    t0 = time.time()
    while state["step"] < steps:
        step = state["step"]
        metrics = _train_step(model, opt, crops, step, args, config, device)
        state["step"] = step + 1
        _record(state, step + 1, metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", dice64=f"{metrics['dice64']:.3f}", ppl=f"{metrics['perplexity']:.0f}")
        if state["step"] % checkpoint_every == 0 or state["step"] == steps:
            state["elapsed_s"] += time.time() - t0
            t0 = time.time()
            _save_checkpoint(out_dir / CHECKPOINT_FILE, {**state, "model": model.state_dict(), "optim": opt.state_dict()})
        if callback is not None:
            callback(step + 1, metrics)
    bar.close()
    state["elapsed_s"] += time.time() - t0
    model.to("cpu").eval()
    tokenizer = MaskTokenizer(model)
    info = _training_info(tokenizer, data, run, state, command)
    tokenizer.training = info
    tokenizer.save(out_dir, info)
    return tokenizer


def _init_training(config: MaskTokConfig, run: dict[str, Any], ckpt: Path, seed: int, lr: float, resume: bool):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MaskVQVAE(config)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    state: dict[str, Any] = {"step": 0, "run": run, "log": [], "elapsed_s": 0.0, "window": []}
    if resume and ckpt.is_file():
        saved = _load_checkpoint(ckpt, run)
        try:
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optim"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"resume: {ckpt} does not match the model ({_one_line(exc)}); delete it to start over") from None
        state = {k: saved[k] for k in ("step", "run", "log", "elapsed_s", "window")}
    return model, opt, state


def _train_step(model: MaskVQVAE, opt: torch.optim.Optimizer, crops: torch.Tensor, step: int,
                args: TrainArgs, cfg: MaskTokConfig, device: str) -> dict[str, float]:
    g = _step_generator(args.seed, step)
    idx = torch.randint(crops.shape[0], (args.batch_size,), generator=g)
    x = augment(crops[idx.to(crops.device)].float()[:, None].cpu(), g, args.jitter, args.flip).to(device)
    out = model(x, generator=g, restart=step < args.restart_until * args.steps)
    losses = _losses(out, x, cfg)
    for group in opt.param_groups:
        group["lr"] = _lr_at(step, args.steps, args.lr)
    opt.zero_grad(set_to_none=True)
    losses["loss"].backward()
    opt.step()
    metrics = {k: float(v.detach()) for k, v in losses.items()}
    metrics["dice64"] = float(_hard_dice(out.logits.detach(), x).mean())
    metrics["perplexity"] = out.perplexity
    return metrics


def _record(state: dict[str, Any], step: int, metrics: dict[str, float], every: int = 50) -> None:
    """Keep a window of recent metrics; every ``every`` steps append their mean to the log."""
    state["window"].append([metrics["loss"], metrics["dice64"], metrics["perplexity"]])
    if step % every == 0:
        arr = np.asarray(state["window"], dtype=np.float64)
        state["log"].append({"step": step, "loss": round(float(arr[:, 0].mean()), 5),
                             "dice64": round(float(arr[:, 1].mean()), 5), "perplexity": round(float(arr[:, 2].mean()), 1)})
        state["window"] = []


def _training_info(tok: MaskTokenizer, data: CropSet, run: dict[str, Any], state: dict[str, Any], command: str | None) -> dict[str, Any]:
    final = evaluate_crops(tok, data.crops[: min(len(data.crops), 4096)].float().numpy())
    return {
        "command": command,
        "data": data.sources,
        "n_masks": int(len(data.crops)),
        "steps": state["step"],
        "args": run["args"],
        "config": run["config"],
        "parameters": n_parameters(tok.model),
        "train_seconds": round(state["elapsed_s"], 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "final_metrics": final,
        "final_metrics_on": "the first 4096 training masks, 64 x 64, no augmentation",
        "loss_curve": state["log"],
    }


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def evaluate_crops(tok: MaskTokenizer, crops: np.ndarray, batch: int = 256) -> dict[str, float]:
    """64 x 64 reconstruction of coverage crops (N, S, S): mean Dice of (decoded >= 0.5) vs
    (crop >= 0.5), codebook codes used and usage perplexity."""
    dices, used = [], []
    with torch.no_grad():
        for i in range(0, len(crops), batch):
            x = torch.as_tensor(crops[i : i + batch], dtype=torch.float32)[:, None]
            codes = tok.model.encode(x)
            dices.append(_hard_dice(tok.model.decode_codes(codes), x))
            used.append(codes.flatten())
    ids = torch.cat(used)
    p = torch.bincount(ids, minlength=tok.config.codebook_size).float()
    p = p / p.sum()
    return {"dice64": round(float(torch.cat(dices).mean()), 4), "codes_used": int((p > 0).sum()),
            "perplexity": round(float(torch.exp(-(p * torch.log(p + 1e-10)).sum())), 1)}


def roundtrip_dice(tok: MaskTokenizer, dataset_root: str | Path, *, start: int = 0, stop: int | None = None,
                   structures: Sequence[str] | None = None, progress: bool = False) -> dict[str, Any]:
    """Round-trip Dice (encode -> decode at the original size vs the original mask) on images
    ``[start:stop]`` of a dataset (dataset order), and the crop-only Dice (crop to the quantised
    box, paste back: the upper bound set by the 64 x 64 resize). Per structure and overall (mean
    over masks, and mean of the per-structure means)."""
    from tqdm.auto import tqdm

    from rau.data.dataset import load_dataset
    from rau.metrics import dice

    ds = load_dataset(dataset_root, arg="dataset_root")
    per: dict[str, list[tuple[float, float]]] = {}
    for entry in tqdm(ds.entries[start:stop], desc=f"round trip {Path(dataset_root).name}", disable=not progress):
        ann = ds.load(entry, structures=list(structures) if structures else None)
        for name, mask in sorted(ann.masks.items()):
            if mask.any():
                per.setdefault(name, []).append(_roundtrip_one(tok, mask, dice))
    table = {name: {"n": len(v), "dice": float(np.mean([a for a, _ in v])), "crop_dice": float(np.mean([b for _, b in v]))}
             for name, v in sorted(per.items())}
    rows = [r for v in per.values() for r in v]
    overall = {"n": len(rows), "dice": float(np.mean([a for a, _ in rows])) if rows else float("nan"),
               "crop_dice": float(np.mean([b for _, b in rows])) if rows else float("nan"),
               "dice_structure_mean": float(np.mean([t["dice"] for t in table.values()])) if table else float("nan"),
               "crop_dice_structure_mean": float(np.mean([t["crop_dice"] for t in table.values()])) if table else float("nan")}
    return {"dataset": str(dataset_root), "images": len(ds.entries[start:stop]), "per_structure": table, "overall": overall}


def _roundtrip_one(tok: MaskTokenizer, mask: np.ndarray, dice: Callable) -> tuple[float, float]:
    tokens = tok.encode(mask)
    decoded = tok.decode_tokens(tokens, mask.shape)
    box = loc_tokens_to_box(tokens.loc, mask.shape, tok.config.bins)
    crop_only = paste_from_box(crop_to_box(mask, box, tok.config.size), box, mask.shape)
    pred = decoded.mask if decoded.mask is not None else np.zeros_like(mask)
    return dice(pred, mask), dice(crop_only, mask)


# --------------------------------------------------------------------------------------------
# Command line: python -m rau.tokens.masktok --data DIR [DIR...] --out DIR --steps N
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rau.tokens.masktok", description="Train the CheXanatomy mask tokenizer (VQ-VAE) on dataset folders.")
    p.add_argument("--data", nargs="+", required=True, help="dataset folders (images/ + masks/<structure>/, or COCO)")
    p.add_argument("--out", required=True, help="output folder: checkpoint.pt while training, then the tokenizer")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--codebook-size", type=int, default=512)
    p.add_argument("--code-dim", type=int, default=32)
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 96])
    p.add_argument("--jitter", type=float, default=0.05, help="box jitter (fraction of the box side)")
    p.add_argument("--no-flip", action="store_true", help="no left-right flips")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (results are reproducible for a fixed count)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --out")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    try:
        if a.threads < 1:
            raise RauInputError(f"--threads: expected an integer >= 1, got {a.threads}")
        torch.set_num_threads(a.threads)
        config = MaskTokConfig(codebook_size=a.codebook_size, code_dim=a.code_dim, channels=tuple(a.channels))
        tok = train_masktok(
            a.data, a.out, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, resume=not a.no_resume,
            device=a.device, config=config, checkpoint_every=a.checkpoint_every, jitter=a.jitter,
            flip=not a.no_flip, command=" ".join(["python -m rau.tokens.masktok", *argv]),
        )
    except (RauInputError, CheckpointError, FileNotFoundError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(f"{tok!r} -> {a.out}: {json.dumps(tok.training.get('final_metrics', {}))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
