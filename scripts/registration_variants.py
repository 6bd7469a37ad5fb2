"""reg-refine's Dice and registration seconds under variants of the registration settings, on the
bench's pairs (first N targets of each split). Used to choose reg-refine's B-spline iterations
(HISTORY 2026-12-03, "Registration at 20 B-spline iterations").

    .venv/bin/python scripts/registration_variants.py --variants base,it20,it30 --splits arcade,drr-unseen --limit 30
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from rau.data.dataset import load_dataset
from rau.eval.bench import resolve_splits
from rau.eval.evaluate import evaluate
from rau.methods import create_method, registration

#: keyword overrides of rau.methods.registration.register (bspline_iterations is forced here, so
#: "base" means registration's own 40, not reg-refine's default)
VARIANTS = {
    "base": {"bspline_iterations": 40},
    "it20": {"bspline_iterations": 20},
    "it30": {"bspline_iterations": 30},
    "s10": {"bspline_iterations": 40, "sampling": 0.10},
    "lvl1": {"bspline_iterations": 40, "bspline_shrink": (1,)},
    "lvl2": {"bspline_iterations": 40, "bspline_shrink": (2,)},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="base,it20")
    ap.add_argument("--splits", default="wingspan,drr,arcade")
    ap.add_argument("--limit", type=int, default=12)
    ap.add_argument("--method", default="reg-refine")
    ap.add_argument("--data", type=Path, default=Path("../shared/datasets"))
    ap.add_argument("--drr-dir", type=Path, default=Path("runs/drr_full"))
    args = ap.parse_args()
    original = registration.register
    for split in resolve_splits(args.splits.split(","), args.data, args.drr_dir, quick=False, limit=args.limit):
        targets = load_dataset(split.targets).slice(split.target_range)
        references = load_dataset(split.references).slice(split.reference_range)
        for name in args.variants.split(","):
            seconds: list[float] = []

            def timed(*a, _kw=VARIANTS[name], _seconds=seconds, **kw):
                t = time.perf_counter()
                out = original(*a, **{**kw, **_kw})
                _seconds.append(time.perf_counter() - t)
                return out

            registration.register = timed
            try:
                doc = evaluate(targets, references, create_method(args.method), limit=split.limit, seed=0,
                               progress=False, structures=list(split.structures) if split.structures else None)
            finally:
                registration.register = original
            print(f"{split.name} {name}: Dice {doc['mean']['dice']:.4f}, registration {np.mean(seconds):.3f} s", flush=True)


if __name__ == "__main__":
    main()
