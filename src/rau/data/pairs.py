"""Reference/target training pairs for the localizer's supervised fine-tuning (pure numpy/PIL).

Example ``index`` (a global counter over every example a run draws) is a pure function of
``(seed, index)``: its generator is ``np.random.default_rng([seed, index])``, so a resumed run
draws exactly what the uninterrupted run would have drawn, with no sampler state to save.

For one example:

1. a TARGET, uniform over the images of all datasets that can be paired (bigger datasets weigh more);
2. a REFERENCE, uniform over the other images of the SAME dataset that have an annotation
   (a reference never serves as its own target);
3. a STRUCTURE, uniform over the structures with a non-empty mask in the reference;
4. the answer comes from the target's mask for that structure: its box, or "not visible" when the
   target lacks it (missing or empty mask; also when augmentation moves it out of the frame).

Optional augmentation warps the TARGET only (seeded, from the same generator): isotropic scale
about the image centre, a shift, then a gamma curve. Image and masks go through the same affine
map (bilinear / nearest), so the answer box, taken from the warped mask, matches the warped pixels.
The output keeps the target's size; pixels moved in from outside are 0.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from rau.data.annotated import AnnotatedImage
from rau.data.dataset import Dataset
from rau.errors import RauInputError
from rau.geometry import Box

# A reference whose masks are all empty is redrawn; bounded so a broken dataset fails loudly.
MAX_REDRAWS = 16


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the target augmentation (see the module doc); recorded with every example.

    scale: (low, high) isotropic zoom about the image centre (> 1 zooms in).
    shift_fraction: shift per axis, uniform in +-fraction of that side.
    gamma: (low, high); ``image ** gamma`` with gamma log-uniform in the range.
    """

    scale: tuple[float, float] = (0.9, 1.1)
    shift_fraction: float = 0.05
    gamma: tuple[float, float] = (0.8, 1.25)

    def __post_init__(self) -> None:
        for name in ("scale", "gamma"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise RauInputError(f"augment {name}: expected 0 < low <= high, got ({low}, {high})")
        if not 0 <= self.shift_fraction < 0.5:
            raise RauInputError(f"augment shift_fraction: expected 0 <= f < 0.5, got {self.shift_fraction}")


@dataclass
class Pair:
    """One training example before tokenization.

    ``target`` is already augmented (when augmentation is on); ``rng`` is the example's generator
    after sampling, for anything else that must be seeded per example (question paraphrase).
    ``record``: JSON-able description (index, dataset, reference_id, target_id, structure,
    visible, augment) for logs.
    """

    reference: AnnotatedImage
    target: AnnotatedImage
    structure: str
    record: dict[str, Any]
    rng: np.random.Generator = field(repr=False)


def affine_params(shape: tuple[int, int], scale: float, shift_xy: tuple[float, float]) -> tuple[float, ...]:
    """PIL ``Image.AFFINE`` data mapping OUTPUT pixel-edge coords to INPUT ones for a zoom by
    ``scale`` about the centre followed by a shift ``(dx, dy)`` px: out = s * (in - c) + c + d."""
    h, w = shape
    cx, cy = w / 2.0, h / 2.0
    dx, dy = shift_xy
    return (1.0 / scale, 0.0, cx - (cx + dx) / scale, 0.0, 1.0 / scale, cy - (cy + dy) / scale)


def transform_box(box: Box, shape: tuple[int, int], scale: float, shift_xy: tuple[float, float]) -> Box:
    """Where the augmentation moves a pixel-edge box (before clipping to the image)."""
    h, w = shape
    cx, cy = w / 2.0, h / 2.0
    dx, dy = shift_xy
    x0, y0, x1, y1 = box
    return (scale * (x0 - cx) + cx + dx, scale * (y0 - cy) + cy + dy,
            scale * (x1 - cx) + cx + dx, scale * (y1 - cy) + cy + dy)


def _warp(array: np.ndarray, data: tuple[float, ...], *, nearest: bool) -> np.ndarray:
    from PIL import Image

    h, w = array.shape
    if nearest:  # masks: no interpolation, so they stay binary
        img = Image.fromarray(array.astype(np.uint8) * 255)  # mode "L"
        return np.asarray(img.transform((w, h), Image.Transform.AFFINE, data, Image.Resampling.NEAREST)) > 127
    img = Image.fromarray(array.astype(np.float32))  # mode "F"
    return np.asarray(img.transform((w, h), Image.Transform.AFFINE, data, Image.Resampling.BILINEAR), np.float32)


def augment_target(
    target: AnnotatedImage, rng: np.random.Generator, config: AugmentConfig
) -> tuple[AnnotatedImage, dict[str, Any]]:
    """(augmented copy of ``target``, record {scale, shift_px [dx, dy], gamma}); same (H, W)."""
    h, w = target.shape
    scale = float(rng.uniform(*config.scale))
    shift = rng.uniform(-config.shift_fraction, config.shift_fraction, 2) * (w, h)
    dx, dy = float(shift[0]), float(shift[1])
    gamma = float(math.exp(rng.uniform(math.log(config.gamma[0]), math.log(config.gamma[1]))))
    data = affine_params((h, w), scale, (dx, dy))
    image = np.clip(_warp(target.image, data, nearest=False), 0.0, 1.0) ** gamma
    masks = {name: _warp(m, data, nearest=True) for name, m in target.masks.items()}
    record = {"scale": round(scale, 6), "shift_px": [round(dx, 3), round(dy, 3)], "gamma": round(gamma, 6)}
    meta = {**target.meta, "augment": record}
    return AnnotatedImage(image.astype(np.float32), masks, meta), record


class PairSampler:
    """Deterministic reference/target pairs over one or more datasets.

    Args:
        datasets: :class:`rau.data.dataset.Dataset` objects; a dataset with fewer than two images
            (or with no annotated image besides a target) contributes no targets.
        seed: example ``i`` depends only on ``(seed, i)``.
        augment: :class:`AugmentConfig` to augment targets, or None.
        cache_size: decoded images kept in memory (LRU), so small datasets are read once.

    Raises RauInputError when no dataset can form a single pair.
    """

    def __init__(
        self,
        datasets: Sequence[Dataset],
        *,
        seed: int = 0,
        augment: AugmentConfig | None = None,
        cache_size: int = 256,
    ):
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise RauInputError(f"seed: expected an int >= 0, got {seed!r}")
        self.datasets = list(datasets)
        self.seed = seed
        self.augment = augment
        self._cache: OrderedDict[tuple[int, int], AnnotatedImage] = OrderedDict()
        self._cache_size = cache_size
        # Per dataset: indices of images with at least one mask file (possible references).
        self._annotated = [[i for i, e in enumerate(ds.entries) if e.structures] for ds in self.datasets]
        self._targets = [
            (d, i)
            for d, ds in enumerate(self.datasets)
            for i in range(len(ds.entries))
            if any(j != i for j in self._annotated[d])
        ]
        if not self._targets:
            roots = ", ".join(str(ds.root) for ds in self.datasets) or "none"
            raise RauInputError(
                f"datasets: no dataset has two images of which one is annotated (got {roots}); "
                "each dataset needs at least two images and annotated masks"
            )

    def __repr__(self) -> str:
        return f"PairSampler({len(self.datasets)} datasets, {len(self._targets)} targets, seed={self.seed})"

    @property
    def n_targets(self) -> int:
        return len(self._targets)

    def describe(self) -> dict[str, Any]:
        """JSON-able summary (what a run log records about its data)."""
        return {
            "seed": self.seed,
            "augment": asdict(self.augment) if self.augment is not None else None,
            "datasets": [
                {"root": str(ds.root), "layout": ds.layout, "n_images": len(ds), "structures": ds.structures,
                 "n_targets": sum(1 for d, _ in self._targets if d == k)}
                for k, ds in enumerate(self.datasets)
            ],
        }

    def _image(self, d: int, i: int) -> AnnotatedImage:
        key = (d, i)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        image = self.datasets[d].load(self.datasets[d].entries[i])
        self._cache[key] = image
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return image

    def sample(self, index: int) -> Pair:
        """Example ``index`` (>= 0); the same ``(seed, index)`` always gives the same pair."""
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise RauInputError(f"index: expected an int >= 0, got {index!r}")
        rng = np.random.default_rng([self.seed, index])
        d, t = self._targets[int(rng.integers(len(self._targets)))]
        candidates = [j for j in self._annotated[d] if j != t]
        for _ in range(MAX_REDRAWS):
            r = candidates[int(rng.integers(len(candidates)))]
            reference = self._image(d, r)
            names = [s for s, m in reference.masks.items() if m.any()]  # sorted: entry order
            if names:
                break
        else:
            raise RauInputError(
                f"dataset {self.datasets[d].root}: references drawn for target "
                f"{self.datasets[d].entries[t].id!r} have only empty masks; remove empty mask files"
            )
        structure = names[int(rng.integers(len(names)))]
        target = self._image(d, t)
        augment = None
        if self.augment is not None:
            target, augment = augment_target(target, rng, self.augment)
        mask = target.masks.get(structure)
        record = {
            "index": index, "dataset": d, "reference_id": reference.id, "target_id": target.id,
            "structure": structure, "visible": bool(mask is not None and mask.any()), "augment": augment,
        }
        return Pair(reference, target, structure, record, rng)
