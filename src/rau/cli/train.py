"""`rau train ...`: training commands (typer sub-app mounted by :mod:`rau.cli.app`).

Only typer is imported here; training code is imported inside the command, so ``rau --help``
stays fast.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

train_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Train rau's models.",
    pretty_exceptions_enable=False,
)

# Same one-line contract as rau.cli.app: bad input -> "error: <first line>", exit code 2.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, IsADirectoryError, FloatingPointError)


def _fail(exc: BaseException) -> None:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code=2)


def _read_config_file(path: Path) -> dict[str, Any]:
    """TrainConfig fields from a JSON file: a plain object, or a run's config.json (its "config")."""
    if not path.is_file():
        raise FileNotFoundError(f"--config: {path} does not exist")
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--config: {path} is not valid JSON ({exc})") from None
    if isinstance(doc, dict) and isinstance(doc.get("config"), dict):
        doc = doc["config"]  # the config.json a previous run wrote
    if not isinstance(doc, dict):
        raise ValueError(f"--config: {path} must hold a JSON object of training options")
    return doc


def _merge(file_values: dict[str, Any], cli_values: dict[str, Any]) -> dict[str, Any]:
    # Options given on the command line win over the file; unset ones (None) leave it alone.
    merged = dict(file_values)
    merged.update({k: v for k, v in cli_values.items() if v is not None})
    return merged


def _opt(help_text: str, *names: str):
    return typer.Option(*names, help=help_text)


@train_app.command("vlm")
def vlm(
    model: Annotated[Optional[Path], _opt("Local Qwen-VL checkpoint folder to fine-tune (hub layout).")] = None,
    dataset: Annotated[Optional[list[Path]], _opt("Dataset folder (images/ + masks/<structure>/, or COCO); repeat for several.", "--dataset")] = None,
    output_dir: Annotated[Optional[Path], _opt("Run folder: checkpoints, loss.json/png, final/. An existing run there is resumed.")] = None,
    config: Annotated[Optional[Path], _opt("JSON file of options (TrainConfig field names, or a run's config.json); command-line options override it.")] = None,
    max_steps: Annotated[Optional[int], _opt("Optimizer steps to reach (default: 1000).")] = None,
    batch_size: Annotated[Optional[int], _opt("Examples per micro-batch per process (default: 1).")] = None,
    grad_accum: Annotated[Optional[int], _opt("Micro-batches per optimizer step (default: 1).")] = None,
    lr: Annotated[Optional[float], _opt("AdamW learning rate (default: 1e-4).")] = None,
    weight_decay: Annotated[Optional[float], _opt("AdamW weight decay (not on norms/biases) (default: 0).")] = None,
    warmup_steps: Annotated[Optional[int], _opt("Linear warmup steps (default: 0).")] = None,
    lr_schedule: Annotated[Optional[str], _opt("cosine (to 10% of lr at --decay-steps) or constant (default: cosine).")] = None,
    decay_steps: Annotated[Optional[int], _opt("Step where the cosine ends (default: max-steps); set it to extend a run later.")] = None,
    max_grad_norm: Annotated[Optional[float], _opt("Gradient clipping norm, 0 = off (default: 1.0).")] = None,
    lora: Annotated[Optional[bool], _opt("Train a LoRA adapter (merged into final/) instead of all weights (default: --lora).", "--lora/--no-lora")] = None,
    lora_r: Annotated[Optional[int], _opt("LoRA rank (default: 8).")] = None,
    lora_alpha: Annotated[Optional[int], _opt("LoRA alpha (default: 16).")] = None,
    lora_dropout: Annotated[Optional[float], _opt("LoRA dropout (default: 0.05).")] = None,
    lora_targets: Annotated[Optional[str], _opt("Comma-separated module names for LoRA (default: q_proj,k_proj,v_proj,o_proj).")] = None,
    freeze_vision: Annotated[Optional[bool], _opt("Keep the vision tower frozen (default: --freeze-vision).", "--freeze-vision/--no-freeze-vision")] = None,
    augment: Annotated[Optional[bool], _opt("Augment targets: scale, shift, gamma (default: --no-augment).", "--augment/--no-augment")] = None,
    seed: Annotated[Optional[int], _opt("Seed: data order, LoRA init, dropout (default: 0).")] = None,
    save_every: Annotated[Optional[int], _opt("Checkpoint every N steps (and at the end) (default: 100).")] = None,
    log_every: Annotated[Optional[int], _opt("Rewrite loss.json/loss.png every N steps (default: 10).")] = None,
    max_pixels: Annotated[Optional[int], _opt("Cap on resized pixels per image (default: 401408 = 512*28*28).")] = None,
    bf16: Annotated[Optional[bool], _opt("bf16 (default: auto, on a bf16-capable GPU).", "--bf16/--no-bf16")] = None,
    device: Annotated[Optional[str], _opt("auto, cpu or cuda (default: auto); pick GPUs with CUDA_VISIBLE_DEVICES.")] = None,
    progress: Annotated[bool, _opt("Show a progress bar.")] = True,
) -> None:
    """Supervised fine-tuning of the Qwen-VL localizer on reference/target pairs (resumable).

    CPU smoke run (a tiny random model, seconds):

        python -c "from tiny_qwen import save_tiny_checkpoint; save_tiny_checkpoint('runs/tiny')"
        rau train vlm --model runs/tiny --dataset DATASET --output-dir runs/sft-smoke --max-steps 2 --max-pixels 3136 --device cpu

    Several GPUs: accelerate launch --num_processes 4 -m rau.cli.app train vlm --model ... (same options).
    Rerunning a command resumes its output dir from the latest checkpoint.
    """
    try:
        from rau.training.recipes.qwen_sft import TrainConfig, train

        cli_values = {
            "model": model, "datasets": [str(d) for d in dataset] if dataset else None, "output_dir": output_dir,
            "max_steps": max_steps, "batch_size": batch_size, "grad_accum": grad_accum, "lr": lr,
            "weight_decay": weight_decay, "warmup_steps": warmup_steps, "lr_schedule": lr_schedule,
            "decay_steps": decay_steps, "max_grad_norm": max_grad_norm, "lora": lora, "lora_r": lora_r,
            "lora_alpha": lora_alpha, "lora_dropout": lora_dropout, "lora_targets": lora_targets,
            "freeze_vision": freeze_vision, "augment": augment, "seed": seed, "save_every": save_every,
            "log_every": log_every, "max_pixels": max_pixels, "bf16": bf16, "device": device,
        }
        file_values = _read_config_file(config) if config is not None else {}
        cfg = TrainConfig.from_dict(_merge(file_values, cli_values), source=f"--config {config}" if config else "options")
        summary = train(cfg, progress=progress, command=["rau", *sys.argv[1:]])
    except USER_ERRORS as exc:
        _fail(exc)
    if int(os.environ.get("RANK", "0")) != 0:  # under accelerate launch / torchrun: one summary line
        return
    rate = summary["steps_per_second"]
    speed = f", {rate:.2f} steps/s" if rate else ""
    first, last = (f"{x:.4f}" if x is not None else "-" for x in (summary["first_loss"], summary["last_loss"]))
    typer.echo(
        f"trained steps {summary['start_step']}->{summary['max_steps']}{speed}; loss {first} -> {last}; "
        f"final checkpoint: {summary['final_dir']}"
    )


