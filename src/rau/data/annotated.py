"""The annotated image: pixels + named binary masks + metadata, and per-structure results.

Conventions used everywhere in rau:

- ``image``: 2D ``float32`` array of shape (H, W), values in [0, 1] (readers rescale 8/16-bit,
  apply DICOM rescale/windowing and convert RGB to luminance).
- masks: 2D ``bool`` arrays of shape (H, W), the same size as their image.
- boxes: ``box_xyxy_px`` = (x0, y0, x1, y1) in pixel-edge coordinates of the ORIGINAL image: a mask
  covering columns c0..c1 and rows r0..r1 (inclusive) has the box (c0, r0, c1 + 1, r1 + 1). See
  :mod:`rau.geometry` for conversions to and from model input space.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rau.errors import RauInputError


@dataclass
class AnnotatedImage:
    """An image with named binary masks.

    Args:
        image: (H, W) float32 in [0, 1].
        masks: structure name -> (H, W) bool mask. May be empty for unlabeled targets.
        meta: free-form metadata: ``id``, ``source`` (path), ``modality``, ``spacing_mm`` (row, col)
            when known.
    """

    image: np.ndarray
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        image = np.asarray(self.image)
        if image.ndim != 2:
            raise RauInputError(f"image: expected a 2D (H, W) array, got shape {image.shape}")
        if not np.all(np.isfinite(image)):
            raise RauInputError(f"image {self.id!r}: contains NaN or infinite values; clean the input first")
        self.image = image.astype(np.float32, copy=False)
        for name, mask in list(self.masks.items()):
            mask = np.asarray(mask)
            if mask.shape != image.shape:
                raise RauInputError(
                    f"mask {name!r} of image {self.id!r}: size {mask.shape[::-1]} (W, H) differs from "
                    f"the image size {image.shape[::-1]}; masks must match their image pixel for pixel"
                )
            self.masks[name] = mask.astype(bool, copy=False)

    @property
    def id(self) -> str:
        return str(self.meta.get("id", "image"))

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.image.shape[0]), int(self.image.shape[1]))

    @property
    def structures(self) -> list[str]:
        return list(self.masks)

    def to_uint8(self) -> np.ndarray:
        """(H, W) uint8 copy of the image, for rendering and 8-bit models."""
        return np.clip(np.rint(self.image * 255.0), 0, 255).astype(np.uint8)

    def annotates(self, name: str) -> bool:
        """True when this image has a non-empty mask for structure ``name``."""
        return name in self.masks and bool(self.masks[name].any())

    def require_nonempty(self, structures: list[str] | None = None, role: str = "reference") -> None:
        """Raise RauInputError if a requested structure is missing or its mask is empty."""
        for name in structures if structures is not None else self.structures:
            if name not in self.masks:
                known = ", ".join(sorted(self.masks)) or "none"
                raise RauInputError(
                    f"structures: {name!r} is not annotated in the {role} {self.id!r} (it has: {known})"
                )
            if not self.masks[name].any():
                raise RauInputError(
                    f"{role} mask {name!r} of {self.id!r} is empty; remove it or draw the structure"
                )


@dataclass
class StructureResult:
    """What a method says about one structure in one target.

    ``answer`` is the identification answer ("yes"/"no" visible, or free text from a VLM), ``None``
    when the method does not answer questions. ``box_xyxy_px`` and ``mask`` are in target pixels;
    both are ``None`` when the structure was not found. ``reason`` explains a missing answer.

    Set by :func:`rau.methods.confidence.assess`: ``confidence``, the calibrated probability that
    the output is right (None for a method without a calibration); ``flag``, the reason to abstain
    whatever the threshold (blank or noise target, reference does not fit); ``features``, what the
    confidence was computed from; ``presence``, the calibrated probability that the structure is in
    the target at all (None where the calibration has no presence model), and ``absent``, the reason
    "structure absent from target" when ``presence`` is below the calibration's presence threshold.
    :func:`rau.methods.confidence.abstain` sets ``abstained``. ``copied``: the mask is the reference copied onto
    the target rather than drawn by the segmenter (:attr:`rau.methods.interfaces.SegmentationOutput.copied`).
    """

    label: str
    answer: str | None = None
    box_xyxy_px: tuple[float, float, float, float] | None = None
    score: float = 0.0
    mask: np.ndarray | None = None
    reason: str | None = None
    confidence: float | None = None
    flag: str | None = None
    abstained: bool = False
    features: dict[str, float] | None = None
    presence: float | None = None
    absent: str | None = None
    copied: bool = False

    @property
    def found(self) -> bool:
        return self.mask is not None and bool(self.mask.any())


@dataclass
class TargetResult:
    """All structures for one target, plus timing and the reference that was used. ``threshold``: the
    default ``min_confidence`` of the calibration that assessed it (set by
    :func:`rau.methods.confidence.assess`; a method may assess some targets with another calibration)."""

    target_id: str
    reference_id: str
    method: str
    structures: dict[str, StructureResult]
    seconds: float = 0.0
    threshold: float | None = None
