"""Image kind: what kind of image this is (a chest radiograph, a coronary angiogram, something
else), read from the image alone.

The confidence's "reference does not fit" rule needs to know when a reference and a target are
different kinds of image. The thumbnail correlation of the two (``fit``) cannot tell an unlike
reference of the same anatomy from another modality: random ARCADE pairs correlate as low as
-0.58, angiograms read against a chest as high as 0.44 (docs/HISTORY.md, 2026-12-06 s20). This
model looks at each image on its own: :meth:`ImageKindModel.probs` gives one probability per kind,
and :meth:`ImageKindModel.agreement` of a reference and a target is the probability that they are
the same kind, ``sum_k p_ref(k) p_target(k)``: near 1 for two chest radiographs, near 0 for an
angiogram against a chest (:func:`rau.methods.confidence.kind_reason` reads it). A small CNN on a
64 x 64 equalised thumbnail (:func:`rau.models.thumbnail.thumbnail_cnn`), trained by
:mod:`rau.training.recipes.imagekind`.

A model folder holds ``model.safetensors`` + ``config.json`` (+ ``training.json``), as the U-Net's.
"""

from __future__ import annotations

import numpy as np

from rau.models.imagekind.configuration import ImageKindConfig
from rau.models.thumbnail import ThumbnailModel


class ImageKindModel(ThumbnailModel):
    """The image-kind CNN with its config; the model-folder protocol is the U-Net's."""

    config_class = ImageKindConfig
    kind = "image-kind"

    def __repr__(self) -> str:
        return f"ImageKindModel(kinds={self.config.kinds}, image_size={self.config.image_size})"

    @staticmethod
    def outputs(config) -> list[str]:
        return config.kinds

    def probs(self, image: np.ndarray) -> np.ndarray:
        """(len(kinds),) probabilities of the image's kind, in the order of ``config.kinds``."""
        import torch

        return torch.softmax(self.logits(image), 0).numpy().astype(np.float64)

    def predict_kind(self, image: np.ndarray) -> tuple[str, float]:
        """The likeliest kind and its probability."""
        p = self.probs(image)
        i = int(np.argmax(p))
        return self.config.kinds[i], float(p[i])

    def agreement(self, reference: np.ndarray, target: np.ndarray) -> float:
        """P(same kind) = sum_k p_reference(k) p_target(k), in [0, 1]."""
        return float(self.probs(reference) @ self.probs(target))
