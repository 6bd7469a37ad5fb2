"""U-Net baseline of CheXanatomy: a MONAI BasicUNet trained on DRRs (and/or real radiographs).

Conventions:

- Input: the target (H, W) float32 in [0, 1] is preprocessed at its own size (global histogram
  equalisation, as LiteMedSAM needs on real CXR, or min-max) and then resized (bilinear, with
  antialiasing, NOT aspect-preserving) to ``image_size`` x ``image_size``. Training images go
  through the very same path, so a non-square target is squashed the same way at train and test.
- Output: one sigmoid channel per structure (multi-label: lungs and heart overlap in projection);
  probabilities are resized back to (H, W) and thresholded at ``threshold``.
- Left/right are the patient's (right lung on the image left for a PA view); no flip augmentation.

Training (:func:`train_unet`): Dice + BCE per (image, structure), averaged over the pairs whose
structure is annotated in that image's dataset (a dataset that never annotates a structure, e.g.
clavicles on Wingspan, contributes no loss for it; a structure missing from one image of a dataset
that annotates it elsewhere counts as absent = empty mask). Adam with cosine decay to 0.1 x lr.
Every step's randomness (batch indices and augmentation) is drawn from ``default_rng([seed, step])``
so a run resumed from a checkpoint repeats the uninterrupted run exactly (CPU).

Command line (reproducible runs)::

    python -m rau.models.unet.modeling train --data runs/drr/train --out runs/unet/drr --structures right_lung,left_lung,heart ...
    python -m rau.models.unet.modeling eval --checkpoint runs/unet/drr --data runs/drr/test --out runs/unet/eval.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rau.atomic import write_bytes as _atomic_write_bytes
from rau.atomic import write_json
from rau.data.annotated import AnnotatedImage
from rau.errors import CheckpointError, RauInputError
from rau.geometry import Box
from rau.methods.interfaces import SegmentationOutput, Segmenter

PREPROCESSING = ("equalize", "minmax")
NORMS = ("instance", "batch")
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAINING = "training.json"
CHECKPOINTS = "checkpoints"

#: Augmentation ranges (recorded in training.json). Geometry as in CheXanatomy: random isotropic
#: scale 0.7-1.3 and shifts; plus a small rotation. The SAME affine warps image and masks.
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


# ----------------------------------------------------------------------------- configuration


@dataclass
class UNetConfig:
    """Network + preprocessing description, saved as config.json next to the weights.

    Args:
        structures: output channel order; one sigmoid channel per structure.
        image_size: square network input side in pixels, a multiple of 16 (BasicUNet pools 4 times).
        channels: BasicUNet ``features``: 5 encoder widths + the last decoder width (6 ints).
        preprocessing: "equalize" (global histogram equalisation) or "minmax".
        norm: "instance" (default: per-image statistics, robust to the DRR -> real domain shift) or "batch".
        threshold: probability threshold for the binary mask.
        seed: seed of the weight initialisation.
    """

    structures: list[str]
    image_size: int = 256
    channels: tuple[int, ...] = (16, 32, 64, 128, 256, 16)
    preprocessing: str = "equalize"
    norm: str = "instance"
    threshold: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.structures, str) or not isinstance(self.structures, Sequence) or not self.structures:
            raise RauInputError(f"structures: expected a non-empty list of names, got {self.structures!r}")
        self.structures = [str(s) for s in self.structures]
        if any(not s.strip() for s in self.structures) or len(set(self.structures)) != len(self.structures):
            raise RauInputError(f"structures: names must be non-empty and unique, got {self.structures}")
        if not isinstance(self.image_size, int) or self.image_size < 16 or self.image_size % 16:
            raise RauInputError(f"image_size: must be a multiple of 16 (>= 16), got {self.image_size!r}")
        ch = tuple(self.channels) if isinstance(self.channels, Sequence) else ()
        if len(ch) != 6 or not all(isinstance(c, int) and c > 0 for c in ch):
            raise RauInputError(f"channels: expected 6 positive ints (5 encoder widths + last decoder width), "
                                f"got {self.channels!r}")
        self.channels = ch
        if self.preprocessing not in PREPROCESSING:
            raise RauInputError(f"preprocessing: must be one of {PREPROCESSING}, got {self.preprocessing!r}")
        if self.norm not in NORMS:
            raise RauInputError(f"norm: must be one of {NORMS}, got {self.norm!r}")
        if not 0.0 < float(self.threshold) < 1.0:
            raise RauInputError(f"threshold: must be in (0, 1), got {self.threshold!r}")
        if not isinstance(self.seed, int):
            raise RauInputError(f"seed: must be an int, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d


def build_network(config: UNetConfig):
    """MONAI BasicUNet: (B, 1, S, S) -> (B, len(structures), S, S) logits. Seeded init."""
    import torch
    from monai.networks.nets import BasicUNet

    norm = ("instance", {"affine": True}) if config.norm == "instance" else ("batch", {})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return BasicUNet(spatial_dims=2, in_channels=1, out_channels=len(config.structures),
                         features=config.channels, norm=norm)


# ----------------------------------------------------------------------------- pre/post-processing


def preprocess(image: np.ndarray, mode: str) -> np.ndarray:
    """(H, W) float in [0, 1] -> (H, W) float32 in [0, 1] at the same size."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise RauInputError(f"target: expected a (H, W) grayscale image, got shape {image.shape}")
    if mode == "equalize":
        from rau.encoders.litemedsam import equalize

        return equalize(image)
    lo, hi = float(image.min()), float(image.max())
    return ((image - lo) / max(hi - lo, 1e-8)).astype(np.float32)


