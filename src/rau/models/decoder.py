"""The token-decoder core shared by rau's VLMs (CheXanatomy, :mod:`rau.models.chex`; the compact RAU
VLM, :mod:`rau.models.refvlm`) and the ``<seg>`` head's folder format.

Both VLMs are LLaVA-style: LiteMedSAM's frozen image encoder (:mod:`rau.encoders.litemedsam`),
pooled to ``grid`` x ``grid`` image tokens, a projector (LayerNorm -> Linear -> GELU -> Linear) with
a position embedding per image cell, and a ``transformers.Qwen2ForCausalLM`` decoder trained from
scratch with its own vocabulary (1024 location tokens, the mask tokenizer's codes, a few specials).
What they share lives here:

- :func:`check_vision` / :func:`encode_features`: the vision fields of a config and the features
  they describe;
- :func:`build_projector`, :func:`build_lm`, :func:`init_geometry`, :func:`sincos_1d`,
  :func:`sincos_2d`: the network parts and their smooth initial geometry;
- :func:`lm_step`, :func:`cache_key`: one decoder call with a KV cache across transformers versions;
- :func:`answer_loss`: next-token loss on answer tokens, Gaussian-smoothed over location bins;
- :class:`DecoderFolderModel`: the model folder (``config.json`` + ``model.safetensors`` +
  optional ``training.json``; the tied output head is never stored).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rau.atomic import write_bytes, write_json
from rau.errors import CheckpointError, RauInputError

CONFIG_FILE, WEIGHTS_FILE, TRAINING_FILE = "config.json", "model.safetensors", "training.json"
TIED_KEY = "lm.lm_head.weight"  # the output head shares the input embeddings; never stored
VISION = "litemedsam"
PREPROCESSING = ("equalize", "minmax")
IMAGE_SIZE = 256  # LiteMedSAM's input frame


# ----------------------------------------------------------------------------- vision


def check_vision(config) -> None:
    """RauInputError unless ``config``'s vision fields describe LiteMedSAM's encoder: ``vision``
    "litemedsam", ``image_size`` 256 (its frame) and ``preprocessing`` "equalize" or "minmax"."""
    if config.vision != VISION:
        raise RauInputError(f"vision: only {VISION!r} is supported, got {config.vision!r}")
    if config.image_size != IMAGE_SIZE:
        raise RauInputError(f"image_size: LiteMedSAM reads a {IMAGE_SIZE} x {IMAGE_SIZE} frame; set image_size={IMAGE_SIZE}, "
                            f"not {config.image_size!r}")
    if config.preprocessing not in PREPROCESSING:
        raise RauInputError(f"preprocessing: must be one of {PREPROCESSING}, got {config.preprocessing!r}")


@dataclass
class DecoderConfig:
    """The fields every token-decoder VLM shares (decoder size, LiteMedSAM features, token
    vocabulary sizes); a family's config subclasses it and sets ``format``. Vision fields: see
    :func:`check_vision`."""

    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 4
    intermediate_size: int = 768
    feature_dim: int = 256
    grid: int = 16
    image_size: int = 256
    bins: int = 1024
    codebook_size: int = 512
    n_codes: int = 16
    vision: str = "litemedsam"
    preprocessing: str = "equalize"
    format: str = ""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise RauInputError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
        check_vision(self)


def encode_features(images: Sequence[np.ndarray], config, *, device: str = "cpu", progress: bool = False,
                    precision: str | None = None):
    """Images -> (N, feature_dim, grid, grid) float32 features of the frozen LiteMedSAM encoder as
    ``config`` (a VLM config) describes them: LiteMedSAM's padded 256 frame, histogram-equalised
    when ``config.preprocessing`` is "equalize", pooled to ``config.grid`` cells. ``precision``:
    see :func:`rau.encoders.litemedsam.resolve_precision` (training caches use fp32)."""
    from rau.encoders.litemedsam import encode_images

    check_vision(config)
    return encode_images(images, grid=config.grid, equalize=config.preprocessing == "equalize", device=device,
                         precision=precision, progress=progress)


# ----------------------------------------------------------------------------- network parts


def sincos_1d(n: int, dim: int):
    """(n, dim) sine/cosine features of positions 0..n-1 (geometric frequencies, periods 2n..~4)."""
    import torch

    pos = torch.arange(n, dtype=torch.float32)[:, None] / n
    freqs = torch.exp(torch.linspace(0.0, math.log(n / 2), dim // 2))[None] * math.pi
    out = torch.zeros(n, dim)
    out[:, 0 : dim // 2 * 2 : 2], out[:, 1 : dim // 2 * 2 : 2] = torch.sin(pos * freqs), torch.cos(pos * freqs)
    return out


def sincos_2d(grid: int, dim: int):
    """(grid*grid, dim) row features in the first half, column features in the second (row-major cells)."""
    import torch

    half = sincos_1d(grid, dim // 2)
    rows = half[:, None, :].expand(grid, grid, -1)
    cols = half[None, :, :].expand(grid, grid, -1)
    return torch.cat([rows, cols, torch.zeros(grid, grid, dim - 2 * (dim // 2))], -1).reshape(grid * grid, dim)


def build_projector(config):
    """LayerNorm -> Linear -> GELU -> Linear: encoder features (feature_dim) -> decoder width."""
    from torch import nn

    c = config
    return nn.Sequential(nn.LayerNorm(c.feature_dim), nn.Linear(c.feature_dim, c.hidden_size), nn.GELU(),
                         nn.Linear(c.hidden_size, c.hidden_size))


def build_lm(config, vocab_size: int, max_positions: int):
    """A randomly initialised ``Qwen2ForCausalLM`` of ``config``'s size (tied embeddings, sdpa attention)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    c = config
    qcfg = Qwen2Config(
        vocab_size=vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True, rope_theta=10000.0,
        pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )
    qcfg._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(qcfg)


