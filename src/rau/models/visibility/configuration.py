"""The visibility model's configuration, saved as ``config.json`` next to its weights."""

from __future__ import annotations

from dataclasses import dataclass, field

from rau.errors import RauInputError
from rau.models.thumbnail import ThumbnailConfig


@dataclass
class VisibilityConfig(ThumbnailConfig):
    """Network + input of :class:`rau.models.visibility.modeling.VisibilityModel`: a
    :class:`rau.models.thumbnail.ThumbnailConfig` (``image_size``, ``width``, ``seed``; 128 x 128 by
    default: a vessel tree at 64 x 64 is a few pixels wide) and ``structures``, the names it answers
    for (at least one, distinct), one output each."""

    image_size: int = 128
    structures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.structures, (list, tuple)) or not self.structures \
                or not all(isinstance(s, str) and s for s in self.structures) \
                or len(set(self.structures)) != len(self.structures):
            raise RauInputError(f"structures: must be at least one distinct name, got {self.structures!r}")
        self.structures = list(self.structures)
