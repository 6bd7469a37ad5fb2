"""Small CNNs that read a whole image as one equalised thumbnail: the shared parts of the
laterality model (:mod:`rau.models.laterality`, which way round an image is) and the image-kind
model (:mod:`rau.models.imagekind`, what kind of image it is). Both answer a question about the
image as a whole, for the confidence's pair rules (:mod:`rau.methods.confidence`), in milliseconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from rau.errors import RauInputError
from rau.models.unet.modeling import UNetModel


@dataclass
class ThumbnailConfig:
    """Network + input of a thumbnail CNN.

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


def thumbnail_cnn(config: ThumbnailConfig, outputs: int):
    """(B, 1, S, S) -> (B, outputs) logits: four conv blocks (GroupNorm, ReLU, 2x max-pool), then a
    linear read of the (S/16)^2 grid, which keeps where in the image a pattern is. Seeded init."""
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        layers, c = [], 1
        w = config.width
        for o in (w, 2 * w, 4 * w, 4 * w):
            layers += [nn.Conv2d(c, o, 3, padding=1), nn.GroupNorm(4, o), nn.ReLU(),
                       nn.Conv2d(o, o, 3, padding=1), nn.GroupNorm(4, o), nn.ReLU(), nn.MaxPool2d(2)]
            c = o
        side = config.image_size // 16
        return nn.Sequential(*layers, nn.Flatten(), nn.Dropout(0.2), nn.Linear(c * side * side, outputs))


def to_thumbnail(image: np.ndarray, size: int, what: str = "thumbnail"):
    """(H, W) image -> (1, 1, size, size) float32 tensor in [0, 1]: equalised at its own size, then resized."""
    import torch

    from rau.models.unet.modeling import preprocess, resize

    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise RauInputError(f"{what}: expected a (H, W) grayscale image, got shape {image.shape}")
    t = torch.from_numpy(np.ascontiguousarray(preprocess(image, "equalize")))[None, None]
    return resize(t, (size, size)).clamp_(0.0, 1.0)


def batched_logits(net, images, device: str = "cpu", batch: int = 256):
    """Logits of a (N, 1, S, S) thumbnail batch, ``batch`` at a time -> (N, outputs) float32 on the CPU
    (eval mode is the caller's)."""
    import torch

    with torch.inference_mode():
        return torch.cat([net(images[i:i + batch].to(device)).float().cpu() for i in range(0, len(images), batch)])


class ThumbnailModel(UNetModel):
    """A thumbnail CNN that reads a whole image (the image-kind and visibility models): the U-Net's
    model-folder protocol, :func:`thumbnail_cnn` with one output per name of ``outputs(config)``, and
    :meth:`logits` of one image. Subclasses set ``config_class``, ``kind`` and :meth:`outputs`."""

    @staticmethod
    def outputs(config) -> list[str]:
        raise NotImplementedError

    @classmethod
    def build_network(cls, config):
        return thumbnail_cnn(config, len(cls.outputs(config)))

    def predict_probs(self, image, structures=None):  # noqa: D102 - no masks here
        raise NotImplementedError(f"the {self.kind} model reads a whole image; it writes no masks")

    def thumbnail(self, image: np.ndarray):
        """(H, W) image -> the (1, 1, S, S) tensor the network reads."""
        return to_thumbnail(image, self.config.image_size, self.kind)

    def logits(self, image: np.ndarray):
        """(outputs,) float32 logits of one (H, W) image, on the CPU."""
        import torch

        with torch.inference_mode():
            return self.net(self.thumbnail(image).to(self.device))[0].float().cpu()