def resize(t, size: tuple[int, int], *, binary: bool = False):
    """(B, C, h, w) float tensor -> (B, C, *size): bilinear with antialiasing; ``binary``: > 0.5."""
    import torch.nn.functional as F

    if tuple(t.shape[-2:]) != tuple(size):
        t = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)
    return (t > 0.5).float() if binary else t


def to_input(image: np.ndarray, config: UNetConfig):
    """(H, W) image -> (1, 1, S, S) float32 tensor: preprocess at native size, then resize."""
    import torch

    img = preprocess(image, config.preprocessing)
    t = torch.from_numpy(np.ascontiguousarray(img))[None, None]
    return resize(t, (config.image_size, config.image_size)).clamp_(0.0, 1.0)


# ----------------------------------------------------------------------------- segmenter


def _write_json(path: Path, obj: Any) -> None:
    write_json(path, obj, indent=1)


def _save_weights(net, path: Path) -> None:
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    _atomic_write_bytes(path, save(state))


def _load_weights(net, path: Path) -> None:
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"checkpoint: {path} is missing; a U-Net checkpoint folder holds {WEIGHTS} + {CONFIG}")
    try:
        net.load_state_dict(load_file(str(path), device="cpu"), strict=True)
    except Exception as exc:  # truncated, foreign or mismatched file: one clear line
        raise CheckpointError(f"checkpoint: cannot load U-Net weights from {path} ({exc.__class__.__name__}); "
                              f"re-train or pass the folder of a complete checkpoint") from None


def _read_config(directory: Path) -> UNetConfig:
    path = directory / CONFIG
    if not directory.is_dir() or not path.is_file():
        raise CheckpointError(f"checkpoint: {directory} is not a U-Net checkpoint folder ({WEIGHTS} + {CONFIG})")
    try:
        return UNetConfig(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, RauInputError) as exc:
        raise CheckpointError(f"checkpoint: {path} is not a valid U-Net config ({exc})") from None


