"""The laterality model behind the "mirrored" rule (rau.methods.confidence.MIN_LATERALITY), measured:

- ``--heldout``: accuracy (score > 0) on images it never trained on, in their usual orientation, next to
  the linear thumbnail orientation model (``assets/calibration/orientation.json``);
- ``--reports``: on every (target, reference) pair of calibration or bench reports (``rau calibrate
  --work`` / ``rau bench --out``; correct pairs, and the mirrored targets of a wrong-input split), how
  many pairs the rule flags, next to the former registration rule (``mirror_fit_gain`` > 0, read
  from the reports). Images come from the dataset folders (HISTORY 2026-12-06, session s20).

    .venv/bin/python scripts/laterality_rule.py --heldout --reports runs/calib_s19_rr --drr-dir runs/drr_full
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

import numpy as np

from rau.data.dataset import load_dataset
from rau.methods.confidence import MIN_LATERALITY, LATERALITY_DIR, default_orientation
from rau.models.laterality.modeling import LateralityModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=LATERALITY_DIR, help="laterality model folder (default: shipped)")
    ap.add_argument("--data", type=Path, default=Path("../shared/datasets"))
    ap.add_argument("--drr-dir", type=Path, default=Path("runs/drr"))
    ap.add_argument("--heldout", action="store_true", help="held-out accuracy table")
    ap.add_argument("--reports", type=Path, default=None, help="folder of <split>_<method>.json reports")
    ap.add_argument("--wrong-inputs", type=Path, nargs="*", default=[Path("runs/wrong_inputs_calib"), Path("runs/wrong_inputs_bench")],
                    help="folders of wrong-input targets the reports name")
    a = ap.parse_args()
    model = LateralityModel.from_pretrained(a.model)
    if a.heldout:
        linear = default_orientation()
        print("| images (never trained on) | linear orientation | laterality |\n|---|---|---|")
        for name, root, sl in (("Wingspan 120..199", a.data / "wingspan_cxr", slice(120, 200)),
                               ("DRR test poses", a.drr_dir / "test", None), ("DRR calibration poses", a.drr_dir / "calib", None),
                               ("ARCADE val", a.data / "arcade_syntax" / "val", None)):
            ds = load_dataset(root).slice(sl)
            images = [ds.load(e, []).image for e in ds.entries]
            lin = np.mean([linear.score(i) > 0 for i in images]) if linear is not None else float("nan")
            print(f"| {name} ({len(images)}) | {lin:.3f} | {np.mean([model.score(i) > 0 for i in images]):.3f} |")
    if a.reports is None:
        return
    where = {}
    for root in [a.data / "wingspan_cxr", a.data / "arcade_syntax" / "val", a.data / "arcade_syntax" / "train",
                 a.drr_dir / "calib", a.drr_dir / "train", a.drr_dir / "test", *a.wrong_inputs]:
        if root.is_dir():
            ds = load_dataset(root)
            for e in ds.entries:
                where.setdefault(e.id, (ds, e))
    scores: dict[str, float] = {}

    def score(image_id: str) -> float:
        if image_id not in scores:
            ds, e = where[image_id]
            scores[image_id] = model.score(ds.load(e, []).image)
        return scores[image_id]

    print(f"| report | pairs | laterality < {MIN_LATERALITY} | former rule (gain > 0) |\n|---|---|---|---|")
    for path in sorted(a.reports.glob("*.json")):
        doc = json.loads(path.read_text())
        if "targets" not in doc:
            continue
        pairs = {}
        for t in doc["targets"]:
            f = t.get("features")
            f = ast.literal_eval(f.replace("nan", "None")) if isinstance(f, str) else f
            if f and ("wrong" not in path.name or t["target"].startswith("mirror")):
                pairs[(t["target"], t["reference"])] = f.get("mirror_fit_gain") or 0.0
        lat = [np.tanh(score(t)) * np.tanh(score(r)) for t, r in pairs]
        print(f"| {path.stem} | {len(pairs)} | {sum(v < MIN_LATERALITY for v in lat)} | "
              f"{sum(g > 0 for g in pairs.values())} |")


if __name__ == "__main__":
    main()
