"""The one training loop of rau: every model (the compact RAU VLM's SFT and GRPO, its ``<seg>``
head, CheXanatomy, the mask tokenizer, the U-Net, Qwen2.5-VL LoRA) trains through
:func:`run_training`; a recipe (:mod:`rau.training.recipes`) only supplies the model and the loss
of one step.

What the loop gives every recipe: accelerate (CPU, one GPU with bf16 autocast, or several under
``accelerate launch``), the learning-rate schedule (:func:`rau.training.schedule.lr_at`), gradient
clipping, a tqdm bar, the loss log, checkpoints every ``save_every`` steps in one folder format
(:mod:`rau.training.checkpoints`), resumption from the latest one (refused if the run's settings
differ), and ``final/``. Rerunning the same command after a kill resumes and ends with the same
weights as an uninterrupted run, provided the recipe draws step ``s``'s batch from ``(seed, s)``
alone (every recipe here does).

Gradient accumulation (``accumulate=n``): each optimizer step sums the gradients of ``n`` calls
``step_loss(net, step, accelerator, micro)`` (``micro`` = 0..n-1; each loss scaled by 1/n, gradient
sync across processes only on the last), and logs their mean loss; with the default ``n = 1`` the
loop is unchanged and ``step_loss`` gets no ``micro``.

The model handed in follows a small protocol (duck-typed): ``net`` (the ``torch.nn.Module`` that
trains), ``device`` (settable str), ``weights_bytes() -> bytes`` (safetensors),
``load_weights(path, what=...)``, ``save_pretrained(folder, training=...)`` and either
``config_dict()`` or a dataclass ``config``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rau.atomic import write_json
from rau.training.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from rau.training.losslog import write_loss_log
from rau.training.schedule import lr_at

#: step_loss(net, step, accelerator[, micro]) -> loss tensor, or (loss, {name: float} logged beside it).
StepLoss = Callable[..., Any]


def adamw(params, lr: float):
    """The default optimizer: AdamW, weight decay 0.01."""
    import torch

    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)


def resolve_device(device: str) -> bool:
    """True when training should run on CUDA (``device`` "cuda", or "auto" with a GPU present)."""
    import torch

    if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda"):
        raise ValueError(f"device: expected auto, cpu or cuda, got {device!r}")
    return str(device).startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def _accumulate(net, step: int, acc, opt, step_loss: StepLoss, n: int):
    """Backward of ``n`` micro-batches of step ``step`` -> (their mean loss, last extras)."""
    opt.zero_grad(set_to_none=True)
    total, extras = 0.0, {}
    for micro in range(n):
        # No gradient all-reduce before the last micro-batch (forward and backward inside no_sync).
        with acc.no_sync(net) if micro < n - 1 else contextlib.nullcontext():
            loss = step_loss(net, step, acc, micro)
            loss, extras = loss if isinstance(loss, tuple) else (loss, {})
            acc.backward(loss / n)
        total = total + loss.detach() / n
    return total, extras


def run_training(model, out: str | Path, run_key: dict, step_loss: StepLoss, *, steps: int, lr: float,
                 warmup: int = 0, min_lr_ratio: float = 0.1, schedule: str = "cosine",
                 optimizer: Callable = adamw, clip_grad: float | None = 1.0, save_every: int = 200,
                 log_every: int = 10, keep: int = 2, device: str = "auto", command: str | None = None,
                 progress: bool = True, desc: str = "train", loss_label: str = "loss",
                 on_step: Callable[[int, dict], None] | None = None,
                 extra_training: Callable[[], dict] | None = None, accumulate: int = 1,
                 stop_after: int | None = None) -> Path:
    """Train ``model.net`` for ``steps`` optimizer steps into ``out`` -> ``out/final``.

    ``step_loss(net, step, accelerator)`` returns the loss of 0-based step ``step`` (or ``(loss,
    extras)``); ``optimizer(params, lr)`` builds the optimizer over the trainable parameters;
    ``on_step(done, record)`` runs after each step on the main process (``done`` counts from 1);
    ``extra_training()`` adds entries to ``final/training.json``; ``accumulate``: micro-batches per
    step (module doc; the extras logged are those of the last micro-batch); ``stop_after``: end
    this call after that many steps of the ``steps``-long schedule, with a checkpoint there and no
    ``final/`` (-> the checkpoint folder); a later call without it resumes the schedule.
    """
    import torch
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    if steps < 1 or save_every < 1 or log_every < 1 or accumulate < 1:
        raise ValueError(f"steps, save_every, log_every and accumulate must be >= 1, "
                         f"got {steps}, {save_every}, {log_every}, {accumulate}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = resolve_device(device)
    acc = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")
    model.device = str(acc.device)
    model.net.to(acc.device)
    opt = optimizer([p for p in model.net.parameters() if p.requires_grad], lr)
    start, history = 0, []
    latest = latest_checkpoint(out)
    if latest is not None:
        start, history = load_checkpoint(latest, model, opt, run_key)
    net, opt = acc.prepare(model.net, opt)
    command = command or " ".join(sys.argv)
    if acc.is_main_process:
        write_json(out / "config.json", {**run_key, "command": command,
                                         "n_parameters": sum(p.numel() for p in model.net.parameters())}, indent=1)
    net.train()
    t0 = time.perf_counter()
    bar = tqdm(total=steps, initial=start, desc=desc, unit="step", disable=not (progress and acc.is_main_process))
    end = steps if stop_after is None else max(start, min(steps, stop_after))
    for step in range(start, end):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=warmup, min_ratio=min_lr_ratio, schedule=schedule)
        if accumulate == 1:
            loss = step_loss(net, step, acc)
            loss, extras = loss if isinstance(loss, tuple) else (loss, {})
            opt.zero_grad(set_to_none=True)
            acc.backward(loss)
        else:
            loss, extras = _accumulate(net, step, acc, opt, step_loss, accumulate)
        if clip_grad is not None:
            acc.clip_grad_norm_(net.parameters(), clip_grad)
        opt.step()
        history.append({"step": step + 1, "loss": float(loss.detach()), "lr": opt.param_groups[0]["lr"], **extras})
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
        done = step + 1
        if acc.is_main_process and (done % log_every == 0 or done == steps):
            write_loss_log(out, history, loss_label)
        if acc.is_main_process and (done % save_every == 0 or done in (steps, end)):
            save_checkpoint(out, model, opt, done, history, run_key, keep=keep)
        if on_step is not None and acc.is_main_process:
            on_step(done, history[-1])
    bar.close()
    if end < steps:
        acc.wait_for_everyone()
        return out / f"checkpoint-{end}"
    seconds = time.perf_counter() - t0
    if acc.is_main_process:
        training = {**run_key, "command": command, "final_loss": history[-1]["loss"] if history else None,
                    "seconds_this_call": seconds, "device": str(acc.device), "threads": torch.get_num_threads(),
                    **(extra_training() if extra_training else {})}
        tmp = out / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        acc.unwrap_model(net).eval()
        model.save_pretrained(tmp, training=training)
        shutil.rmtree(out / "final", ignore_errors=True)
        os.replace(tmp, out / "final")
    acc.wait_for_everyone()
    return out / "final"