def init_geometry(image_pos, lm, config, loc_offset: int) -> None:
    """Smooth initial geometry: neighbouring image cells (``image_pos``, (grid^2, hidden)) and
    neighbouring location bins (the ``bins`` embeddings from ``loc_offset``) start similar."""
    import torch

    c = config
    with torch.no_grad():
        image_pos.copy_(sincos_2d(c.grid, c.hidden_size) * 0.02 / 0.7)
        emb = lm.get_input_embeddings().weight
        emb[loc_offset : loc_offset + c.bins] = sincos_1d(c.bins, c.hidden_size) * 0.02 / 0.7


def cache_key(forward) -> str:
    """The keyword a decoder's ``forward`` takes its KV cache by (``cache`` replaced
    ``past_key_values`` in transformers 5.2x)."""
    import inspect

    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def lm_step(lm, past, **kwargs):
    """One decoder call with a KV cache, across transformers versions -> (logits of the last
    position (B, V), cache)."""
    if past is not None:
        kwargs[cache_key(lm.forward)] = past
    out = lm(use_cache=True, **kwargs)
    cache = getattr(out, "cache", None)
    return out.logits[:, -1], cache if cache is not None else out.past_key_values


def answer_loss(logits, input_ids, answer_mask, loc_mask, *, loc_offset: int, bins: int, loc_sigma: float = 4.0):
    """Mean next-token loss over answer tokens. Location tokens use a Gaussian target over the
    neighbouring bins (sigma ``loc_sigma`` bins): a box edge 3 bins off is nearly right, which
    plain cross-entropy would not know. Other answer tokens: cross-entropy.

    ``logits`` (B, T, V) with logits[:, t] predicting ``input_ids`` (B, T)[:, t]; ``answer_mask``
    and ``loc_mask`` (B, T) bool."""
    import torch
    import torch.nn.functional as F

    logp = F.log_softmax(logits.float(), dim=-1)
    hard = -logp.gather(-1, input_ids[..., None])[..., 0]
    hard_mask = answer_mask & ~loc_mask
    total = (hard * hard_mask).sum()
    if loc_mask.any() and loc_sigma > 0:
        centre = (input_ids[loc_mask] - loc_offset).float()[:, None]
        grid = torch.arange(bins, device=logits.device, dtype=torch.float32)[None]
        target = torch.exp(-0.5 * ((grid - centre) / loc_sigma) ** 2)
        target = target / target.sum(-1, keepdim=True)
        total = total - (target * logp[loc_mask][:, loc_offset : loc_offset + bins]).sum()
    elif loc_mask.any():
        total = total + (hard * loc_mask).sum()
    return total / answer_mask.sum().clamp_min(1)


