"""A second opinion for the confidence: another segmenter reads the same reference by another route,
and how well its mask agrees with the delivered one becomes the confidence feature ``second_opinion``.

On coronary angiograms a mask on the wrong branch of the tree has the area, contrast and edges of a
right one, so the features measured on the output alone judge it poorly (`reg-refine`'s ARCADE
confidence AUROC 0.82 against >= 0.95 on the chest splits). The memory segmenter (``sam2-memory``'s
model) reads the reference through image features and memory attention instead of registration; where
the two routes draw the same segment, it is more often right. On the 120 calib-arcade-val pairs the
out-of-fold AUROC of `reg-refine`'s confidence rose 0.839 -> 0.902 with the feature (docs/HISTORY.md,
2026-12-07 s24). By default its mask is never delivered.

The memory pass costs about 1.2 s per angiogram on 2 CPU cores (decoded in bfloat16 where the CPU has native bf16
units; HISTORY s26), so it runs only on targets the
image-kind model reads as one of :data:`SECOND_OPINION_KINDS`; elsewhere the feature is missing and the
calibration reads its mean, no evidence either way (:data:`rau.methods.confidence.TARGET_FEATURES`).

With ``delivers`` the two swap roles on those targets: the second segmenter's mask is delivered for every
structure it knows (one it never trained on, which it would only copy, keeps the first mask) and the first
mask becomes the opinion; the agreement is the same number either way round. ``reg-refine`` does so on
angiograms with ``--angiogram-masks memory``: there the memory segmenter's masks are the better ones (mean segment
Dice 0.231 against the refiner's 0.141 on the 50 ARCADE bench pairs), but their calibrated confidence separates
right from wrong less well (AUROC 0.83 against 0.87; docs/RESULTS.md, 2026-12-07 s25), so it is not the default.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

#: The target kinds (:mod:`rau.models.imagekind`) that get a second opinion: where the confidence needs
#: it and the chest splits, whose AUROC is >= 0.95 without it, do not pay for it.
SECOND_OPINION_KINDS = ("coronary angiogram",)


def agreement(delivered: np.ndarray | None, other: np.ndarray | None) -> float:
    """Dice of the delivered mask with the second segmenter's; 0 where either has none."""
    from rau.metrics import dice

    if delivered is None or other is None or not delivered.any() or not other.any():
        return 0.0
    return float(dice(delivered, other))


class SecondOpinion:
    """A second segmenter (built on first use by ``make_segmenter``; a
    :class:`~rau.methods.interfaces.Segmenter` that reads the reference and needs no box) asked about
    the targets whose kind is in ``kinds``. ``make_segmenter`` returning None (its model is not in this
    checkout) turns the second opinion off. ``delivers``: on those targets its masks are delivered
    instead (:meth:`review`)."""

    def __init__(self, make_segmenter: Callable[[], object | None], kinds: tuple[str, ...] = SECOND_OPINION_KINDS,
                 *, delivers: bool = False):
        self._make, self.kinds, self.delivers = make_segmenter, tuple(kinds), bool(delivers)
        self._segmenter, self._made = None, False

    @property
    def segmenter(self):
        if not self._made:
            self._segmenter, self._made = self._make(), True
        return self._segmenter

    def applies(self, target: np.ndarray) -> bool:
        """Whether ``target`` gets a second opinion: the shipped image-kind model reads it as one of
        :attr:`kinds` (never without that model; its reading is the one the "does not fit" rule reuses)."""
        from rau.methods.confidence import default_imagekind, image_kind_probs

        p = image_kind_probs(target)
        return p is not None and default_imagekind().config.kinds[int(np.argmax(p))] in self.kinds

    def review(self, reference, target: np.ndarray, results: dict) -> tuple[dict, dict[str, dict[str, float]]]:
        """-> (structure -> the second segmenter's :class:`~rau.methods.interfaces.SegmentationOutput`
        to deliver instead, structure -> {"second_opinion": agreement}) for the structures of ``results``
        (name -> StructureResult) the reference annotates; ({}, {}) where the target gets none. The
        first is empty unless :attr:`delivers`; it holds the structures the second segmenter drew and
        did not copy, and the agreement is measured between the two masks either way."""
        names = [s for s in results if reference.annotates(s)]
        if not names or not self.applies(target) or self.segmenter is None:
            return {}, {}
        other = self.segmenter.segment(target, {s: None for s in names}, reference)
        instead, feats = {}, {}
        for s in names:
            o = other.get(s)
            drawn = o is not None and o.mask is not None and bool(o.mask.any())
            feats[s] = {"second_opinion": agreement(results[s].mask, o.mask if drawn else None)}
            if self.delivers and drawn and not o.copied:
                instead[s] = o
        return instead, feats
