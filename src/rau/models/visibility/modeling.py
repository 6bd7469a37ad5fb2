"""Visibility: which structures an image shows, read from the image alone.

Which coronary segments an angiogram shows is mostly a property of the target: which tree was
injected (left or right) and the view. A reference can show a segment the target does not (on the
ARCADE bench pairs 14% of the segments asked are not in the target), and the calibrated presence
(:class:`rau.methods.confidence.Presence`) decides "structure absent from target". Before this
model every presence feature described the method's *output* (its area, its fit, its score); this
one reads the target: :meth:`VisibilityModel.probs` gives P(the image shows it) per structure name
it knows, the confidence feature ``visibility`` (:func:`rau.methods.confidence.output_features`). A
structure it does not know gets no such feature (read as the calibration's mean: no evidence).

A multi-label thumbnail CNN (:func:`rau.models.thumbnail.thumbnail_cnn`, one sigmoid per name) on a
128 x 128 equalised thumbnail, trained by :mod:`rau.training.recipes.visibility`. A model folder
holds ``model.safetensors`` + ``config.json`` (+ ``training.json``), as the U-Net's.
"""

from __future__ import annotations

import numpy as np

from rau.models.thumbnail import ThumbnailModel
from rau.models.visibility.configuration import VisibilityConfig


class VisibilityModel(ThumbnailModel):
    """The visibility CNN with its config; the model-folder protocol is the U-Net's."""

    config_class = VisibilityConfig
    kind = "visibility"

    def __repr__(self) -> str:
        return f"VisibilityModel({len(self.config.structures)} structures, image_size={self.config.image_size})"

    @staticmethod
    def outputs(config) -> list[str]:
        return config.structures

    def probs(self, image: np.ndarray) -> dict[str, float]:
        """structure name -> P(the image shows it), for every name of ``config.structures``."""
        import torch

        p = torch.sigmoid(self.logits(image)).numpy()
        return {n: float(v) for n, v in zip(self.config.structures, p)}