# ----------------------------------------------------------------------------- folder format


def config_from_dict(cls, values: dict, fmt: str, label: str):
    """A config dataclass from a config.json dict: CheckpointError unless its ``format`` is ``fmt``
    (``label`` names the folder kind); unknown keys are ignored (newer files still load)."""
    from dataclasses import fields

    if values.get("format") != fmt:
        raise CheckpointError(f"config: format {values.get('format')!r} is not {fmt!r}; not a {label} folder")
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in known})


class DecoderFolderModel:
    """Persistence shared by the token VLMs and the ``<seg>`` head: a model folder of
    ``config.json`` + ``model.safetensors`` (+ ``training.json``); the tied output head is never
    stored. Subclasses set FORMAT, CONFIG (with ``from_dict``), LABEL (for errors) and OPTION (the
    CLI option), and hold ``config``, ``net``, ``device`` and ``training``."""

    FORMAT: str = ""
    CONFIG: type = None  # type: ignore[assignment]
    LABEL: str = "model"
    OPTION: str = "--model"

    def weights_bytes(self, *, half: bool = False) -> bytes:
        """The network's weights as safetensors bytes (fp16 with ``half``)."""
        from safetensors.torch import save

        state = {k: (v.detach().cpu().half() if half else v.detach().cpu()).contiguous()
                 for k, v in self.net.state_dict().items() if k != TIED_KEY}
        return save(state, metadata={"format": self.FORMAT})

    def load_weights(self, path: Path, what: str | None = None) -> None:
        """Load weights written by :meth:`weights_bytes`; CheckpointError if unreadable or not this config's."""
        what = what or self.OPTION
        try:
            from safetensors.torch import load_file

            missing, unexpected = self.net.load_state_dict(load_file(str(path)), strict=False)
        except Exception as exc:  # noqa: BLE001 - truncated/foreign file: one line
            raise CheckpointError(f"{what}: cannot load {path} ({exc.__class__.__name__}); it is truncated or corrupted") from None
        if unexpected or [m for m in missing if m != TIED_KEY]:
            raise CheckpointError(f"{what}: {path} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
        if hasattr(self.net, "lm"):
            self.net.lm.tie_weights()

    def save_pretrained(self, directory: str | Path, training: dict | None = None, *, half: bool = False) -> Path:
        """Write the model folder; ``half`` stores fp16 weights (loaded back as fp32)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        write_bytes(out / WEIGHTS_FILE, self.weights_bytes(half=half))
        write_json(out / CONFIG_FILE, asdict(self.config), indent=1)
        if training is not None or self.training:
            write_json(out / TRAINING_FILE, training if training is not None else self.training, indent=1)
        return out

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device: str = "cpu"):
        """Load a model folder (float32 weights, eval mode, on ``device``); CheckpointError if it is
        not one, or truncated, or written for another config."""
        folder = Path(directory)
        if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise CheckpointError(f"{cls.OPTION}: {folder} is not a {cls.LABEL} folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        try:
            config = cls.CONFIG.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
        except (ValueError, TypeError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{cls.OPTION}: {folder / CONFIG_FILE} is unreadable ({exc.__class__.__name__}: {exc})") from None
        model = cls(config, device="cpu")
        model.load_weights(folder / WEIGHTS_FILE)
        model.net.float().to(device).eval()
        model.device = device
        if (folder / TRAINING_FILE).is_file():
            try:
                model.training = json.loads((folder / TRAINING_FILE).read_text())
            except ValueError:
                model.training = {}
        return model
