"""Two routes to one answer: the VLM route (``rau-seg``: what the RAU VLM knows a structure looks
like) and the reference route (``reg-refine``: the reference's own mask, aligned by registration and
corrected by the refiner). Method ``rau-refine``.

Per structure (:func:`agree`): where both routes give a mask and they agree (Dice >= ``tau``), the
mask is their consensus (:func:`consensus`: each mask's edge softened by ``sigma`` px, the two
averaged, > 0.5: the boundary halfway between theirs); where they disagree the reference route
wins, because a VLM trained on few structures lands elsewhere on a structure it never learned
(docs/RESULTS.md: clavicles, coronary segments), while the reference route follows whatever the
reference shows; where only one route gives a mask, that mask.
"""

from __future__ import annotations

import time

import numpy as np
from scipy import ndimage

from rau.data.annotated import AnnotatedImage, StructureResult, TargetResult
from rau.geometry import mask_to_box
from rau.methods.confidence import assess
from rau.methods.interfaces import Method
from rau.metrics import dice

#: Agreement (Dice between the two routes' masks) above which their consensus is kept.
TAU = 0.5
#: Edge softening of :func:`consensus`, as a fraction of the target's longest side (2 px at 512).
SIGMA = 2 / 512


def soft_vote(masks: list[np.ndarray], sigma_px: float) -> np.ndarray:
    """Pixel vote of binary masks with softened edges: each mask's edge blurred by ``sigma_px``, the
    masks averaged, > 0.5 -> (H, W) bool (for two masks: the boundary halfway between them)."""
    soft = [ndimage.gaussian_filter(m.astype(np.float32), sigma_px) if sigma_px > 0 else m.astype(np.float32)
            for m in masks]
    return np.mean(soft, axis=0) > 0.5


def consensus(a: np.ndarray, b: np.ndarray, sigma_px: float) -> np.ndarray:
    """Boundary halfway between two binary masks -> (H, W) bool."""
    return soft_vote([a, b], sigma_px)


def agree(vlm: StructureResult, ref: StructureResult, tau: float, sigma_px: float) -> tuple[StructureResult, str]:
    """One structure's combined result (confidence fields unset) and which rule made it:
    "consensus", "reference" (routes disagree, or only the reference route found it) or "vlm"."""
    if vlm.found and ref.found and dice(vlm.mask, ref.mask) >= tau:
        mask = consensus(vlm.mask, ref.mask, sigma_px)
        if mask.any():
            return StructureResult(vlm.label, "yes", mask_to_box(mask), (vlm.score + ref.score) / 2, mask), "consensus"
    if ref.found or not vlm.found:
        return StructureResult(ref.label, ref.answer, ref.box_xyxy_px, ref.score, ref.mask, ref.reason), "reference"
    return StructureResult(vlm.label, vlm.answer, vlm.box_xyxy_px, vlm.score, vlm.mask, vlm.reason), "vlm"


class AgreementMethod(Method):
    """``vlm_route`` and ``reference_route`` (two :class:`Method`) run on the same pair and are
    combined per structure (module doc). The routes run without calibration; this method's own
    calibration, if any, is applied to the combined result."""

    def __init__(self, name: str, vlm_route: Method, reference_route: Method, *, tau: float = TAU,
                 sigma: float = SIGMA):
        super().__init__(name, vlm_route.localizer, vlm_route.segmenter)
        self.vlm_route, self.reference_route = vlm_route, reference_route
        self.vlm_route.calibration = self.reference_route.calibration = None
        self.tau, self.sigma = tau, sigma
        self.last_rules: dict[str, str] = {}

    @property
    def fuses_in_memory(self) -> bool:
        return False

    def predict(self, reference: AnnotatedImage, target: AnnotatedImage, structures: list[str] | None = None) -> TargetResult:
        structures, start, checks, withheld = self._begin(reference, target, structures)
        if withheld is not None:
            return withheld
        a = self.vlm_route.predict(reference, target, structures)
        b = self.reference_route.predict(reference, target, structures)
        sigma = self.sigma * max(target.shape)
        results, self.last_rules = {}, {}
        for s in structures:
            results[s], self.last_rules[s] = agree(a.structures[s], b.structures[s], self.tau, sigma)
        result = TargetResult(target.id, reference.id, self.name, results)
        assess(result, reference, target.image, self.calibration, checks)
        result.seconds = time.perf_counter() - start
        return result
