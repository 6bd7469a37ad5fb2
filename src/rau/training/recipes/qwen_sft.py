"""`rau train vlm`: supervised fine-tuning (SFT) of the Qwen-VL localizer on reference/target pairs,
on the one training engine (:func:`rau.training.engine.run_training`).

One example = one chat turn of :class:`rau.methods.qwen.QwenLocalizer` (reference with the structure
drawn, target, "localize" question) with the answer JSON as the only supervised tokens (see
:func:`rau.models.qwen.processor.encode_example`); pairs come from :class:`rau.data.pairs.PairSampler`.

Steps and batches: one STEP = one optimizer update = ``grad_accum`` micro-batches of
``batch_size`` examples on each process (the engine's ``accumulate``). Example indices are a
global counter, ``k = ((step * grad_accum + micro) * n_processes + rank) * batch_size + b``
(:func:`example_indices`), and example ``k`` depends only on ``(seed, k)``: a resumed run sees
exactly the data of the uninterrupted run, and ``PairSampler(...).sample(k).record`` says what
step ``s`` saw.

Precision: LoRA keeps the frozen base in bf16 when ``bf16`` (auto: on a bf16-capable GPU) with
fp32 adapters (peft's default); full fine-tuning keeps fp32 master weights; on a GPU the engine
runs forward in bf16 autocast. ~16 bytes per parameter with AdamW: full fine-tuning of 7B does
not fit one 80 GB GPU - use LoRA there.

Output folder (``output_dir``, the engine's format, :mod:`rau.training.checkpoints`)::

    config.json            the run key (TrainConfig fields but output_dir/max_steps/save_every/
                           log_every/device, "kind": "qwen-sft", the data), command, size
    loss.json, loss.png    per-step loss and lr
    checkpoint-<step>/     model.safetensors = the trainable weights only (LoRA adapter, or all
                           unfrozen weights), optimizer.pt, rng.pt, config.json, state.json
    final/                 a complete QwenLocalizer folder (LoRA merged) + training.json; with
                           LoRA also final/adapter/ (for QwenLocalizer(base, lora=final/adapter))

Rerunning the same command resumes from the latest checkpoint; other settings in the same folder
are refused (RauInputError naming the differing fields), a truncated checkpoint raises
CheckpointError. torch / transformers / peft / accelerate are imported inside functions.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rau.atomic import write_json
from rau.errors import CheckpointError, RauInputError
from rau.models.qwen.loading import check_checkpoint
from rau.models.qwen.lora import add_lora, set_trainable, trainable_parameters
from rau.models.qwen.processor import collate, encode_example
from rau.training.checkpoints import checkpoints
from rau.training.engine import run_training
from rau.training.recipes.qwen_config import RUN_KIND, TrainConfig

__all__ = ["QwenSftModel", "TrainConfig", "example_indices", "make_batch", "train"]


class QwenSftModel:
    """The engine's model protocol around the Qwen-VL of ``localizer`` being fine-tuned.

    ``net``: the PeftModel (LoRA) or the model itself with only the right parameters trainable;
    checkpoints hold the trainable weights only; :meth:`save_pretrained` writes a QwenLocalizer
    folder. The LoRA init draws from the torch RNG: seed before constructing.
    """

    def __init__(self, localizer, config: TrainConfig):
        self.localizer, self.config, self.device = localizer, config, "cpu"
        if config.lora:
            self.net = add_lora(localizer.model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                                targets=config.lora_targets, freeze_vision=config.freeze_vision, source=config.model)
        else:
            set_trainable(localizer.model, freeze_vision=config.freeze_vision)
            self.net = localizer.model
        if not trainable_parameters(self.net):
            raise RauInputError("lora/freeze_vision: no parameter is trainable; use --lora or --no-freeze-vision")
        self.net.train()
        self._merged = False

    def config_dict(self) -> dict[str, Any]:
        c = self.config
        return {"format": RUN_KIND, "base_model": c.model, "lora": c.lora, "lora_r": c.lora_r,
                "lora_alpha": c.lora_alpha, "lora_dropout": c.lora_dropout, "lora_targets": c.lora_targets,
                "freeze_vision": c.freeze_vision, "max_pixels": c.max_pixels, "bf16": c.bf16}

    def weights_bytes(self) -> bytes:
        """The trainable weights (LoRA adapter, or every unfrozen parameter) as safetensors bytes."""
        from safetensors.torch import save

        return save({n: p.detach().cpu().contiguous() for n, p in trainable_parameters(self.net).items()})

    def load_weights(self, path: str | Path, what: str = "checkpoint") -> None:
        """Load :meth:`weights_bytes` output; CheckpointError naming ``what`` if unreadable or not
        the trainable weights this config makes."""
        import torch
        from safetensors.torch import load_file

        path = Path(path)
        try:
            weights = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - truncated or foreign file: one line
            raise CheckpointError(f"{what}: cannot read {path} ({exc.__class__.__name__}); delete {path.parent}") from None
        params = trainable_parameters(self.net)
        if set(weights) != set(params):
            raise CheckpointError(f"{what}: {path} holds other trainable weights than this config makes; "
                                  f"delete {path.parent} or use a new output_dir")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(weights[name])

    def save_pretrained(self, folder: str | Path, training: dict[str, Any] | None = None) -> Path:
        """A complete QwenLocalizer folder (+ ``adapter/`` with LoRA, + training.json when given).

        LoRA is merged in place (the end of a run): a second call raises RuntimeError."""
        if self._merged:
            raise RuntimeError("save_pretrained: the LoRA adapter was merged by an earlier call; save once per run")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        net = self.net
        if self.config.lora:
            net.save_pretrained(str(folder / "adapter"))
            net = self.net = net.merge_and_unload()
            self._merged = True
        net.save_pretrained(str(folder))
        self.localizer.processor.save_pretrained(str(folder))
        if training is not None:
            write_json(folder / "training.json", training, indent=1)
        return folder


def example_indices(step: int, micro: int, config: TrainConfig, n_proc: int, rank: int) -> list[int]:
    """Sampler indices of micro-batch ``micro`` of step ``step`` on process ``rank`` of ``n_proc``."""
    first = ((step * config.grad_accum + micro) * n_proc + rank) * config.batch_size
    return list(range(first, first + config.batch_size))


def make_batch(localizer, sampler, indices: list[int]) -> dict:
    """CPU batch with labels (:func:`rau.models.qwen.processor.collate`) for the example ``indices`` of ``sampler``."""
    encoded = []
    for k in indices:
        pair = sampler.sample(k)
        messages, images, answer = localizer.build_training_example(
            pair.reference, pair.target, pair.structure, rng=pair.rng
        )
        encoded.append(encode_example(localizer.processor, messages, images, answer))
    return collate(encoded, localizer.processor.tokenizer.pad_token_id)


def adamw_groups(params, lr: float, weight_decay: float):
    """AdamW with ``weight_decay`` on matrices only (none on norms and biases)."""
    import torch

    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


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


def _prepare(config: TrainConfig):
    """(resolved config, sampler, latest (step, folder) or None) after checking the inputs."""
    import torch

    from rau.data.dataset import load_dataset
    from rau.data.pairs import AugmentConfig, PairSampler

    cfg = config.resolved(cuda=torch.cuda.is_available(),
                          bf16_supported=torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    try:
        check_checkpoint(cfg.model)
    except CheckpointError as exc:
        raise CheckpointError(f"model: {exc}") from None
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise RauInputError(f"output_dir: {out} is a file; pass a folder (new, or a run to resume)")
    datasets = [load_dataset(d, arg=f"datasets[{i}]") for i, d in enumerate(cfg.datasets)]
    sampler = PairSampler(datasets, seed=cfg.seed, augment=AugmentConfig() if cfg.augment else None)
    found = checkpoints(out)
    if found and found[-1][0] > cfg.max_steps:
        raise RauInputError(f"max_steps: {cfg.max_steps} is below the latest checkpoint step {found[-1][0]} in {out}; "
                            "raise max_steps or use a new output_dir")
    return cfg, sampler, found[-1] if found else None


def train(config: TrainConfig, *, progress: bool = True, command: str | list[str] | None = None,
          on_step: Callable[[int, Any, float], None] | None = None) -> dict[str, Any]:
    """Run (or resume) SFT as described in the module doc; returns a summary dict.

    ``command``: recorded in config.json (default: ``sys.argv``). ``on_step(step, net, loss)`` is
    called on the main process after each optimizer update, gradients still in place (for
    monitoring and tests). Summary keys: output_dir, final_dir, resumed_from, start_step,
    max_steps, trained_steps, first_loss, last_loss, seconds, steps_per_second, trainable_parameters.
    """
    import torch

    from rau.methods.qwen import QwenLocalizer

    cfg, sampler, latest = _prepare(config)
    torch.manual_seed(cfg.seed)  # LoRA init (replaced on resume, with the RNG state)
    # fp32 master weights for full FT (bf16 only through autocast); a frozen LoRA base can be bf16.
    dtype = torch.bfloat16 if (cfg.lora and cfg.bf16) else torch.float32
    localizer = QwenLocalizer(cfg.model, device="cpu", dtype=dtype, max_pixels=cfg.max_pixels)
    model = QwenSftModel(localizer, cfg)

    def step_loss(net, step, acc, micro=0):
        batch = make_batch(localizer, sampler, example_indices(step, micro, cfg, acc.num_processes, acc.process_index))
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(localizer.model.dtype)
        loss = net(**batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"lr: loss became {float(loss)} at step {step + 1}; lower lr or check the data")
        return loss

    n_trainable = sum(p.numel() for p in trainable_parameters(model.net).values())  # before LoRA is merged
    if not isinstance(command, str):
        command = " ".join(command if command is not None else sys.argv)
    watch = (lambda done, record: on_step(done, model.net, record["loss"])) if on_step else None
    extra = {"base_model": cfg.model, "step": cfg.max_steps, "lora_merged": cfg.lora, "config": cfg.to_dict(),
             "versions": _versions()}
    final = run_training(
        model, cfg.output_dir, cfg.run_key(sampler.describe()), step_loss, steps=cfg.max_steps, lr=cfg.lr,
        warmup=cfg.warmup_steps, schedule=cfg.lr_schedule, accumulate=cfg.grad_accum,
        optimizer=lambda params, lr: adamw_groups(params, lr, cfg.weight_decay),
        clip_grad=cfg.max_grad_norm or None, save_every=cfg.save_every, log_every=cfg.log_every, device=cfg.device,
        command=command, progress=progress, desc="sft", loss_label="loss (answer tokens)", on_step=watch,
        extra_training=lambda: extra,
    )
    return _summary(cfg, final, latest, n_trainable)


def _summary(cfg: TrainConfig, final: Path, latest: tuple[int, Path] | None, n_trainable: int) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    log = out / "loss.json"
    losses = [h["loss"] for h in json.loads(log.read_text())["history"]] if log.is_file() else []
    seconds = json.loads((final / "training.json").read_text())["seconds_this_call"]
    start = latest[0] if latest else 0
    trained = cfg.max_steps - start
    return {
        "output_dir": str(out), "final_dir": str(final), "resumed_from": str(latest[1]) if latest else None,
        "start_step": start, "max_steps": cfg.max_steps, "trained_steps": trained,
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "seconds": seconds, "steps_per_second": trained / seconds if trained and seconds > 0 else None,
        "trainable_parameters": n_trainable,
    }
