"""The laterality model's configuration, saved as ``config.json`` next to its weights."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rau.errors import RauInputError
from rau.models.thumbnail import ThumbnailConfig


@dataclass
class LateralityConfig(ThumbnailConfig):
    """Network + input of :class:`rau.models.laterality.modeling.LateralityModel`: a
    :class:`rau.models.thumbnail.ThumbnailConfig` (``image_size``, ``width``, ``seed``), and the
    score's ``temperature``: P(usual way round) = sigmoid(score / temperature), fitted after training
    on images the model never saw (:func:`rau.training.recipes.laterality.fit_temperature`). 0.5, the
    default of a config without it, is the uncalibrated reading ``tanh(score)`` of the agreement."""

    temperature: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not math.isfinite(self.temperature) or self.temperature <= 0:
            raise RauInputError(f"temperature: must be a finite number > 0, got {self.temperature!r}")
