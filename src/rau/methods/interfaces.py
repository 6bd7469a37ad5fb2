"""The interfaces every method is built from.

- :class:`Localizer`: reference (with masks) + target -> per structure an answer and a box
  (:class:`Localization`); registration, the RAU VLMs, CheXanatomy and the oracle implement it.
- :class:`Segmenter`: target (+ optional reference memory, + optional boxes) -> masks
  (:class:`SegmentationOutput`); one call per target segments every structure, so a backend encodes
  the target once. LiteMedSAM (box prompt), SAM2 memory and the U-Net implement it.
- :class:`Method`: an optional localizer + an optional segmenter, run on one pair.
"""

from __future__ import annotations

import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from rau.data.annotated import AnnotatedImage, StructureResult, TargetResult
from rau.errors import RauInputError
from rau.geometry import Box, mask_to_box
from rau.methods.confidence import assess, target_checks, target_reason

#: Blur of the localizer's soft mask before fusion (:func:`fuse_probabilities`), as a fraction of
#: the target's longest side (4 px at 512 px; picked on 15 Wingspan targets of the reference part,
#: see docs/HISTORY.md). The fusing methods (reg-fuse, rau) set it as ``Method.fuse_sigma``.
FUSE_SIGMA = 4 / 512


@dataclass
class Localization:
    """One structure in one target.

    answer: identification answer ("yes"/"no" for "is it visible", a name, or None if not asked);
    box_xyxy_px: box in ORIGINAL target pixels (pixel-edge xyxy) or None if not found;
    score: confidence in [0, 1]; reason: why there is no answer/box (e.g. malformed model output);
    mask: a (H, W) bool mask when the localizer also produces one (registration does), else None;
    prob: (H, W) float32 soft version of ``mask`` (e.g. the linearly warped reference mask), or None;
    cue: a spatial cue beyond the box for segmenters that read cues (``Segmenter.reads_cues``), e.g.
    RAU's ``<seg>`` query (:class:`rau.methods.rau_seg.SegCue`); None otherwise;
    features: measurements only the localizer can make, handed to the confidence
    (:data:`rau.methods.confidence.LOCALIZER_FEATURES`, e.g. the RAU VLM's ``p_yes``), or None.
    """

    answer: str | None = None
    box_xyxy_px: Box | None = None
    score: float = 0.0
    reason: str | None = None
    mask: np.ndarray | None = None
    prob: np.ndarray | None = None
    cue: object | None = None
    features: dict[str, float] | None = None


class Localizer(ABC):
    """Backends: ``qwen`` (VLM), ``registration`` (SimpleITK label propagation), ``oracle``
    (ground-truth boxes, evaluation only)."""

    name: str = "localizer"
    #: True only for the oracle: evaluation then shows it the target's ground-truth masks.
    reads_target_truth: bool = False

    @abstractmethod
    def localize(
        self,
        reference: AnnotatedImage,
        target: AnnotatedImage,
        structures: list[str],
    ) -> dict[str, Localization]:
        """Localize each of ``structures`` (all annotated in ``reference``) in ``target``.

        ``target.masks`` is empty at inference time; only the oracle reads it.
        """


@dataclass
class SegmentationOutput:
    """mask: (H, W) bool in target pixels; score: the backend's confidence in [0, 1];
    prob: (H, W) float32 foreground probability when the backend has one (used for fusion);
    box_xyxy_px: the backend's own box, replacing the localizer's (e.g. the extent of a mask that
    refines the localizer's box), or None; reason: why the mask is empty, when the backend knows
    (the structure is then answered "no"); features: measurements only the backend can make, handed
    to the confidence (:data:`rau.methods.confidence.FEATURES`, e.g. the memory segmenter's
    ``readout_agreement``); copied: the mask is the reference copied onto the target (the caller's prior or the
    memory readout), not the backend's own drawing (a structure the memory segmenter never trained on)."""

    mask: np.ndarray
    score: float
    prob: np.ndarray | None = None
    box_xyxy_px: Box | None = None
    reason: str | None = None
    features: dict[str, float] | None = None
    copied: bool = False


