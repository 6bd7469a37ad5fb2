"""The laterality model's configuration, saved as ``config.json`` next to its weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from rau.errors import RauInputError


@dataclass
class LateralityConfig:
    """Network + input of :class:`rau.models.laterality.modeling.LateralityModel`.

    Args:
        image_size: square thumbnail side (a multiple of 16: four 2x poolings), after global
            histogram equalisation at the image's own size.
        width: channels of the first of four conv blocks (then 2x, 4x, 4x).
        seed: seed of the weight initialisation.
    """

    image_size: int = 64
    width: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size < 16 or self.image_size % 16:
            raise RauInputError(f"image_size: must be a multiple of 16 (>= 16), got {self.image_size!r}")
        if not isinstance(self.width, int) or self.width < 4 or self.width % 4:
            raise RauInputError(f"width: must be a multiple of 4 (>= 4), got {self.width!r}")
        if not isinstance(self.seed, int):
            raise RauInputError(f"seed: must be an int, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        if not isinstance(values, dict):
            raise TypeError(f"expected a JSON object, got {type(values).__name__}")
        return cls(**values)
