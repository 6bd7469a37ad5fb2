"""A second opinion for the confidence: another segmenter reads the same reference by another route,
and how well its mask agrees with the delivered one becomes the confidence feature ``second_opinion``.

On coronary angiograms a mask on the wrong branch of the tree has the area, contrast and edges of a
right one, so the features measured on the output alone judge it poorly (`reg-refine`'s ARCADE
confidence AUROC 0.82 against >= 0.95 on the chest splits). The memory segmenter (``sam2-memory``'s
model) reads the reference through image features and memory attention instead of registration; where
the two routes draw the same segment, it is more often right. On the 120 calib-arcade-val pairs the
out-of-fold AUROC of `reg-refine`'s confidence rose 0.839 -> 0.902 with the feature (docs/HISTORY.md,
2026-12-07 s24). Its mask is never delivered.

The memory pass costs about 2 s per angiogram on 2 CPU cores, so it runs only on targets the
image-kind model reads as one of :data:`SECOND_OPINION_KINDS`; elsewhere the feature is missing and the
calibration reads its mean, no evidence either way (:data:`rau.methods.confidence.TARGET_FEATURES`).
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
    checkout) turns the second opinion off."""

    def __init__(self, make_segmenter: Callable[[], object | None], kinds: tuple[str, ...] = SECOND_OPINION_KINDS):
        self._make, self.kinds = make_segmenter, tuple(kinds)
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

    def features(self, reference, target: np.ndarray, results: dict) -> dict[str, dict[str, float]]:
        """structure -> {"second_opinion": agreement} for every structure of ``results`` (name ->
        StructureResult) the reference annotates; {} where the target gets none."""
        names = [s for s in results if reference.annotates(s)]
        if not names or not self.applies(target) or self.segmenter is None:
            return {}
        other = self.segmenter.segment(target, {s: None for s in names}, reference)
        return {s: {"second_opinion": agreement(results[s].mask, other[s].mask if other.get(s) is not None else None)}
                for s in names}
