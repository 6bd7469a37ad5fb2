"""Supervised fine-tuning (SFT) of the Qwen-VL localizer on reference/target pairs.

One example = one chat turn of :class:`rau.methods.qwen.QwenLocalizer` (reference with the structure
drawn, target, "localize" question) with the answer JSON as the only supervised tokens (see
:func:`rau.methods.qwen.encode_example`); pairs come from :class:`rau.data.pairs.PairSampler`.

Steps and batches: one STEP = one optimizer update = ``grad_accum`` micro-batches of
``batch_size`` examples on each process. Example indices are a global counter,
``k = ((step * grad_accum + micro) * n_processes + rank) * batch_size + b``, and example ``k``
depends only on ``(seed, k)``: a resumed run sees exactly the data of the uninterrupted run.

Precision: LoRA keeps the frozen base in bf16 when ``bf16`` (auto: on a bf16-capable GPU) with
fp32 adapters (peft's default); full fine-tuning keeps fp32 master weights and runs forward in
bf16 autocast (Accelerate ``mixed_precision="bf16"``): ~16 bytes per parameter with AdamW, so
full fine-tuning of 7B does not fit one 80 GB GPU - use LoRA there.

Output folder (``output_dir``)::

    config.json            resolved TrainConfig, command line, datasets, versions, history of runs
    loss.json, loss.png    per-step loss and lr (rewritten every log_every steps, atomically)
    samples.jsonl          per step: what was sampled (ids, structure, visible, augmentation)
    checkpoint-<step>/     adapter/ (LoRA, peft save_pretrained) or model/ (full FT, a complete
                           QwenLocalizer folder), optimizer.pt, scheduler.pt, rng_state_<rank>.pt,
                           trainer_state.json (step, losses, file sizes); the last 2 are kept
    final/                 complete merged checkpoint for QwenLocalizer(final_dir); with LoRA also
                           final/adapter/ (the unmerged adapter, for QwenLocalizer(base, lora=...))
                           and training.json

Every checkpoint (and final/) is written to a ``.tmp-*`` folder and renamed when complete, so a
run killed at any point leaves either the previous or the new checkpoint. Rerunning the same
command resumes from the latest checkpoint (the config must match, except max_steps / save_every
/ log_every / device); a checkpoint that fails its size check or does not load raises
CheckpointError instead of silently restarting.

torch / transformers / peft / accelerate are imported inside functions.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from rau.atomic import write_bytes as _write_atomic
from rau.atomic import write_json
from rau.errors import CheckpointError, RauInputError

CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
KEEP_CHECKPOINTS = 2
MIN_LR_RATIO = 0.1  # cosine decays to 10 % of lr
LR_SCHEDULES = ("cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Fields that may change when a run is resumed: they do not change what a step computes.
RESUMABLE_CHANGES = ("output_dir", "max_steps", "save_every", "log_every", "device")
# Parameter names of the vision tower (Qwen2/2.5/3-VL: model.visual.*, incl. the merger).
VISION_RE = re.compile(r"(^|\.)visual\.")
STATE_FILES = ("optimizer.pt", "scheduler.pt", "rng_state_0.pt", "trainer_state.json")


# ----------------------------------------------------------------------------- config
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


@dataclass
class TrainConfig:
    """Everything that defines an SFT run (JSON-able; recorded in ``output_dir/config.json``).

    Args:
        model: local Qwen-VL checkpoint folder to start from (as for QwenLocalizer).
        datasets: dataset folders (``rau.data.dataset.load_dataset`` layouts); references are
            drawn from the target's own dataset.
        output_dir: run folder (see the module doc); an existing run there is resumed.
        max_steps: optimizer steps to reach (a resumed run continues up to it).
        batch_size: examples per micro-batch per process; grad_accum: micro-batches per step.
        lr, weight_decay: AdamW (no decay on 1-D parameters: norms, biases).
        warmup_steps: linear warmup; lr_schedule: "cosine" (to 10 % of lr at ``decay_steps``,
            default max_steps) or "constant".
        max_grad_norm: gradient clipping (0: off).
        lora: train a LoRA adapter (r=lora_r, alpha=lora_alpha, dropout=lora_dropout) on the
            modules named ``lora_targets`` (last name component); False: full fine-tuning.
        freeze_vision: keep the vision tower (incl. merger) frozen; with LoRA, no adapter goes
            into it.
        augment: augment targets (:class:`rau.data.pairs.AugmentConfig` defaults).
        seed: data order, LoRA init, dropout.
        save_every, log_every: checkpoint / loss-log period in steps (the last step always both).
        max_pixels: cap on resized pixels per image (both images); None: the processor's own.
        bf16: None = auto (a bf16-capable GPU); device: "auto" (Accelerate's choice), "cpu", "cuda".
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
        if self.decay_steps is not None:
            _check_int("decay_steps", self.decay_steps, 1)
        if self.max_pixels is not None:
            _check_int("max_pixels", self.max_pixels, 28 * 28)
        _check_float("lr", self.lr, 0.0, strict=True)
        _check_float("weight_decay", self.weight_decay, 0.0)
        _check_float("max_grad_norm", self.max_grad_norm, 0.0)
        _check_float("lora_dropout", self.lora_dropout, 0.0, below=1.0)
        for name in ("lora", "freeze_vision", "augment"):
            _check_bool(name, getattr(self, name))
        _check_bool("bf16", self.bf16, optional=True)
        if self.lr_schedule not in LR_SCHEDULES:
            raise RauInputError(f"lr_schedule: expected one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.device not in DEVICES:
            raise RauInputError(
                f"device: expected one of {DEVICES}, got {self.device!r}; pick GPUs with CUDA_VISIBLE_DEVICES"
            )
        self.lora_targets = _module_names(self.lora_targets)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from a dict of field values; unknown keys and missing required fields are errors."""
        if not isinstance(values, dict):
            raise RauInputError(f"{source}: expected a JSON object of TrainConfig fields, got {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise RauInputError(f"{source}: unknown fields {unknown}; known: {sorted(known)}")
        options = {"model": "--model", "datasets": "--dataset", "output_dir": "--output-dir"}
        missing = [n for n in options if values.get(n) in (None, [], "")]
        if missing:
            raise RauInputError(f"{', '.join(missing)}: required; pass {options[missing[0]]} or set it in --config")
        return cls(**values)

    def resolved(self, *, cuda: bool, bf16_supported: bool) -> TrainConfig:
        """Absolute paths, ``decay_steps`` and ``bf16`` filled in (what config.json records)."""
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
            decay_steps=(self.decay_steps or self.max_steps) if self.lr_schedule == "cosine" else None,
        )


def _module_names(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    names = list(value) if isinstance(value, (list, tuple)) else []
    if not names or not all(isinstance(n, str) and re.fullmatch(r"[A-Za-z_]\w*", n) for n in names):
        raise RauInputError(
            f"lora_targets: expected module names such as q_proj,v_proj (last name component), got {value!r}"
        )
    return names


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of ``config.lr`` at optimizer step ``step`` (0-based); ``decay_steps`` resolved."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    if config.lr_schedule == "constant":
        return 1.0
    decay = config.decay_steps or config.max_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, decay - config.warmup_steps))
    return MIN_LR_RATIO + (1.0 - MIN_LR_RATIO) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- files
def write_json_atomic(path: Path, obj: Any) -> None:
    write_json(path, obj, indent=1)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{what}: {path} is missing; the folder is incomplete") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"{what}: {path} is unreadable ({exc.__class__.__name__}); it is truncated or corrupted"
        ) from None


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of the complete ``checkpoint-<step>`` folders, oldest first (temp folders excluded)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.fullmatch(p.name))]
    return sorted(found)


def _file_sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def _verify_checkpoint(folder: Path, step: int) -> dict[str, Any]:
    """trainer_state.json of ``folder`` after checking every recorded file is there at its size."""
    state = _read_json(folder / "trainer_state.json", "checkpoint")
    if not isinstance(state, dict) or state.get("step") != step or not isinstance(state.get("files"), dict):
        raise CheckpointError(
            f"checkpoint: {folder / 'trainer_state.json'} does not describe step {step}; it is corrupted"
        )
    hint = f"delete {folder} to resume from the previous checkpoint, or use a new output_dir"
    for rel, size in state["files"].items():
        path = folder / rel
        if not path.is_file():
            raise CheckpointError(f"checkpoint: {path} is missing; {hint}")
        if path.stat().st_size != size:
            raise CheckpointError(
                f"checkpoint: {path} is truncated or corrupted ({path.stat().st_size} bytes, expected {size}); {hint}"
            )
    return state


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {lines[0][:160]}" if lines else exc.__class__.__name__


def _torch_load(path: Path) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, bad pickle...: one clear line
        raise CheckpointError(
            f"checkpoint: cannot read {path} ({exc.__class__.__name__}); delete {path.parent} to resume from the "
            "previous checkpoint"
        ) from None


def _remove_tree(path: Path) -> None:
    # Rename first: a deletion killed half-way leaves a .tmp-* folder, never a half checkpoint.
    doomed = path.with_name(f".tmp-delete-{path.name}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _clean_temp(out: Path) -> None:
    for p in out.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- model
def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import rau

    out = {"rau": rau.__version__}
    for pkg in ("torch", "transformers", "peft", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "missing"
    return out


def load_for_training(config: TrainConfig, *, weights: Path | None = None):
    """(localizer, model) ready for training on CPU: the QwenLocalizer that builds examples, and
    its model with LoRA applied (PeftModel) or with only the right parameters trainable.

    ``weights``: a full-fine-tuning checkpoint ``model/`` folder to load instead of
    ``config.model`` (resume). LoRA init uses the current torch RNG: seed before calling.
    """
    import torch

    from rau.methods.qwen import QwenLocalizer

    # fp32 master weights for full FT (bf16 only through autocast); a frozen LoRA base can be bf16.
    dtype = torch.bfloat16 if (config.lora and config.bf16) else torch.float32
    localizer = QwenLocalizer(weights or config.model, device="cpu", dtype=dtype, max_pixels=config.max_pixels)
    model = localizer.model
    if config.lora:
        model = _apply_new_lora(model, config)
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(not (config.freeze_vision and VISION_RE.search(name)))
    model.train()
    return localizer, model


def _apply_new_lora(model, config: TrainConfig):
    from peft import LoraConfig, get_peft_model

    alternatives = "|".join(config.lora_targets)
    # A regex is matched against full module names: it is how peft lets us skip the vision tower.
    prefix = r"^(?!(?:.*\.)?visual\.)" if config.freeze_vision else "^"
    lora = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=rf"{prefix}.*\.(?:{alternatives})$", bias="none",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError:
        where = "outside the vision tower (freeze_vision)" if config.freeze_vision else "in the model"
        raise RauInputError(
            f"lora_targets: {config.lora_targets} match no module {where} of {config.model}; "
            "use last name components such as q_proj,v_proj"
        ) from None


def trainable_parameters(model) -> dict[str, Any]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _optimizer(model, config: TrainConfig):
    import torch

    params = list(trainable_parameters(model).values())
    if not params:
        raise RauInputError("lora/freeze_vision: no parameter is trainable; use --lora or --no-freeze-vision")
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},  # norms, biases
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)


def _scheduler(optimizer, config: TrainConfig):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))


# ----------------------------------------------------------------------------- batches
def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad single-example encodings (:func:`rau.methods.qwen.encode_example`) into a batch.

    Token tensors (1, L_i) -> (B, max L): input_ids padded with ``pad_id``, attention_mask and
    mm/token_type_ids with 0, labels with -100. pixel_values (N_i, D) and image_grid_thw (n_i, 3)
    are concatenated in example order (the model splits them by grid).
    """
    import torch

    if len(examples) == 1:
        return dict(examples[0])
    length = max(e["input_ids"].shape[1] for e in examples)
    pads = {"input_ids": pad_id, "attention_mask": 0, "labels": -100, "mm_token_type_ids": 0, "token_type_ids": 0}
    batch: dict[str, Any] = {}
    for key, value in pads.items():
        if key in examples[0]:
            rows = [torch.nn.functional.pad(e[key], (0, length - e[key].shape[1]), value=value) for e in examples]
            batch[key] = torch.cat(rows, dim=0)
    for key in ("pixel_values", "image_grid_thw"):
        batch[key] = torch.cat([e[key] for e in examples], dim=0)
    return batch


def make_batch(localizer, sampler, indices: list[int]) -> tuple[dict, list[dict]]:
    """(CPU batch with labels, sample records) for the example ``indices`` of ``sampler``."""
    from rau.methods.qwen import encode_example

    encoded, records = [], []
    for k in indices:
        pair = sampler.sample(k)
        messages, images, answer = localizer.build_training_example(
            pair.reference, pair.target, pair.structure, rng=pair.rng
        )
        encoded.append(encode_example(localizer.processor, messages, images, answer))
        records.append(pair.record)
    return collate(encoded, localizer.processor.tokenizer.pad_token_id), records


def _example_indices(step: int, micro: int, config: TrainConfig, n_proc: int, rank: int) -> list[int]:
    first = ((step * config.grad_accum + micro) * n_proc + rank) * config.batch_size
    return list(range(first, first + config.batch_size))


# ----------------------------------------------------------------------------- run folder
def _load_datasets(config: TrainConfig):
    from rau.data.dataset import load_dataset

    return [load_dataset(d, arg=f"datasets[{i}]") for i, d in enumerate(config.datasets)]


def _config_mismatch(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    now = json.loads(json.dumps(config.to_dict()))
    return [
        f"{name}: {saved.get(name)!r} -> {now[name]!r}"
        for name in now
        if name not in RESUMABLE_CHANGES and saved.get(name) != now[name]
    ]


def _check_resume(out: Path, config: TrainConfig, latest: tuple[int, Path]) -> dict[str, Any]:
    """The saved config.json document when ``config`` may resume the run in ``out``."""
    doc = _read_json(out / "config.json", "output_dir")
    if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict):
        raise CheckpointError(f"output_dir: {out / 'config.json'} is not a run config; use a new output_dir")
    diff = _config_mismatch(doc["config"], config)
    if diff:
        hint = " (decay_steps defaults to max_steps: pass the old decay_steps to extend a cosine run)" if any(
            d.startswith("decay_steps:") for d in diff) else ""
        raise CheckpointError(
            f"output_dir: {out} holds a run with a different config ({'; '.join(diff)}); rerun with the same "
            f"settings to resume it, or use a new output_dir{hint}"
        )
    if latest[0] > config.max_steps:
        raise RauInputError(
            f"max_steps: {config.max_steps} is below the latest checkpoint step {latest[0]} in {out}; "
            "raise max_steps or use a new output_dir"
        )
    return doc


def _run_doc(config: TrainConfig, sampler, command: list[str], previous: dict | None, start: int) -> dict:
    run = {"command": command, "start_step": start, "max_steps": config.max_steps,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": _versions()}
    if previous is not None:
        return {**previous, "history": [*previous.get("history", []), run]}
    return {"config": config.to_dict(), "command": command, "datasets": sampler.describe(),
            "versions": run["versions"], "history": [run]}


def _truncate_samples(path: Path, step: int) -> None:
    """Drop samples.jsonl lines of steps after ``step`` (logged after the checkpoint we resume)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            break  # a line cut by a kill: everything after it is stale
    _write_atomic(path, ("\n".join(keep) + "\n" if keep else "").encode())


def write_loss_log(out: Path, history: list[dict[str, float]], loss_label: str = "loss (answer tokens)") -> None:
    """loss.json ([{step, loss, lr}]) and loss.png (y axis ``loss_label``), both replaced atomically."""
    write_json_atomic(out / "loss.json", {"history": history})
    if history:
        plot_losses(history, out / "loss.png", loss_label)


def plot_losses(history: list[dict[str, float]], path: Path, loss_label: str = "loss (answer tokens)") -> None:
    # Figure + Agg canvas directly: no pyplot, so the caller's matplotlib backend is left alone.
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = np.array([h["step"] for h in history])
    loss = np.array([h["loss"] for h in history])
    extra = [k for k in history[-1] if k not in ("step", "loss", "lr") and isinstance(history[-1][k], (int, float))]
    fig = Figure(figsize=(6, 3.5 * (1 + bool(extra))), dpi=100)
    FigureCanvasAgg(fig)
    window = max(1, len(loss) // 20)

    def curve(ax, values, label):
        ok = ~np.isnan(values)
        smooth = window > 1 and ok.sum() > window
        line = ax.plot(steps[ok], values[ok], lw=0.6, alpha=0.35, label=None if smooth else label)[0]
        if smooth:  # the running mean over the logged steps (a figure may be missing at some steps)
            avg = np.convolve(values[ok], np.ones(window) / window, mode="valid")
            ax.plot(steps[ok][window - 1:], avg, lw=1.5, color=line.get_color(), label=f"{label} (mean of {window})")

    ax = fig.add_subplot(1 + bool(extra), 1, 1)
    curve(ax, loss, "loss")
    ax.set_xlabel("step")
    ax.set_ylabel(loss_label)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    if extra:  # e.g. GRPO: mean reward and its parts
        ax2 = fig.add_subplot(2, 1, 2)
        for k in extra:
            curve(ax2, np.array([h.get(k, np.nan) for h in history], float), k)
        ax2.set_xlabel("step")
        ax2.grid(alpha=0.3)
        ax2.legend(loc="best", fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict[str, Any]:
    import torch

    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run, step: int) -> Path:
    """Write ``checkpoint-<step>`` atomically (all processes call; rank 0 writes all but its RNG
    files); prune to the last :data:`KEEP_CHECKPOINTS`."""
    import torch

    acc, out = run.accelerator, run.out
    tmp = out / f".tmp-checkpoint-{step}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng_state_{acc.process_index}.pt")
    acc.wait_for_everyone()
    final = out / f"checkpoint-{step}"
    if acc.is_main_process:
        model = acc.unwrap_model(run.model)
        if run.config.lora:
            model.save_pretrained(str(tmp / "adapter"))
        else:
            model.save_pretrained(str(tmp / "model"))
            run.localizer.processor.save_pretrained(str(tmp / "model"))
        torch.save(run.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(run.scheduler.state_dict(), tmp / "scheduler.pt")
        # The sampler has no state beyond (seed, next example index): recorded for the logs.
        per_step = run.config.grad_accum * acc.num_processes * run.config.batch_size
        sampler = {"seed": run.config.seed, "next_example": step * per_step}
        state = {"step": step, "n_processes": acc.num_processes, "sampler": sampler, "log_history": run.history}
        state["files"] = _file_sizes(tmp)  # trainer_state.json itself is the last file written
        write_json_atomic(tmp / "trainer_state.json", state)
        if final.exists():  # same step written again (rerun of a finished run): replace it
            _remove_tree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(out)[:-KEEP_CHECKPOINTS]:
            _remove_tree(old)
    acc.wait_for_everyone()
    return final


def _load_adapter(model, folder: Path) -> None:
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    path = folder / "adapter" / "adapter_model.safetensors"
    try:
        weights = load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"checkpoint: cannot read {path} ({exc.__class__.__name__}); delete {folder}") from None
    expected = set(get_peft_model_state_dict(model))
    if set(weights) != expected:
        raise CheckpointError(f"checkpoint: {path} holds other adapter weights than this config makes; delete {folder}")
    set_peft_model_state_dict(model, weights)


def _restore_state(run, folder: Path) -> None:
    """Optimizer, scheduler and this process's RNG from ``folder`` (after accelerator.prepare)."""
    optimizer, scheduler = _torch_load(folder / "optimizer.pt"), _torch_load(folder / "scheduler.pt")
    try:
        run.optimizer.load_state_dict(optimizer)
        run.scheduler.load_state_dict(scheduler)
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(
            f"checkpoint: {folder} does not match this model/optimizer ({_first_line(exc)}); delete it"
        ) from None
    rng_file = folder / f"rng_state_{run.accelerator.process_index}.pt"
    if rng_file.is_file():  # absent when resumed on more processes than it was saved with
        _set_rng_state(_torch_load(rng_file))


def write_final(run, step: int) -> Path:
    """``output_dir/final``: a complete QwenLocalizer folder (LoRA merged) + training.json; atomic."""
    acc, out = run.accelerator, run.out
    final = out / "final"
    if acc.is_main_process:
        tmp = out / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        model = acc.unwrap_model(run.model)
        if run.config.lora:
            model.save_pretrained(str(tmp / "adapter"))
            model = model.merge_and_unload()  # in place: training is over
        model.save_pretrained(str(tmp))
        run.localizer.processor.save_pretrained(str(tmp))
        last = run.history[-1]["loss"] if run.history else None
        write_json_atomic(tmp / "training.json", {
            "base_model": run.config.model, "step": step, "final_loss": last, "lora_merged": run.config.lora,
            "config": run.config.to_dict(), "versions": _versions(),
        })
        if final.exists():
            _remove_tree(final)
        os.replace(tmp, final)
    acc.wait_for_everyone()
    return final


# ----------------------------------------------------------------------------- training
@dataclass
class _Run:
    config: TrainConfig
    out: Path
    accelerator: Any
    localizer: Any
    model: Any
    optimizer: Any
    scheduler: Any
    sampler: Any
    history: list[dict[str, float]]


def _setup(config: TrainConfig, command: list[str]) -> tuple[_Run, int, Path | None]:
    """Everything a run needs, resumed from the latest checkpoint in ``output_dir`` if any."""
    import torch
    from accelerate import Accelerator

    from rau.data.pairs import AugmentConfig, PairSampler
    from rau.methods.qwen import check_checkpoint

    cfg = config.resolved(cuda=torch.cuda.is_available(),
                          bf16_supported=torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    try:
        check_checkpoint(cfg.model)
    except CheckpointError as exc:
        raise CheckpointError(f"model: {exc}") from None
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise RauInputError(f"output_dir: {out} is a file; pass a folder (new, or a run to resume)")
    sampler = PairSampler(_load_datasets(cfg), seed=cfg.seed, augment=AugmentConfig() if cfg.augment else None)
    checkpoints = list_checkpoints(out)
    latest = checkpoints[-1] if checkpoints else None
    previous = _check_resume(out, cfg, latest) if latest else None
    state = _verify_checkpoint(latest[1], latest[0]) if latest else None

    accelerator = Accelerator(cpu=cfg.device == "cpu", gradient_accumulation_steps=cfg.grad_accum,
                              mixed_precision="bf16" if cfg.bf16 else "no")
    torch.manual_seed(cfg.seed)  # LoRA init (replaced on resume, with the RNG state)
    weights = latest[1] / "model" if (latest and not cfg.lora) else None
    localizer, model = load_for_training(cfg, weights=weights)
    if latest and cfg.lora:
        _load_adapter(model, latest[1])
    optimizer = _optimizer(model, cfg)
    scheduler = _scheduler(optimizer, cfg)
    # The scheduler stays unprepared: Accelerate would step it once per process per update.
    model, optimizer = accelerator.prepare(model, optimizer)
    history = [h for h in state["log_history"] if h["step"] <= latest[0]] if state else []
    run = _Run(cfg, out, accelerator, localizer, model, optimizer, scheduler, sampler, history)
    start = latest[0] if latest else 0
    if latest:
        _restore_state(run, latest[1])
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        _clean_temp(out)
        write_json_atomic(out / "config.json", _run_doc(cfg, sampler, command, previous, start))
        _truncate_samples(out / "samples.jsonl", start)
        if latest:  # drop entries logged after the checkpoint we resume from
            write_loss_log(out, history)
    accelerator.wait_for_everyone()
    return run, start, latest[1] if latest else None


def _train_step(run: _Run, step: int, on_step: Callable | None) -> tuple[float, list[dict]]:
    """One optimizer update (grad_accum micro-batches); (mean loss over processes, local samples)."""
    import torch

    acc, cfg = run.accelerator, run.config
    dtype = run.localizer.model.dtype
    total = torch.zeros((), device=acc.device)
    records: list[dict] = []
    lr = run.scheduler.get_last_lr()[0]
    for micro in range(cfg.grad_accum):
        indices = _example_indices(step, micro, cfg, acc.num_processes, acc.process_index)
        batch, recs = make_batch(run.localizer, run.sampler, indices)
        records += recs
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        with acc.accumulate(run.model):
            loss = run.model(**batch).loss
            acc.backward(loss)
            total += loss.detach() / cfg.grad_accum
            if acc.sync_gradients:
                if cfg.max_grad_norm > 0:
                    acc.clip_grad_norm_(list(trainable_parameters(run.model).values()), cfg.max_grad_norm)
                run.optimizer.step()
                if on_step is not None:
                    on_step(step + 1, acc.unwrap_model(run.model), float(total))  # gradients still there
                run.optimizer.zero_grad()
    run.scheduler.step()
    mean = float(acc.reduce(total, reduction="mean"))
    if not math.isfinite(mean):
        raise FloatingPointError(f"lr: loss became {mean} at step {step + 1} (lr {lr:.3g}); lower lr or check the data")
    return mean, records


def train(
    config: TrainConfig,
    *,
    progress: bool = True,
    command: list[str] | None = None,
    on_step: Callable[[int, Any, float], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) SFT as described in the module doc; returns a summary dict.

    ``command``: recorded in config.json (default: ``sys.argv``). ``on_step(step, model, loss)``
    is called on every process after each optimizer update, before gradients are zeroed (for
    monitoring and tests; ``model`` is unwrapped).
    Summary keys: output_dir, final_dir, resumed_from, start_step, max_steps, trained_steps,
    first_loss, last_loss, seconds, steps_per_second, trainable_parameters.
    """
    from accelerate.utils import gather_object
    from tqdm import tqdm

    run, start, resumed = _setup(config, list(command if command is not None else sys.argv))
    cfg, acc = run.config, run.accelerator

    bar = tqdm(total=cfg.max_steps, initial=start, desc="sft", unit="step",
               disable=not (progress and acc.is_local_main_process))
    t0 = time.perf_counter()
    for step in range(start, cfg.max_steps):
        lr = run.scheduler.get_last_lr()[0]
        loss, records = _train_step(run, step, on_step)
        run.history.append({"step": step + 1, "loss": loss, "lr": lr})
        records = gather_object(records)
        if acc.is_main_process:
            with open(run.out / "samples.jsonl", "a") as f:
                f.write(json.dumps({"step": step + 1, "samples": records}) + "\n")
        done = step + 1
        if acc.is_main_process and (done % cfg.log_every == 0 or done == cfg.max_steps):
            write_loss_log(run.out, run.history)
        if done % cfg.save_every == 0 or done == cfg.max_steps:
            save_checkpoint(run, done)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
    bar.close()
    seconds = time.perf_counter() - t0
    n_trainable = sum(p.numel() for p in trainable_parameters(acc.unwrap_model(run.model)).values())
    if acc.is_main_process and start == cfg.max_steps:
        write_loss_log(run.out, run.history)  # nothing trained: still leave a complete folder
    final = write_final(run, cfg.max_steps)
    trained = cfg.max_steps - start
    losses = [h["loss"] for h in run.history]
    return {
        "output_dir": str(run.out), "final_dir": str(final), "resumed_from": str(resumed) if resumed else None,
        "start_step": start, "max_steps": cfg.max_steps, "trained_steps": trained,
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "seconds": seconds, "steps_per_second": trained / seconds if trained and seconds > 0 else None,
        "trainable_parameters": n_trainable,
    }
