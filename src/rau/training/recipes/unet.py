"""Train (or fine-tune) the U-Net baseline on dataset folders, on :func:`rau.training.engine.run_training`.

Loss: Dice + BCE per (image, structure), averaged over the pairs whose structure is annotated in
that image's dataset (a dataset that never annotates a structure, e.g. clavicles on Wingspan,
contributes no loss for it; a structure missing from one image of a dataset that annotates it
elsewhere counts as absent = empty mask). Adam, cosine decay to 0.1 x lr, no warm-up, no gradient
clipping. Step ``s`` draws its batch indices and augmentation from ``default_rng([seed, s])``
alone, so a run resumed after a kill ends with the weights of an uninterrupted one.

Output (the engine's run folder)::

    config.json           the run: data, UNetConfig, hyper-parameters, command
    loss.json, loss.png   per-step loss and lr
    checkpoint-<step>/    every ``checkpoint_every`` steps (the last 2 kept)
    final/                the trained model (UNetModel.from_pretrained) + training.json

CPU-sized example (``rau train unet`` exposes the same options)::

    train_unet("runs/drr/train", "runs/unet/drr", steps=1500, threads=1,
               config=UNetConfig(["right_lung", "left_lung", "heart"], image_size=128))
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rau.errors import RauInputError
from rau.models.unet.configuration import UNetConfig
from rau.models.unet.modeling import UNetModel, read_config, resize, to_input
from rau.training.checkpoints import checkpoints, model_folder
from rau.training.engine import run_training

#: Augmentation ranges (recorded in the run). Geometry as in CheXanatomy: random isotropic scale
#: 0.7-1.3 and shifts; plus a small rotation. The SAME affine warps image and masks.
AUGMENTATION: dict[str, Any] = {
    "scale": [0.7, 1.3],
    "shift_fraction": 0.1,        # uniform in +-10 % of the image side, per axis
    "rotate_deg": 10.0,           # uniform in +-10 degrees
    "gamma": [0.7, 1.5],          # log-uniform
    "contrast": [0.8, 1.2],
    "brightness": 0.1,            # additive, uniform in +-0.1
    "blur_p": 0.3, "blur_sigma_px": [0.3, 1.2],
    "noise_std": [0.0, 0.03],
    "padding": "zeros",
}

# ----------------------------------------------------------------------------- image selection


def few_shot_ids(ids: Sequence[str], k: int, seed: int) -> list[str]:
    """k ids drawn with ``seed`` (a seeded permutation's first k, so smaller k are nested in larger k)."""
    if not isinstance(k, int) or not 1 <= k <= len(ids):
        raise RauInputError(f"--few-shot: must be between 1 and {len(ids)} (the images in range), got {k!r}")
    perm = np.random.default_rng(seed).permutation(len(ids))
    return sorted(ids[i] for i in perm[:k])


def select_ids(ids: Sequence[str], id_range: str | None) -> list[str]:
    """Slice the (natural-)sorted id list with "A:B" (python slice semantics)."""
    if id_range is None:
        return list(ids)
    try:
        a, b = (int(v) if v.strip() else None for v in id_range.split(":"))
    except ValueError:
        raise RauInputError(f"--id-range: expected START:END (e.g. 0:160), got {id_range!r}") from None
    chosen = list(ids)[a:b]
    if not chosen:
        raise RauInputError(f"--id-range: {id_range} selects no image of {len(ids)}")
    return chosen


def pick_ids(roots: Sequence[str | Path], id_range: str | None = None, few_shot: int | None = None,
             few_shot_seed: int = 0) -> list[str] | None:
    """Ids of ``roots[0]`` in ``id_range``, then ``few_shot`` of them drawn with ``few_shot_seed``;
    None (all images) when neither is given. The ``--id-range/--few-shot`` options of the CLI."""
    if id_range is None and few_shot is None:
        return None
    if len(roots) != 1:
        raise RauInputError("--id-range/--few-shot: select ids in exactly one --data folder")
    from rau.data.dataset import load_dataset

    ids = select_ids([e.id for e in load_dataset(roots[0], arg="--data").entries], id_range)
    return few_shot_ids(ids, few_shot, few_shot_seed) if few_shot is not None else ids


# ----------------------------------------------------------------------------- training data


@dataclass
class TrainData:
    """Training tensors at network size. images (N, 1, S, S) float32; masks (N, K, S, S) uint8;
    labelled (N, K) float32 (1 where the image's dataset annotates the structure)."""

    images: Any
    masks: Any
    labelled: Any
    ids: list[str] = field(default_factory=list)
    roots: list[str] = field(default_factory=list)


def load_train_data(roots: Sequence[str | Path], config: UNetConfig, train_ids: Sequence[str] | None = None,
                    *, progress: bool = True) -> TrainData:
    """Read, preprocess and resize the training images + masks of ``roots`` (restricted to ``train_ids``)."""
    import torch
    from tqdm.auto import tqdm

    from rau.data.dataset import load_dataset

    datasets = [load_dataset(r, arg="--data") for r in roots]
    wanted = None if train_ids is None else set(train_ids)
    if wanted is not None:
        missing = sorted(wanted - {e.id for ds in datasets for e in ds.entries})
        if missing:
            raise RauInputError(f"train_ids: {len(missing)} id(s) not in the training data, e.g. {missing[:3]}; "
                                f"use ids of the --data folders' images/")
    images, masks, labelled, ids = [], [], [], []
    size = (config.image_size, config.image_size)
    for ds in datasets:
        annotated = [s in ds.structures for s in config.structures]
        entries = [e for e in ds.entries if wanted is None or e.id in wanted]
        for e in tqdm(entries, desc=f"loading {ds.root.name}", disable=not progress):
            ann = ds.load(e, structures=config.structures)
            images.append(to_input(ann.image, config)[0])
            m = np.stack([ann.masks.get(s, np.zeros(ann.image.shape, bool)) for s in config.structures])
            masks.append(resize(torch.from_numpy(m.astype(np.float32))[None], size, binary=True)[0].to(torch.uint8))
            labelled.append(annotated)
            ids.append(e.id)
    if not images:
        raise RauInputError("train_ids: no training image left; check --data and the id selection")
    if not any(any(row) for row in labelled):
        raise RauInputError(f"structures: none of {config.structures} is annotated in {list(map(str, roots))}")
    return TrainData(torch.stack(images), torch.stack(masks), torch.tensor(labelled, dtype=torch.float32),
                     ids, [str(Path(r).resolve()) for r in roots])


# ----------------------------------------------------------------------------- augmentation + loss


def augment_batch(x, y, rng: np.random.Generator, params: dict[str, Any] = AUGMENTATION):
    """Random affine (same for image and masks) + intensity changes (image only).

    x: (B, 1, S, S) float in [0, 1]; y: (B, K, S, S) float {0, 1}. Returns new tensors."""
    import torch
    import torch.nn.functional as F

    b = x.shape[0]
    scale = rng.uniform(*params["scale"], size=b)
    angle = np.deg2rad(rng.uniform(-params["rotate_deg"], params["rotate_deg"], size=b))
    shift = rng.uniform(-params["shift_fraction"], params["shift_fraction"], size=(b, 2)) * 2.0  # normalised coords
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    theta = np.stack([np.stack([cos, -sin, shift[:, 0]], 1), np.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(torch.tensor(theta, dtype=torch.float32), list(x.shape), align_corners=False)
    warped = F.grid_sample(torch.cat([x, y], 1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x, y = warped[:, :1], (warped[:, 1:] > 0.5).float()

    gamma = np.exp(rng.uniform(*np.log(params["gamma"]), size=b))
    contrast = rng.uniform(*params["contrast"], size=b)
    bright = rng.uniform(-params["brightness"], params["brightness"], size=b)
    blur = rng.uniform(size=b) < params["blur_p"]
    sigma = rng.uniform(*params["blur_sigma_px"], size=b)
    noise = rng.uniform(*params["noise_std"], size=b)
    eps = rng.standard_normal(size=x.shape).astype(np.float32)

    def col(a):
        return torch.tensor(a, dtype=torch.float32).view(b, 1, 1, 1)

    x = x.clamp(0.0, 1.0) ** col(gamma)
    x = (x - 0.5) * col(contrast) + 0.5 + col(bright)
    x = torch.stack([gaussian_blur(x[i], sigma[i]) if blur[i] else x[i] for i in range(b)])
    x = x + col(noise) * torch.from_numpy(eps)
    return x.clamp(0.0, 1.0), y


def gaussian_blur(img, sigma: float):
    """(C, S, S) -> (C, S, S) separable Gaussian blur (reflect padding), ``sigma`` in pixels."""
    import torch
    import torch.nn.functional as F

    r = max(1, int(math.ceil(3 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    k = (k / k.sum()).to(img.dtype)
    t = F.pad(img[None], (r, r, r, r), mode="reflect")
    t = F.conv2d(t, k.view(1, 1, 1, -1).repeat(img.shape[0], 1, 1, 1), groups=img.shape[0])
    t = F.conv2d(t, k.view(1, 1, -1, 1).repeat(img.shape[0], 1, 1, 1), groups=img.shape[0])
    return t[0]


def dice_bce_loss(logits, target, labelled):
    """Soft Dice (smooth 1) + BCE per (image, structure), averaged over labelled pairs.

    logits, target: (B, K, S, S); labelled: (B, K) in {0, 1}."""
    import torch
    import torch.nn.functional as F

    prob = torch.sigmoid(logits)
    inter = (prob * target).sum((2, 3))
    denom = prob.sum((2, 3)) + target.sum((2, 3))
    dice_loss = 1.0 - (2.0 * inter + 1.0) / (denom + 1.0)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((2, 3))
    return ((dice_loss + bce) * labelled).sum() / labelled.sum().clamp_min(1.0)


def make_batch(data: TrainData, seed: int, step: int, batch_size: int, augment: bool, rank: int = 0,
               n_proc: int = 1):
    """(images, masks, labelled) of step ``step`` (process ``rank``), drawn from (seed, step) alone."""
    import torch

    rng = np.random.default_rng([seed, step] if n_proc == 1 else [seed, step, rank, n_proc])
    n = data.images.shape[0]
    idx = torch.from_numpy(rng.choice(n, size=batch_size, replace=n < batch_size))
    x, y, w = data.images[idx], data.masks[idx].float(), data.labelled[idx]
    if augment:
        x, y = augment_batch(x, y, rng)
    return x, y, w


# ----------------------------------------------------------------------------- training


def adam(params, lr: float):
    """The U-Net's optimizer: plain Adam (no weight decay)."""
    import torch

    return torch.optim.Adam(params, lr=lr)


def _validate(train_roots, steps, batch_size, lr, threads, checkpoint_every) -> list[Path]:
    roots = [Path(train_roots)] if isinstance(train_roots, (str, Path)) else [Path(r) for r in train_roots]
    if not roots:
        raise RauInputError("train_roots: give at least one dataset folder")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("threads", threads),
                        ("checkpoint_every", checkpoint_every)):
        if not isinstance(value, int) or value < 1:
            raise RauInputError(f"{name}: must be a positive int, got {value!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise RauInputError(f"lr: must be a positive number, got {lr!r}")
    return roots


def _resolve_config(structures, config: UNetConfig | None, init_from: Path | None, seed: int) -> UNetConfig:
    if init_from is not None:
        base = read_config(init_from, what="init_from")
        if structures is not None and list(structures) != base.structures:
            raise RauInputError(f"structures: fine-tuning keeps the checkpoint's structures {base.structures}; "
                                f"omit structures or pass exactly those")
        return base
    if config is not None:
        if structures is not None and list(structures) != config.structures:
            raise RauInputError("structures: differs from config.structures; pass only one of them")
        return config
    if structures is None:
        raise RauInputError("structures: required when training from scratch (e.g. right_lung,left_lung,heart)")
    return UNetConfig(structures=list(structures), seed=seed)


def _data_record(data: TrainData, cfg: UNetConfig) -> dict[str, Any]:
    """The training data as it enters the run key (ids listed up to 200, else their digest)."""
    ids: Any = data.ids
    if len(ids) > 200:
        ids = f"{len(ids)} ids, sha256 {hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]}"
    return {"roots": data.roots, "n_images": len(data.ids), "ids": ids,
            "labelled_structures": {s: int(data.labelled[:, i].sum()) for i, s in enumerate(cfg.structures)}}


def train_unet(train_roots: str | Path | Sequence[str | Path], out_dir: str | Path, *,
               structures: Sequence[str] | None = None, steps: int = 2000, batch_size: int = 8,
               lr: float = 1e-3, seed: int = 0, init_from: str | Path | None = None,
               train_ids: Sequence[str] | None = None, augment: bool = True, resume: bool = True,
               device: str = "cpu", threads: int = 1, config: UNetConfig | None = None,
               checkpoint_every: int = 100, progress: bool = True, command: str | None = None,
               on_step: Callable[[int, dict], None] | None = None) -> Path:
    """Train (or fine-tune, ``init_from``) a U-Net into the run folder ``out_dir`` -> ``out_dir/final``.

    Args:
        train_roots: dataset folder(s) (folder or COCO layout); structures absent from a whole
            dataset are not trained on its images (masked out of the loss).
        structures: output channels when training from scratch (else from ``config``/``init_from``).
        init_from: a U-Net model folder or run folder to fine-tune (its config is kept).
        train_ids: only these image ids (e.g. :func:`pick_ids`); every id must exist.
        resume: continue from the latest checkpoint of the SAME run in ``out_dir`` (RauInputError
            if it holds another run); False deletes its checkpoints and starts over.
        device: "cpu" (default), "cuda" or "auto"; threads: torch CPU threads during training.
        on_step: called as ``on_step(step_done, {"step", "loss", "lr"})`` after each step.
    """
    import torch

    roots = _validate(train_roots, steps, batch_size, lr, threads, checkpoint_every)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train(roots, Path(out_dir), structures, steps, batch_size, lr, seed, init_from, train_ids, augment,
                      resume, device, config, checkpoint_every, progress, command, on_step)
    finally:
        torch.set_num_threads(before)


def _train(roots, out: Path, structures, steps, batch_size, lr, seed, init_from, train_ids, augment, resume,
           device, config, checkpoint_every, progress, command, on_step) -> Path:
    init = model_folder(init_from) if init_from is not None else None
    cfg = _resolve_config(structures, config, init, seed)
    data = load_train_data(roots, cfg, train_ids, progress=progress)
    model = UNetModel.from_pretrained(init, what="init_from") if init is not None else UNetModel(cfg)
    run_key = {"data": _data_record(data, cfg), "config": cfg.to_dict(), "steps": steps, "batch_size": batch_size,
               "lr": lr, "seed": seed, "augment": augment, "init_from": str(init.resolve()) if init else None,
               "augmentation": AUGMENTATION}
    if not resume:
        for _, old in checkpoints(out):
            shutil.rmtree(old)

    def step_loss(net, step, acc):
        x, y, w = make_batch(data, seed, step, batch_size, augment, acc.process_index, acc.num_processes)
        return dice_bce_loss(net(x.to(acc.device)).float(), y.to(acc.device), w.to(acc.device))

    def extra_training() -> dict[str, Any]:
        import monai
        import torch

        history = json.loads((out / "loss.json").read_text())["history"]
        losses = [h["loss"] for h in history]
        model.net.eval()  # batch-norm statistics must not move while measuring
        return {"lr_schedule": "cosine to 0.1 x lr", "optimizer": "Adam",
                "loss": "soft Dice (smooth 1) + BCE, mean over labelled (image, structure) pairs",
                "torch": torch.__version__, "monai": monai.__version__,
                "metrics": {"final_loss_mean_last_50": float(np.mean(losses[-50:])),
                            "train_dice_no_aug": train_dice(model.net, data, cfg)}}

    return run_training(model, out, run_key, step_loss, steps=steps, lr=lr, warmup=0, min_lr_ratio=0.1,
                        schedule="cosine", optimizer=adam, clip_grad=None, save_every=checkpoint_every,
                        device=device, command=command, progress=progress, desc=f"train {out.name}",
                        loss_label="Dice + BCE", on_step=on_step, extra_training=extra_training)


def train_dice(net, data: TrainData, cfg: UNetConfig, limit: int = 20) -> dict[str, float]:
    """Dice at network size on up to ``limit`` training images without augmentation (a fit check)."""
    import torch

    from rau.metrics import dice

    idx = np.linspace(0, len(data.ids) - 1, min(limit, len(data.ids))).round().astype(int)
    device = next(net.parameters()).device
    with torch.inference_mode():
        pred = (torch.sigmoid(net(data.images[idx].to(device)).float()) > cfg.threshold).cpu()
    out = {}
    for i, s in enumerate(cfg.structures):
        rows = [dice(pred[j, i].numpy(), data.masks[k, i].numpy() > 0)
                for j, k in enumerate(idx) if data.labelled[k, i] > 0]
        if rows:
            out[s] = round(float(np.mean(rows)), 4)
    return out