class Segmenter(ABC):
    """Backends: ``medsam`` (box prompt, LiteMedSAM) and ``sam2-memory`` (reference in SAM2 memory).

    ``uses_reference``: the backend reads the reference image and masks (memory route);
    ``needs_boxes``: the backend cannot segment a structure without a box;
    ``reads_cues``: the backend's ``segment`` also takes ``cues`` (structure -> the localizer's
    :attr:`Localization.cue`), e.g. RAU's ``<seg>`` query.
    """

    name: str = "segmenter"
    uses_reference: bool = False
    needs_boxes: bool = True
    reads_cues: bool = False

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


def fuse_probabilities(seg_prob: np.ndarray, loc_prob: np.ndarray, sigma_px: float) -> np.ndarray:
    """Consensus of a segmenter's and a localizer's soft masks -> (H, W) bool.

    The localizer's mask (e.g. the warped reference mask) is blurred by ``sigma_px`` so that its
    edge becomes a ramp the segmenter's sharper boundary can win on; the two probabilities are then
    averaged and thresholded at 0.5. Where both agree the pixel stays, where only one is confident
    the other decides. Measured on Wingspan held-out lungs/heart: better than either alone
    (docs/HISTORY.md)."""
    blurred = ndimage.gaussian_filter(np.asarray(loc_prob, np.float32), sigma_px) if sigma_px > 0 else loc_prob
    return (np.asarray(seg_prob, np.float32) + blurred) / 2.0 > 0.5


def segmenter_features(segs: dict, locs: dict | None = None) -> dict[str, dict[str, float]]:
    """structure -> the features a segmenter measured on its output (:attr:`SegmentationOutput.features`)
    and, from ``locs``, those the localizer measured (:attr:`Localization.features`)."""
    out: dict[str, dict[str, float]] = {}
    for parts in (locs or {}, segs):
        for s, o in parts.items():
            if o is not None and o.features:
                out.setdefault(s, {}).update(o.features)
    return out


