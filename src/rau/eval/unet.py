"""Dice of a trained U-Net on a dataset folder, at the images' own size (``rau eval-unet``)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rau.atomic import write_json
from rau.errors import RauInputError

COLORS = ["tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:cyan", "tab:pink", "tab:olive"]


def evaluate_unet(checkpoint: str | Path, data_root: str | Path, *, ids: Sequence[str] | None = None,
                  out: str | Path | None = None, overlays: str | Path | None = None, n_overlays: int = 6,
                  threads: int = 1, progress: bool = True) -> dict[str, Any]:
    """Dice per structure (model structures that the dataset annotates), at the images' own size.

    ``checkpoint``: a U-Net model folder or run folder; ``ids``: only these images; ``overlays``:
    a PNG with contours of ``n_overlays`` images spread over the set. Returns (and writes to
    ``out``) {"per_structure": {s: {mean, std, median, min, n}}, "mean_dice", "seconds_per_image",
    "per_image": [...], ...}."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _evaluate(checkpoint, data_root, ids, out, overlays, n_overlays, progress)
    finally:
        torch.set_num_threads(before)


def _evaluate(checkpoint, data_root, ids, out, overlays, n_overlays, progress) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from rau.data.dataset import load_dataset
    from rau.methods.unet import UNetSegmenter
    from rau.metrics import dice

    seg = UNetSegmenter.from_pretrained(checkpoint)
    ds = load_dataset(data_root, arg="--data")
    if ids is not None:
        ds = ds.subset(list(ids))
    names = [s for s in seg.config.structures if s in ds.structures]
    if not names:
        raise RauInputError(f"--data: {data_root} annotates none of the model's structures {seg.config.structures}")
    rows, shown, seconds = [], [], 0.0
    show = set(np.linspace(0, len(ds) - 1, min(n_overlays, len(ds))).round().astype(int).tolist())
    for i, e in enumerate(tqdm(ds.entries, desc="eval", disable=not progress)):
        ann = ds.load(e, structures=names)
        t = time.perf_counter()
        res = seg.segment(ann.image, {s: None for s in names})
        seconds += time.perf_counter() - t
        truth = {s: ann.masks.get(s, np.zeros(ann.image.shape, bool)) for s in names}
        rows.append({"id": e.id, **{s: dice(res[s].mask, truth[s]) for s in names}})
        if i in show:
            shown.append((e.id, ann.image, truth, {s: res[s].mask for s in names}))
    result = summary(checkpoint, data_root, names, rows, seconds)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(out), result, indent=1)
    if overlays is not None and shown:
        save_overlays(shown, names, Path(overlays))
    return result


def summary(checkpoint, data_root, names: list[str], rows: list[dict], seconds: float) -> dict[str, Any]:
    """Per-structure Dice statistics of ``rows`` ({"id", structure: dice}) -> the result JSON object."""
    per = {}
    for s in names:
        v = np.array([r[s] for r in rows])
        per[s] = {"mean": round(float(v.mean()), 4), "std": round(float(v.std()), 4),
                  "median": round(float(np.median(v)), 4), "min": round(float(v.min()), 4), "n": len(v)}
    return {"checkpoint": str(Path(checkpoint).resolve()), "data": str(Path(data_root).resolve()),
            "n_images": len(rows), "ids": [r["id"] for r in rows], "per_structure": per,
            "mean_dice": round(float(np.mean([per[s]["mean"] for s in names])), 4),
            "seconds_per_image": round(seconds / max(1, len(rows)), 4),
            "per_image": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]}


def save_overlays(shown: list[tuple], names: list[str], path: Path) -> None:
    """Grid of images: ground truth as solid contours, prediction as dashed, one colour per structure.

    ``shown``: (id, (H, W) image, {structure: truth mask}, {structure: predicted mask}) per image."""
    # Figure + Agg canvas directly: no pyplot, so the caller's matplotlib backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from rau.metrics import dice

    n = len(shown)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4 * cols, 4.8 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (iid, image, truth, pred) in zip(axes.flat, shown):
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        for i, s in enumerate(names):
            c = COLORS[i % len(COLORS)]
            if truth[s].any():
                ax.contour(truth[s], levels=[0.5], colors=[c], linewidths=1.0)
            if pred[s].any():
                ax.contour(pred[s], levels=[0.5], colors=[c], linewidths=1.2, linestyles="dashed")
        dices = ", ".join(f"{s[:7]} {dice(pred[s], truth[s]):.2f}" for s in names[:3])
        ax.set_title(f"{iid}\n{dices}", fontsize=8)
    handles = [Line2D([], [], color=COLORS[i % len(COLORS)], label=s) for i, s in enumerate(names)]
    handles += [Line2D([], [], color="k", label="truth"), Line2D([], [], color="k", ls="--", label="U-Net")]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    from rau.atomic import save_figure

    save_figure(fig, path, dpi=90)