@train_app.command("chex-cache")
def chex_cache(
    dataset: Annotated[Path, _opt("Dataset folder (images/ + masks/<structure>/, or COCO).")],
    out: Annotated[Path, _opt("Cache file to write (.npz): pooled LiteMedSAM features + answer tokens.")],
    structures: Annotated[Optional[str], _opt("Comma-separated structures (default: all of the dataset's).")] = None,
    id_range: Annotated[Optional[str], _opt("START:STOP slice of the id-sorted images, e.g. 0:160.")] = None,
    ids: Annotated[Optional[str], _opt("Comma-separated image ids (after --id-range).")] = None,
    threads: Annotated[Optional[int], _opt("torch CPU threads.")] = None,
    progress: Annotated[bool, _opt("Show progress bars.")] = True,
) -> None:
    """Encode a dataset once for CheXanatomy training (the vision tower is frozen)."""
    try:
        import torch

        from rau.data.caches import build_cache
        from rau.cli.app import _range

        if threads:
            torch.set_num_threads(threads)
        cache = build_cache(dataset, out, structures=structures.split(",") if structures else None,
                            id_range=_range(id_range, "--id-range"), ids=ids.split(",") if ids else None, progress=progress)
    except USER_ERRORS as exc:
        _fail(exc)
    typer.echo(f"{len(cache)} images, {len(cache.names)} structures -> {out}")


