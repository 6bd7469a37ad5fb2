"""The one learning-rate schedule of every training: linear warm-up, then cosine decay to a floor."""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "constant")


def lr_at(step: int, steps: int, lr: float, *, warmup: int = 0, min_ratio: float = 0.1,
          schedule: str = "cosine") -> float:
    """Learning rate of 0-based step ``step`` of ``steps``.

    Warm-up: ``lr * (step + 1) / warmup`` for ``step < warmup``; then ``cosine`` decays from ``lr``
    to ``min_ratio * lr`` at ``steps`` (``constant`` stays at ``lr``). Stateless, so a resumed run
    needs no scheduler state.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac))))
