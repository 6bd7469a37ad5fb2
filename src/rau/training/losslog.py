"""The loss log of a training run: ``loss.json`` and ``loss.png``, both replaced atomically."""

from __future__ import annotations

from pathlib import Path

from rau.atomic import save_figure, write_json


def write_loss_log(out: Path, history: list[dict[str, float]], loss_label: str = "loss") -> None:
    """loss.json (``{"history": [{step, loss, lr, ...}]}``) and loss.png (y axis ``loss_label``)."""
    write_json(Path(out) / "loss.json", {"history": history}, indent=1)
    if history:
        plot_losses(history, Path(out) / "loss.png", loss_label)


def plot_losses(history: list[dict[str, float]], path: Path, loss_label: str = "loss") -> None:
    """Loss per step with its running mean; any other numeric entry of the history (e.g. GRPO's
    mean reward, the mask tokenizer's Dice) in a second panel."""
    # Figure + Agg canvas directly: no pyplot, so the caller's matplotlib backend is left alone.
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = np.array([h["step"] for h in history])
    loss = np.array([h["loss"] for h in history])
    extra = [k for k in history[-1] if k not in ("step", "loss", "lr") and isinstance(history[-1][k], (int, float))]
    fig = Figure(figsize=(6, 3.5 * (1 + bool(extra))), dpi=100)
    FigureCanvasAgg(fig)
    window = max(1, len(loss) // 20)

    def curve(ax, values, label):
        ok = ~np.isnan(values)
        smooth = window > 1 and ok.sum() > window
        line = ax.plot(steps[ok], values[ok], lw=0.6, alpha=0.35, label=None if smooth else label)[0]
        if smooth:  # the running mean over the logged steps (a figure may be missing at some steps)
            avg = np.convolve(values[ok], np.ones(window) / window, mode="valid")
            ax.plot(steps[ok][window - 1:], avg, lw=1.5, color=line.get_color(), label=f"{label} (mean of {window})")

    ax = fig.add_subplot(1 + bool(extra), 1, 1)
    curve(ax, loss, "loss")
    ax.set_xlabel("step")
    ax.set_ylabel(loss_label)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    if extra:
        ax2 = fig.add_subplot(2, 1, 2)
        for k in extra:
            curve(ax2, np.array([h.get(k, np.nan) for h in history], float), k)
        ax2.set_xlabel("step")
        ax2.grid(alpha=0.3)
        ax2.legend(loc="best", fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
