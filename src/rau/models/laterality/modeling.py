"""Laterality: which way round an image is, read from its own anatomy (the heart's side on a chest
radiograph, the spine and catheter on an angiogram).

A small CNN ``g`` reads a ``image_size`` x ``image_size`` thumbnail; the score is
``g(x) - g(mirror(x))``, odd under mirroring by construction: a mirrored image scores exactly the
negative. It is trained on images in their usual orientation only (:mod:`rau.training.recipes.laterality`),
so ``score > 0`` means "as usual". Its scale is set after training (the config's ``temperature``,
fitted on images it never saw): P(usual) = sigmoid(score / temperature) (:meth:`LateralityModel.p_usual`).
:meth:`LateralityModel.agreement` of a reference and a target is (2 p_ref - 1)(2 p_target - 1): close to
+1 when both face the same way, to -1 when one is mirrored, near 0 when either shows no side the model
knows; P(same way round) = (1 + agreement) / 2. The "mirrored" rule of the confidence
(:func:`rau.methods.confidence.mirror_reason`) reads it.

A model folder holds ``model.safetensors`` + ``config.json`` (+ ``training.json``), as the U-Net's.
"""

from __future__ import annotations

import numpy as np

from rau.models.laterality.configuration import LateralityConfig
from rau.models.thumbnail import thumbnail_cnn
from rau.models.thumbnail import to_thumbnail as thumbnail
from rau.models.unet.modeling import UNetModel


def build_network(config: LateralityConfig):
    """``g``: (B, 1, S, S) -> (B,) logits, the shared thumbnail CNN (:func:`rau.models.thumbnail.thumbnail_cnn`)."""
    from torch import nn

    return nn.Sequential(*thumbnail_cnn(config, 1), nn.Flatten(0))


def odd_score(net, x):
    """``g(x) - g(mirror(x))`` for a (B, 1, S, S) batch -> (B,)."""
    return net(x) - net(x.flip(-1))


def batched_scores(net, images, device: str = "cpu", batch: int = 256) -> np.ndarray:
    """Odd scores of a (N, 1, S, S) thumbnail batch, ``batch`` at a time -> (N,) float64 (eval mode is the caller's)."""
    import torch

    with torch.inference_mode():
        return torch.cat([odd_score(net, images[i:i + batch].to(device)).cpu()
                          for i in range(0, len(images), batch)]).double().numpy()


def agreement_from_scores(score_reference: float, score_target: float, temperature: float) -> float:
    """(2 p_ref - 1)(2 p_target - 1) with p = sigmoid(score / temperature), i.e.
    tanh(s_ref / 2T) tanh(s_target / 2T), in [-1, 1]: < 0 when one of the two is mirrored."""
    t = 2.0 * temperature
    return float(np.tanh(score_reference / t) * np.tanh(score_target / t))


def to_thumbnail(image: np.ndarray, config: LateralityConfig):
    """(H, W) image -> (1, 1, S, S) float32 tensor: equalised at its own size, then resized."""
    return thumbnail(image, config.image_size, "laterality")


class LateralityModel(UNetModel):
    """The laterality CNN with its config; the model-folder protocol is the U-Net's."""

    config_class = LateralityConfig
    kind = "laterality"

    def __repr__(self) -> str:
        c = self.config
        return f"LateralityModel(image_size={c.image_size}, width={c.width}, temperature={c.temperature:.3g})"

    @staticmethod
    def build_network(config):
        return build_network(config)

    def predict_probs(self, image, structures=None):  # noqa: D102 - no masks here
        raise NotImplementedError("the laterality model scores images; use score()")

    def score(self, image: np.ndarray) -> float:
        """> 0: the image is the usual way round; < 0: mirrored; exactly odd under mirroring."""
        import torch

        with torch.inference_mode():
            return float(odd_score(self.net, to_thumbnail(image, self.config).to(self.device))[0])

    def p_usual(self, image: np.ndarray) -> float:
        """P(the image is the usual way round) = sigmoid(score / temperature)."""
        return float(0.5 + 0.5 * np.tanh(self.score(image) / (2.0 * self.config.temperature)))

    def agreement(self, reference: np.ndarray, target: np.ndarray) -> float:
        """:func:`agreement_from_scores` of the two images' scores with the config's temperature (with
        the default T = 0.5, tanh(s_ref) tanh(s_target))."""
        return agreement_from_scores(self.score(reference), self.score(target), self.config.temperature)
