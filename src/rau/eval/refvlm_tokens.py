"""Token-level evaluation of a compact RAU VLM on caches (no image encoding: seconds, for
checkpoints during training). The full protocol with masks, HD95 and timing is ``rau eval``.

For every target of the test cache the reference is the most similar image of the reference cache
(cosine of centred pooled features, the bank's measure); every structure annotated in the
reference is asked. Reports per structure: identification accuracy (yes/no vs. the target's
truth), box IoU and accuracy at IoU 0.5 over structures present in both (boxes compared in the
1024-bin token space, where both images are the unit square).

    rau eval-tokens --model runs/ref/vlm/final --references runs/chex/wingspan_0_160.npz \
        --targets runs/ref/wingspan_160_200.npz [--out r.json]
"""

from __future__ import annotations

import numpy as np

from rau.data.caches import TokenCache


def _unit(cache: TokenCache) -> np.ndarray:
    x = cache.features.astype(np.float32).reshape(len(cache), cache.features.shape[1], -1).mean(-1)
    return x


def bin_box_iou(a, b) -> float:
    """IoU of two (ymin, xmin, ymax, xmax) inclusive bin boxes."""
    y0, x0 = max(a[0], b[0]), max(a[1], b[1])
    y1, x1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, y1 - y0 + 1) * max(0, x1 - x0 + 1)
    area = lambda r: max(0, r[2] - r[0] + 1) * max(0, r[3] - r[1] + 1)  # noqa: E731
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def evaluate_cache(model, references: TokenCache, targets: TokenCache, limit: int | None = None) -> dict:
    import torch

    ref_x, tgt_x = _unit(references), _unit(targets)
    mean = ref_x.mean(0, keepdims=True)
    rn = (ref_x - mean) / np.linalg.norm(ref_x - mean, axis=1, keepdims=True).clip(1e-8)
    tn = (tgt_x - mean) / np.linalg.norm(tgt_x - mean, axis=1, keepdims=True).clip(1e-8)
    names = [n for n in targets.names if n in references.names]
    col_r = {n: references.names.index(n) for n in names}
    col_t = {n: targets.names.index(n) for n in names}
    rows = []
    n = len(targets) if limit is None else min(limit, len(targets))
    for i in range(n):
        r = int(np.argmax(rn @ tn[i]))
        asked = [s for s in names if references.loc[r, col_r[s], 0] >= 0]
        if not asked:
            continue
        toks = [(references.loc[r, col_r[s]], references.codes[r, col_r[s]]) for s in asked]
        answers = model.answer(torch.from_numpy(references.features[r : r + 1].astype(np.float32)),
                               torch.from_numpy(targets.features[i : i + 1].astype(np.float32)), toks)
        for s, a in zip(asked, answers):
            truth = bool(targets.loc[i, col_t[s], 0] >= 0)
            row = {"target": targets.ids[i], "structure": s, "id_correct": a.visible == truth, "p_yes": a.p_yes}
            if truth:
                row["box_iou"] = bin_box_iou(a.loc, targets.loc[i, col_t[s]])
            rows.append(row)
    per = {}
    for s in names:
        rs = [r for r in rows if r["structure"] == s]
        if not rs:
            continue
        ious = [r["box_iou"] for r in rs if "box_iou" in r]
        per[s] = {"id_acc": float(np.mean([r["id_correct"] for r in rs])), "n": len(rs),
                  "box_iou": float(np.mean(ious)) if ious else float("nan"),
                  "box_acc50": float(np.mean([v >= 0.5 for v in ious])) if ious else float("nan")}
    ious = [r["box_iou"] for r in rows if "box_iou" in r]
    return {"per_structure": per, "id_acc": float(np.mean([r["id_correct"] for r in rows])) if rows else float("nan"),
            "box_iou": float(np.mean(ious)) if ious else float("nan"),
            "box_acc50": float(np.mean([v >= 0.5 for v in ious])) if ious else float("nan"),
            "n_targets": n, "n_rows": len(rows)}
