"""What the thumbnail-CNN recipes share (:mod:`rau.training.recipes.laterality`,
:mod:`rau.training.recipes.imagekind`, :mod:`rau.training.recipes.visibility`): reading dataset images as
thumbnails, each step's seeded generator, and a seeded geometric + gamma augmentation of a batch."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rau.errors import RauInputError
from rau.models.thumbnail import to_thumbnail

#: Augmentation ranges (recorded in the runs).
AUGMENTATION: dict[str, Any] = {"rotate_deg": 10.0, "scale": [0.85, 1.15], "shift_fraction": 0.08,
                                "gamma": [0.7, 1.42], "padding": "border"}


def read_thumbnails(sources: Sequence[tuple[Path, slice | None, int]], size: int, what: str, progress: bool = True):
    """Sources as (dataset folder, id slice, at most n evenly spaced) -> ((N, 1, size, size) float32
    tensor, ids "folder/id", per image the sorted structure names it annotates); at least 4 images."""
    import torch
    from tqdm.auto import tqdm

    from rau.data.dataset import load_dataset

    images, ids, shown = [], [], []
    for root, sl, n in sources:
        ds = load_dataset(root).slice(sl)
        entries = ds.entries[:: max(1, len(ds.entries) // n)][:n]
        for e in tqdm(entries, desc=f"read {Path(root).name}", disable=not progress, leave=False):
            images.append(to_thumbnail(ds.load(e, []).image, size, what)[0])
            ids.append(f"{Path(root).name}/{e.id}")
            shown.append(e.structures)
    if len(images) < 4:
        raise RauInputError(f"{what}: {len(images)} training images, need at least 4")
    return torch.stack(images), ids, shown


def load_thumbnails(sources: Sequence[tuple[Path, slice | None, int]], size: int, what: str, progress: bool = True):
    """:func:`read_thumbnails` without the structure names -> (images, ids)."""
    images, ids, _ = read_thumbnails(sources, size, what, progress)
    return images, ids


def step_generator(seed: int, step: int):
    """The torch generator of training step ``step``, drawn from ``(seed, step)`` alone, with torch's global seed
    set the same way (the dropout masks too), so a resumed run draws what an uninterrupted one does."""
    import torch

    step_seed = int(np.random.default_rng([seed, step]).integers(2**62))
    torch.manual_seed(step_seed)
    return torch.Generator().manual_seed(step_seed)


def augment(x, generator, augmentation: dict[str, Any] = AUGMENTATION):
    """Random rotation, scale, shift and gamma of a (B, 1, S, S) batch in [0, 1]."""
    import torch
    import torch.nn.functional as F

    a = augmentation
    b = x.shape[0]

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=generator)

    ang = uniform(-1, 1, b) * math.radians(a["rotate_deg"])
    sc = uniform(*a["scale"], b)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(ang) / sc, -torch.sin(ang) / sc
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(ang) / sc, torch.cos(ang) / sc
    theta[:, :, 2] = uniform(-1, 1, b, 2) * a["shift_fraction"]
    y = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), padding_mode="border",
                      align_corners=False)
    gamma = torch.exp(uniform(*np.log(a["gamma"]), b, 1, 1, 1))
    return y.clamp(1e-4, 1.0) ** gamma