class UNetSegmenter(Segmenter):
    """Box-free, reference-free segmenter: all its structures in ONE forward pass.

    Structures asked for that the model does not know get None; boxes are ignored."""

    name = "unet"
    uses_reference = False
    needs_boxes = False

    def __init__(self, net, config: UNetConfig, *, device: str = "cpu"):
        self.config = config
        self.device = device
        self.net = net.to(device).eval()

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device: str = "cpu") -> UNetSegmenter:
        """Load ``directory``/{config.json, model.safetensors}. Raises CheckpointError (one line)."""
        directory = Path(directory)
        config = _read_config(directory)
        net = build_network(config)
        _load_weights(net, directory / WEIGHTS)
        return cls(net, config, device=device)

    def save_pretrained(self, directory: str | Path, training: dict[str, Any] | None = None) -> Path:
        """Write model.safetensors + config.json (+ training.json when given), each atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _save_weights(self.net, directory / WEIGHTS)
        _write_json(directory / CONFIG, self.config.to_dict())
        if training is not None:
            _write_json(directory / TRAINING, training)
        return directory

    def predict_probs(self, image: np.ndarray, structures: Sequence[str] | None = None) -> np.ndarray:
        """(H, W) image -> (K, H, W) float32 probabilities for ``structures`` (default: all of the
        model's, in config order); only those channels are resized back to (H, W)."""
        import torch

        names = self.config.structures if structures is None else list(structures)
        idx = [self.config.structures.index(n) for n in names]
        x = to_input(image, self.config).to(self.device)
        with torch.inference_mode():
            prob = torch.sigmoid(self.net(x)[:, idx].float())
            prob = resize(prob.cpu(), tuple(image.shape[:2])).clamp_(0.0, 1.0)
        return prob[0].numpy()

    def segment(self, target: np.ndarray, boxes_xyxy_px: dict[str, Box | None],
                reference: AnnotatedImage | None = None) -> dict[str, SegmentationOutput | None]:
        """Segment the structures named in ``boxes_xyxy_px`` (boxes unused) -> masks at target size.

        score: mean probability inside the predicted mask (0.0 when the mask is empty)."""
        out: dict[str, SegmentationOutput | None] = {n: None for n in boxes_xyxy_px}
        known = [n for n in boxes_xyxy_px if n in self.config.structures]
        if not known:
            return out
        probs = self.predict_probs(target, known)
        for name, p in zip(known, probs):
            mask = p > self.config.threshold
            out[name] = SegmentationOutput(mask, float(p[mask].mean()) if mask.any() else 0.0, p)
        return out


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
        found = {e.id for ds in datasets for e in ds.entries}
        missing = sorted(wanted - found)
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
    x = torch.stack([_gaussian_blur(x[i], sigma[i]) if blur[i] else x[i] for i in range(b)])
    x = x + col(noise) * torch.from_numpy(eps)
    return x.clamp(0.0, 1.0), y


def _gaussian_blur(img, sigma: float):
    """(C, S, S) -> (C, S, S) separable Gaussian blur (reflect padding)."""
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


def lr_at(step: int, steps: int, lr: float) -> float:
    """Cosine decay from lr to 0.1 x lr over ``steps`` (stateless, so resuming needs no scheduler state)."""
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * step / max(1, steps))))


# ----------------------------------------------------------------------------- checkpoints


def _latest_checkpoint(out_dir: Path) -> Path | None:
    root = out_dir / CHECKPOINTS
    if not root.is_dir():
        return None
    done = sorted((p for p in root.glob("step_*") if (p / "state.json").is_file()), key=lambda p: p.name)
    return done[-1] if done else None


