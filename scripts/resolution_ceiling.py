"""Issue 15, resolution: how much Dice a mask keeps when it lives on a coarser square frame.

Each ground-truth mask goes to a side-S frame (aspect kept, area resampling at 0.5, as
rau.training.recipes.seghead.mask_to_frame) and back to the image (nearest), for S = 512 (a 512
encoder input), 256 (LiteMedSAM's frame, where the memory segmenter writes its masks), 64
(LiteMedSAM's embedding grid) and 32 (the CPU memseg grid). Dice against the original is the
ceiling a model predicting on that frame cannot pass. Usage:
    python scripts/resolution_ceiling.py DATASET_DIR [LIMIT] [PATTERN]
"""
import sys

import numpy as np
import torch
import torch.nn.functional as F

from rau.data.dataset import load_dataset
from rau.metrics import dice
from rau.training.recipes.seghead import mask_to_frame

root, limit = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 50
pattern = sys.argv[3] if len(sys.argv) > 3 else None
sides = (512, 256, 64, 32)
rows = {s: [] for s in sides}
ds = load_dataset(root)
for i, item in enumerate(ds):
    if i >= limit:
        break
    for name, m in item.masks.items():
        if not m.any() or (pattern and pattern not in name):
            continue
        h, w = m.shape
        for s in sides:
            f = mask_to_frame(m, s)
            nh, nw = max(1, round(h * s / max(h, w))), max(1, round(w * s / max(h, w)))
            back = F.interpolate(torch.from_numpy(f[:nh, :nw].astype(np.float32))[None, None], size=(h, w), mode="nearest")[0, 0].numpy() > 0.5
            rows[s].append(dice(back, m))
print(f"{root} ({limit} images{', ' + pattern if pattern else ''}): {len(rows[256])} masks")
print("| frame side | mean Dice ceiling | 10th percentile |\n|---|---|---|")
for s in sides:
    print(f"| {s} | {np.mean(rows[s]):.3f} | {np.percentile(rows[s], 10):.3f} |")
