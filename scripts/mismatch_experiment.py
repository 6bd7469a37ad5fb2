"""Does the reference bank know when no reference fits? (issue 4, item 5, first part)

For every Wingspan held-out target (160..199) and the LiteMedSAM bank over 0..159, three
references are scored with :meth:`rau.references.bank.ReferenceBank.fit` (centred cosine in the bank's space):

- matched: the retrieved top-1 reference (what `--bank` would use);
- mirrored: that same reference flipped left-right (a left/right-swapped reference: its "left_lung"
  mask would land on the target's right lung);
- other anatomy: an ARCADE coronary angiogram (val image i for target i).

The threshold is calibrated on the bank alone (:meth:`fit_threshold`, 5% quantile of each
reference's best match among the others), never on the targets. Prints AUROC (matched vs each
mismatch) and abstention rates, and writes JSON.

    .venv/bin/python scripts/mismatch_experiment.py --bank runs/bank/wingspan_litemedsam.npz --out runs/bank/mismatch.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from rau.atomic import write_json
from rau.references.bank import ReferenceBank
from rau.data.dataset import load_dataset
from rau.metrics import auroc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bank", required=True)
    p.add_argument("--targets", default="../shared/datasets/wingspan_cxr")
    p.add_argument("--target-range", default="160:200")
    p.add_argument("--other", default="../shared/datasets/arcade_syntax/val")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    bank = ReferenceBank.load(args.bank)
    refs = bank.dataset()
    by_id = {e.id: e for e in refs.entries}
    a, b = (int(v) for v in args.target_range.split(":"))
    targets = load_dataset(args.targets).slice(slice(a, b))
    other = load_dataset(args.other)
    threshold = bank.fit_threshold()
    rows = []
    for i, entry in enumerate(targets.entries):
        target = targets.load(entry)
        ref_id, matched = bank.search(target.image, 1, exclude_source=str(entry.image_path.resolve()))[0]
        ref = refs.load(by_id[ref_id])
        rows.append({"target": target.id, "reference": ref_id, "matched": matched,
                     "mirrored": bank.fit(np.ascontiguousarray(ref.image[:, ::-1]), target.image),
                     "other_anatomy": bank.fit(other[i % len(other)].image, target.image)})
    res = {"bank": args.bank, "threshold": threshold, "n": len(rows), "rows": rows}
    m = np.array([r["matched"] for r in rows])
    for kind in ("mirrored", "other_anatomy"):
        x = np.array([r[kind] for r in rows])
        res[kind] = {"auroc_matched_vs_this": auroc(np.r_[m, x], np.r_[np.ones(len(m), bool), np.zeros(len(x), bool)]),
                     "abstained": float(np.mean(x < threshold)), "mean_fit": float(x.mean())}
    res["matched"] = {"false_abstention": float(np.mean(m < threshold)), "mean_fit": float(m.mean())}
    write_json(args.out, res, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
