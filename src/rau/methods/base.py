"""A method = an optional localizer (answer + box per structure) + an optional segmenter (mask)."""

from __future__ import annotations

import time

import numpy as np
from scipy import ndimage

from rau.data.annotated import AnnotatedImage, StructureResult, TargetResult
from rau.geometry import mask_to_box
from rau.segment.base import Segmenter
from rau.vlm.base import Localization, Localizer


def fuse_probabilities(seg_prob: np.ndarray, loc_prob: np.ndarray, sigma_px: float) -> np.ndarray:
    """Consensus of a segmenter's and a localizer's soft masks -> (H, W) bool.

    The localizer's mask (e.g. the warped reference mask) is blurred by ``sigma_px`` so that its
    edge becomes a ramp the segmenter's sharper boundary can win on; the two probabilities are then
    averaged and thresholded at 0.5. Where both agree the pixel stays, where only one is confident
    the other decides. Measured on Wingspan held-out lungs/heart: better than either alone
    (docs/BENCHMARKS.md)."""
    blurred = ndimage.gaussian_filter(np.asarray(loc_prob, np.float32), sigma_px) if sigma_px > 0 else loc_prob
    return (np.asarray(seg_prob, np.float32) + blurred) / 2.0 > 0.5


class Method:
    """Runs one reference/target pair. The target image is encoded once by the segmenter for all
    structures (see :class:`rau.segment.base.Segmenter`).

    ``fuse_sigma``: if set, the final mask fuses the segmenter's probability with the localizer's
    soft mask (:func:`fuse_probabilities`), blur sigma = ``fuse_sigma`` x the target's longest side.
    """

    def __init__(self, name: str, localizer: Localizer | None, segmenter: Segmenter | None,
                 *, fuse_sigma: float | None = None):
        if localizer is None and segmenter is None:
            raise ValueError("Method needs a localizer, a segmenter, or both")
        self.name, self.localizer, self.segmenter = name, localizer, segmenter
        self.fuse_sigma = fuse_sigma

    def predict(self, reference: AnnotatedImage, target: AnnotatedImage, structures: list[str] | None = None) -> TargetResult:
        """Identify, localize and segment ``structures`` (default: all of the reference's) in ``target``.

        Raises RauInputError if a structure is not annotated in the reference or its mask is empty.
        """
        structures = list(structures) if structures is not None else reference.structures
        reference.require_nonempty(structures)
        start = time.perf_counter()
        locs = self.localizer.localize(reference, target, structures) if self.localizer else {}
        segs = {}
        if self.segmenter is not None:
            boxes = {s: locs[s].box_xyxy_px if s in locs else None for s in structures}
            ref = reference if self.segmenter.uses_reference else None
            segs = self.segmenter.segment(target.image, boxes, ref)
        sigma = self.fuse_sigma * max(target.shape) if self.fuse_sigma else None
        results = {s: self._combine(s, locs.get(s), segs.get(s), sigma) for s in structures}
        return TargetResult(target.id, reference.id, self.name, results, time.perf_counter() - start)

    def _combine(self, name: str, loc: Localization | None, seg, sigma: float | None) -> StructureResult:
        if seg is not None and sigma is not None and seg.prob is not None and loc is not None and loc.prob is not None:
            mask, score = fuse_probabilities(seg.prob, loc.prob, sigma), seg.score
        elif seg is not None:
            mask, score = seg.mask, seg.score
        elif loc is not None and loc.mask is not None and self.segmenter is None:
            mask, score = loc.mask, loc.score
        else:
            mask, score = None, 0.0
        box = loc.box_xyxy_px if loc is not None and loc.box_xyxy_px is not None else None
        if box is None and mask is not None:
            box = mask_to_box(mask)
        if loc is not None and self.segmenter is not None:
            score = loc.score * score if loc.box_xyxy_px is not None else 0.0
        found = mask is not None and bool(mask.any())
        answer = loc.answer if loc is not None and loc.answer is not None else ("yes" if found else "no")
        reason = loc.reason if loc is not None else None
        if reason is None and not found:
            reason = "the segmenter returned an empty mask" if seg is not None else "no box to segment"
        return StructureResult(name, answer, box, float(score), mask if found else None, reason)
