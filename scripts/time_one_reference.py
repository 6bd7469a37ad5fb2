"""Seconds per target when ONE annotated reference serves many targets (the usual use: annotate
once, run on a folder). The first target pays the reference's encoding; the mean is over the rest.

    .venv/bin/python scripts/time_one_reference.py --methods rau,registration,reg-fuse --n 10
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import rau


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="../shared/datasets/wingspan_cxr")
    p.add_argument("--reference-index", type=int, default=0)
    p.add_argument("--targets", default="160:200")
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--methods", default="rau,registration,reg-fuse")
    a = p.parse_args()
    ds = rau.load_dataset(a.data)
    ref = ds[a.reference_index]
    lo, hi = (int(v) for v in a.targets.split(":"))
    targets = [ds[i] for i in range(lo, min(hi, lo + a.n))]
    out = {}
    for name in a.methods.split(","):
        method = rau.create_method(name)
        times = []
        for t in targets:
            blank = rau.AnnotatedImage(t.image, {}, {"id": t.id})
            start = time.perf_counter()
            method.predict(ref, blank)
            times.append(time.perf_counter() - start)
        out[name] = {"first": times[0], "mean_rest": float(np.mean(times[1:])), "n": len(times)}
        print(f"{name}: first target {times[0]:.2f} s, then {np.mean(times[1:]):.2f} s/target ({len(times) - 1} targets)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