@train_app.command("chex")
def chex(
    cache: Annotated[list[Path], _opt("Token cache(s) from `rau train chex-cache`; repeat for several.", "--cache")],
    output_dir: Annotated[Path, _opt("Run folder: checkpoints, loss.json/png, final/. An existing run there is resumed.")],
    steps: Annotated[int, _opt("Optimizer steps.")] = 2000,
    batch_size: Annotated[int, _opt("Sequences (images) per step.")] = 8,
    tasks_per_seq: Annotated[int, _opt("Task blocks (detect/segment/name) per image sequence.")] = 8,
    lr: Annotated[float, _opt("AdamW peak learning rate (cosine to 10%).")] = 5e-4,
    warmup: Annotated[int, _opt("Linear warmup steps.")] = 100,
    loc_sigma: Annotated[float, _opt("Gaussian soft-label width over location bins (0 = plain cross-entropy).")] = 4.0,
    init_from: Annotated[Optional[Path], _opt("Start from this trained model folder (fine-tuning, e.g. k-shot).")] = None,
    cache_weights: Annotated[Optional[str], _opt("Comma-separated sampling weights per cache (default: by size).")] = None,
    hidden_size: Annotated[int, _opt("Decoder width (new models only).")] = 256,
    num_layers: Annotated[int, _opt("Decoder layers (new models only).")] = 6,
    seed: Annotated[int, _opt("Seed: init and data order.")] = 0,
    save_every: Annotated[int, _opt("Checkpoint every N steps.")] = 200,
    threads: Annotated[Optional[int], _opt("torch CPU threads.")] = None,
    device: Annotated[str, _opt("auto, cpu or cuda.")] = "auto",
    progress: Annotated[bool, _opt("Show a progress bar.")] = True,
) -> None:
    """Train the CheXanatomy VLM (boxes and masks as tokens) by next-token prediction; resumable.

    Example (the shipped recipe is in docs/BENCHMARKS.md):

        rau drr --out runs/drr/train --views 300 --seed 0
        rau train chex-cache --dataset runs/drr/train --out runs/chex/drr_train.npz
        rau train chex --cache runs/chex/drr_train.npz --output-dir runs/chex/drr --steps 2000
    """
    try:
        from rau.training.recipes.chex import train_chex

        weights = [float(w) for w in cache_weights.split(",")] if cache_weights else None
        config = None if init_from else {"hidden_size": hidden_size, "num_layers": num_layers}
        final = train_chex(cache, output_dir, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, seed=seed,
                           tasks_per_seq=tasks_per_seq, loc_sigma=loc_sigma, init_from=init_from, config=config,
                           save_every=save_every, threads=threads, device=device, cache_weights=weights,
                           command="rau " + " ".join(sys.argv[1:]), progress=progress)
    except USER_ERRORS as exc:
        _fail(exc)
    typer.echo(f"final model: {final}")


@train_app.command("refvlm")
def refvlm(
    cache: Annotated[list[Path], _opt("Token cache(s) from `rau train chex-cache` (one per dataset: pairs never mix caches); repeat for several.", "--cache")],
    output_dir: Annotated[Path, _opt("Run folder: checkpoints, loss.json/png, final/. An existing run there is resumed.")],
    steps: Annotated[int, _opt("Optimizer steps.")] = 3000,
    batch_size: Annotated[int, _opt("Reference/target pairs per step.")] = 8,
    structures_per_pair: Annotated[int, _opt("Reference structures (blocks) per pair.")] = 6,
    p_similar: Annotated[float, _opt("Probability that a pair's reference is one of the target's nearest images (else any).")] = 0.5,
    lr: Annotated[float, _opt("AdamW peak learning rate (cosine to 10%).")] = 1e-3,
    warmup: Annotated[int, _opt("Linear warmup steps.")] = 100,
    loc_sigma: Annotated[float, _opt("Gaussian soft-label width over location bins (0 = plain cross-entropy).")] = 4.0,
    init_from: Annotated[Optional[Path], _opt("Start from this trained model folder (fine-tuning).")] = None,
    cache_weights: Annotated[Optional[str], _opt("Comma-separated sampling weights per cache (default: by size).")] = None,
    hidden_size: Annotated[int, _opt("Decoder width (new models only).")] = 256,
    num_layers: Annotated[int, _opt("Decoder layers (new models only).")] = 6,
    seed: Annotated[int, _opt("Seed: init and data order.")] = 0,
    save_every: Annotated[int, _opt("Checkpoint every N steps.")] = 200,
    threads: Annotated[Optional[int], _opt("torch CPU threads.")] = None,
    device: Annotated[str, _opt("auto, cpu or cuda.")] = "auto",
    progress: Annotated[bool, _opt("Show a progress bar.")] = True,
) -> None:
    """Train the compact RAU VLM (the shipped default localizer) on reference/target pairs; resumable.

    The shipped weights' recipe is scripts/rau_vlm_recipe.sh; e.g.

        rau train chex-cache --dataset ../shared/datasets/wingspan_cxr --id-range 0:160 --out runs/ref/ws.npz
        rau train refvlm --cache runs/ref/ws.npz --output-dir runs/ref/vlm --steps 3000

    Several GPUs: accelerate launch --num_processes 4 -m rau.cli.app train refvlm ... (same options).
    """
    try:
        from rau.training.recipes.refvlm import train_refvlm

        weights = [float(w) for w in cache_weights.split(",")] if cache_weights else None
        config = None if init_from else {"hidden_size": hidden_size, "num_layers": num_layers}
        final = train_refvlm(cache, output_dir, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, seed=seed,
                             structures_per_pair=structures_per_pair, p_similar=p_similar, loc_sigma=loc_sigma,
                             init_from=init_from, config=config, save_every=save_every, threads=threads,
                             device=device, cache_weights=weights, command="rau " + " ".join(sys.argv[1:]),
                             progress=progress)
    except USER_ERRORS as exc:
        _fail(exc)
    typer.echo(f"final model: {final}")


