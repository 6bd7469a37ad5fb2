"""Mask tokenizer for CheXanatomy-style outputs: a box as 4 location tokens + a mask as 16 VQ codes.

Token sequence of one structure (what a VLM is trained to emit)::

    <loc0123><loc0045><loc0800><loc0512><seg017><seg301>...<seg099>     (4 + 16 tokens)

The location tokens, the crop/paste geometry and the token text live in :mod:`rau.tokens.loc`
(pure numpy), the network (:class:`MaskVQVAE`, :class:`MaskTokConfig`) in :mod:`rau.tokens.vqvae`.
This module holds the tokenizer:

- Mask tokens: the mask is cropped to the box *as decoded from its location tokens*, resized to
  ``size`` x ``size`` (64) as per-cell coverage, and encoded by :class:`MaskVQVAE` into a ``grid`` x
  ``grid`` (4 x 4) latent grid; the 16 codebook indices are read row-major (token i = latent row
  i // 4, column i % 4).
- Decoding pastes the decoder's 64 x 64 probabilities back into the box (bilinear when the box is
  larger than 64 px along an axis, area otherwise) and thresholds at 0.5. It never raises on a
  malformed token sequence: it returns ``mask=None`` and a ``reason``, like :mod:`rau.parsing`.

Entry points: :class:`MaskTokenizer` (``encode``, ``decode``, ``to_string``, ``from_string``,
``save``, ``load``), :func:`load_default` (the shipped weights in ``rau/assets/masktok``). Training:
:func:`rau.training.recipes.masktok.train_masktok` (``rau train masktok``); evaluation:
:mod:`rau.eval.masktok`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rau.atomic import write_bytes, write_json
from rau.errors import CheckpointError, RauInputError, one_line
from rau.tokens.loc import (
    DecodedMask,
    MaskTokens,
    ParsedMaskTokens,
    box_tokens_reason,
    check_hw,
    check_mask,
    crop_to_box,
    int_sequence_reason,
    loc_tokens_to_box,
    mask_loc_tokens,
    parse_mask_tokens,
    paste_from_box,
    tokens_to_string,
)
from rau.tokens.vqvae import MaskTokConfig, MaskVQVAE, n_parameters

FORMAT = "rau-masktok-v1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAINING_FILE = "training.json"


# --------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------


class MaskTokenizer:
    """Masks <-> CheXanatomy tokens with a trained :class:`MaskVQVAE` (eval mode, CPU).

    Example::

        tok = load_default()
        t = tok.encode(mask)                     # MaskTokens(loc=(ymin, xmin, ymax, xmax), codes=16 ids)
        text = tok.to_string(t)                  # '<loc0123>...<seg045>...'
        out = tok.decode_string(text, mask.shape)  # DecodedMask(mask=(H, W) bool | None, reason=...)

    It also follows the model protocol of :func:`rau.training.engine.run_training` (``net``,
    ``device``, ``weights_bytes``, ``load_weights``, ``save_pretrained``, ``config_dict``).
    """

    def __init__(self, model: MaskVQVAE, training: dict[str, Any] | None = None):
        self.model = model.eval()
        self.training = training or {}

    @property
    def config(self) -> MaskTokConfig:
        return self.model.config

    def __repr__(self) -> str:
        c = self.config
        return f"MaskTokenizer(K={c.codebook_size}, tokens={c.n_codes}, size={c.size}, params={n_parameters(self.model)})"

    # ---- encode / decode
    def encode(self, mask: np.ndarray) -> MaskTokens:
        """(H, W) bool mask -> MaskTokens. Empty mask -> RauInputError."""
        loc, box = mask_loc_tokens(mask, self.config.bins)
        crop = crop_to_box(check_mask(mask), box, self.config.size)
        return MaskTokens(loc, self.encode_crops(crop[None])[0])

    def encode_crops(self, crops: np.ndarray) -> list[tuple[int, ...]]:
        """(B, S, S) coverage crops -> B tuples of code ids."""
        x = torch.as_tensor(np.asarray(crops, np.float32))[:, None].to(self.device)
        with torch.no_grad():
            codes = self.model.encode(x)
        return [tuple(int(c) for c in row) for row in codes.tolist()]

    def decode_crop(self, codes: Sequence[int]) -> np.ndarray:
        """Valid code ids -> (S, S) float32 probabilities of the box's grid."""
        with torch.no_grad():
            logits = self.model.decode_codes(torch.as_tensor([list(codes)], dtype=torch.long, device=self.device))
        return torch.sigmoid(logits)[0, 0].cpu().numpy()

    def decode(self, loc: Sequence[int], codes: Sequence[int], hw: tuple[int, int]) -> DecodedMask:
        """Tokens -> DecodedMask with the (H, W) bool mask, or mask=None and a reason (never raises
        on malformed tokens; ``hw`` that is not a positive (H, W) raises RauInputError)."""
        hw = check_hw(hw)
        cfg = self.config
        reason = box_tokens_reason(loc, cfg.bins) or int_sequence_reason(codes, cfg.n_codes, cfg.codebook_size, "codes")
        if reason is not None:
            return DecodedMask(None, None, reason)
        box = loc_tokens_to_box(loc, hw, cfg.bins)
        mask = paste_from_box(self.decode_crop(codes), box, hw)
        if not mask.any():
            return DecodedMask(None, box, "decoded mask is empty (the box is smaller than a pixel or the codes decode to background)")
        return DecodedMask(mask, box, None)

    def decode_tokens(self, tokens: MaskTokens, hw: tuple[int, int]) -> DecodedMask:
        return self.decode(tokens.loc, tokens.codes, hw)

    # ---- text
    def to_string(self, tokens: MaskTokens) -> str:
        return tokens_to_string(tokens)

    def from_string(self, text: Any) -> ParsedMaskTokens:
        """Token text -> ParsedMaskTokens (never raises); see :func:`rau.tokens.loc.parse_mask_tokens`."""
        cfg = self.config
        return parse_mask_tokens(text, n_codes=cfg.n_codes, bins=cfg.bins, codebook_size=cfg.codebook_size)

    def decode_string(self, text: Any, hw: tuple[int, int]) -> DecodedMask:
        """Token text -> DecodedMask (never raises on the text)."""
        parsed = self.from_string(text)
        if parsed.tokens is None:
            check_hw(hw)
            return DecodedMask(None, None, parsed.reason)
        return self.decode_tokens(parsed.tokens, hw)

    # ---- the training engine's model protocol
    @property
    def net(self) -> MaskVQVAE:
        return self.model

    @property
    def device(self) -> str:
        return str(next(self.model.parameters()).device)

    @device.setter
    def device(self, value: str) -> None:
        self.model.to(value)

    def config_dict(self) -> dict[str, Any]:
        """What ``config.json`` holds (a training checkpoint loads with :meth:`load` too)."""
        return {"format": FORMAT, "config": asdict(self.config)}

    def weights_bytes(self) -> bytes:
        """The network's state (weights and codebook buffers) as safetensors bytes."""
        from safetensors.torch import save

        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.model.state_dict().items()}
        return save(state, metadata={"format": FORMAT})

    def load_weights(self, path: str | Path, what: str = "tokenizer") -> None:
        """Load safetensors written by :meth:`weights_bytes`; CheckpointError (one line) if unusable."""
        from safetensors.torch import load_file

        try:
            self.model.load_state_dict(load_file(str(path)), strict=True)
        except Exception as exc:  # noqa: BLE001 - truncated or foreign file: one line
            raise CheckpointError(f"{what}: cannot load {path} ({one_line(exc)}); delete it or use another folder") from None

    def save_pretrained(self, directory: str | Path, training: dict[str, Any] | None = None) -> Path:
        return self.save(directory, training)

    # ---- persistence
    def save(self, directory: str | Path, training: dict[str, Any] | None = None) -> Path:
        """Write ``model.safetensors``, ``config.json`` (with the weights' sha256) and, when there is
        training info, ``training.json``. Each file is written atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        blob = self.weights_bytes()
        write_bytes(directory / WEIGHTS_FILE, blob)
        config = {**self.config_dict(), "weights_sha256": hashlib.sha256(blob).hexdigest()}
        write_json(directory / CONFIG_FILE, config)
        info = training if training is not None else self.training
        if info:
            write_json(directory / TRAINING_FILE, info)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> MaskTokenizer:
        """Load a folder written by :meth:`save`, a training run folder (its ``final/``) or one of its
        ``checkpoint-N/``; CheckpointError (one line) when it is missing, truncated, corrupted or does
        not match its config."""
        from rau.training.checkpoints import model_folder

        directory = model_folder(directory)
        hint = f"expected a folder with {CONFIG_FILE} and {WEIGHTS_FILE} written by MaskTokenizer.save"
        if not directory.is_dir():
            raise CheckpointError(f"tokenizer: {directory} is not a folder; {hint}")
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise CheckpointError(f"tokenizer: {directory} has no {name}; {hint}")
        training = directory / TRAINING_FILE
        return _from_bytes(
            (directory / CONFIG_FILE).read_bytes(),
            (directory / WEIGHTS_FILE).read_bytes(),
            training.read_bytes() if training.is_file() else None,
            str(directory),
        )


def _from_bytes(config_bytes: bytes, weights: bytes, training: bytes | None, where: str) -> MaskTokenizer:
    fix = "re-save the tokenizer or copy the folder again"
    try:
        raw = json.loads(config_bytes.decode("utf-8"))
        if raw.get("format") != FORMAT:
            raise ValueError(f"format {raw.get('format')!r} is not {FORMAT!r}")
        config = MaskTokConfig(**raw["config"])
    except (ValueError, TypeError, KeyError, AttributeError, RauInputError) as exc:
        raise CheckpointError(f"tokenizer: {where}/{CONFIG_FILE} is not a valid mask tokenizer config ({one_line(exc)}); {fix}") from None
    expected = raw.get("weights_sha256")
    if expected is not None and hashlib.sha256(weights).hexdigest() != expected:
        raise CheckpointError(
            f"tokenizer: {where}/{WEIGHTS_FILE} does not match the checksum in {CONFIG_FILE} (truncated or corrupted); {fix}"
        )
    model = MaskVQVAE(config)
    try:
        from safetensors.torch import load

        state = load(weights)
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types on truncated headers
        raise CheckpointError(f"tokenizer: cannot load {where}/{WEIGHTS_FILE} ({one_line(exc)}); {fix}") from None
    if not all(bool(torch.isfinite(t).all()) for t in model.state_dict().values()):
        raise CheckpointError(f"tokenizer: {where}/{WEIGHTS_FILE} holds NaN or infinite weights; {fix}")
    info = None
    if training is not None:
        try:
            info = json.loads(training.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            info = None  # training.json is documentation only
    return MaskTokenizer(model, info)


def load_default() -> MaskTokenizer:
    """The shipped tokenizer (``rau/assets/masktok``), read through importlib.resources."""
    from importlib.resources import files

    folder = files("rau").joinpath("assets").joinpath("masktok")
    try:
        config_bytes = folder.joinpath(CONFIG_FILE).read_bytes()
        weights = folder.joinpath(WEIGHTS_FILE).read_bytes()
    except (FileNotFoundError, NotADirectoryError, OSError):
        raise CheckpointError(
            "tokenizer: the shipped weights rau/assets/masktok/{config.json,model.safetensors} are missing; "
            "reinstall rau or train one with rau train masktok"
        ) from None
    training_file = folder.joinpath(TRAINING_FILE)
    training = training_file.read_bytes() if training_file.is_file() else None
    return _from_bytes(config_bytes, weights, training, "rau/assets/masktok")
