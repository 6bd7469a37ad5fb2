"""The configuration of a Qwen-VL SFT run (:mod:`rau.training.recipes.qwen_sft`): a JSON-able,
validated dataclass; every error names the field and how to fix it."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from rau.errors import RauInputError
from rau.training.schedule import SCHEDULES

RUN_KIND = "qwen-sft"
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Fields that may change when a run is resumed: they do not change what a step computes
# (max_steps only under the constant schedule: the cosine ends at max_steps).
RESUMABLE_CHANGES = ("output_dir", "max_steps", "decay_steps", "save_every", "log_every", "device")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RauInputError(f"{name}: expected an int >= {minimum}, got {value!r}")


def _check_float(name: str, value: Any, minimum: float, *, strict: bool = False, below: float | None = None) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > minimum if strict else value >= minimum) and (below is None or value < below)
    if not ok:
        bound = f"{'>' if strict else '>='} {minimum}" + (f" and < {below}" if below is not None else "")
        raise RauInputError(f"{name}: expected a number {bound}, got {value!r}")


def _check_bool(name: str, value: Any, *, optional: bool = False) -> None:
    if not (isinstance(value, bool) or (optional and value is None)):
        raise RauInputError(f"{name}: expected true or false{' or null (auto)' if optional else ''}, got {value!r}")


def _path_str(name: str, value: Any) -> str:
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise RauInputError(f"{name}: expected a folder path, got {value!r}")
    return str(value)


def _module_names(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    names = list(value) if isinstance(value, (list, tuple)) else []
    if not names or not all(isinstance(n, str) and re.fullmatch(r"[A-Za-z_]\w*", n) for n in names):
        raise RauInputError(
            f"lora_targets: expected module names such as q_proj,v_proj (last name component), got {value!r}"
        )
    return names


@dataclass
class TrainConfig:
    """Everything that defines an SFT run (JSON-able; recorded in ``output_dir/config.json``).

    Args:
        model: local Qwen-VL checkpoint folder to start from (as for QwenLocalizer).
        datasets: dataset folders (``rau.data.dataset.load_dataset`` layouts); references are
            drawn from the target's own dataset.
        output_dir: run folder (:mod:`rau.training.checkpoints` layout); an existing run there is resumed.
        max_steps: optimizer steps to reach (a resumed constant-schedule run may raise it).
        batch_size: examples per micro-batch per process; grad_accum: micro-batches per step.
        lr, weight_decay: AdamW (no decay on 1-D parameters: norms, biases).
        warmup_steps: linear warm-up (``lr * (s + 1) / warmup_steps``); lr_schedule: "cosine" (to
            10 % of lr at max_steps) or "constant" (:func:`rau.training.schedule.lr_at`).
        decay_steps: where the cosine ends: must be max_steps (or unset) since the one schedule
            ends at max_steps; kept so that old configs and ``--decay-steps`` still parse.
        max_grad_norm: gradient clipping (0: off).
        lora: train a LoRA adapter (r=lora_r, alpha=lora_alpha, dropout=lora_dropout) on the
            modules named ``lora_targets`` (last name component); False: full fine-tuning.
        freeze_vision: keep the vision tower (incl. merger) frozen; with LoRA, no adapter goes
            into it.
        augment: augment targets (:class:`rau.data.pairs.AugmentConfig` defaults).
        seed: data order, LoRA init, dropout.
        save_every, log_every: checkpoint / loss-log period in steps (the last step always both).
        max_pixels: cap on resized pixels per image (both images); None: the processor's own.
        bf16: keep the frozen LoRA base in bfloat16 (None = auto: on a bf16-capable GPU; the
            engine trains with bf16 autocast on any GPU); device: "auto", "cpu" or "cuda".
    """

    model: str
    datasets: list[str]
    output_dir: str
    max_steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "cosine"
    decay_steps: int | None = None
    max_grad_norm: float = 1.0
    lora: bool = True
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    freeze_vision: bool = True
    augment: bool = False
    seed: int = 0
    save_every: int = 100
    log_every: int = 10
    max_pixels: int | None = 512 * 28 * 28
    bf16: bool | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        self.model = _path_str("model", self.model)
        self.output_dir = _path_str("output_dir", self.output_dir)
        if isinstance(self.datasets, (str, os.PathLike)):
            self.datasets = [self.datasets]
        if not isinstance(self.datasets, (list, tuple)) or not self.datasets:
            raise RauInputError(f"datasets: expected a non-empty list of dataset folders, got {self.datasets!r}")
        self.datasets = [_path_str(f"datasets[{i}]", d) for i, d in enumerate(self.datasets)]
        for name in ("max_steps", "batch_size", "grad_accum", "lora_r", "lora_alpha", "save_every", "log_every"):
            _check_int(name, getattr(self, name), 1)
        _check_int("warmup_steps", self.warmup_steps, 0)
        _check_int("seed", self.seed, 0)
        if self.max_pixels is not None:
            _check_int("max_pixels", self.max_pixels, 28 * 28)
        _check_float("lr", self.lr, 0.0, strict=True)
        _check_float("weight_decay", self.weight_decay, 0.0)
        _check_float("max_grad_norm", self.max_grad_norm, 0.0)
        _check_float("lora_dropout", self.lora_dropout, 0.0, below=1.0)
        for name in ("lora", "freeze_vision", "augment"):
            _check_bool(name, getattr(self, name))
        _check_bool("bf16", self.bf16, optional=True)
        if self.lr_schedule not in SCHEDULES:
            raise RauInputError(f"lr_schedule: expected one of {SCHEDULES}, got {self.lr_schedule!r}")
        if self.decay_steps is not None:
            _check_int("decay_steps", self.decay_steps, 1)
            if self.lr_schedule == "cosine" and self.decay_steps != self.max_steps:
                raise RauInputError(
                    f"decay_steps: the cosine ends at max_steps ({self.max_steps}), got {self.decay_steps}; "
                    "leave decay_steps unset, or use lr_schedule constant to extend a run later"
                )
        if self.device not in DEVICES:
            raise RauInputError(
                f"device: expected one of {DEVICES}, got {self.device!r}; pick GPUs with CUDA_VISIBLE_DEVICES"
            )
        self.lora_targets = _module_names(self.lora_targets)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from a dict of field values; unknown keys and missing required fields are errors.

        A run's ``config.json`` (``"kind": "qwen-sft"``) is accepted too: its non-field entries
        (data, command...) and unset values are dropped."""
        if not isinstance(values, dict):
            raise RauInputError(f"{source}: expected a JSON object of TrainConfig fields, got {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        if values.get("kind") == RUN_KIND:
            values = {k: v for k, v in values.items() if k in known and v is not None}
        unknown = sorted(set(values) - known)
        if unknown:
            raise RauInputError(f"{source}: unknown fields {unknown}; known: {sorted(known)}")
        options = {"model": "--model", "datasets": "--dataset", "output_dir": "--output-dir"}
        missing = [n for n in options if values.get(n) in (None, [], "")]
        if missing:
            raise RauInputError(f"{', '.join(missing)}: required; pass {options[missing[0]]} or set it in --config")
        return cls(**values)

    def resolved(self, *, cuda: bool, bf16_supported: bool) -> TrainConfig:
        """Absolute paths, ``decay_steps`` and ``bf16`` filled in (what the run records)."""
        if self.device == "cuda" and not cuda:
            raise RauInputError("device: 'cuda' requested but CUDA is not available; use --device cpu or auto")
        on_gpu = cuda and self.device != "cpu"
        bf16 = self.bf16 if self.bf16 is not None else bool(on_gpu and bf16_supported)
        if bf16 and not on_gpu:
            raise RauInputError("bf16: true needs a GPU (slow and unsupported on CPU here); use --no-bf16")

        def absolute(p: str) -> str:
            return str(Path(p).expanduser().resolve())

        return replace(
            self, model=absolute(self.model), datasets=[absolute(d) for d in self.datasets],
            output_dir=absolute(self.output_dir), bf16=bf16,
            decay_steps=self.max_steps if self.lr_schedule == "cosine" else None,
        )

    def run_key(self, data: dict[str, Any]) -> dict[str, Any]:
        """The engine's run key: what must match to resume (all but :data:`RESUMABLE_CHANGES`;
        max_steps under the cosine schedule) + ``data`` (the sampler's description), as JSON."""
        key = {"kind": RUN_KIND, **{k: v for k, v in self.to_dict().items() if k not in RESUMABLE_CHANGES}}
        key["max_steps"] = self.max_steps if self.lr_schedule == "cosine" else None
        key["data"] = data
        return json.loads(json.dumps(key))