@train_app.command("grpo")
def grpo(
    init_from: Annotated[Path, _opt("The SFT model folder to start from (`rau train refvlm` final/ or src/rau/assets/refvlm); also the KL anchor.", "--init-from")],
    cache: Annotated[list[Path], _opt("Token cache(s) from `rau train chex-cache`, as for `rau train refvlm`; repeat for several.", "--cache")],
    output_dir: Annotated[Path, _opt("Run folder: checkpoints, loss.json/png (loss, reward and its parts), final/. An existing run there is resumed.")],
    steps: Annotated[int, _opt("Optimizer steps.")] = 400,
    pairs_per_step: Annotated[int, _opt("Reference/target pairs per step.")] = 4,
    structures_per_pair: Annotated[int, _opt("Reference structures (groups) per pair.")] = 4,
    group_size: Annotated[int, _opt("Sampled answers per structure (GRPO group).")] = 8,
    temperature: Annotated[float, _opt("Sampling temperature.")] = 1.0,
    lr: Annotated[float, _opt("AdamW peak learning rate (cosine to 10%).")] = 5e-5,
    warmup: Annotated[int, _opt("Linear warmup steps.")] = 10,
    beta: Annotated[float, _opt("Weight of the KL penalty to the SFT model.")] = 0.04,
    reward_weights: Annotated[Optional[str], _opt("Override reward weights, e.g. 'box_iou=1,mask_dice=0.5' (format, identification, box_iou, mask_dice).")] = None,
    p_similar: Annotated[float, _opt("Probability that a pair's reference is one of the target's nearest images.")] = 0.5,
    cache_weights: Annotated[Optional[str], _opt("Comma-separated sampling weights per cache (default: by size).")] = None,
    seed: Annotated[int, _opt("Seed: data order and sampling.")] = 0,
    save_every: Annotated[int, _opt("Checkpoint every N steps.")] = 50,
    threads: Annotated[Optional[int], _opt("torch CPU threads.")] = None,
    device: Annotated[str, _opt("auto, cpu or cuda.")] = "auto",
    progress: Annotated[bool, _opt("Show a progress bar.")] = True,
) -> None:
    """GRPO after SFT for the compact RAU VLM (RAU's second stage): sampled answers rewarded for
    format, identification, box IoU and mask Dice; resumable. Recipe: scripts/rau_vlm_grpo_recipe.sh.

        rau train grpo --init-from src/rau/assets/refvlm --cache runs/ref/ws.npz --output-dir runs/ref/grpo
    """
    try:
        from rau.errors import RauInputError
        from rau.training.recipes.grpo import train_grpo

        weights = [float(w) for w in cache_weights.split(",")] if cache_weights else None
        rw = None
        if reward_weights:
            try:
                rw = {k.strip(): float(v) for k, v in (item.split("=") for item in reward_weights.split(","))}
            except ValueError:
                raise RauInputError(f"--reward-weights: expected name=value pairs separated by commas, got {reward_weights!r}") from None
        final = train_grpo(cache, output_dir, init_from=init_from, steps=steps, pairs_per_step=pairs_per_step,
                           structures_per_pair=structures_per_pair, group_size=group_size, temperature=temperature,
                           lr=lr, warmup=warmup, beta=beta, seed=seed, p_similar=p_similar, reward_weights=rw,
                           cache_weights=weights, save_every=save_every, threads=threads, device=device,
                           command="rau " + " ".join(sys.argv[1:]), progress=progress)
    except USER_ERRORS as exc:
        _fail(exc)
    typer.echo(f"final model: {final}")


