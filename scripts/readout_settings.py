"""Issue 15: choose the training-free memory readout's settings on shapes no model here trained on.

The readout's TAU (similarity temperature), NEIGHBOURS and LOCALITY (:mod:`rau.models.memseg.readout`)
were first chosen by a look at 12 drr-unseen targets, the very split it is judged on. This repeats the
choice on random 3D shapes drawn in the bundled CT (``rau.data.drr_blobs``, seeds 3.. , never in the
shipped memory segmenter's training; clavicles and scapulae avoided), projected into 100 DRR poses:
novel structures with exact correspondence. Each of N targets per set (poses evenly spaced) takes as
reference the other pose with the highest normalised cross-correlation of 32 x 32 thumbnails (the
bench's rule); the readout of every shape both annotate is scored by Dice in the 256 frame; macro
over shapes. Prints one line per setting, best first.

Usage (caches of scripts/memseg_blobs_recipe.sh's lines for seeds 3..8, runs/s17/blobs.sh):
    python scripts/readout_settings.py N SEED [SEED ...]
e.g. ``python scripts/readout_settings.py 10 3 4 5 6 7 8``.
"""
import itertools
import sys

import numpy as np
import torch

from rau.models.memseg.readout import feature_readout
from rau.training.recipes.memseg import load_memseg_cache

TAUS, NEIGHBOURS, LOCALITIES = (0.02, 0.05, 0.1), (4, 8, 16), (20.0, 100.0, 300.0)


def thumbs(frames):
    t = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(frames).float()[:, None], 32).flatten(1)
    t = t - t.mean(1, keepdim=True)
    return torch.nn.functional.normalize(t, dim=1)


def main(n: int, seeds: list[int]) -> None:
    torch.set_num_threads(2)
    scores = {s: [] for s in itertools.product(TAUS, NEIGHBOURS, LOCALITIES)}  # setting -> [(shape key, dice)]
    for seed in seeds:
        cache = load_memseg_cache(f"runs/memseg_emb/blobs_{seed}.npz")
        frames = np.load(f"runs/memseg_frames/blobs_{seed}.npz")["frames"]
        sim = thumbs(frames) @ thumbs(frames).T
        sim.fill_diagonal_(-2)
        emb = torch.from_numpy(cache.embeddings).float()
        for t in np.linspace(0, len(frames) - 1, n).round().astype(int):
            r = int(sim[t].argmax())
            shapes = np.flatnonzero(cache.present[t] & cache.present[r])
            ref_masks = torch.from_numpy(np.stack([cache.frame_mask(r, s) for s in shapes])).float()[:, None]
            truth = [cache.frame_mask(t, s) for s in shapes]
            for setting in scores:
                tau, k, lam = setting
                read = feature_readout(emb[t], emb[r][None], ref_masks, tau=tau, neighbours=k, locality=lam).numpy() > 0.5
                for s, p, g in zip(shapes, read, truth):
                    d = 2 * (p & g).sum() / max(p.sum() + g.sum(), 1)
                    scores[setting].append((f"{seed}:{s}", float(d)))
        print(f"blobs_{seed}: {n} targets", flush=True)
    rows = []
    for setting, vals in scores.items():
        per = {}
        for key, d in vals:
            per.setdefault(key, []).append(d)
        rows.append((float(np.mean([np.mean(v) for v in per.values()])), setting, len(per), len(vals)))
    for macro, (tau, k, lam), shapes, outputs in sorted(rows, reverse=True):
        print(f"tau {tau:<5} neighbours {k:<3} locality {lam:<6g} macro Dice {macro:.3f} ({shapes} shapes, {outputs} outputs)")


if __name__ == "__main__":
    main(int(sys.argv[1]), [int(s) for s in sys.argv[2:]])
