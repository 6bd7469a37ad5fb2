"""The shipped visibility model on ARCADE val targets it never trained on (the 120 `calib-arcade-val` targets of
`runs/s23/calib_rr`, none a bench target): per segment, the AUROC of P(segment shown | target) against the truth,
and two examples. Writes docs/images/results/visibility_arcade.png; run `.venv/bin/python scripts/visibility_figure.py`."""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from rau.data.dataset import load_dataset
from rau.methods.confidence import default_visibility
from rau.metrics import auroc

report = json.load(open("runs/s23/calib_rr/calib-arcade-val_reg-refine.json"))
targets = sorted({r["target"] for r in report["targets"]}, key=int)
ds = load_dataset(report["config"]["targets"])
by_id = {e.id: e for e in ds.entries}
model = default_visibility()
names = model.config.structures
p, y, images = [], [], {}
for t in targets:
    img = ds.load(by_id[t], []).image
    probs = model.probs(img)
    p.append([probs[n] for n in names])
    y.append([n in by_id[t].structures for n in names])
    images[t] = img
p, y = np.array(p), np.array(y)
aucs = [auroc(p[:, j], y[:, j]) for j in range(len(names))]
print("macro AUROC", round(float(np.nanmean(aucs)), 3), {n: round(a, 3) for n, a in zip(names, aucs)})
fig = plt.figure(figsize=(13, 4.2))
ax = fig.add_axes([0.05, 0.14, 0.5, 0.74])
ax.bar(range(len(names)), [0 if np.isnan(a) else a for a in aucs], color="tab:blue")
for j, n in enumerate(names):
    ax.text(j, 0.02, str(int(y[:, j].sum())), ha="center", color="white", fontsize=7)
ax.set_xticks(range(len(names)), names, fontsize=8)
ax.set_ylim(0, 1.02)
ax.axhline(0.5, color="gray", lw=0.8, ls=":")
ax.set_ylabel("AUROC, P(shown | target)")
ax.set_title(f"{len(targets)} ARCADE val targets never trained on (numbers: targets showing it); macro {np.nanmean(aucs):.3f}",
             fontsize=9)
# two examples: the most confident left-tree and right-tree targets
right_tree = p[:, names.index("1")]
for k, (t_idx, label) in enumerate(((int(np.argmin(right_tree)), "left tree"), (int(np.argmax(right_tree)), "right tree"))):
    ax2 = fig.add_axes([0.58 + k * 0.21, 0.1, 0.2, 0.8])
    t = targets[t_idx]
    ax2.imshow(images[t], cmap="gray")
    ax2.axis("off")
    top = sorted(zip(p[t_idx], names), reverse=True)[:6]
    shown = set(by_id[t].structures)
    ax2.set_title(f"val {t} ({label})", fontsize=9)
    ax2.text(0.02, 0.02, "\n".join(f"{n}: {v:.2f}{' *' if n in shown else ''}" for v, n in top), transform=ax2.transAxes,
             color="yellow", fontsize=7, va="bottom", family="monospace")
out = Path("docs/images/results/visibility_arcade.png")
fig.savefig(out, dpi=110)
print(out, "(* = in the target's annotation)")
