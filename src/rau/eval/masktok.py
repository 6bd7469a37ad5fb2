"""How well the mask tokenizer reconstructs masks (``rau eval-masktok``).

- :func:`evaluate_crops`: 64 x 64 reconstruction of coverage crops (what training reports).
- :func:`roundtrip_dice`: encode -> decode at the original size vs the original mask, on a dataset.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rau.tokens.loc import crop_to_box, loc_tokens_to_box, paste_from_box

if TYPE_CHECKING:
    from rau.tokens.masktok import MaskTokenizer


def hard_dice(logits, target):
    """(B,) Dice between ``logits > 0`` and ``target >= 0.5`` (torch tensors of the same shape,
    (B, ...)); 1 when both are empty."""
    import torch

    p, t = (logits > 0).flatten(1).float(), (target >= 0.5).flatten(1).float()
    total = p.sum(1) + t.sum(1)
    return torch.where(total > 0, 2 * (p * t).sum(1) / total.clamp(min=1), torch.ones_like(total))


def evaluate_crops(tok: MaskTokenizer, crops: np.ndarray, batch: int = 256) -> dict[str, float]:
    """64 x 64 reconstruction of coverage crops (N, S, S) in [0, 1]: mean Dice of (decoded >= 0.5)
    vs (crop >= 0.5), codebook codes used and usage perplexity."""
    import torch

    device = next(tok.model.parameters()).device
    dices, used = [], []
    with torch.no_grad():
        for i in range(0, len(crops), batch):
            x = torch.as_tensor(crops[i : i + batch], dtype=torch.float32)[:, None].to(device)
            codes = tok.model.encode(x)
            dices.append(hard_dice(tok.model.decode_codes(codes), x).cpu())
            used.append(codes.flatten().cpu())
    ids = torch.cat(used)
    p = torch.bincount(ids, minlength=tok.config.codebook_size).float()
    p = p / p.sum()
    return {"dice64": round(float(torch.cat(dices).mean()), 4), "codes_used": int((p > 0).sum()),
            "perplexity": round(float(torch.exp(-(p * torch.log(p + 1e-10)).sum())), 1)}


def roundtrip_dice(tok: MaskTokenizer, dataset_root: str | Path, *, start: int = 0, stop: int | None = None,
                   structures: Sequence[str] | None = None, progress: bool = False) -> dict[str, Any]:
    """Round-trip Dice (encode -> decode at the original size vs the original mask) on images ``[start:stop]`` of a dataset (dataset
    order), and the crop-only Dice (crop to the quantised box, paste back: the upper bound set by
    the 64 x 64 resize). Per structure and overall (mean over masks, and mean of the per-structure
    means) -> ``{"dataset", "images", "per_structure": {name: {n, dice, crop_dice}}, "overall"}``."""
    from tqdm.auto import tqdm

    from rau.data.dataset import load_dataset
    from rau.metrics import dice

    ds = load_dataset(dataset_root, arg="dataset_root")
    per: dict[str, list[tuple[float, float]]] = {}
    for entry in tqdm(ds.entries[start:stop], desc=f"round trip {Path(dataset_root).name}", disable=not progress):
        ann = ds.load(entry, structures=list(structures) if structures else None)
        for name, mask in sorted(ann.masks.items()):
            if mask.any():
                per.setdefault(name, []).append(_roundtrip_one(tok, mask, dice))
    table = {name: {"n": len(v), "dice": float(np.mean([a for a, _ in v])), "crop_dice": float(np.mean([b for _, b in v]))}
             for name, v in sorted(per.items())}
    rows = [r for v in per.values() for r in v]
    overall = {"n": len(rows), "dice": float(np.mean([a for a, _ in rows])) if rows else float("nan"),
               "crop_dice": float(np.mean([b for _, b in rows])) if rows else float("nan"),
               "dice_structure_mean": float(np.mean([t["dice"] for t in table.values()])) if table else float("nan"),
               "crop_dice_structure_mean": float(np.mean([t["crop_dice"] for t in table.values()])) if table else float("nan")}
    return {"dataset": str(dataset_root), "images": len(ds.entries[start:stop]), "per_structure": table, "overall": overall}


def _roundtrip_one(tok: MaskTokenizer, mask: np.ndarray, dice: Callable) -> tuple[float, float]:
    """(round-trip Dice, crop-only Dice) of one non-empty (H, W) bool mask."""
    tokens = tok.encode(mask)
    decoded = tok.decode_tokens(tokens, mask.shape)
    box = loc_tokens_to_box(tokens.loc, mask.shape, tok.config.bins)
    crop_only = paste_from_box(crop_to_box(mask, box, tok.config.size), box, mask.shape)
    pred = decoded.mask if decoded.mask is not None else np.zeros_like(mask)
    return dice(pred, mask), dice(crop_only, mask)
