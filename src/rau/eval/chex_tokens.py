"""Token-level evaluation of a CheXanatomy model on a token cache (held-out DRRs, real radiographs).

Two questions that the mask metrics of ``rau eval --method chexanatomy`` do not ask:

- **naming**: given the TRUE box of a structure ("what is in <loc><loc><loc><loc>?"), does the
  model name it? Greedy, grammar-constrained answer (4 words) compared with the true name.
- **detect**: "detect X" -> 4 location tokens; box IoU against the true box (both from tokens, so
  on the same 1024-bin grid).

    rau eval-chex-tokens --model runs/chex/drr/final --cache runs/chex/drr_test.npz --out naming.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rau.data.caches import load_cache
from rau.models.chex.modeling import ChexModel
from rau.geometry import box_iou


def _box(loc) -> tuple[float, float, float, float]:
    y0, x0, y1, x1 = (float(v) for v in loc)
    return (x0, y0, x1 + 1, y1 + 1)


def evaluate_tokens(model: ChexModel, cache_path: str | Path, *, limit: int | None = None) -> dict[str, Any]:
    """Per-structure naming accuracy and detect box IoU over the cache's present structures."""
    import torch

    cache = load_cache(cache_path)
    names = [n for n in cache.names if model.vocab.knows(n)]
    rows: dict[str, dict[str, list[float]]] = {n: {"named": [], "box_iou": []} for n in names}
    confusions: dict[str, dict[str, int]] = {n: {} for n in names}
    idx = range(len(cache)) if limit is None else range(min(limit, len(cache)))
    for i in idx:
        feats = torch.from_numpy(cache.features[i : i + 1].astype(np.float32))
        present = [n for n in names if cache.loc[i, cache.names.index(n), 0] >= 0]
        if not present:
            continue
        locs = [cache.loc[i, cache.names.index(n)] for n in present]
        prompts = [("name", model.vocab.block("name", loc=[int(v) for v in loc])[0]) for loc in locs]
        named = model.generate(feats, prompts)
        detected = model.detect(feats, present)
        for n, loc, ans in zip(present, locs, named):
            rows[n]["named"].append(float(ans.name == n))
            confusions[n][ans.name] = confusions[n].get(ans.name, 0) + 1
            rows[n]["box_iou"].append(box_iou(_box(detected[n].loc), _box(loc)))
    per = {n: {"n": len(r["named"]), "naming_acc": float(np.mean(r["named"])) if r["named"] else float("nan"),
               "detect_box_iou": float(np.mean(r["box_iou"])) if r["box_iou"] else float("nan"),
               "confused_with": {k: v for k, v in sorted(confusions[n].items(), key=lambda kv: -kv[1]) if k != n}}
           for n, r in rows.items() if r["named"]}
    mean = {k: float(np.mean([e[k] for e in per.values()])) for k in ("naming_acc", "detect_box_iou")} if per else {}
    return {"cache": str(cache_path), "images": len(idx), "per_structure": per, "mean": mean}
