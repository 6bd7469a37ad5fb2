"""Check and load a local Qwen-VL folder (hub layout: config.json, weights, tokenizer, processor).

Nothing is downloaded (``local_files_only``); every failure is a one-line :class:`CheckpointError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rau.errors import CheckpointError, one_line

#: Box coordinates each model family answers in: absolute pixels of the resized image, or 0..1000.
COORDS_BY_MODEL_TYPE = {"qwen2_5_vl": "qwen25_abs", "qwen2_vl": "norm1000", "qwen3_vl": "norm1000"}
WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def check_checkpoint(checkpoint: str | Path) -> Path:
    """The checkpoint folder as a Path; CheckpointError (one line) when it cannot be a Qwen-VL folder."""
    path = Path(checkpoint).expanduser()
    hint = "pass a local Qwen-VL folder with config.json, weights, tokenizer and processor files"
    if not path.is_dir():
        raise CheckpointError(f"checkpoint: {path} is not a directory; {hint}")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"checkpoint: {path} has no config.json; {hint}")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise CheckpointError(f"checkpoint: {path} has no weights (expected one of {', '.join(WEIGHT_FILES)})")
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            check_shards(path, index)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(f"checkpoint: {path} has no tokenizer (expected tokenizer.json or vocab.json)")
    if not any((path / f).is_file() for f in PROCESSOR_FILES):
        expected = " or ".join(PROCESSOR_FILES)
        raise CheckpointError(f"checkpoint: {path} has no image processor config (expected {expected})")
    return path


def check_shards(path: Path, index: str) -> None:
    """CheckpointError when a weight shard named by ``path/index`` is missing."""
    try:
        shards = set(json.loads((path / index).read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint: {path / index} is unreadable ({exc.__class__.__name__})") from None
    missing = sorted(s for s in shards if not (path / s).is_file())
    if missing:
        raise CheckpointError(f"checkpoint: {path} is incomplete, missing weight shards {missing[:3]}; re-download it")


def resolve_dtype(dtype: Any, device: str):
    """A torch dtype from a dtype or its name; None: float32 on CPU (bf16 matmuls are slow there),
    bfloat16 elsewhere. ValueError naming ``dtype`` otherwise."""
    import torch

    if dtype is None:
        return torch.float32 if str(device).startswith("cpu") else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype: expected a torch dtype or its name (e.g. 'bfloat16'), got {dtype!r}")
    return resolved


def load_qwen(path: Path, device: str, dtype, max_pixels: int | None):
    """(processor, model in eval mode, model_type) from a folder :func:`check_checkpoint` accepted.

    ``max_pixels`` caps the resized pixels of every image (None: the processor's own setting).
    CheckpointError (one line) on any load failure or an unsupported ``model_type``.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from rau.models.qwen.processor import set_max_pixels

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any parse error is a bad checkpoint
        raise CheckpointError(f"checkpoint: cannot read {path / 'config.json'} ({one_line(exc)})") from None
    model_type = getattr(config, "model_type", None)
    if model_type not in COORDS_BY_MODEL_TYPE:
        raise CheckpointError(
            f"checkpoint: {path} is a {model_type!r} model; QwenLocalizer supports {sorted(COORDS_BY_MODEL_TYPE)}"
        )
    try:
        processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
        model = AutoModelForImageTextToText.from_pretrained(
            str(path), local_files_only=True, dtype=dtype, device_map=device
        )
    except Exception as exc:  # noqa: BLE001 - truncated weights, shape mismatch...: one clear line
        raise CheckpointError(f"checkpoint: cannot load {path} ({one_line(exc)})") from None
    if max_pixels is not None:
        set_max_pixels(processor.image_processor, max_pixels)
    return processor, model.eval(), model_type
