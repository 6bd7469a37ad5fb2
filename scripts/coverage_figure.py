"""The reference chosen by what the target shows (``--reference-choice coverage``), on ARCADE bench targets: the
target whose mean segment Dice gained most and the one that lost most, `sam2-memory` with the most similar reference
(NCC) and with the coverage rule's. Reads the two `rau eval` reports (their pairs and Dice), redraws both outputs.
Writes docs/images/results/reference_coverage_arcade.png; run
`.venv/bin/python scripts/coverage_figure.py runs/s27/arcade_sam2_similar.json runs/s27/arcade_sam2_coverage.json`."""
import sys

import matplotlib

matplotlib.use("Agg")
import json

import matplotlib.pyplot as plt
import numpy as np

from rau.data.dataset import load_dataset
from rau.methods.registry import create_method
from rau.render import draw_annotation

similar, coverage = (json.load(open(p)) for p in sys.argv[1:3])
val = load_dataset("../shared/datasets/arcade_syntax/val")
train = load_dataset("../shared/datasets/arcade_syntax/train")
val_by, train_by = {e.id: e for e in val.entries}, {e.id: e for e in train.entries}


def per_target(report):
    out = {}
    for r in report["targets"]:
        if r["in_truth"]:
            out.setdefault(str(r["target"]), []).append(r["dice"])
    return {t: float(np.mean(v)) for t, v in out.items()}


a, b = per_target(similar), per_target(coverage)
ref_a = {str(p["target"]): str(p["reference"]) for p in similar["config"]["pairs"]}
ref_b = {str(p["target"]): str(p["reference"]) for p in coverage["config"]["pairs"]}
changed = [t for t in a if ref_a[t] != ref_b[t]]
gain = sorted(changed, key=lambda t: b[t] - a[t])
picks = [("most gained", gain[-1]), ("most lost", gain[0])]
print(f"{len(changed)} of {len(a)} targets get another reference; mean Dice per target {np.mean(list(a.values())):.3f} -> "
      f"{np.mean(list(b.values())):.3f}")
method = create_method("sam2-memory")
fig, axes = plt.subplots(len(picks), 5, figsize=(20, 4.3 * len(picks)))
for row, (what, t) in zip(axes, picks):
    target = val.load(val_by[t])
    blank = type(target)(target.image, {}, dict(target.meta))
    refs = [train.load(train_by[ref_a[t]]), train.load(train_by[ref_b[t]])]
    outs = [method.predict(r, blank) for r in refs]
    names = sorted(set(target.masks) | set(refs[0].masks) | set(refs[1].masks))
    panels = [(refs[0].image, refs[0].masks, f"most similar reference {ref_a[t]}"),
              (target.image, {s: o.mask for s, o in outs[0].structures.items() if o.mask is not None},
               f"with it: mean Dice {a[t]:.2f}"),
              (refs[1].image, refs[1].masks, f"coverage reference {ref_b[t]}"),
              (target.image, {s: o.mask for s, o in outs[1].structures.items() if o.mask is not None},
               f"with it: mean Dice {b[t]:.2f}"),
              (target.image, target.masks, f"target {t}: truth ({what})")]
    for ax, (img, masks, title) in zip(row, panels):
        ax.imshow(draw_annotation(img, masks, palette_names=names))
        ax.set_title(title, fontsize=11)
        ax.axis("off")
fig.tight_layout()
out = "docs/images/results/reference_coverage_arcade.png"
fig.savefig(out, dpi=45)
print("->", out)
