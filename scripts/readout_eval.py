"""Issue 15, development check: a memory segmenter's trained readout path (MemSegConfig.readout) against the
training-free readout (rau.models.memseg.readout.feature_readout) and the model's own mask, on the pairs of a
``rau bench`` / ``rau calibrate`` report; prints macro Dice (mean over structures of the per-structure mean).

Usage: python scripts/readout_eval.py MODEL_DIR REPORT.json TARGETS_DIR REFERENCES_DIR N [SKIP_PATTERNS]
(N targets, a seeded pick; SKIP_PATTERNS: comma-separated name parts left out; THREADS=k sets torch threads)."""
import json
import os
import sys
import time

import numpy as np
import torch

from rau.data.dataset import load_dataset
from rau.encoders.litemedsam import frame_to_image
from rau.methods.memseg import MemSegSegmenter
from rau.metrics import dice
from rau.models.memseg.readout import feature_readout
from rau.training.recipes.seghead import mask_to_frame
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
mdir, report, tdir, rdir, n = sys.argv[1:6]
skip = [p for p in sys.argv[6].split(",") if p] if len(sys.argv) > 6 else []
rows = json.load(open(report))["targets"]
pairs = {r["target"]: r["reference"] for r in rows}
scored = {(r["target"], r["structure"]) for r in rows if r.get("in_truth")}
T, R = load_dataset(tdir), load_dataset(rdir)
tid, rid = {e.id: e for e in T.entries}, {e.id: e for e in R.entries}
seg = MemSegSegmenter(mdir)
net = seg.model.net.eval()
ids = list(pairs)
if int(n) < len(ids):
    ids = [ids[i] for i in sorted(np.random.default_rng(0).choice(len(ids), int(n), replace=False))]
res = {"free": {}, "trained": {}, "model": {}}
t0 = time.time()
for t in ids:
    tgt, ref = T.load(tid[t]), R.load(rid[pairs[t]])
    names = [s for s in ref.structures if ref.annotates(s) and (t, s) in scored and not any(p in s for p in skip)]
    if not names:
        continue
    mem = seg.segment(tgt.image, {s: None for s in names}, ref)
    et, sc = seg.embed(tgt.image)
    er, _ = seg.embed(ref.image)
    masks = torch.from_numpy(np.stack([mask_to_frame(ref.masks[s]) for s in names])).float()[:, None]  # (S,1,F,F)
    free = frame_to_image(feature_readout(et[0], er, masks)[:, None], sc, tgt.image.shape)[:, 0].numpy()
    if seg.model.config.readout:
        with torch.inference_mode():
            tr = net.read(et.expand(len(names), -1, -1, -1), er[None].expand(len(names), -1, -1, -1, -1), masks[:, :, None])
        trained = frame_to_image(tr, sc, tgt.image.shape)[:, 0].numpy()
    else:
        trained = free
    for j, s in enumerate(names):
        res["free"].setdefault(s, []).append(dice(free[j] > 0.5, tgt.masks[s]))
        res["trained"].setdefault(s, []).append(dice(trained[j] > 0.5, tgt.masks[s]))
        res["model"].setdefault(s, []).append(dice(mem[s].mask, tgt.masks[s]) if mem[s] is not None else 0.0)
print(report, mdir, len(ids), "targets", round(time.time() - t0), "s")
for k, per in res.items():
    print(f"  {k}: {np.mean([np.mean(v) for v in per.values()]):.3f}  " + " ".join(f"{s}={np.mean(v):.3f}" for s, v in sorted(per.items())[:6]))
