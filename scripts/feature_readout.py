"""Issue 15, diagnosis: does the memory segmenter follow the reference as well as its own features could?

The training-free memory readout of :mod:`rau.models.memseg.readout` (each cell of the target's
LiteMedSAM embedding takes the reference mask's value from its 8 most similar reference cells, cosine /
0.05 minus LAM x squared cell distance), mapped back to the target's pixels and thresholded at 0.5. Compared with the shipped memory segmenter
(``sam2-memory``) and their probability blends ``w * memseg + (1 - w) * readout`` on the pairs of a
``rau bench`` / ``rau calibrate`` report, scored on the structures that report scores.

Usage:
    python scripts/feature_readout.py REPORT.json TARGETS_DIR REFERENCES_DIR [N] [SKIP_PATTERNS] [FIGURE.png]
e.g. ``python scripts/feature_readout.py runs/bench/drr-unseen_sam2-memory.json runs/drr_full/test
runs/drr_full/train 60``; SKIP_PATTERNS (comma-separated name parts) leaves structures out, e.g.
``clavicle,scapula`` to measure the held-in structures of a calibration split only. Prints macro Dice
(mean over structures of the per-structure mean) per (LAM, w); w = 1 is the memory segmenter alone,
w = 0 the readout alone. FIGURE.png: the first target drawn three times (truth, memory segmenter,
readout at LAM = 100), each structure in its colour.
"""
import json
import sys

import numpy as np
import torch

from rau.data.dataset import load_dataset
from rau.encoders.litemedsam import frame_to_image
from rau.methods.memseg import DEFAULT_MEMSEG_DIR, MemSegSegmenter
from rau.metrics import dice
from rau.models.memseg.readout import feature_readout
from rau.training.recipes.seghead import mask_to_frame

LAMS, WEIGHTS = (20, 100), (0.0, 0.3, 0.5, 0.7, 1.0)


def readout(seg, target_image, reference, names, lam):
    """(len(names), H, W) readout probabilities of the reference's masks in the target's pixels."""
    et, scale = seg.embed(target_image)
    er, _ = seg.embed(reference.image)
    masks = torch.from_numpy(np.stack([mask_to_frame(reference.masks[s]) for s in names]))[:, None]
    frame = feature_readout(et[0], er, masks, locality=lam)
    return frame_to_image(frame[None], scale, target_image.shape)[0].numpy()


def draw(path, target, names, memory, probs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    panels = (("truth", [target.masks[s] for s in names]),
              ("memory segmenter (sam2-memory)", [memory[s].mask if memory[s] is not None else None for s in names]),
              ("feature readout, no training", [p > 0.5 for p in probs]))
    for ax, (title, masks) in zip(axes, panels):
        ax.imshow(target.image, cmap="gray")
        for j, (s, m) in enumerate(zip(names, masks)):
            if m is not None and m.any():
                ax.contour(m.astype(float), levels=[0.5], colors=[colours(j)], linewidths=1.2)
                if title == "truth":
                    ax.plot([], [], color=colours(j), label=s)
        ax.set_title(title)
        ax.axis("off")
    axes[0].legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    report, targets_dir, references_dir = sys.argv[1:4]
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 10 ** 9
    skip = [p for p in sys.argv[5].split(",") if p] if len(sys.argv) > 5 else []
    figure = sys.argv[6] if len(sys.argv) > 6 else None
    rows = json.load(open(report))["targets"]
    pairs = {r["target"]: r["reference"] for r in rows}
    scored = {(r["target"], r["structure"]) for r in rows if r.get("in_truth")}
    targets, references = load_dataset(targets_dir), load_dataset(references_dir)
    tid = {e.id: e for e in targets.entries}
    rid = {e.id: e for e in references.entries}
    seg = MemSegSegmenter(DEFAULT_MEMSEG_DIR)
    ids = list(pairs)
    if n < len(ids):
        ids = [ids[i] for i in sorted(np.random.default_rng(0).choice(len(ids), n, replace=False))]
    out = {(lam, w): {} for lam in LAMS for w in WEIGHTS}
    torch.set_num_threads(2)
    for t in ids:
        target, reference = targets.load(tid[t]), references.load(rid[pairs[t]])
        names = [s for s in reference.structures if reference.annotates(s) and (t, s) in scored
                 and not any(p in s for p in skip)]
        if not names:
            continue
        memory = seg.segment(target.image, {s: None for s in names}, reference)
        for lam in LAMS:
            probs = readout(seg, target.image, reference, names, lam)
            if figure and lam == 100:
                draw(figure, target, names, memory, probs)
                figure = None
            for j, s in enumerate(names):
                pm = memory[s].prob if memory[s] is not None else np.zeros_like(probs[j])
                for w in WEIGHTS:
                    out[(lam, w)].setdefault(s, []).append(dice(w * pm + (1 - w) * probs[j] > 0.5, target.masks[s]))
    print(f"{report}: {len(ids)} targets; macro Dice per (LAM, w_memseg)")
    for key, per in out.items():
        print(f"  {key}: {np.mean([np.mean(v) for v in per.values()]):.3f}")


if __name__ == "__main__":
    main()
