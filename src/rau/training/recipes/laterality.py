"""Train the laterality model (:mod:`rau.models.laterality`) on :func:`rau.training.engine.run_training`.

Data: images in their usual orientation only; the model's score is odd under mirroring, so the
mirrored class comes for free and the loss is ``softplus(-score)`` of augmented images (the
logistic loss of "usual" against "mirrored"). Default images (:func:`laterality_sources`): Wingspan
0..119, DRR training poses, ARCADE train; never a calibration or bench target (Wingspan 120..199,
the DRR calibration/test poses, ARCADE val). Augmentation: rotation, isotropic scale, shift, gamma.
Step ``s`` draws its batch and augmentation from ``(seed, s)`` alone, so a resumed run ends with
the weights of an uninterrupted one. AdamW, cosine decay to 0.1 x lr.

After training, the score's temperature (P(usual) = sigmoid(score / T)) is fitted by log-likelihood
on images the model never trained on and that are never bench targets (:func:`laterality_heldout_sources`:
ARCADE train 600.., Wingspan 120..159), each image with its mirror image as the other class
(:func:`fit_temperature`): a CNN trained to 100% on separable data reads its scores as far surer
than they are, and the "mirrored" rule reads P(same way round) (docs/HISTORY.md, 2026-12-06 s22).

CPU-sized (about 2 minutes on 2 cores): ``rau train laterality --output-dir runs/laterality``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rau.errors import RauInputError
from rau.models.laterality.configuration import LateralityConfig
from rau.atomic import write_json
from rau.models.laterality.modeling import LateralityModel, batched_scores, odd_score
from rau.models.unet.modeling import CONFIG, TRAINING, model_folder
from rau.training.engine import run_training
from rau.training.recipes.thumbnails import AUGMENTATION, augment, load_thumbnails, step_generator

def laterality_sources(data: str | Path, drr_dir: str | Path) -> list[tuple[Path, slice | None, int]]:
    """The default training images as (dataset folder, id slice, at most n evenly spaced)."""
    data, drr_dir = Path(data), Path(drr_dir)
    return [(data / "wingspan_cxr", slice(0, 120), 120), (drr_dir / "train", None, 300),
            (data / "arcade_syntax" / "train", None, 600)]


def laterality_heldout_sources(data: str | Path) -> list[tuple[Path, slice | None, int]]:
    """Images for the temperature: the ARCADE train images :func:`laterality_sources` leaves out
    (its 600 are the first 600) and Wingspan 120..159 (calibration targets, never bench ones)."""
    data = Path(data)
    return [(data / "arcade_syntax" / "train", slice(600, None), 400), (data / "wingspan_cxr", slice(120, 160), 40)]


#: The smallest temperature :func:`fit_temperature` returns: the trained reading ``tanh(score)``. It
#: only ever softens that reading; where no held-out image is read the wrong way round the
#: likelihood has no finite optimum (it falls as T -> 0) and the trained reading stays.
MIN_TEMPERATURE = 0.5


def fit_temperature(scores: np.ndarray) -> float:
    """T >= :data:`MIN_TEMPERATURE` minimising the logistic loss of ``scores / T`` of usual-orientation
    images, each with its mirror image (score ``-s``, label "mirrored"; the same loss, since the
    score is odd): the maximum-likelihood temperature, searched on log T in [MIN_TEMPERATURE, 1e3]."""
    from scipy.optimize import minimize_scalar

    s = np.asarray(scores, np.float64)
    if s.size < 2 or not np.isfinite(s).all():
        raise RauInputError(f"laterality temperature: need at least 2 finite scores, got {s.size}")
    if (s > 0).all():  # the loss falls all the way to T -> 0
        return MIN_TEMPERATURE
    res = minimize_scalar(lambda log_t: float(np.logaddexp(0.0, -s / np.exp(log_t)).mean()),
                          bounds=(np.log(MIN_TEMPERATURE), np.log(1e3)), method="bounded", options={"xatol": 1e-6})
    return max(MIN_TEMPERATURE, float(np.exp(res.x)))


def calibrate_laterality(folder: str | Path, heldout: Sequence[tuple[Path, slice | None, int]],
                         progress: bool = True) -> float:
    """Fit the temperature of the model folder ``folder`` on the ``heldout`` images and write it
    into its ``config.json`` (atomically; the weights do not change), with a ``temperature``
    record in ``training.json``. Returns T."""
    from scipy.special import expit

    model = LateralityModel.from_pretrained(folder, what="laterality model")
    images, ids = load_thumbnails(heldout, model.config.image_size, "laterality temperature", progress)
    model.net.eval()
    s = batched_scores(model.net, images, model.device)
    t = fit_temperature(s)
    model.config.temperature = t
    p_wrong = expit(-s / t)  # P(mirrored) of each usual-orientation image
    record = {"value": t, "n_images": len(ids), "ids_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16],
              "sources": [[str(r), None if sl is None else [sl.start, sl.stop], n] for r, sl, n in heldout],
              "read_mirrored": int((s < 0).sum()), "min_score": float(s.min()),
              "nll": float(np.logaddexp(0.0, -s / t).mean()), "mean_p_mirrored": float(p_wrong.mean())}
    folder = model_folder(folder)  # the weights stay as they are: only the two JSON files change
    write_json(folder / CONFIG, model.config.to_dict(), indent=1)
    write_json(folder / TRAINING, {**(model.training or {}), "temperature": record}, indent=1)
    return t


def train_laterality(sources: Sequence[tuple[Path, slice | None, int]], out_dir: str | Path, *,
                     steps: int = 600, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                     config: LateralityConfig | None = None, device: str = "cpu", threads: int = 2,
                     checkpoint_every: int = 100, progress: bool = True, command: str | None = None,
                     on_step: Callable[[int, dict], None] | None = None, stop_after: int | None = None,
                     heldout: Sequence[tuple[Path, slice | None, int]] | None = None) -> Path:
    """Train into the run folder ``out_dir`` (resuming its latest checkpoint) -> ``out_dir/final``;
    ``stop_after``: end after that many steps with a checkpoint and no ``final/`` (as a kill would).
    ``heldout``: images to fit the temperature on (:func:`calibrate_laterality`), after training."""
    import torch

    if steps < 1 or batch_size < 1 or lr <= 0 or checkpoint_every < 1:
        raise RauInputError(f"steps, batch_size, checkpoint_every must be >= 1 and lr > 0, "
                            f"got {steps}, {batch_size}, {checkpoint_every}, {lr}")
    cfg = config or LateralityConfig(seed=seed)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        images, ids = load_thumbnails(sources, cfg.image_size, "laterality", progress)
        model = LateralityModel(cfg)
        digest = hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]
        run_key = {"data": {"sources": [[str(r), None if s is None else [s.start, s.stop], n] for r, s, n in sources],
                            "n_images": len(ids), "ids_sha256": digest},
                   # the temperature is fitted after training: not part of what the steps compute
                   "config": {k: v for k, v in cfg.to_dict().items() if k != "temperature"},
                   "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                   "augmentation": AUGMENTATION}

        def step_loss(net, step, acc):
            gen = step_generator(seed, step)
            idx = torch.randint(0, len(images), (batch_size,), generator=gen)
            x = augment(images[idx], gen).to(acc.device)
            return torch.nn.functional.softplus(-odd_score(net, x).float()).mean()

        def extra_training() -> dict[str, Any]:
            model.net.eval()
            s = batched_scores(model.net, images, model.device)
            return {"recipe": "laterality", "optimizer": "AdamW", "lr_schedule": "cosine to 0.1 x lr",
                    "loss": "softplus(-score) of augmented usual-orientation images", "torch": torch.__version__,
                    "metrics": {"train_accuracy_no_aug": float((s > 0).mean())}}

        final = run_training(model, out_dir, run_key, step_loss, steps=steps, lr=lr, warmup=0, min_lr_ratio=0.1,
                            schedule="cosine", save_every=checkpoint_every, device=device, command=command,
                            progress=progress, desc="train laterality", loss_label="logistic",
                            on_step=on_step, extra_training=extra_training, stop_after=stop_after)
        if heldout is not None and Path(final).name == "final":
            calibrate_laterality(final, heldout, progress)
        return final
    finally:
        torch.set_num_threads(before)
