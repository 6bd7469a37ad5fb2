"""The U-Net behind rau's :class:`~rau.methods.interfaces.Segmenter` interface (method ``unet``).

Box-free and reference-free: all the model's structures come out of ONE forward pass; structures
asked for that the model does not know get None, and boxes are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rau.data.annotated import AnnotatedImage
from rau.geometry import Box
from rau.methods.interfaces import SegmentationOutput, Segmenter
from rau.models.unet.configuration import UNetConfig
from rau.models.unet.modeling import UNetModel


class UNetSegmenter(Segmenter):
    """Segmenter over a :class:`~rau.models.unet.modeling.UNetModel`."""

    name = "unet"
    uses_reference = False
    needs_boxes = False

    def __init__(self, model: UNetModel):
        self.model = model

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, device: str = "cpu") -> UNetSegmenter:
        """Load a U-Net model folder (or a run folder's ``final/``). Raises CheckpointError (one line)."""
        return cls(UNetModel.from_pretrained(folder, device=device))

    @property
    def config(self) -> UNetConfig:
        return self.model.config

    def predict_probs(self, image: np.ndarray, structures: Sequence[str] | None = None) -> np.ndarray:
        """(H, W) image -> (K, H, W) float32 probabilities (see :meth:`UNetModel.predict_probs`)."""
        return self.model.predict_probs(image, structures)

    def segment(self, target: np.ndarray, boxes_xyxy_px: dict[str, Box | None],
                reference: AnnotatedImage | None = None) -> dict[str, SegmentationOutput | None]:
        """Segment the structures named in ``boxes_xyxy_px`` (boxes unused) -> masks at target size.

        score: mean probability inside the predicted mask (0.0 when the mask is empty)."""
        out: dict[str, SegmentationOutput | None] = {n: None for n in boxes_xyxy_px}
        known = [n for n in boxes_xyxy_px if n in self.config.structures]
        if not known:
            return out
        probs = self.model.predict_probs(target, known)
        for name, p in zip(known, probs):
            mask = p > self.config.threshold
            out[name] = SegmentationOutput(mask, float(p[mask].mean()) if mask.any() else 0.0, p)
        return out
