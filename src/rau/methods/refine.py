"""The registration refiner behind rau's :class:`~rau.methods.interfaces.Segmenter` interface
(method ``reg-refine``): registration aligns the reference image and masks with the target
(:class:`rau.methods.registration.RegistrationLocalizer` with ``warped_cues``), and the refiner
(:mod:`rau.models.refiner`) corrects each warped mask from the target and the warped reference.
Every structure is refined in one batch. A structure whose warped mask left the image gets None.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np

from rau.assets import ASSETS_DIR
from rau.data.annotated import AnnotatedImage, TargetResult
from rau.errors import RauInputError
from rau.geometry import Box, mask_to_box
from rau.methods.confidence import assess, best_fit, k_reference_features
from rau.methods.interfaces import Method, SegmentationOutput, Segmenter

#: The shipped refiner (scripts/refine_recipe.sh reproduces it).
DEFAULT_REFINER_DIR = ASSETS_DIR / "refiner"
#: Edge softening of the k-reference vote, as a fraction of the target's longest side (2 px at 512).
SOFT_VOTE_SIGMA = 2 / 512


class RefineSegmenter(Segmenter):
    """Warped reference mask + warped reference image + target -> target mask (reads the
    localizer's :class:`rau.methods.registration.WarpedReference` cues; boxes unused). The box
    reported is the refined mask's extent."""

    name = "refiner"
    uses_reference = False
    needs_boxes = False
    reads_cues = True

    def __init__(self, model_dir: str | Path | None = None, *, model=None, device: str = "cpu"):
        from rau.models.refiner.modeling import RefinerModel

        if (model_dir is None) == (model is None):
            raise RauInputError("model_dir: pass a refiner model folder or a loaded model (exactly one)")
        self.model = model if model is not None else RefinerModel.from_pretrained(model_dir, device=device,
                                                                                 what="--refiner")
        self.model.net.to(device).eval()
        self.model.device = device

    def segment(self, target: np.ndarray, boxes_xyxy_px: dict[str, Box | None], reference=None,
                cues: dict | None = None) -> dict[str, SegmentationOutput | None]:
        from rau.methods.registration import WarpedReference

        out: dict[str, SegmentationOutput | None] = {n: None for n in boxes_xyxy_px}
        have = [n for n in boxes_xyxy_px if isinstance((cues or {}).get(n), WarpedReference)
                and cues[n].prob.shape == target.shape and (cues[n].prob >= 0.5).any()]
        if not have:
            return out
        probs = self.model.predict_probs(target, cues[have[0]].image, [cues[n].prob for n in have])
        for name, p in zip(have, probs):
            mask = p > self.model.config.threshold
            out[name] = SegmentationOutput(mask, float(p[mask].mean()) if mask.any() else 0.0, p, mask_to_box(mask),
                                           reason=None if mask.any() else "the refiner erased the warped mask")
        return out


#: k references: the refined masks of a structure are pixel-voted when every two of them agree at
#: least this much (Dice); otherwise the most similar reference's mask is kept.
VOTE_TAU = 0.5


class RegRefineMethod(Method):
    """``reg-refine``: registration + the refiner, one reference as :class:`Method` runs it. With k
    references (:meth:`predict_k`) a structure is answered when more than half of the references
    annotate it; each of those references is registered and refined on its own, and the refined
    masks are pixel-voted (:func:`rau.methods.agreement.soft_vote`) when every two agree (Dice >=
    :data:`VOTE_TAU`), else read from the most similar reference. So a segment the first reference
    lacks still comes from the others, one only a minority shows is called absent, large organs gain
    from the vote, and thin vessels of different patients, which rarely agree, keep the most similar
    reference's mask. Measured (HISTORY 2026-12-04): on the calibration splits with the 3 NCC-nearest
    references the vote adds 0.008 on DRR poses (0.009 on clavicles and scapulae) and 0.002 on
    Wingspan, and changes ARCADE by under 0.002; averaging the k warped masks into one prior before the
    refiner lost half the ARCADE Dice (thin vessels of different patients barely overlap). The
    confidence of a k-reference result also reads how the k refined masks agree and how many
    references annotate the structure (:func:`rau.methods.confidence.k_reference_features`), and its
    ``fit`` is the best-fitting reference's (:func:`rau.methods.confidence.best_fit`), with the
    k-reference calibration (:attr:`calibration_k`) when one ships."""

    _warned_k = False

    @property
    def fuses_in_memory(self) -> bool:
        return True

    def predict_k(self, references: list[AnnotatedImage], target: AnnotatedImage,
                  structures: list[str] | None = None) -> TargetResult:
        from rau.methods.agreement import soft_vote
        from rau.metrics import dice

        if len(references) == 1:
            return self.predict(references[0], target, structures)
        if getattr(self.second_opinion, "delivers", False) and not self._warned_k:
            self._warned_k = True  # k references: one refined mask per reference, voted; no memory pass
            warnings.warn(f"{self.name}: --angiogram-masks memory applies to one reference; with {len(references)} "
                          "references the refiner's masks are voted (for the memory segmenter's masks from k references "
                          "in one memory, use --method sam2-memory)")
        structures, ref_id, start, checks, withheld = self._begin_k(references, target, structures)
        if withheld is not None:
            return withheld
        k = len(references)
        annotated = {s: sum(r.annotates(s) for r in references) for s in structures}
        majority = [s for s in structures if 2 * annotated[s] > k]
        # per structure and reference (by rank): (localization, segmentation), None where it is not asked
        parts: dict[str, list] = {s: [None] * k for s in structures}
        for i, ref in enumerate(references):
            have = [s for s in majority if ref.annotates(s)]
            if not have:
                continue
            found = self.localizer.localize(ref, target, have)
            cues = {s: found[s].cue for s in have if found[s].cue is not None}
            segs = self.segmenter.segment(target.image, {s: None for s in have}, None, cues=cues)
            for s in have:
                parts[s][i] = (found[s], segs.get(s))
        sigma = SOFT_VOTE_SIGMA * max(target.shape)
        # the pair's fit is the best-fitting reference's; what the k references say together per structure
        fit = {"fit": best_fit([r.image for r in references], target.image)}
        results, extra, read_from = {}, {}, {}
        for s in structures:
            asked = [i for i in range(k) if parts[s][i] is not None]
            if not asked:
                r = self._combine(s, None, None, None)
                r.answer, r.reason = "no", f"annotated in {annotated[s]} of the {k} references (not more than half)"
                results[s] = r
                extra[s] = {**k_reference_features([None] * k, annotated[s]), **fit}
                continue
            each = [self._combine(s, *parts[s][i], None) for i in asked]
            by_rank = dict(zip(asked, each))
            extra[s] = {**k_reference_features([by_rank[i].mask if i in by_rank else None for i in range(k)],
                                               annotated[s]), **fit}
            read_from[s] = references[asked[0]].masks[s]
            r = each[0]
            masks = [e.mask for e in each if e.mask is not None]
            if len(masks) == len(each) > 1 and all(dice(masks[i], masks[j]) >= VOTE_TAU
                                                   for i in range(len(masks)) for j in range(i + 1, len(masks))):
                voted = soft_vote(masks, sigma)
                if voted.any():
                    r.mask, r.box_xyxy_px = voted, mask_to_box(voted)
                    r.score = float(np.mean([e.score for e in each]))
            results[s] = r
        result = TargetResult(target.id, ref_id, self.name, results)
        # pair features from the first reference but the fit of the best-fitting one; each structure's
        # output compared with the mask of the first reference that has it, plus what the k references
        # say together (agreement, support)
        assess(result, references[0], target.image, self.calibration_for(k), checks, reference_masks=read_from, extra=extra)
        result.seconds = time.perf_counter() - start
        return result
