"""The registration refiner's configuration, saved as ``config.json`` next to its weights."""

from __future__ import annotations

from dataclasses import dataclass, field

from rau.errors import RauInputError
from rau.models.unet.configuration import BasicUNetConfig

DEFAULT_CHANNELS = (16, 32, 64, 96, 128, 16)


@dataclass
class RefinerConfig(BasicUNetConfig):
    """Network + preprocessing of :class:`rau.models.refiner.modeling.RefinerModel`.

    Args:
        image_size: square side at which target, warped reference and prior are read (multiple of 16).
        crop: side (multiple of 16) to which each structure's window around its prior is resized.
        channels: MONAI BasicUNet ``features`` (5 encoder widths + the last decoder width).
        preprocessing: per-image intensity normalisation of both images ("equalize" or "minmax").
        prior_gain: initial weight of the prior in the output logit (``gain * (2 * prior - 1)``), so
            an untrained refiner returns the registration mask unchanged.
        threshold: probability threshold of the binary mask.
        held_out: structure-name patterns kept out of its training (recorded, for honest benchmarks).
        seed: seed of the weight initialisation.
    """

    image_size: int = 256
    crop: int = 128
    channels: tuple[int, ...] = DEFAULT_CHANNELS
    preprocessing: str = "equalize"
    prior_gain: float = 4.0
    threshold: float = 0.5
    held_out: list[str] = field(default_factory=list)
    seed: int = 0

    def __post_init__(self) -> None:
        self.check_network()
        if not isinstance(self.crop, int) or self.crop < 16 or self.crop % 16:
            raise RauInputError(f"crop: must be a multiple of 16 (>= 16), got {self.crop!r}")
        if not 0.0 <= float(self.prior_gain) <= 20.0:
            raise RauInputError(f"prior_gain: must be in [0, 20], got {self.prior_gain!r}")
        if isinstance(self.held_out, str):
            raise RauInputError(f"held_out: expected a list of name patterns, got the string {self.held_out!r}")
        self.held_out = [str(p) for p in self.held_out]
