"""Figure of predicted vs true masks on real radiographs, several methods side by side.

    .venv/bin/python scripts/chex_figure.py --out docs/images/chex_wingspan.png \
        --method chexanatomy:runs/chex/drr/final --method chexanatomy:runs/chex/drr_k20/final \
        --method unet:runs/unet/drr --method unet:runs/unet/drr_k20 --ids wingspan_160,wingspan_175,wingspan_190

Each method is NAME:WEIGHTS (the folder its --chex / --unet option takes); the reference-free
methods need no reference, so the target's own structure names are passed through a stand-in.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from rau.data.dataset import load_dataset
from rau.methods import create_method
from rau.metrics import dice
from rau.eval.plots import prediction_grid


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="../shared/datasets/wingspan_cxr")
    p.add_argument("--ids", required=True, help="comma-separated image ids")
    p.add_argument("--method", action="append", required=True, help="NAME:WEIGHTS, e.g. chexanatomy:runs/chex/drr/final")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    ds = load_dataset(args.data)
    methods = {}
    for spec in args.method:
        name, weights = spec.split(":", 1)
        key = "chex" if name == "chexanatomy" else name
        methods[f"{name} ({Path(weights).parent.name if Path(weights).name == 'final' else Path(weights).name})"] = \
            create_method(name, **{key: weights})
    rows = []
    for image_id in args.ids.split(","):
        target = ds[[e.id for e in ds.entries].index(image_id)]
        row = {"image": target.image, "id": image_id, "truth": dict(target.masks), "pred": {}, "dice": {}}
        for label, method in methods.items():
            result = method.predict(target, target)  # the reference only names the structures here
            masks = {s: r.mask for s, r in result.structures.items()}
            row["pred"][label] = masks
            row["dice"][label] = float(np.mean([dice(masks[s], target.masks[s]) if masks[s] is not None else 0.0
                                                for s in target.masks]))
        rows.append(row)
    print(prediction_grid(rows, args.out, title="white: truth; colour: prediction (Wingspan held-out, never trained on)"))


if __name__ == "__main__":
    main()