@train_app.command("seg-cache")
def seg_cache(
    cache: Annotated[Path, _opt("Token cache (rau train chex-cache) whose images to store.", "--cache")],
    out: Annotated[Path, _opt("Output .npz: full LiteMedSAM embeddings (fp16) + masks in the encoder frame.")],
    dataset: Annotated[Optional[Path], _opt("Dataset folder (default: the one recorded in the cache).")] = None,
    progress: Annotated[bool, _opt("Show a progress bar.")] = True,
) -> None:
    """Store what `rau train seg-head` trains on: each image's full LiteMedSAM embedding and masks."""
    try:
        from rau.models.refvlm.seghead import build_seg_cache

        path = build_seg_cache(cache, out, dataset_root=dataset, progress=progress)
    except USER_ERRORS as exc:
        _fail(exc)
    typer.echo(f"seg cache: {path}")


@train_app.command("seg-head")
def seg_head(
    cache: Annotated[list[Path], _opt("Token cache(s) (rau train chex-cache); repeat for several.", "--cache")],
    seg_cache: Annotated[list[Path], _opt("The matching seg cache(s) (rau train seg-cache), same order.", "--seg-cache")],
    output_dir: Annotated[Path, _opt("Run folder: checkpoints, loss.json/png (loss and Dice), final/. An existing run there is resumed.")],
    vlm: Annotated[Optional[Path], _opt("The compact RAU VLM the head serves (default: the shipped one); frozen.", "--vlm")] = None,
    steps: Annotated[int, _opt("Optimizer steps.")] = 400,
    pairs_per_step: Annotated[int, _opt("Reference/target pairs per step.")] = 4,
    structures_per_pair: Annotated[int, _opt("Structures per pair (masks per pair).")] = 4,
    lr: Annotated[float, _opt("AdamW peak learning rate (cosine to 10%).")] = 1e-4,
    warmup: Annotated[int, _opt("Linear warmup steps.")] = 20,
    cache_weights: Annotated[Optional[str], _opt("Comma-separated sampling weights per cache (default: by size).")] = None,
    seed: Annotated[int, _opt("Seed: init and data order.")] = 0,
    box_prompt: Annotated[bool, _opt("Also prompt the decoder with the VLM's own answer box (beside the <seg> tokens).")] = True,
    seg_after: Annotated[str, _opt("Where <seg> follows the VLM's answer: 'mask' (after box + 16 mask codes) or 'box' "
                                   "(right after the box: 5 decoding steps at inference instead of 21; the shipped head).")] = "box",
    save_every: Annotated[int, _opt("Checkpoint every N steps.")] = 50,
    threads: Annotated[Optional[int], _opt("torch CPU threads.")] = None,
    device: Annotated[str, _opt("auto, cpu or cuda.")] = "auto",
    progress: Annotated[bool, _opt("Show a progress bar.")] = True,
) -> None:
    """Train the <seg> query head of method rau-seg (the VLM's <seg> state -> LiteMedSAM mask decoder
    prompts; decoder fine-tuned, VLM frozen); resumable. Recipe: scripts/rau_seg_recipe.sh."""
    try:
        from rau.methods.rau_vlm import DEFAULT_DIR
        from rau.models.refvlm.seghead import train_seghead

        weights = [float(w) for w in cache_weights.split(",")] if cache_weights else None
        final = train_seghead(vlm or DEFAULT_DIR, cache, seg_cache, output_dir, steps=steps, pairs_per_step=pairs_per_step,
                              structures_per_pair=structures_per_pair, lr=lr, warmup=warmup, seed=seed,
                              box_prompt=box_prompt, seg_after=seg_after, cache_weights=weights, save_every=save_every, threads=threads, device=device,
                              command="rau " + " ".join(sys.argv[1:]), progress=progress)
    except USER_ERRORS as exc:
        _fail(exc)
    typer.echo(f"final model: {final}")
