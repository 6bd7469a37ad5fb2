"""U-Net baseline of CheXanatomy: a MONAI BasicUNet, its input path and its model folder.

Conventions:

- Input: the target (H, W) float32 in [0, 1] is preprocessed at its own size (global histogram
  equalisation, as LiteMedSAM needs on real CXR, or min-max) and then resized (bilinear, with
  antialiasing, NOT aspect-preserving) to ``image_size`` x ``image_size``. Training images go
  through the very same path, so a non-square target is squashed the same way at train and test.
- Output: one sigmoid channel per structure (multi-label: lungs and heart overlap in projection);
  probabilities are resized back to (H, W) and thresholded at ``threshold``.
- Left/right are the patient's (right lung on the image left for a PA view); no flip augmentation.

A model folder holds ``model.safetensors`` + ``config.json`` (+ ``training.json``);
:meth:`UNetModel.from_pretrained` also takes a training run folder (it loads ``final/``). Training:
:mod:`rau.training.recipes.unet`; the Segmenter adapter: :mod:`rau.methods.unet`; evaluation:
:mod:`rau.eval.unet`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rau.atomic import write_bytes, write_json
from rau.errors import CheckpointError, RauInputError
from rau.models.unet.configuration import UNetConfig
from rau.training.checkpoints import model_folder

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAINING = "training.json"


def build_network(config: UNetConfig):
    """MONAI BasicUNet: (B, 1, S, S) -> (B, len(structures), S, S) logits. Seeded init."""
    import torch
    from monai.networks.nets import BasicUNet

    norm = ("instance", {"affine": True}) if config.norm == "instance" else ("batch", {})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return BasicUNet(spatial_dims=2, in_channels=1, out_channels=len(config.structures),
                         features=config.channels, norm=norm)


# ----------------------------------------------------------------------------- pre/post-processing


def preprocess(image: np.ndarray, mode: str) -> np.ndarray:
    """(H, W) float in [0, 1] -> (H, W) float32 in [0, 1] at the same size."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise RauInputError(f"target: expected a (H, W) grayscale image, got shape {image.shape}")
    if mode == "equalize":
        from rau.encoders.litemedsam import equalize

        return equalize(image)
    lo, hi = float(image.min()), float(image.max())
    return ((image - lo) / max(hi - lo, 1e-8)).astype(np.float32)


def resize(t, size: tuple[int, int], *, binary: bool = False):
    """(B, C, h, w) float tensor -> (B, C, *size): bilinear with antialiasing; ``binary``: > 0.5."""
    import torch.nn.functional as F

    if tuple(t.shape[-2:]) != tuple(size):
        t = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)
    return (t > 0.5).float() if binary else t


def to_input(image: np.ndarray, config: UNetConfig):
    """(H, W) image -> (1, 1, S, S) float32 tensor: preprocess at native size, then resize."""
    import torch

    img = preprocess(image, config.preprocessing)
    t = torch.from_numpy(np.ascontiguousarray(img))[None, None]
    return resize(t, (config.image_size, config.image_size)).clamp_(0.0, 1.0)


# ----------------------------------------------------------------------------- model folder


def read_config(folder: str | Path, what: str = "checkpoint", config_class=UNetConfig, kind: str = "U-Net"):
    """``folder/config.json`` -> ``config_class``; CheckpointError (one line) when missing or invalid."""
    folder = Path(folder)
    path = folder / CONFIG
    if not folder.is_dir() or not path.is_file():
        raise CheckpointError(f"{what}: {folder} is not a {kind} checkpoint folder ({WEIGHTS} + {CONFIG})")
    try:
        return config_class.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, RauInputError) as exc:
        raise CheckpointError(f"{what}: {path} is not a valid {kind} config ({exc})") from None


class UNetModel:
    """A BasicUNet with its config: image-level prediction and the model folder.

    Follows the protocol of :func:`rau.training.engine.run_training` (``net``, settable
    ``device``, ``weights_bytes``, ``load_weights``, ``save_pretrained``, ``config_dict``).
    Subclasses with another network set ``config_class``/``kind`` and override :meth:`build_network`."""

    config_class = UNetConfig
    kind = "U-Net"

    def __init__(self, config: UNetConfig, net=None, *, device: str = "cpu", training: dict | None = None):
        self.config = config
        self.device = device
        self.net = (net if net is not None else self.build_network(config)).to(device).eval()
        self.training = training

    def __repr__(self) -> str:
        return f"UNetModel(structures={self.config.structures}, image_size={self.config.image_size})"

    @staticmethod
    def build_network(config):
        return build_network(config)

    def config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    def weights_bytes(self) -> bytes:
        """The network's state dict (fp32, CPU) as safetensors bytes."""
        from safetensors.torch import save

        return save({k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()})

    def load_weights(self, path: str | Path, what: str = "checkpoint") -> None:
        """Load safetensors weights (strict); CheckpointError naming ``what`` if missing or unreadable."""
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{what}: {path} is missing; a {self.kind} checkpoint folder holds {WEIGHTS} + {CONFIG}")
        try:
            self.net.load_state_dict(load_file(str(path), device="cpu"), strict=True)
        except Exception as exc:  # noqa: BLE001 - truncated, foreign or mismatched file: one clear line
            raise CheckpointError(f"{what}: cannot load {self.kind} weights from {path} ({exc.__class__.__name__}); "
                                  f"re-train or pass the folder of a complete checkpoint") from None

    def save_pretrained(self, folder: str | Path, training: dict[str, Any] | None = None) -> Path:
        """Write model.safetensors + config.json (+ training.json when given), each atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_bytes(folder / WEIGHTS, self.weights_bytes())
        write_json(folder / CONFIG, self.config.to_dict(), indent=1)
        if training is not None:
            write_json(folder / TRAINING, training, indent=1)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, device: str = "cpu", what: str = "checkpoint"):
        """Load a model folder ({config.json, model.safetensors}) or a run folder's ``final/``.

        Raises CheckpointError (one line naming ``what``)."""
        folder = model_folder(folder)
        model = cls(read_config(folder, what, cls.config_class, cls.kind))
        model.load_weights(folder / WEIGHTS, what)
        if (folder / TRAINING).is_file():
            try:
                model.training = json.loads((folder / TRAINING).read_text())
            except ValueError:
                model.training = {}
        model.net.to(device)
        model.device = device
        return model

    def predict_probs(self, image: np.ndarray, structures: Sequence[str] | None = None) -> np.ndarray:
        """(H, W) image in [0, 1] -> (K, H, W) float32 probabilities for ``structures`` (default: all
        of the model's, in config order); only those channels are resized back to (H, W)."""
        import torch

        names = self.config.structures if structures is None else list(structures)
        idx = [self.config.structures.index(n) for n in names]
        x = to_input(image, self.config).to(self.device)
        with torch.inference_mode():
            prob = torch.sigmoid(self.net(x)[:, idx].float())
            prob = resize(prob.cpu(), tuple(image.shape[:2])).clamp_(0.0, 1.0)
        return prob[0].numpy()