class Method:
    """Runs one reference/target pair. The target image is encoded once by the segmenter for all
    structures (see :class:`rau.methods.interfaces.Segmenter`).

    ``fuse_sigma``: if set, the final mask fuses the segmenter's probability with the localizer's
    soft mask (:func:`fuse_probabilities`), blur sigma = ``fuse_sigma`` x the target's longest side.
    ``calibration``: a :class:`rau.methods.confidence.Calibration` (``create_method`` loads the
    shipped one of the method's name); every result is assessed with it
    (:func:`rau.methods.confidence.assess`: a confidence per structure; masks are not changed).
    ``calibration_k``: the one for results of k references fused in memory (:meth:`predict_k`),
    fitted with the references' agreement (``rau calibrate --k-references K``); None: ``calibration``.
    ``segment_all``: a structure the localizer answers "not visible" is still segmented by a segmenter
    that can do without a box (the memory segmenter, from memory alone) and kept; the calibrated
    confidence and presence models, which read the localizer's answer (``p_yes``), decide what is
    withheld. False (the paper's RAU): the localizer's "no" stands and no mask is delivered. None (the
    default): the method has no such choice (its localizer's "no" stands).
    ``second_opinion``: a :class:`rau.methods.second_opinion.SecondOpinion` whose agreement with each
    one-reference result is the confidence feature ``second_opinion`` (``reg-refine`` on angiograms), or None;
    one that ``delivers`` hands over its masks and the method's own become the opinion.
    ``calibration_memory``: the calibration of a result whose masks the second opinion delivered (fitted on
    such results alone, ``rau calibrate --memory-route``); None: ``calibration`` assesses those too.
    """

    calibration = None
    calibration_k = None
    calibration_memory = None
    segment_all: bool | None = None
    second_opinion = None

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
        structures, start, checks, withheld = self._begin(reference, target, structures)
        if withheld is not None:
            return withheld
        locs = self.localizer.localize(reference, target, structures) if self.localizer else {}
        segs = {}
        if self.segmenter is not None:
            boxes = {s: locs[s].box_xyxy_px if s in locs else None for s in structures}
            ref = reference if self.segmenter.uses_reference else None
            if self.segmenter.reads_cues:
                cues = {s: locs[s].cue for s in structures if s in locs and locs[s].cue is not None}
                segs = self.segmenter.segment(target.image, boxes, ref, cues=cues)
            else:
                segs = self.segmenter.segment(target.image, boxes, ref)
        sigma = self.fuse_sigma * max(target.shape) if self.fuse_sigma else None
        results = {s: self._combine(s, locs.get(s), segs.get(s), sigma) for s in structures}
        result = TargetResult(target.id, reference.id, self.name, results)
        extra = segmenter_features(segs, locs)
        calibration = self.calibration
        if self.second_opinion is not None:  # a second route's agreement, a confidence feature
            instead, opinion = self.second_opinion.review(reference, target.image, results)
            for s, seg in instead.items():  # the second route delivers (its mask, box and score), the first is the opinion
                results[s] = self._combine(s, None, seg, None)
            for s, more in opinion.items():
                extra.setdefault(s, {}).update(more)
            if instead and self.calibration_memory is not None:  # those masks have their own calibration
                calibration = self.calibration_memory
        assess(result, reference, target.image, calibration, checks, extra=extra)
        result.seconds = time.perf_counter() - start
        return result

    @property
    def reads_target_truth(self) -> bool:
        """True for the oracles: the localizer reads the target's ground truth (evaluation only)."""
        return bool(getattr(self.localizer, "reads_target_truth", False))

    def calibration_for(self, k: int = 1):
        """The calibration that assesses this method's results from ``k`` references (its threshold is
        the default ``min_confidence``): :attr:`calibration_k` for k > 1 references fused in memory
        when there is one, else :attr:`calibration` (k = 1, or one result per reference). Warns once
        when :attr:`calibration_k` was fitted with another number of references (its threshold then
        withholds more or fewer right masks than it aims at: with 8 references `sam2-memory`'s k = 3
        calibration withholds 9% of right ARCADE masks, docs/RESULTS.md)."""
        if k > 1 and self.fuses_in_memory and self.calibration_k is not None:
            fitted = (getattr(self.calibration_k, "record", None) or {}).get("k_references")
            if fitted and fitted != k:
                warnings.warn(f"{self.name}: its confidence for k references was calibrated with {fitted} references, not "
                              f"{k}; its threshold may withhold more or fewer right masks than it aims at (rau calibrate "
                              f"--method {self.name} --k-references {k} fits one for {k})")
            return self.calibration_k
        return self.calibration

    @property
    def fuses_in_memory(self) -> bool:
        """True when k references go into the segmenter's memory together (a memory segmenter with
        ``segment_k`` and no localizer) instead of one run per reference and a pixel vote."""
        return self.localizer is None and callable(getattr(self.segmenter, "segment_k", None))

    def predict_k(self, references: list[AnnotatedImage], target: AnnotatedImage,
                  structures: list[str] | None = None) -> TargetResult:
        """All ``references`` in memory at once (:attr:`fuses_in_memory` methods only): each
        structure is read from the references that annotate it, so one missing from a reference
        comes from the others. ``structures``: default every structure some reference annotates."""
        if not self.fuses_in_memory:
            raise TypeError(f"method {self.name!r} does not fuse references in memory; run it once per reference")
        structures, ref_id, start, checks, withheld = self._begin_k(references, target, structures)
        if withheld is not None:
            return withheld
        segs = self.segmenter.segment_k(target.image, references, {s: None for s in structures})
        results = {s: self._combine(s, None, segs.get(s), None) for s in structures}
        result = TargetResult(target.id, ref_id, self.name, results)
        annotating = {s: [r for r in references if r.annotates(s)] for s in structures}
        # how many of the k references annotate each structure ("support"): one that only one of
        # three references shows is often not in the target (a coronary side branch)
        extra = {s: {"support": len(a) / len(references)} for s, a in annotating.items()}
        for s, more in segmenter_features(segs).items():
            extra.setdefault(s, {}).update(more)
        # features from the first reference that annotates the structure
        read_from = {s: a[0].masks[s] for s, a in annotating.items()}
        assess(result, references[0], target.image, self.calibration_for(len(references)), checks,
               reference_masks=read_from, extra=extra)
        result.seconds = time.perf_counter() - start
        return result

    def _begin(self, reference: AnnotatedImage, target: AnnotatedImage, structures: list[str] | None):
        """What every ``predict`` does first -> (structures asked, start time, the target's
        :func:`target_checks`, the withheld result of an unfit target or None). Raises
        RauInputError if a structure is not annotated in the reference or its mask is empty."""
        structures = list(structures) if structures is not None else reference.structures
        reference.require_nonempty(structures)
        start = time.perf_counter()
        checks = target_checks(target.image)
        return structures, start, checks, self._unfit_target(target, checks, reference.id, structures, start)

    def _begin_k(self, references: list[AnnotatedImage], target: AnnotatedImage, structures: list[str] | None):
        """:meth:`_begin` for k references -> (structures asked, the joined reference id, start time,
        checks, withheld result or None). Structures default to every one some reference annotates;
        RauInputError for one that none annotates."""
        if structures is None:
            structures = sorted({s for r in references for s in r.structures if r.annotates(s)})
        missing = [s for s in structures if not any(r.annotates(s) for r in references)]
        if missing:
            raise RauInputError(f"--structures: {', '.join(map(repr, missing))} annotated in none of the references")
        start = time.perf_counter()
        checks = target_checks(target.image)
        ref_id = "+".join(str(r.id) for r in references)
        return list(structures), ref_id, start, checks, self._unfit_target(target, checks, ref_id, structures, start)

    def _unfit_target(self, target: AnnotatedImage, checks: dict[str, float], reference_id: str, structures: list[str],
                      start: float):
        """A blank or noise target (:func:`rau.methods.confidence.target_reason`) is not run at all:
        every structure is answered "no" with the reason, flagged for abstention; else None."""
        why = target_reason(checks)
        if why is None:
            return None
        conf = self.calibration.never_run_confidence() if self.calibration is not None else 0.0
        results = {s: StructureResult(s, "no", None, 0.0, None, why, confidence=conf, flag=why) for s in structures}
        return TargetResult(target.id, reference_id, self.name, results, time.perf_counter() - start)

    def _combine(self, name: str, loc: Localization | None, seg, sigma: float | None) -> StructureResult:
        overruled = False  # the localizer says not visible and the segmenter drew it anyway
        if loc is not None and loc.answer == "no" and loc.box_xyxy_px is None:
            if self.segment_all is True and seg is not None and seg.mask.any():
                overruled = True
            else:  # the localizer's "no" stands: a segmenter that needs no box (memory) does not overrule it
                seg = None
        if seg is not None and sigma is not None and seg.prob is not None and loc is not None and loc.prob is not None:
            mask, score = fuse_probabilities(seg.prob, loc.prob, sigma), seg.score
        elif seg is not None:
            mask, score = seg.mask, seg.score
        elif loc is not None and loc.mask is not None and self.segmenter is None:
            mask, score = loc.mask, loc.score
        else:
            mask, score = None, 0.0
        box = loc.box_xyxy_px if loc is not None and loc.box_xyxy_px is not None else None
        if seg is not None and seg.box_xyxy_px is not None:
            box = seg.box_xyxy_px
        if box is None and mask is not None:
            box = mask_to_box(mask)
        if loc is not None and self.segmenter is not None:  # a "no" answer's score is the VLM's P(yes)
            score = loc.score * score if loc.box_xyxy_px is not None or overruled else 0.0
        found = mask is not None and bool(mask.any())
        answer = loc.answer if loc is not None and loc.answer is not None else ("yes" if found else "no")
        reason = loc.reason if loc is not None else None
        if overruled:
            answer, reason = "yes", None
        if seg is not None and seg.reason is not None and not found:  # the segmenter knows why: not visible
            answer, reason = "no", seg.reason
        if reason is None and not found:
            reason = "the segmenter returned an empty mask" if seg is not None else "no box to segment"
        return StructureResult(name, answer, box, float(score), mask if found else None, reason,
                               copied=found and seg is not None and seg.copied)
