"""`rau train masktok`: train the mask tokenizer's VQ-VAE (:mod:`rau.tokens.vqvae`) on dataset masks.

Data: every non-empty mask of every image of each dataset folder, cropped to its loc-quantised box
and resampled to 64 x 64 coverage (:func:`collect_crops`, the crop :class:`MaskTokenizer` encodes).
Step ``s`` draws its batch, its augmentation, the codebook's initialisation and dead-code
re-seeding from one generator seeded from ``(seed, s)`` alone, so rerunning the same call after a
kill resumes from the latest checkpoint and ends with the same weights as an uninterrupted run
(same device and thread count).

Loss: BCE + ``dice_weight`` x soft Dice + ``beta`` x commitment; Adam, linear warm-up over the first
5 % of the steps (at most 100), cosine decay to 5 % of ``lr``, no gradient clipping. The run folder
is the engine's (:mod:`rau.training.checkpoints`): config.json, loss.json/loss.png (loss, dice64 and
perplexity per step), checkpoint-<step>/, and final/ (:meth:`MaskTokenizer.load`, the format of the
shipped ``rau/assets/masktok``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rau.errors import RauInputError
from rau.tokens.loc import crop_to_box, mask_loc_tokens

if TYPE_CHECKING:
    import torch

    from rau.tokens.masktok import MaskTokenizer
    from rau.tokens.vqvae import MaskTokConfig, VQOutput


@dataclass
class CropSet:
    """crops: (N, S, S) float16 coverage crops; sources: per root, how many masks it gave."""

    crops: torch.Tensor
    sources: dict[str, int] = field(default_factory=dict)


def collect_crops(roots: Sequence[str | Path], *, size: int = 64, bins: int = 1024, progress: bool = True) -> CropSet:
    """Every non-empty mask of every image of each dataset folder, cropped to its (loc-quantised)
    box and resampled to size x size. Order: roots as given, images in dataset order, structures
    sorted by name (deterministic)."""
    import torch
    from tqdm.auto import tqdm

    from rau.data.dataset import load_dataset

    crops: list[np.ndarray] = []
    sources: dict[str, int] = {}
    for root in roots:
        ds = load_dataset(root, arg="--data")
        before = len(crops)
        for entry in tqdm(ds.entries, desc=f"masks {Path(root).name}", disable=not progress, leave=False):
            ann = ds.load(entry)
            for name in sorted(ann.masks):
                mask = ann.masks[name]
                if mask.any():
                    _, box = mask_loc_tokens(mask, bins)
                    crops.append(crop_to_box(mask, box, size))
        sources[str(root)] = len(crops) - before
    if not crops:
        raise RauInputError(f"--data: {', '.join(map(str, roots))} hold no non-empty masks")
    return CropSet(torch.from_numpy(np.stack(crops)).to(torch.float16), sources)


def augment(x: torch.Tensor, generator: torch.Generator, jitter: float = 0.05, flip: bool = True) -> torch.Tensor:
    """Seeded augmentation of (B, 1, S, S) CPU crops: half of them see their box jittered (each edge
    moved by up to ``jitter`` of the box side), and each is flipped left-right with p = 0.5 (so
    left and right structures share shapes)."""
    import torch
    import torch.nn.functional as F

    b = x.shape[0]
    d = (torch.rand(b, 4, generator=generator) * 2 - 1) * jitter
    d = d * (torch.rand(b, 1, generator=generator) < 0.5)
    sign = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0) if flip else torch.ones(b)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = (1 + d[:, 1] - d[:, 0]) * sign
    theta[:, 0, 2] = d[:, 0] + d[:, 1]
    theta[:, 1, 1] = 1 + d[:, 3] - d[:, 2]
    theta[:, 1, 2] = d[:, 2] + d[:, 3]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def vq_loss(out: VQOutput, target: torch.Tensor, cfg: MaskTokConfig) -> torch.Tensor:
    """BCE(logits, target) + dice_weight x soft Dice + beta x commitment; target (B, 1, S, S) in [0, 1]."""
    import torch
    import torch.nn.functional as F

    logits = out.logits.float()  # bf16 under the engine's CUDA autocast
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    soft_dice = 1 - (2 * (prob * t).sum(1) + 1) / (prob.sum(1) + t.sum(1) + 1)
    return bce + cfg.dice_weight * soft_dice.mean() + cfg.beta * out.commit


def _step_generator(seed: int, step: int) -> torch.Generator:
    # One generator per step, derived from (seed, step): a resumed run draws exactly what an
    # uninterrupted one would, with no RNG state to checkpoint.
    import torch

    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _adam(params, lr: float):
    import torch

    return torch.optim.Adam(params, lr=lr)


@dataclass
class TrainArgs:
    """The hyper-parameters of a run (part of its key: a rerun with others is refused)."""

    steps: int
    batch_size: int
    lr: float
    seed: int
    jitter: float
    flip: bool
    restart_until: float

    def check(self) -> None:
        for name, lo in (("steps", 1), ("batch_size", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise RauInputError(f"{name}: expected an integer >= {lo}, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise RauInputError(f"lr: expected a learning rate in (0, 1), e.g. 2e-3, got {self.lr!r}")
        if not 0 <= self.jitter < 0.5:
            raise RauInputError(f"jitter: expected a box fraction in [0, 0.5), got {self.jitter!r}")


def train_masktok(
    dataset_roots: Sequence[str | Path],
    out_dir: str | Path,
    *,
    steps: int = 1500,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    device: str = "cpu",
    config: MaskTokConfig | None = None,
    save_every: int = 100,
    log_every: int = 50,
    jitter: float = 0.05,
    flip: bool = True,
    restart_until: float = 0.9,
    command: str | None = None,
    progress: bool = True,
    on_step: Callable[[int, dict], None] | None = None,
) -> MaskTokenizer:
    """Train a :class:`~rau.tokens.vqvae.MaskVQVAE` on the masks of ``dataset_roots`` into the run
    folder ``out_dir`` -> the tokenizer loaded from ``out_dir/final``.

    A checkpoint is written every ``save_every`` steps and the loss log every ``log_every`` (both
    also at the end); rerunning the same call resumes from the latest checkpoint (a run with other
    data or settings in ``out_dir`` is refused). Dead codes are re-seeded during the first
    ``restart_until`` fraction of the steps. ``on_step(step, record)`` runs after
    each step (``step`` counts from 1; ``record`` = {step, loss, lr, dice64, perplexity})."""
    import torch

    from rau.eval.masktok import evaluate_crops, hard_dice
    from rau.tokens.masktok import MaskTokenizer
    from rau.tokens.vqvae import MaskTokConfig, MaskVQVAE
    from rau.training.engine import run_training

    config = config or MaskTokConfig()
    args = TrainArgs(steps, batch_size, lr, seed, jitter, flip, restart_until)
    args.check()
    if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 1:
        raise RauInputError(f"save_every: expected an integer >= 1, got {save_every!r}")
    data = collect_crops(dataset_roots, size=config.size, bins=config.bins, progress=progress)
    run_key = {"config": asdict(config) | {"channels": list(config.channels)}, "args": asdict(args),
               "data": {str(Path(k).resolve()): v for k, v in data.sources.items()}}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok = MaskTokenizer(MaskVQVAE(config))

    def step_loss(net, step: int, acc):
        g = _step_generator(seed, step)
        idx = torch.randint(data.crops.shape[0], (batch_size,), generator=g)
        x = augment(data.crops[idx].float()[:, None], g, jitter, flip).to(acc.device)
        out = net(x, generator=g, restart=step < restart_until * steps)
        extras = {"dice64": float(hard_dice(out.logits.detach(), x).mean()), "perplexity": out.perplexity}
        return vq_loss(out, x, config), extras

    def training_info() -> dict[str, Any]:
        history = json.loads((Path(out_dir) / "loss.json").read_text())["history"]
        return {"n_masks": len(data.crops), "steps": steps, "parameters": sum(p.numel() for p in tok.net.parameters()),
                "torch": torch.__version__, "final_metrics": evaluate_crops(tok, data.crops[:4096].float().numpy()),
                "final_metrics_on": "the first 4096 training masks, 64 x 64, no augmentation",
                "loss_curve": loss_curve(history)}

    final = run_training(tok, out_dir, run_key, step_loss, steps=steps, lr=lr, warmup=max(1, min(100, steps // 20)),
                         min_lr_ratio=0.05, optimizer=_adam, clip_grad=None, save_every=save_every, log_every=log_every,
                         device=device,                          command=command, progress=progress, desc="masktok", on_step=on_step,
                         loss_label="loss (BCE + soft Dice + commitment)", extra_training=training_info)
    return MaskTokenizer.load(final)


def loss_curve(history: list[dict[str, float]], every: int = 50) -> list[dict[str, float]]:
    """Means of loss, dice64 and perplexity over each full window of ``every`` steps of a loss log."""
    curve = []
    for end in range(every, len(history) + 1, every):
        window = history[end - every : end]
        mean = {k: float(np.mean([h[k] for h in window], dtype=np.float64)) for k in ("loss", "dice64", "perplexity")}
        curve.append({"step": window[-1]["step"], "loss": round(mean["loss"], 5), "dice64": round(mean["dice64"], 5),
                      "perplexity": round(mean["perplexity"], 1)})
    return curve
