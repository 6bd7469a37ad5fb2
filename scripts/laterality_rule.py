"""The laterality model behind the "mirrored" rule (rau.methods.confidence.MIN_LATERALITY), measured:

- ``--heldout``: accuracy (score > 0) on images it never trained on, in their usual orientation, next to
  the linear thumbnail orientation model (``assets/calibration/orientation.json``); then the images the
  score's temperature is fitted on (:func:`rau.training.recipes.laterality.laterality_heldout_sources`):
  how many read the wrong way round, the lowest score, and the temperature they give (session s22);
- ``--reports``: on every (target, reference) pair of calibration or bench reports (``rau calibrate
  --work`` / ``rau bench --out``; correct pairs, and the mirrored targets of a wrong-input split), how
  many pairs the rule flags, next to the former registration rule (``mirror_fit_gain`` > 0, read
  from the reports). The agreement reads the scores with the model's temperature (0.5 before s22:
  ``tanh(score)``). Images come from the folders each report's config names (HISTORY 2026-12-06, s20, s22).

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
from rau.models.laterality.modeling import LateralityModel, agreement_from_scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=LATERALITY_DIR, help="laterality model folder (default: shipped)")
    ap.add_argument("--data", type=Path, default=Path("../shared/datasets"))
    ap.add_argument("--drr-dir", type=Path, default=Path("runs/drr"))
    ap.add_argument("--heldout", action="store_true", help="held-out accuracy table")
    ap.add_argument("--reports", type=Path, default=None, help="folder of <split>_<method>.json reports")
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
        from rau.training.recipes.laterality import fit_temperature, laterality_heldout_sources

        print("\n| temperature images | n | read the wrong way round | lowest score |\n|---|---|---|---|")
        fit = []
        for root, sl, _ in laterality_heldout_sources(a.data):
            full = load_dataset(root)
            ds = full.slice(sl)
            s = np.array([model.score(ds.load(e, []).image) for e in ds.entries])
            fit += list(s)
            print(f"| {root.name} {sl.start}..{sl.stop or len(full)} | {len(s)} | {(s < 0).sum()} | "
                  f"{s.min():.2f} ({ds.entries[int(s.argmin())].id}) |")
        print(f"\nfitted temperature {fit_temperature(np.array(fit)):.4f}; the model's {model.config.temperature:.4f}")
    if a.reports is None:
        return
    # images by (folder, id): ARCADE val and train share ids ("1".."200"), so an id alone is ambiguous (until
    # s22 this script looked ids up across folders, and read 2 random ARCADE calibration pairs' references from val)
    datasets: dict[str, tuple] = {}
    scores: dict[tuple[str, str], float] = {}

    def score(folder: str, image_id: str) -> float:
        if folder not in datasets:
            ds = load_dataset(folder)
            datasets[folder] = (ds, {e.id: e for e in ds.entries})
        if (folder, image_id) not in scores:
            ds, entries = datasets[folder]
            scores[folder, image_id] = model.score(ds.load(entries[image_id], []).image)
        return scores[folder, image_id]

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
        tf, rf = doc["config"]["targets"], doc["config"]["references"]
        lat = [agreement_from_scores(score(rf, r), score(tf, t), model.config.temperature) for t, r in pairs]
        print(f"| {path.stem} | {len(pairs)} | {sum(v < MIN_LATERALITY for v in lat)} | "
              f"{sum(g > 0 for g in pairs.values())} |")


if __name__ == "__main__":
    main()
