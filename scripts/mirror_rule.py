"""The physical "mirrored" rule (rau.methods.confidence.MAX_MIRROR_FIT_GAIN) on the pairs of bench
or calibration reports: per split, how many correct pairs it flags (and how many right outputs
those carry) and how many mirrored targets of a wrong-input split it catches, next to the
calibrated orientation rule. Pairs and "right" come from the reports (``rau bench`` / ``rau
calibrate --work``), images from the split folders (HISTORY 2026-12-03, "The mirrored rule").

    .venv/bin/python scripts/mirror_rule.py --reports runs/calib_mirror --method reg-refine \
        --splits calib-wingspan,calib-drr,calib-arcade,calib-wrong
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from rau.data.dataset import load_dataset
from rau.eval.bench import resolve_splits
from rau.methods.confidence import MAX_MIRROR_FIT_GAIN, default_calibration
from rau.methods.registration import mirror_fit_gain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reports", type=Path, required=True, help="folder with <split>_<method>.json")
    ap.add_argument("--method", default="reg-refine")
    ap.add_argument("--splits", default="wingspan,drr,arcade,wrong")
    ap.add_argument("--data", type=Path, default=Path("../shared/datasets"))
    ap.add_argument("--drr-dir", type=Path, default=Path("runs/drr_full"))
    args = ap.parse_args()

    cal = default_calibration(args.method)
    images: dict[str, dict] = {}

    def image(root: Path, item_id: str) -> np.ndarray:
        if str(root) not in images:
            ds = load_dataset(root)
            images[str(root)] = {"ds": ds, "by_id": {e.id: e for e in ds.entries}}
        d = images[str(root)]
        return d["ds"].load(d["by_id"][item_id], []).image

    print("| split | pairs | correct pairs flagged (their right outputs) | mirrored targets caught: rule / "
          "orientation rule / either | s per pair |")
    print("|---|---|---|---|---|")
    for split in resolve_splits(args.splits.split(","), args.data, args.drr_dir, quick=False, limit=None):
        doc = json.loads((args.reports / f"{split.name}_{args.method}.json").read_text())
        right: dict[str, int] = {}
        orient: dict[str, float] = {}
        for r in doc["targets"]:
            right[r["target"]] = right.get(r["target"], 0) + int(bool(r.get("right")))
            if r.get("features"):
                orient[r["target"]] = r["features"]["orientation"]
        pairs = sorted({(r["target"], r["reference"]) for r in doc["targets"]})
        flagged, lost, caught, by_orient, either, n_mirror = 0, 0, 0, 0, 0, 0
        start = time.perf_counter()
        for target_id, ref_id in pairs:
            gain = mirror_fit_gain(image(split.targets, target_id), image(split.references, ref_id))
            hit = gain > MAX_MIRROR_FIT_GAIN
            if target_id.startswith("mirror_"):
                o = cal is not None and cal.min_orientation is not None and orient.get(target_id, 0.0) < cal.min_orientation
                n_mirror += 1
                caught, by_orient, either = caught + hit, by_orient + o, either + (hit or o)
            elif split.truth:
                flagged, lost = flagged + hit, lost + (right[target_id] if hit else 0)
        sec = (time.perf_counter() - start) / max(len(pairs), 1)
        correct = f"{flagged} ({lost})" if split.truth else "-"
        mirrored = f"{caught} / {by_orient} / {either} of {n_mirror}" if n_mirror else "-"
        print(f"| {split.name} | {len(pairs)} | {correct} | {mirrored} | {sec:.2f} |", flush=True)


if __name__ == "__main__":
    main()
