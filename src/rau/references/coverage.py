"""Choosing a reference by what the target shows (``--reference-choice coverage``).

The most similar reference (thumbnail NCC, :mod:`rau.references.thumbnails`, or a bank's embedding) often
annotates another set of structures than the target shows: on coronary angiograms the NCC-nearest ARCADE
training image lacks 28% of the target's segments (they can only be missed) and shows about one segment the
target lacks. The shipped visibility model (:mod:`rau.models.visibility`) reads from the target alone the
probability that it shows each segment it learnt. Among the :data:`CANDIDATES` most similar references this rule
takes the one expected to cover most of what the target shows: the largest sum, over the segments it
annotates, of P(the target shows it); a name the model never learnt counts :data:`UNKNOWN` (no evidence either
way), so where it knows none of the names (chest radiographs) every candidate ties and the most similar is
kept, as with ``similar``.

Measured on the 120 calib-arcade-val targets (never bench targets; docs/HISTORY.md, 2026-12-07 s27), the memory
segmenter's mean segment Dice, a segment the reference lacks scoring 0: 0.241 with the most similar reference,
0.297 with this rule over 10 candidates (the target's segments covered 0.72 -> 0.87), against 0.277 for the
candidate with the most segments, which the visibility model does not guide.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

#: How many of the most similar references the rule chooses among.
CANDIDATES = 10
#: What a structure name the visibility model never learnt adds to a reference's expected coverage.
UNKNOWN = 0.5


def pool_size(reference_choice: str, k: int) -> int:
    """How many of the most similar references to retrieve for ``k`` chosen ones: :data:`CANDIDATES` (or ``k``
    if more) for ``coverage``, which chooses among them (:func:`choose_by_coverage`); ``k`` otherwise."""
    return max(k, CANDIDATES) if reference_choice == "coverage" else k


def expected_coverage(structures: Sequence[str], shows: dict[str, float]) -> float:
    """The expected number of the target's structures a reference annotating ``structures`` covers:
    the sum of P(the target shows it) (``shows``; :data:`UNKNOWN` for a name it lacks)."""
    return float(sum(shows.get(s, UNKNOWN) for s in set(structures)))


def coverage_order(candidates: Sequence[str], structures_of: Callable[[str], Sequence[str]],
                   shows: dict[str, float]) -> list[str]:
    """``candidates`` (reference ids, most similar first) reordered by :func:`expected_coverage`,
    highest first; equal coverage keeps the similarity order (a stable sort)."""
    cover = np.array([expected_coverage(structures_of(c), shows) for c in candidates])
    return [candidates[i] for i in np.argsort(-cover, kind="stable")]


def choose_by_coverage(target: np.ndarray, ranked: Sequence[str], structures_of: Callable[[str], Sequence[str]],
                       k: int = 1, candidates: int = CANDIDATES) -> list[str]:
    """The ``k`` references of ``ranked`` (ids, most similar first) that the rule puts first among the
    ``candidates`` most similar (all of them when there are fewer); the shipped visibility model
    reads the ``target`` image (no model, or no name it learnt: the similarity order)."""
    from rau.methods.confidence import target_visibility

    pool = list(ranked[:max(candidates, k)])
    names = sorted({s for c in pool for s in structures_of(c)})
    return coverage_order(pool, structures_of, target_visibility(target, names))[:k]
