"""Localizer interface: reference (with masks) + target image -> per-structure answer and box."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from rau.data.annotated import AnnotatedImage
from rau.geometry import Box


@dataclass
class Localization:
    """One structure in one target.

    answer: identification answer ("yes"/"no" for "is it visible", a name, or None if not asked);
    box_xyxy_px: box in ORIGINAL target pixels (pixel-edge xyxy) or None if not found;
    score: confidence in [0, 1]; reason: why there is no answer/box (e.g. malformed model output);
    mask: a (H, W) bool mask when the localizer also produces one (registration does), else None;
    prob: (H, W) float32 soft version of ``mask`` (e.g. the linearly warped reference mask), or None.
    """

    answer: str | None = None
    box_xyxy_px: Box | None = None
    score: float = 0.0
    reason: str | None = None
    mask: np.ndarray | None = None
    prob: np.ndarray | None = None


class Localizer(ABC):
    """Backends: ``qwen`` (VLM), ``registration`` (SimpleITK label propagation), ``oracle``
    (ground-truth boxes, evaluation only)."""

    name: str = "localizer"
    #: True only for the oracle: evaluation then shows it the target's ground-truth masks.
    reads_target_truth: bool = False

    @abstractmethod
    def localize(
        self,
        reference: AnnotatedImage,
        target: AnnotatedImage,
        structures: list[str],
    ) -> dict[str, Localization]:
        """Localize each of ``structures`` (all annotated in ``reference``) in ``target``.

        ``target.masks`` is empty at inference time; only the oracle reads it.
        """
