"""The image-kind model's configuration, saved as ``config.json`` next to its weights."""

from __future__ import annotations

from dataclasses import dataclass, field

from rau.errors import RauInputError
from rau.models.thumbnail import ThumbnailConfig

#: The kinds of the shipped model. "other" is everything else it was shown (CT slices, smooth
#: noise); an image of a kind it never saw (a hand radiograph, an MRI) may land anywhere.
DEFAULT_KINDS = ("chest radiograph", "coronary angiogram", "other")


@dataclass
class ImageKindConfig(ThumbnailConfig):
    """Network + input of :class:`rau.models.imagekind.modeling.ImageKindModel`: a
    :class:`rau.models.thumbnail.ThumbnailConfig` (``image_size``, ``width``, ``seed``) and
    ``kinds``, the names of its classes (at least two, distinct)."""

    kinds: list[str] = field(default_factory=lambda: list(DEFAULT_KINDS))

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.kinds, (list, tuple)) or len(self.kinds) < 2 \
                or not all(isinstance(k, str) and k for k in self.kinds) or len(set(self.kinds)) != len(self.kinds):
            raise RauInputError(f"kinds: must be at least two distinct names, got {self.kinds!r}")
        self.kinds = list(self.kinds)
