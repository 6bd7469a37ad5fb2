"""The U-Net's configuration: network widths + preprocessing, saved as ``config.json`` next to the weights."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from rau.errors import RauInputError

PREPROCESSING = ("equalize", "minmax")
NORMS = ("instance", "batch")
DEFAULT_CHANNELS = (16, 32, 64, 128, 256, 16)


class BasicUNetConfig:
    """What the configs of MONAI BasicUNet models (the U-Net, :mod:`rau.models.refiner`) share: the
    checks of ``image_size``, ``channels``, ``preprocessing``, ``threshold`` and ``seed``, and the
    config.json round trip."""

    def check_network(self) -> None:
        """Validate the shared fields (RauInputError names the field); ``channels`` becomes a tuple."""
        if not isinstance(self.image_size, int) or self.image_size < 16 or self.image_size % 16:
            raise RauInputError(f"image_size: must be a multiple of 16 (>= 16), got {self.image_size!r}")
        ch = tuple(self.channels) if isinstance(self.channels, Sequence) else ()
        if len(ch) != 6 or not all(isinstance(c, int) and c > 0 for c in ch):
            raise RauInputError(f"channels: expected 6 positive ints (5 encoder widths + last decoder width), "
                                f"got {self.channels!r}")
        self.channels = ch
        if self.preprocessing not in PREPROCESSING:
            raise RauInputError(f"preprocessing: must be one of {PREPROCESSING}, got {self.preprocessing!r}")
        if not 0.0 < float(self.threshold) < 1.0:
            raise RauInputError(f"threshold: must be in (0, 1), got {self.threshold!r}")
        if not isinstance(self.seed, int):
            raise RauInputError(f"seed: must be an int, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``channels`` as a list, so it round-trips through config.json unchanged)."""
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        """Inverse of :meth:`to_dict`; TypeError for unknown keys, RauInputError for bad values."""
        if not isinstance(values, dict):
            raise TypeError(f"expected a JSON object, got {type(values).__name__}")
        return cls(**values)


@dataclass
class UNetConfig(BasicUNetConfig):
    """Network + preprocessing description (validated at construction; RauInputError names the field).

    Args:
        structures: output channel order; one sigmoid channel per structure.
        image_size: square network input side in pixels, a multiple of 16 (BasicUNet pools 4 times).
        channels: BasicUNet ``features``: 5 encoder widths + the last decoder width (6 ints).
        preprocessing: "equalize" (global histogram equalisation) or "minmax".
        norm: "instance" (default: per-image statistics, robust to the DRR -> real domain shift) or "batch".
        threshold: probability threshold for the binary mask.
        seed: seed of the weight initialisation.
    """

    structures: list[str]
    image_size: int = 256
    channels: tuple[int, ...] = DEFAULT_CHANNELS
    preprocessing: str = "equalize"
    norm: str = "instance"
    threshold: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.structures, str) or not isinstance(self.structures, Sequence) or not self.structures:
            raise RauInputError(f"structures: expected a non-empty list of names, got {self.structures!r}")
        self.structures = [str(s) for s in self.structures]
        if any(not s.strip() for s in self.structures) or len(set(self.structures)) != len(self.structures):
            raise RauInputError(f"structures: names must be non-empty and unique, got {self.structures}")
        self.check_network()
        if self.norm not in NORMS:
            raise RauInputError(f"norm: must be one of {NORMS}, got {self.norm!r}")