def _save_checkpoint(out_dir: Path, net, opt, state: dict[str, Any], keep: int = 2) -> None:
    """Write checkpoints/step_NNNNNNN atomically (a temp folder renamed when complete); keep the last ``keep``."""
    import torch

    root = out_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{state['step']:07d}"
    tmp = root / f".tmp_step_{state['step']:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _save_weights(net, tmp / WEIGHTS)
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    _write_json(tmp / "state.json", state)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    for old in sorted(p for p in root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(ckpt: Path, net, opt, run_key: str) -> dict[str, Any]:
    import torch

    state = json.loads((ckpt / "state.json").read_text())
    if state.get("run_key") != run_key:
        raise CheckpointError(f"out_dir: {ckpt.parent.parent} holds checkpoints of a different run (other data, "
                              f"config or hyper-parameters); use a new --out or --no-resume")
    _load_weights(net, ckpt / WEIGHTS)
    try:
        opt.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
    except Exception as exc:
        raise CheckpointError(f"checkpoint: cannot load optimizer state from {ckpt} ({exc.__class__.__name__}); "
                              f"delete that folder to resume from the one before") from None
    return state


def _restore(out_dir: Path, net, opt, run_key: str, resume: bool) -> tuple[int, list[float], float]:
    """-> (first step to run, losses so far, seconds so far) from the latest checkpoint, or a fresh start."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)
        return 0, [], 0.0
    ckpt = _latest_checkpoint(out_dir)
    if ckpt is None:
        return 0, [], 0.0
    state = _load_checkpoint(ckpt, net, opt, run_key)
    return int(state["step"]), list(state["losses"]), float(state["seconds"])


# ----------------------------------------------------------------------------- training


def _validate_train_args(train_roots, steps, batch_size, lr, threads, checkpoint_every) -> list[Path]:
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


def _resolve_config(structures, config: UNetConfig | None, init_from, seed: int) -> UNetConfig:
    if init_from is not None:
        base = _read_config(Path(init_from))
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


def _run_key(data: TrainData, config: UNetConfig, **hyper) -> str:
    blob = json.dumps({"roots": data.roots, "ids": data.ids, "config": config.to_dict(), **hyper},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_unet(train_roots: str | Path | Sequence[str | Path], out_dir: str | Path, *,
               structures: Sequence[str] | None = None, steps: int = 2000, batch_size: int = 8,
               lr: float = 1e-3, seed: int = 0, init_from: str | Path | None = None,
               train_ids: Sequence[str] | None = None, augment: bool = True, resume: bool = True,
               device: str = "cpu", threads: int = 1, config: UNetConfig | None = None,
               checkpoint_every: int = 100, progress: bool = True, command: str | None = None,
               callback: Callable[[int, float], None] | None = None) -> Path:
    """Train (or fine-tune, ``init_from``) a U-Net; returns ``out_dir`` (a from_pretrained folder).

    Args:
        train_roots: dataset folder(s) (folder or COCO layout); structures absent from a whole
            dataset are not trained on its images (masked out of the loss).
        out_dir: gets model.safetensors, config.json, training.json, loss.json, loss.png and
            checkpoints/step_* (atomic, every ``checkpoint_every`` steps; the last 2 kept).
        structures: output channels when training from scratch (else from ``config``/``init_from``).
        train_ids: only these image ids (e.g. a few-shot selection); every id must exist.
        resume: continue from the latest checkpoint of the SAME run in ``out_dir`` (CheckpointError
            if it belongs to another run); False starts over and deletes old checkpoints.
        callback: called as ``callback(step_done, loss)`` after each step (and its checkpoint).
    """
    import torch

    roots = _validate_train_args(train_roots, steps, batch_size, lr, threads, checkpoint_every)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train(roots, Path(out_dir), structures, steps, batch_size, lr, seed, init_from, train_ids, augment,
                      resume, device, threads, config, checkpoint_every, progress, command, callback)
    finally:
        torch.set_num_threads(before)


def _train(roots, out_dir: Path, structures, steps, batch_size, lr, seed, init_from, train_ids, augment, resume,
           device, threads, config, checkpoint_every, progress, command, callback) -> Path:
    import torch
    from tqdm.auto import tqdm

    cfg = _resolve_config(structures, config, init_from, seed)
    data = load_train_data(roots, cfg, train_ids, progress=progress)
    net = build_network(cfg)
    if init_from is not None:
        _load_weights(net, Path(init_from) / WEIGHTS)
    net = net.to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    hyper = dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, augment=augment,
                 init_from=str(Path(init_from).resolve()) if init_from else None, augmentation=AUGMENTATION)
    key = _run_key(data, cfg, **hyper)
    start, losses, elapsed = _restore(out_dir, net, opt, key, resume)
    t0 = time.perf_counter() - elapsed
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"train {out_dir.name}", disable=not progress)
    for step in bar:
        loss = _train_step(net, opt, data, step, steps, batch_size, lr, seed, augment, device)
        losses.append(loss)
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            _save_checkpoint(out_dir, net, opt, {"step": step + 1, "losses": losses, "run_key": key,
                                                 "seconds": time.perf_counter() - t0})
        if callback is not None:
            callback(step + 1, loss)
    seconds = time.perf_counter() - t0
    net.eval()
    record = _training_record(command, data, cfg, hyper, losses, seconds, threads, device, net)
    UNetSegmenter(net, cfg, device=device).save_pretrained(out_dir, training=record)
    _write_json(out_dir / "loss.json", {"loss": losses})
    plot_losses(losses, out_dir / "loss.png")
    return out_dir


def _train_step(net, opt, data: TrainData, step: int, steps: int, batch_size: int, lr: float, seed: int,
                augment: bool, device: str) -> float:
    """One optimisation step; all randomness from default_rng([seed, step])."""
    import torch

    rng = np.random.default_rng([seed, step])
    n = data.images.shape[0]
    idx = torch.from_numpy(rng.choice(n, size=batch_size, replace=n < batch_size))
    x, y, w = data.images[idx], data.masks[idx].float(), data.labelled[idx]
    if augment:
        x, y = augment_batch(x, y, rng)
    for group in opt.param_groups:
        group["lr"] = lr_at(step, steps, lr)
    loss = dice_bce_loss(net(x.to(device)), y.to(device), w.to(device))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def _training_record(command, data: TrainData, cfg: UNetConfig, hyper: dict, losses: list[float], seconds: float,
                     threads: int, device: str, net) -> dict[str, Any]:
    import monai
    import torch

    return {
        "command": command if command is not None else " ".join([Path(sys.executable).name, *sys.argv]),
        "data": {"roots": data.roots, "n_images": len(data.ids),
                 "ids": data.ids if len(data.ids) <= 200 else f"{len(data.ids)} ids (all)",
                 "labelled_structures": {s: int(data.labelled[:, i].sum()) for i, s in enumerate(cfg.structures)}},
        "config": cfg.to_dict(), **hyper, "lr_schedule": "cosine to 0.1 x lr", "optimizer": "Adam",
        "loss": "soft Dice (smooth 1) + BCE, mean over labelled (image, structure) pairs",
        "threads": threads, "device": device, "torch": torch.__version__, "monai": monai.__version__,
        "seconds": round(seconds, 1), "seconds_per_step": round(seconds / max(1, len(losses)), 4),
        "metrics": {"final_loss_mean_last_50": float(np.mean(losses[-50:])),
                    "train_dice_no_aug": _train_dice(net, data, cfg)},
    }


def _train_dice(net, data: TrainData, cfg: UNetConfig, limit: int = 20) -> dict[str, float]:
    """Dice at network size on up to ``limit`` training images without augmentation (a fit check)."""
    import torch

    from rau.metrics import dice

    idx = np.linspace(0, len(data.ids) - 1, min(limit, len(data.ids))).round().astype(int)
    device = next(net.parameters()).device
    with torch.inference_mode():
        pred = (torch.sigmoid(net(data.images[idx].to(device))) > cfg.threshold).cpu()
    out = {}
    for i, s in enumerate(cfg.structures):
        rows = [dice(pred[j, i].numpy(), data.masks[k, i].numpy() > 0)
                for j, k in enumerate(idx) if data.labelled[k, i] > 0]
        if rows:
            out[s] = round(float(np.mean(rows)), 4)
    return out


def plot_losses(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, lw=0.5, alpha=0.5, label="step")
    w = max(1, min(50, len(losses) // 10))
    if len(losses) >= w:
        ax.plot(np.arange(w - 1, len(losses)), np.convolve(losses, np.ones(w) / w, "valid"), label=f"mean of {w}")
    ax.set(xlabel="step", ylabel="Dice + BCE", yscale="log", title=path.parent.name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- evaluation


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


def evaluate_unet(checkpoint: str | Path, data_root: str | Path, *, ids: Sequence[str] | None = None,
                  out: str | Path | None = None, overlays: str | Path | None = None, n_overlays: int = 6,
                  threads: int = 1, progress: bool = True) -> dict[str, Any]:
    """Dice per structure (model structures that the dataset annotates), at the images' own size.

    Returns (and writes to ``out``) {"per_structure": {s: {mean, std, median, min, n}}, "mean_dice",
    "seconds_per_image", "per_image": [...], ...}."""
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
    result = _summary(checkpoint, data_root, names, rows, seconds)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        _write_json(Path(out), result)
    if overlays is not None and shown:
        save_overlays(shown, names, Path(overlays))
    return result


def _summary(checkpoint, data_root, names: list[str], rows: list[dict], seconds: float) -> dict[str, Any]:
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


COLORS = ["tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:cyan", "tab:pink", "tab:olive"]


def save_overlays(shown: list[tuple], names: list[str], path: Path) -> None:
    """Grid of images: ground truth as solid contours, prediction as dashed, one colour per structure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    n = len(shown)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4.8 * rows), squeeze=False)
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
        dices = ", ".join(f"{s[:7]} {d:.2f}" for s, d in ((s, _dice(pred[s], truth[s])) for s in names[:3]))
        ax.set_title(f"{iid}\n{dices}", fontsize=8)
    handles = [Line2D([], [], color=COLORS[i % len(COLORS)], label=s) for i, s in enumerate(names)]
    handles += [Line2D([], [], color="k", label="truth"), Line2D([], [], color="k", ls="--", label="U-Net")]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _dice(a, b) -> float:
    from rau.metrics import dice

    return dice(a, b)


