"""The second opinion on coronary masks, shown and measured on ARCADE val targets outside the bench (the 120
`calib-arcade-val` pairs of `runs/s24/calib_rr`, whose rows carry the feature as `rau calibrate` measured it):
left, the agreement of right and wrong masks (Dice >= 0.5 with the truth or not); right, the first target of that
split (by id) holding both a right mask with high agreement and a wrong one with low agreement, redrawn by
`reg-refine` with the memory segmenter's mask beside each. Writes docs/images/results/second_opinion_arcade.png;
run `.venv/bin/python scripts/second_opinion_figure.py`."""
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from scipy import ndimage

from rau.data.dataset import load_dataset
from rau.methods.registry import create_method
from rau.metrics import auroc, dice

report = json.load(open("runs/s24/calib_rr/calib-arcade-val_reg-refine.json"))
rows = [r for r in report["targets"] if r.get("features") and "second_opinion" in r["features"] and "right" in r]
agree = np.array([r["features"]["second_opinion"] for r in rows])
right = np.array([bool(r["right"]) for r in rows])
print(f"{len(rows)} outputs, {right.sum()} right; AUROC of the agreement alone {auroc(agree, right):.3f}")

by_target: dict[str, list] = {}
for r in rows:
    by_target.setdefault(r["target"], []).append(r)
pick = next(t for t in sorted(by_target, key=int)
            if any(r["right"] and r["features"]["second_opinion"] >= 0.6 for r in by_target[t])
            and any(r["in_truth"] and not r["right"] and r["features"]["second_opinion"] <= 0.3 for r in by_target[t]))
good = max((r for r in by_target[pick] if r["right"]), key=lambda r: r["features"]["second_opinion"])
bad = min((r for r in by_target[pick] if r["in_truth"] and not r["right"]), key=lambda r: r["features"]["second_opinion"])
pair = next(p for p in report["config"]["pairs"] if p["target"] == pick)
tds, rds = load_dataset(report["config"]["targets"]), load_dataset(report["config"]["references"])
target = tds.load(next(e for e in tds.entries if e.id == pick))
reference = rds.load(next(e for e in rds.entries if e.id == pair["reference"]))
method = create_method("reg-refine")
result = method.predict(reference, target, [good["structure"], bad["structure"]])
other = method.second_opinion.segmenter.segment(target.image, {good["structure"]: None, bad["structure"]: None}, reference)

fig = plt.figure(figsize=(14, 4.8))
ax = fig.add_axes([0.05, 0.13, 0.25, 0.75])
bins = np.linspace(0, 1, 21)
ax.hist(agree[~right], bins, alpha=0.6, label=f"wrong ({(~right).sum()})", color="tab:red")
ax.hist(agree[right], bins, alpha=0.6, label=f"right ({right.sum()})", color="tab:green")
ax.set_xlabel("second_opinion (Dice with the memory segmenter)")
ax.set_ylabel("outputs")
ax.set_title(f"calib-arcade-val, reg-refine (AUROC {auroc(agree, right):.2f})", fontsize=10)
ax.legend(fontsize=8)


def outline(mask):
    return mask & ~ndimage.binary_erosion(mask, iterations=2)


for k, r in enumerate((good, bad)):
    s = r["structure"]
    mine, theirs, truth = result.structures[s].mask, other[s].mask, target.masks[s]
    rgb = np.repeat(target.image[..., None], 3, axis=2).astype(np.float32)
    rgb[outline(truth)] = (1.0, 1.0, 0.0)
    rgb[outline(theirs)] = (0.2, 0.6, 1.0)
    rgb[outline(mine)] = (1.0, 0.2, 0.2)
    a = fig.add_axes([0.33 + k * 0.33, 0.02, 0.32, 0.9])
    a.imshow(rgb)
    a.axis("off")
    a.set_title(f"target {pick}, segment {s}: delivered (red) Dice {dice(mine, truth):.2f} with the truth (yellow);\n"
                f"memory segmenter (blue) agrees {r['features']['second_opinion']:.2f}; confidence "
                f"{result.structures[s].confidence:.2f}", fontsize=9)
out = "docs/images/results/second_opinion_arcade.png"
fig.savefig(out, dpi=80)
print("wrote", out, "target", pick, "reference", pair["reference"], "segments", good["structure"], bad["structure"])
