"""The laterality model's configuration, saved as ``config.json`` next to its weights."""

from __future__ import annotations

from dataclasses import dataclass

from rau.models.thumbnail import ThumbnailConfig


@dataclass
class LateralityConfig(ThumbnailConfig):
    """Network + input of :class:`rau.models.laterality.modeling.LateralityModel`: a
    :class:`rau.models.thumbnail.ThumbnailConfig` (``image_size``, ``width``, ``seed``)."""