# ----------------------------------------------------------------------------- command line


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rau.models.unet.modeling", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train or fine-tune a U-Net")
    t.add_argument("--data", nargs="+", required=True, help="dataset folder(s)")
    t.add_argument("--out", required=True, help="output folder (resumed when it holds checkpoints of this run)")
    t.add_argument("--structures", help="comma-separated (from scratch); fine-tuning keeps the checkpoint's")
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--image-size", type=int, default=256)
    t.add_argument("--channels", type=_ints, default=UNetConfig.__dataclass_fields__["channels"].default)
    t.add_argument("--preprocessing", default="equalize", choices=PREPROCESSING)
    t.add_argument("--norm", default="instance", choices=NORMS)
    t.add_argument("--init-from", help="checkpoint folder to fine-tune")
    t.add_argument("--id-range", help="START:END slice of the id-sorted images (one --data folder)")
    t.add_argument("--few-shot", type=int, help="then keep K ids of that range, drawn with --few-shot-seed")
    t.add_argument("--few-shot-seed", type=int, default=0)
    t.add_argument("--no-augment", action="store_true")
    t.add_argument("--no-resume", action="store_true")
    t.add_argument("--checkpoint-every", type=int, default=100)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--device", default="cpu")
    t.add_argument("--no-progress", action="store_true")
    e = sub.add_parser("eval", help="Dice per structure of a checkpoint on a dataset folder")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--id-range", help="START:END slice of the id-sorted images")
    e.add_argument("--out", help="results JSON")
    e.add_argument("--overlays", help="PNG with contours of --n-overlays images spread over the set")
    e.add_argument("--n-overlays", type=int, default=6)
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--no-progress", action="store_true")
    return p


