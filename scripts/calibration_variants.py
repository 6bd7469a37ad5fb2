"""Calibration variants, fitted on calibration reports and scored on bench reports of the same
method, without rerunning the method: each bench row's confidence and withholding are recomputed
from its stored features, structure name and rule flag (rau.methods.confidence.abstention_reason),
then summarised as the bench does (rau.eval.evaluate.calibration_summary). A development check:
figures in docs/RESULTS.md come from ``rau bench`` with the shipped calibration.

    .venv/bin/python scripts/calibration_variants.py --calib runs/calib_s4 --bench runs/bench_s4 \
        --method reg-refine --splits wingspan,arcade,drr,drr-unseen,wrong
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from rau.eval.calibrate import calibration_rows, fit_calibration
from rau.eval.evaluate import calibration_summary
from rau.methods.confidence import abstention_reason

VARIANTS = {"measured features, 5% quantile": {"use_prior": False, "threshold_bound": False, "rule_rates": False},
            "measured features, bound": {"use_prior": False, "rule_rates": False},
            "structure_prior, 5% quantile": {"use_prior": True, "threshold_bound": False, "rule_rates": False},
            "structure_prior, bound, orientation rule": {"use_prior": True, "orientation_rule": True, "rule_rates": False},
            "structure_prior, bound": {"use_prior": True, "rule_rates": False},
            "structure_prior, bound, rates per rule and structure": {"use_prior": True},
            "structure_prior, bound, no orientation feature": {"use_prior": True, "drop": ("orientation",), "rule_rates": False}}
#: The last variant: the prior's shares of the held-out families dropped, as for a user's own
#: structure the calibration never saw (they get the pooled share).
UNSEEN = ("clavicle", "scapula")


class _Row:
    """The fields abstention_reason reads, from a report row."""

    def __init__(self, row: dict, confidence: float):
        self.flag, self.confidence, self.found, self.features = row.get("flag"), confidence, row.get("found"), row["features"]


def rescore(rows: list[dict], cal) -> list[dict]:
    out = []
    for r in rows:
        if "right" not in r or "confidence" not in r:
            out.append(r)
            continue
        if not r.get("features"):  # a blank or noise target, never run: its flag stays
            conf = cal.never_run_confidence()
        else:  # the pair rules again, with this calibration's thresholds (as rau.methods.confidence.assess)
            f = r["features"]
            rule = cal.pair_rule(f)
            r = {**r, "flag": rule[1] if rule else None}
            conf = cal.rule_confidence(rule[0], r["structure"], r.get("found", True)) if rule else float(cal.predict(f, [r["structure"]])[0])
        out.append({**r, "confidence": conf, "abstain": abstention_reason(_Row(r, conf), cal.threshold) is not None})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=Path, required=True, help="rau calibrate --work folder")
    ap.add_argument("--bench", type=Path, required=True, help="rau bench --out folder")
    ap.add_argument("--method", default="reg-refine")
    ap.add_argument("--splits", default="wingspan,arcade,drr,drr-unseen,wrong")
    args = ap.parse_args()
    reports = [json.loads(p.read_text()) for p in sorted(args.calib.glob(f"calib-*_{args.method}.json"))]
    rows = calibration_rows(reports)
    print(f"calibration: {len(rows)} outputs from {[d['config'].get('split') for d in reports]}")
    print("| variant | split | outputs | AUROC | ECE | withheld: right masks | withheld: wrong | threshold |")
    print("|---|---|---|---|---|---|---|---|")
    cals = {name: fit_calibration(rows, args.method, **kw) for name, kw in VARIANTS.items()}
    unseen = dataclasses.replace(cals["structure_prior, bound, rates per rule and structure"])
    unseen.structure_rates = {k: v for k, v in unseen.structure_rates.items() if not any(u in k for u in UNSEEN)}
    cals["structure_prior, clavicles and scapulae unknown"] = unseen
    for name, cal in cals.items():
        for split in args.splits.split(","):
            path = args.bench / f"{split}_{args.method}.json"
            if not path.is_file():
                continue
            s = calibration_summary(rescore(json.loads(path.read_text())["targets"], cal), cal)
            print(f"| {name} | {split} | {s['n']} | {s['auroc']:.3f} | {s['ece']:.3f} | {s['abstain_right']:.3f} | "
                  f"{s['abstain_wrong']:.3f} | {cal.threshold:.3f} |")


if __name__ == "__main__":
    main()
