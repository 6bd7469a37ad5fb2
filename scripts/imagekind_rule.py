"""The image-kind model behind the first "reference does not fit" rule (rau.methods.confidence.MIN_KIND), measured:

- ``--heldout``: per image set it never trained on, the share read as its own kind and the lowest
  probability of that kind: Wingspan 120..199, the DRR calibration/test poses, ARCADE val and train
  600..999, slices of the upper-abdomen CT of ``shared/datasets`` (a volume it never saw: "other"),
  smooth noise of an unused seed, the wrong-input splits' angiograms, mirrored radiographs and smooth noise;
- ``--reports``: on the (target, reference) pairs of ``rau calibrate --work`` or ``rau bench --out``
  reports (JSON files with per-output ``features``), per split how many pairs the rule flags (``kind`` <
  MIN_KIND), and how many outputs there are right masks (HISTORY 2026-12-06, session s21).

    .venv/bin/python scripts/imagekind_rule.py --heldout --reports runs/calib_s21_reg-refine --drr-dir runs/drr_full
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from rau.data.dataset import load_dataset
from rau.eval.wrong_inputs import build_wrong_inputs, target_kinds
from rau.methods.confidence import IMAGEKIND_DIR, MIN_KIND
from rau.models.imagekind.modeling import ImageKindModel
from rau.training.recipes.imagekind import ct_slices, smooth_noise


def heldout_sets(data: Path, drr_dir: Path, work: Path) -> dict[str, tuple[str, list[tuple[str, np.ndarray]]]]:
    def ds(root: Path, sl: slice | None = None):
        d = load_dataset(root).slice(sl)
        return [(e.id, d.load(e, []).image) for e in d.entries]

    sets = {"Wingspan 120..199": ("chest radiograph", ds(data / "wingspan_cxr", slice(120, 200)))}
    for sub in sorted(p.name for p in drr_dir.iterdir() if p.is_dir() and p.name != "train"):
        sets[f"DRR {sub} poses"] = ("chest radiograph", ds(drr_dir / sub))
    sets["ARCADE val"] = ("coronary angiogram", ds(data / "arcade_syntax" / "val"))
    sets["ARCADE train 600..999 (calibration targets)"] = ("coronary angiogram",
                                                          ds(data / "arcade_syntax" / "train", slice(600, 1000)))
    sets["upper-abdomen CT slices (never seen)"] = ("other", ct_slices(data / "ct_totalseg_examples" / "abdomen_ct_3mm.nii.gz"))
    sets["smooth noise, unused seed"] = ("other", smooth_noise(50, 12345))
    for role in ("calib", "bench"):
        folder = build_wrong_inputs(work / f"wrong_{role}", data, role)
        kinds, d = target_kinds(folder), load_dataset(folder)
        for kind, name, want in (("modality", "angiograms", "coronary angiogram"), ("mirror", "mirrored radiographs",
                                                                                   "chest radiograph")):
            sets[f"{role} wrong inputs: {name}"] = (want, [(e.id, d.load(e, []).image) for e in d.entries if kinds[e.id] == kind])
        sets[f"{role} wrong inputs: smooth noise"] = ("other", [(e.id, d.load(e, []).image) for e in d.entries
                                                               if e.id.startswith("smooth_noise")])
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=IMAGEKIND_DIR, help="image-kind model folder (default: shipped)")
    ap.add_argument("--data", type=Path, default=Path("../shared/datasets"))
    ap.add_argument("--drr-dir", type=Path, default=Path("runs/drr_full"))
    ap.add_argument("--work", type=Path, default=Path("runs/imagekind_rule"), help="where the wrong-input sets are written")
    ap.add_argument("--heldout", action="store_true")
    ap.add_argument("--reports", type=Path, nargs="*", default=[], help="report files or folders of them")
    a = ap.parse_args()
    model = ImageKindModel.from_pretrained(a.model)
    kinds = model.config.kinds
    if a.heldout:
        print("| images (never trained on) | n | read as their kind | lowest P(their kind) |\n|---|---|---|---|")
        for name, (want, items) in heldout_sets(a.data, a.drr_dir, a.work).items():
            ps = np.array([model.probs(x) for _, x in items])
            c = kinds.index(want)
            print(f"| {name} ({want}) | {len(items)} | {(ps.argmax(1) == c).mean():.3f} | {ps[:, c].min():.3f} |")
    files = [f for p in a.reports for f in (sorted(p.glob("*.json")) if p.is_dir() else [p])]
    if files:
        print(f"\n| report | pairs | flagged (kind < {MIN_KIND}) | lowest kind | right masks | right masks flagged |\n|---|---|---|---|---|---|")
    for f in files:
        doc = json.loads(f.read_text())
        if "targets" not in doc:
            continue
        pairs: dict[str, float] = {}
        right = flagged_right = 0
        for r in doc["targets"]:
            k = (r.get("features") or {}).get("kind")
            if k is None:
                continue
            pairs[r["target"]] = k
            if r.get("right") and r.get("found"):
                right += 1
                flagged_right += k < MIN_KIND
        if pairs:
            v = np.array(list(pairs.values()))
            print(f"| {f.name} | {len(v)} | {(v < MIN_KIND).sum()} | {v.min():.3f} | {right} | {flagged_right} |")


if __name__ == "__main__":
    main()
