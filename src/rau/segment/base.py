"""Segmenter interface: target image (+ optional reference memory, + optional boxes) -> masks.

One call per target segments every requested structure, so a backend encodes the target image
once and reuses the embedding for all structures.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from rau.data.annotated import AnnotatedImage
from rau.geometry import Box


@dataclass
class SegmentationOutput:
    """mask: (H, W) bool in target pixels; score: the backend's confidence in [0, 1];
    prob: (H, W) float32 foreground probability when the backend has one (used for fusion)."""

    mask: np.ndarray
    score: float
    prob: np.ndarray | None = None


class Segmenter(ABC):
    """Backends: ``medsam`` (box prompt, LiteMedSAM) and ``sam2-memory`` (reference in SAM2 memory).

    ``uses_reference``: the backend reads the reference image and masks (memory route);
    ``needs_boxes``: the backend cannot segment a structure without a box.
    """

    name: str = "segmenter"
    uses_reference: bool = False
    needs_boxes: bool = True

    @abstractmethod
    def segment(
        self,
        target: np.ndarray,
        boxes_xyxy_px: dict[str, Box | None],
        reference: AnnotatedImage | None = None,
    ) -> dict[str, SegmentationOutput | None]:
        """Segment each structure named in ``boxes_xyxy_px`` in ``target``.

        Args:
            target: (H, W) float32 in [0, 1].
            boxes_xyxy_px: structure -> box in target pixels (pixel-edge xyxy), or None when no box
                is known (memory backends then segment from memory alone; box-only backends return
                None for that structure).
            reference: annotated reference; required when ``uses_reference``.

        Returns:
            structure -> SegmentationOutput, or None where nothing could be segmented.
        """
