"""Benchmark figures (matplotlib, Agg backend; imported only by the commands that draw)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _save(fig, path: str | Path, dpi: int) -> Path:
    """tight_layout, write the PNG atomically, close the figure."""
    import matplotlib.pyplot as plt

    from rau.atomic import save_figure

    fig.tight_layout()
    path = save_figure(fig, path, dpi)
    plt.close(fig)
    return path


def dice_bar_chart(reports: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Grouped bars: mean Dice per structure (x) for each method (colour); written atomically."""
    import matplotlib

    from rau.eval.evaluate import report_label

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({s for r in reports for s, e in r["per_structure"].items() if e["n"] > 0},
                   key=lambda s: (len(s), s))
    names.append("mean")
    width = 0.8 / max(1, len(reports))
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 0.3 * len(names) * max(1, len(reports)) ** 0.5 + 3)), 3.6))
    x = np.arange(len(names))
    for i, r in enumerate(reports):
        vals = [r["per_structure"].get(s, {}).get("dice", np.nan) if s != "mean" else r["mean"]["dice"] for s in names]
        ax.bar(x + (i - (len(reports) - 1) / 2) * width, vals, width, label=report_label(r))
    ax.set_xticks(x, names, rotation=45 if len(names) > 8 else 0, ha="right" if len(names) > 8 else "center")
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice")
    ax.set_title(title)
    ax.legend(fontsize=8, bbox_to_anchor=(1.01, 1.0), loc="upper left")  # outside: bars reach the top
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path, dpi=120)


def prediction_grid(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Predicted vs true masks: one row per image, one column per method.

    ``rows``: ``{"image": (H, W) float, "id": str, "truth": {name: mask}, "pred": {method: {name: mask | None}},
    "dice": {method: float}}``. Truth is drawn as a white contour, the prediction as a coloured
    contour (one colour per structure); each panel's title gives the method and its mean Dice."""
    import matplotlib

    from rau.render import contour, structure_color

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(rows[0]["pred"]) if rows else []
    fig, axes = plt.subplots(len(rows), len(methods), figsize=(2.6 * len(methods), 2.6 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        names = sorted(row["truth"])
        for c, method in enumerate(methods):
            rgb = np.repeat(np.asarray(row["image"], np.float32)[..., None], 3, axis=-1)
            for name in names:
                rgb[contour(row["truth"][name], 2)] = 1.0
                pred = row["pred"][method].get(name)
                if pred is not None:
                    rgb[contour(pred, 2)] = np.array(structure_color(name, names)) / 255.0
            ax = axes[r][c]
            ax.imshow(np.clip(rgb, 0, 1))
            ax.set_axis_off()
            ax.set_title(f"{method}\n{row['id']}  Dice {row['dice'].get(method, float('nan')):.2f}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path, dpi=110)


def reliability_plot(reports: list[dict[str, Any]], path: str | Path, title: str = "", *,
                     xlabel: str = "confidence", ylabel: str = "share right (Dice >= 0.5)") -> Path | None:
    """Reliability diagram: per confidence bin, the share of right outputs against the mean
    confidence (the diagonal is perfect calibration), one line per method with a calibration;
    None when no report has one. The labels name other probabilities drawn the same way (presence)."""
    import matplotlib

    from rau.eval.evaluate import report_label

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in reports if (r.get("calibration") or {}).get("reliability")]
    if not shown:
        return None
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect")
    for r in shown:
        cal = r["calibration"]
        pts = cal["reliability"]
        ax.plot([p["confidence"] for p in pts], [p["right"] for p in pts], marker="o",
                label=f"{report_label(r)} (ECE {cal['ece']:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path, 110)
