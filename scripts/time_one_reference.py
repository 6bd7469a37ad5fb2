"""Seconds per target when ONE annotated reference serves many targets (the usual use: annotate
once, run on a folder). The first target pays the reference's encoding; the mean is over the rest.
The methods run interleaved (each target through every method in turn), so a change of the
machine's load hits them alike.

    .venv/bin/python scripts/time_one_reference.py --methods rau,registration,reg-fuse --n 10

A method name may carry options after "@", comma-free: ``reg-refine@angiogram_masks=memory``.
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
    p.add_argument("--seg-head", default=None, help="rau-seg: a `rau train seg-head` folder (default: the shipped head)")
    p.add_argument("--precision", default=None, help="auto, fp32 or bf16 (default: $RAU_ENCODER_PRECISION, else auto)")
    a = p.parse_args()
    ds = rau.load_dataset(a.data)
    ref = ds[a.reference_index]
    lo, hi = (int(v) for v in a.targets.split(":"))
    targets = [ds[i] for i in range(lo, min(hi, lo + a.n))]
    methods = {}
    for label in a.methods.split(","):
        name, *extra = label.split("@")
        opts = {"precision": a.precision, **({"seg_head": a.seg_head} if name == "rau-seg" and a.seg_head else {}),
                **dict(e.split("=", 1) for e in extra)}
        methods[label] = rau.create_method(name, **opts)
    # interleaved: every target runs every method in turn, so the machine's load drifts alike for all
    times = {name: [] for name in methods}
    for t in targets:
        blank = rau.AnnotatedImage(t.image, {}, {"id": t.id})
        for name, method in methods.items():
            start = time.perf_counter()
            method.predict(ref, blank)
            times[name].append(time.perf_counter() - start)
    out = {}
    for name, ts in times.items():
        out[name] = {"first": ts[0], "mean_rest": float(np.mean(ts[1:])), "median_rest": float(np.median(ts[1:])), "n": len(ts)}
        print(f"{name}: first target {ts[0]:.2f} s, then {np.mean(ts[1:]):.2f} s/target "
              f"(median {np.median(ts[1:]):.2f}, {len(ts) - 1} targets)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
