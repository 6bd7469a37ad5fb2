"""Segmentation and box metrics on (H, W) bool masks. Pure functions.

Empty-mask rules (explicit, so an absent structure predicted absent is not penalised):
- dice / iou: both empty -> 1.0; exactly one empty -> 0.0.
- hd95: both empty -> 0.0; exactly one empty -> the image diagonal (the worst possible distance),
  so that a missed structure still counts in the mean instead of vanishing as NaN.
Distances are in pixels unless ``spacing`` (row, col) in mm is given.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def dice(pred: np.ndarray, true: np.ndarray) -> float:
    pred, true = np.asarray(pred, bool), np.asarray(true, bool)
    total = int(pred.sum()) + int(true.sum())
    if total == 0:
        return 1.0
    return float(2 * np.logical_and(pred, true).sum() / total)


def iou(pred: np.ndarray, true: np.ndarray) -> float:
    pred, true = np.asarray(pred, bool), np.asarray(true, bool)
    union = int(np.logical_or(pred, true).sum())
    if union == 0:
        return 1.0
    return float(np.logical_and(pred, true).sum() / union)


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(pred: np.ndarray, true: np.ndarray, spacing: tuple[float, float] = (1.0, 1.0)) -> float:
    """95th percentile of the symmetric surface distances."""
    pred, true = np.asarray(pred, bool), np.asarray(true, bool)
    if not pred.any() and not true.any():
        return 0.0
    if not pred.any() or not true.any():
        h, w = pred.shape
        return float(np.hypot(h * spacing[0], w * spacing[1]))
    sp, st = _surface(pred), _surface(true)
    dt_true = ndimage.distance_transform_edt(~st, sampling=spacing)
    dt_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    distances = np.concatenate([dt_true[sp], dt_pred[st]])
    return float(np.percentile(distances, 95))


def mean_or_nan(values: list[float]) -> float:
    vals = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def auroc(scores, positive) -> float:
    """Area under the ROC curve of ``scores`` for separating ``positive`` (bool) from the rest:
    the probability that a random positive scores above a random negative (ties count half;
    Mann-Whitney U from average ranks). NaN when either class is empty."""
    from scipy.stats import rankdata

    s = np.asarray(scores, np.float64)
    y = np.asarray(positive, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