def _train_ids_from_args(args) -> list[str] | None:
    if args.id_range is None and args.few_shot is None:
        return None
    if len(args.data) != 1:
        raise RauInputError("--id-range/--few-shot: select ids in exactly one --data folder")
    from rau.data.dataset import load_dataset

    ids = select_ids([e.id for e in load_dataset(args.data[0], arg="--data").entries], args.id_range)
    return few_shot_ids(ids, args.few_shot, args.few_shot_seed) if args.few_shot is not None else ids


def _cmd_train(args, argv: list[str]) -> None:
    train_ids = _train_ids_from_args(args)
    config = None
    if args.init_from is None:
        structures = [s.strip() for s in (args.structures or "").split(",") if s.strip()] or None
        if structures is None:
            raise RauInputError("--structures: required when training from scratch (e.g. right_lung,left_lung,heart)")
        config = UNetConfig(structures=structures, image_size=args.image_size, channels=args.channels,
                            preprocessing=args.preprocessing, norm=args.norm, seed=args.seed)
    out = train_unet(args.data, args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                     init_from=args.init_from, train_ids=train_ids, augment=not args.no_augment,
                     resume=not args.no_resume, device=args.device, threads=args.threads, config=config,
                     checkpoint_every=args.checkpoint_every, progress=not args.no_progress,
                     command="python -m rau.models.unet.modeling " + " ".join(argv))
    print(json.dumps(json.loads((out / TRAINING).read_text())["metrics"]))


def _cmd_eval(args) -> None:
    from rau.data.dataset import load_dataset

    ids = None
    if args.id_range is not None:
        ids = select_ids([e.id for e in load_dataset(args.data, arg="--data").entries], args.id_range)
    res = evaluate_unet(args.checkpoint, args.data, ids=ids, out=args.out, overlays=args.overlays,
                        n_overlays=args.n_overlays, threads=args.threads, progress=not args.no_progress)
    print(json.dumps({"per_structure_dice": {s: v["mean"] for s, v in res["per_structure"].items()},
                      "mean_dice": res["mean_dice"], "seconds_per_image": res["seconds_per_image"]}))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        _cmd_train(args, argv) if args.cmd == "train" else _cmd_eval(args)
    except (RauInputError, CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
