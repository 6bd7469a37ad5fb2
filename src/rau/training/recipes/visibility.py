"""Train the visibility model (:mod:`rau.models.visibility`) on :func:`rau.training.engine.run_training`.

Default images (:func:`visibility_sources`): all of ARCADE train (1000 angiograms, 25 segment names).
The references of every ARCADE split come from there; no bench target and no ``calib-arcade-val``
target does (ARCADE val). The ``calib-arcade`` split (ARCADE train 600..999), which three older
calibrations were fitted on, is inside it: a calibration fitted there would read the model's
training images, so it must not add this feature (none does; ``rau calibrate`` with
``calib-arcade`` would).

A structure name is learnt where at least :data:`MIN_POSITIVES` training images show it (ARCADE's
"10a" is in one image of 1000); the others get no output. Multi-label binary cross-entropy, the
laterality recipe's augmentation (rotation, scale, shift, gamma) without flips: a mirrored view is
not one the data has. Step ``s`` draws from ``(seed, s)`` alone, so a resumed run ends with the
weights of an uninterrupted one. AdamW, cosine decay to 0.1 x lr.

CPU-sized (about 25 minutes on 2 cores): ``rau train visibility --output-dir runs/visibility``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rau.errors import RauInputError
from rau.models.thumbnail import batched_logits
from rau.models.visibility.configuration import VisibilityConfig
from rau.models.visibility.modeling import VisibilityModel
from rau.training.engine import run_training
from rau.training.recipes.thumbnails import AUGMENTATION, augment, read_thumbnails, step_generator

#: Fewest training images that must show a structure for the model to learn it.
MIN_POSITIVES = 5


def visibility_sources(data: str | Path, drr_dir: str | Path | None = None) -> list[tuple[Path, slice | None, int]]:
    """The default training images: (dataset folder, id slice, at most n evenly spaced)."""
    return [(Path(data) / "arcade_syntax" / "train", None, 1000)]


def learnable_structures(shown: Sequence[Sequence[str]], min_positives: int = MIN_POSITIVES) -> list[str]:
    """Names shown in at least ``min_positives`` images and missing from at least one (else nothing
    to learn), sorted naturally ("9", "9a", "10")."""
    import re

    counts: dict[str, int] = {}
    for names in shown:
        for n in set(names):
            counts[n] = counts.get(n, 0) + 1
    keep = [n for n, c in counts.items() if min_positives <= c < len(shown)]
    return sorted(keep, key=lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)])


def train_visibility(sources: Sequence[tuple[Path, slice | None, int]], out_dir: str | Path, *, steps: int = 1500,
                     batch_size: int = 64, lr: float = 1e-3, seed: int = 0, config: VisibilityConfig | None = None,
                     device: str = "cpu", threads: int = 2, checkpoint_every: int = 100, progress: bool = True,
                     command: str | None = None, on_step: Callable[[int, dict], None] | None = None,
                     stop_after: int | None = None) -> Path:
    """Train into the run folder ``out_dir`` (resuming its latest checkpoint) -> ``out_dir/final``;
    ``config``: its ``structures`` where given, else :func:`learnable_structures` of the images;
    ``stop_after``: end after that many steps with a checkpoint and no ``final/`` (as a kill would)."""
    import torch

    if steps < 1 or batch_size < 1 or lr <= 0 or checkpoint_every < 1:
        raise RauInputError(f"steps, batch_size, checkpoint_every must be >= 1 and lr > 0, "
                            f"got {steps}, {batch_size}, {checkpoint_every}, {lr}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        images, ids, shown = read_thumbnails(sources, config.image_size if config else VisibilityConfig.image_size,
                                             "visibility", progress)
        if config is None:
            names = learnable_structures(shown)
            if not names:
                raise RauInputError(f"visibility: no structure is shown in at least {MIN_POSITIVES} and missing "
                                    f"from at least one of the {len(ids)} training images")
        cfg = config or VisibilityConfig(seed=seed, structures=names)
        labels = torch.tensor([[n in set(s) for n in cfg.structures] for s in shown], dtype=torch.float32)
        model = VisibilityModel(cfg)
        digest = hashlib.sha256(json.dumps([ids, shown]).encode()).hexdigest()[:16]
        run_key = {"data": {"sources": [[str(r), [sl.start, sl.stop] if sl else None, n] for r, sl, n in sources],
                            "n_images": len(ids), "positives": dict(zip(cfg.structures, labels.sum(0).int().tolist())),
                            "ids_sha256": digest},
                   "config": cfg.to_dict(), "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                   "augmentation": {**AUGMENTATION, "flip": 0.0}}

        def step_loss(net, step, acc):
            gen = step_generator(seed, step)
            idx = torch.randint(0, len(ids), (batch_size,), generator=gen)
            x = augment(images[idx], gen).to(acc.device)
            return torch.nn.functional.binary_cross_entropy_with_logits(net(x).float(), labels[idx].to(acc.device))

        def extra_training() -> dict[str, Any]:
            from rau.metrics import auroc

            model.net.eval()
            p = torch.sigmoid(batched_logits(model.net, images, model.device)).numpy()
            y = labels.numpy().astype(bool)
            per = {n: auroc(p[:, j], y[:, j]) for j, n in enumerate(cfg.structures)}
            return {"recipe": "visibility", "optimizer": "AdamW", "lr_schedule": "cosine to 0.1 x lr",
                    "loss": "binary cross-entropy, one output per structure", "torch": torch.__version__,
                    "metrics": {"train_auroc_no_aug": per, "train_auroc_mean": float(np.nanmean(list(per.values())))}}

        return run_training(model, out_dir, run_key, step_loss, steps=steps, lr=lr, warmup=0, min_lr_ratio=0.1,
                            schedule="cosine", save_every=checkpoint_every, device=device, command=command,
                            progress=progress, desc="train visibility", loss_label="binary cross-entropy",
                            on_step=on_step, extra_training=extra_training, stop_after=stop_after)
    finally:
        torch.set_num_threads(before)
