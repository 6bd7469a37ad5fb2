"""Training commands ``rau train ...`` of the VLM family: vlm (Qwen2.5-VL SFT), chex-cache, chex,
refvlm, grpo, seg-cache, seg-head. The mask tokenizer and the U-Net are in :mod:`rau.cli.train_masks`;
:mod:`rau.cli.app` mounts them all under ``rau train``.

Only typer is imported here; training code is imported inside each command, so ``rau --help``
stays fast. Every training runs through :func:`rau.training.engine.run_training` (resumable:
rerunning a command continues its output folder from the latest checkpoint).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from rau.cli.common import (
    CacheWeightsOpt,
    PeakLrOpt,
    ProgressOpt,
    RunDirOpt,
    SaveEveryOpt,
    StepsOpt,
    ThreadsOpt,
    TrainDeviceOpt,
    command_line,
    option,
    parse_range,
    set_threads,
    split_names,
    split_numbers,
    user_errors,
)

# options several trainings share (help text only; each command sets its own default)
WarmupOpt = Annotated[int, option("Linear warmup steps.")]
LocSigmaOpt = Annotated[float, option("Gaussian soft-label width over location bins (0 = plain cross-entropy).")]
HiddenOpt = Annotated[int, option("Decoder width (new models only).")]
LayersOpt = Annotated[int, option("Decoder layers (new models only).")]
SeedOpt = Annotated[int, option("Seed: init and data order.")]

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


def vlm(
    model: Annotated[Optional[Path], option("Local Qwen-VL checkpoint folder to fine-tune (hub layout).")] = None,
    dataset: Annotated[Optional[list[Path]], option("Dataset folder (images/ + masks/<structure>/, or COCO); repeat for several.", "--dataset")] = None,
    output_dir: Annotated[Optional[Path], option("Run folder: checkpoints, loss.json/png, final/. An existing run there is resumed.")] = None,
    config: Annotated[Optional[Path], option("JSON file of options (TrainConfig field names, or a run's config.json); command-line options override it.")] = None,
    max_steps: Annotated[Optional[int], option("Optimizer steps to reach (default: 1000).")] = None,
    batch_size: Annotated[Optional[int], option("Examples per micro-batch per process (default: 1).")] = None,
    grad_accum: Annotated[Optional[int], option("Micro-batches per optimizer step (default: 1).")] = None,
    lr: Annotated[Optional[float], option("AdamW learning rate (default: 1e-4).")] = None,
    weight_decay: Annotated[Optional[float], option("AdamW weight decay (not on norms/biases) (default: 0).")] = None,
    warmup_steps: Annotated[Optional[int], option("Linear warmup steps (default: 0).")] = None,
    lr_schedule: Annotated[Optional[str], option("cosine (to 10% of lr at --decay-steps) or constant (default: cosine).")] = None,
    decay_steps: Annotated[Optional[int], option("Must equal --max-steps when given (the cosine ends at the last step; kept for old run configs).")] = None,
    max_grad_norm: Annotated[Optional[float], option("Gradient clipping norm, 0 = off (default: 1.0).")] = None,
    lora: Annotated[Optional[bool], option("Train a LoRA adapter (merged into final/) instead of all weights (default: --lora).", "--lora/--no-lora")] = None,
    lora_r: Annotated[Optional[int], option("LoRA rank (default: 8).")] = None,
    lora_alpha: Annotated[Optional[int], option("LoRA alpha (default: 16).")] = None,
    lora_dropout: Annotated[Optional[float], option("LoRA dropout (default: 0.05).")] = None,
    lora_targets: Annotated[Optional[str], option("Comma-separated module names for LoRA (default: q_proj,k_proj,v_proj,o_proj).")] = None,
    freeze_vision: Annotated[Optional[bool], option("Keep the vision tower frozen (default: --freeze-vision).", "--freeze-vision/--no-freeze-vision")] = None,
    augment: Annotated[Optional[bool], option("Augment targets: scale, shift, gamma (default: --no-augment).", "--augment/--no-augment")] = None,
    seed: Annotated[Optional[int], option("Seed: data order, LoRA init, dropout (default: 0).")] = None,
    save_every: Annotated[Optional[int], option("Checkpoint every N steps (and at the end) (default: 100).")] = None,
    log_every: Annotated[Optional[int], option("Rewrite loss.json/loss.png every N steps (default: 10).")] = None,
    max_pixels: Annotated[Optional[int], option("Cap on resized pixels per image (default: 401408 = 512*28*28).")] = None,
    bf16: Annotated[Optional[bool], option("bf16 (default: auto, on a bf16-capable GPU).", "--bf16/--no-bf16")] = None,
    device: Annotated[Optional[str], option("auto, cpu or cuda (default: auto); pick GPUs with CUDA_VISIBLE_DEVICES.")] = None,
    progress: ProgressOpt = True,
) -> None:
    """Supervised fine-tuning of the Qwen-VL localizer on reference/target pairs (resumable).

    CPU smoke run (a tiny random model, seconds):

        python -c "from tiny_qwen import save_tiny_checkpoint; save_tiny_checkpoint('runs/tiny')"
        rau train vlm --model runs/tiny --dataset DATASET --output-dir runs/sft-smoke --max-steps 2 --max-pixels 3136 --device cpu

    Several GPUs: accelerate launch --num_processes 4 -m rau.cli.app train vlm --model ... (same options).
    Rerunning a command resumes its output dir from the latest checkpoint.
    """
    with user_errors():
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
    if int(os.environ.get("RANK", "0")) != 0:  # under accelerate launch / torchrun: one summary line
        return
    rate = summary["steps_per_second"]
    speed = f", {rate:.2f} steps/s" if rate else ""
    first, last = (f"{x:.4f}" if x is not None else "-" for x in (summary["first_loss"], summary["last_loss"]))
    typer.echo(
        f"trained steps {summary['start_step']}->{summary['max_steps']}{speed}; loss {first} -> {last}; "
        f"final checkpoint: {summary['final_dir']}"
    )


def chex_cache(
    dataset: Annotated[Path, option("Dataset folder (images/ + masks/<structure>/, or COCO).")],
    out: Annotated[Path, option("Cache file to write (.npz): pooled LiteMedSAM features + answer tokens.")],
    structures: Annotated[Optional[str], option("Comma-separated structures (default: all of the dataset's).")] = None,
    id_range: Annotated[Optional[str], option("START:STOP slice of the id-sorted images, e.g. 0:160.")] = None,
    ids: Annotated[Optional[str], option("Comma-separated image ids (after --id-range).")] = None,
    threads: ThreadsOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Encode a dataset once for CheXanatomy training (the vision tower is frozen)."""
    with user_errors():
        from rau.data.caches import build_cache

        set_threads(threads)
        cache = build_cache(dataset, out, structures=split_names(structures), id_range=parse_range(id_range, "--id-range"),
                            ids=split_names(ids, "--ids"), progress=progress)
    typer.echo(f"{len(cache)} images, {len(cache.names)} structures -> {out}")


def chex(
    cache: Annotated[list[Path], option("Token cache(s) from `rau train chex-cache`; repeat for several.", "--cache")],
    output_dir: RunDirOpt,
    steps: StepsOpt = 2000,
    batch_size: Annotated[int, option("Sequences (images) per step.")] = 8,
    tasks_per_seq: Annotated[int, option("Task blocks (detect/segment/name) per image sequence.")] = 8,
    lr: PeakLrOpt = 5e-4,
    warmup: WarmupOpt = 100,
    loc_sigma: LocSigmaOpt = 4.0,
    init_from: Annotated[Optional[Path], option("Start from this trained model folder (fine-tuning, e.g. k-shot).")] = None,
    cache_weights: CacheWeightsOpt = None,
    hidden_size: HiddenOpt = 256,
    num_layers: LayersOpt = 6,
    seed: SeedOpt = 0,
    save_every: SaveEveryOpt = 200,
    threads: ThreadsOpt = None,
    device: TrainDeviceOpt = "auto",
    progress: ProgressOpt = True,
) -> None:
    """Train the CheXanatomy VLM (boxes and masks as tokens) by next-token prediction; resumable.

    Example (the shipped recipe is in docs/HISTORY.md):

        rau drr --out runs/drr/train --views 300 --seed 0
        rau train chex-cache --dataset runs/drr/train --out runs/chex/drr_train.npz
        rau train chex --cache runs/chex/drr_train.npz --output-dir runs/chex/drr --steps 2000
    """
    with user_errors():
        from rau.training.recipes.chex import train_chex

        weights = split_numbers(cache_weights, "--cache-weights")
        config = None if init_from else {"hidden_size": hidden_size, "num_layers": num_layers}
        final = train_chex(cache, output_dir, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, seed=seed,
                           tasks_per_seq=tasks_per_seq, loc_sigma=loc_sigma, init_from=init_from, config=config,
                           save_every=save_every, threads=threads, device=device, cache_weights=weights,
                           command=command_line(), progress=progress)
    typer.echo(f"final model: {final}")


def refvlm(
    cache: Annotated[list[Path], option("Token cache(s) from `rau train chex-cache` (one per dataset: pairs never mix caches); repeat for several.", "--cache")],
    output_dir: RunDirOpt,
    steps: StepsOpt = 3000,
    batch_size: Annotated[int, option("Reference/target pairs per step.")] = 8,
    structures_per_pair: Annotated[int, option("Reference structures (blocks) per pair.")] = 6,
    p_similar: Annotated[float, option("Probability that a pair's reference is one of the target's nearest images (else any).")] = 0.5,
    lr: PeakLrOpt = 1e-3,
    warmup: WarmupOpt = 100,
    loc_sigma: LocSigmaOpt = 4.0,
    init_from: Annotated[Optional[Path], option("Start from this trained model folder (fine-tuning).")] = None,
    cache_weights: CacheWeightsOpt = None,
    hidden_size: HiddenOpt = 256,
    num_layers: LayersOpt = 6,
    seed: SeedOpt = 0,
    save_every: SaveEveryOpt = 200,
    threads: ThreadsOpt = None,
    device: TrainDeviceOpt = "auto",
    progress: ProgressOpt = True,
) -> None:
    """Train the compact RAU VLM (the shipped default localizer) on reference/target pairs; resumable.

    The shipped weights' recipe is scripts/rau_vlm_recipe.sh; e.g.

        rau train chex-cache --dataset ../shared/datasets/wingspan_cxr --id-range 0:160 --out runs/ref/ws.npz
        rau train refvlm --cache runs/ref/ws.npz --output-dir runs/ref/vlm --steps 3000

    Several GPUs: accelerate launch --num_processes 4 -m rau.cli.app train refvlm ... (same options).
    """
    with user_errors():
        from rau.training.recipes.refvlm import train_refvlm

        weights = split_numbers(cache_weights, "--cache-weights")
        config = None if init_from else {"hidden_size": hidden_size, "num_layers": num_layers}
        final = train_refvlm(cache, output_dir, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, seed=seed,
                             structures_per_pair=structures_per_pair, p_similar=p_similar, loc_sigma=loc_sigma,
                             init_from=init_from, config=config, save_every=save_every, threads=threads,
                             device=device, cache_weights=weights, command=command_line(),
                             progress=progress)
    typer.echo(f"final model: {final}")


def _reward_weights(text: str) -> dict[str, float]:
    """``"box_iou=1,mask_dice=0.5"`` -> ``{"box_iou": 1.0, "mask_dice": 0.5}``."""
    try:
        return {k.strip(): float(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise ValueError(f"--reward-weights: expected name=value pairs separated by commas, got {text!r}") from None


def grpo(
    init_from: Annotated[Path, option("The SFT model folder to start from (`rau train refvlm` final/ or src/rau/assets/refvlm); also the KL anchor.", "--init-from")],
    cache: Annotated[list[Path], option("Token cache(s) from `rau train chex-cache`, as for `rau train refvlm`; repeat for several.", "--cache")],
    output_dir: Annotated[Path, option("Run folder: checkpoints, loss.json/png (loss, reward and its parts), final/. An existing run there is resumed.")],
    steps: StepsOpt = 400,
    pairs_per_step: Annotated[int, option("Reference/target pairs per step.")] = 4,
    structures_per_pair: Annotated[int, option("Reference structures (groups) per pair.")] = 4,
    group_size: Annotated[int, option("Sampled answers per structure (GRPO group).")] = 8,
    temperature: Annotated[float, option("Sampling temperature.")] = 1.0,
    lr: PeakLrOpt = 5e-5,
    warmup: WarmupOpt = 10,
    beta: Annotated[float, option("Weight of the KL penalty to the SFT model.")] = 0.04,
    reward_weights: Annotated[Optional[str], option("Override reward weights, e.g. 'box_iou=1,mask_dice=0.5' (format, identification, box_iou, mask_dice).")] = None,
    p_similar: Annotated[float, option("Probability that a pair's reference is one of the target's nearest images.")] = 0.5,
    cache_weights: CacheWeightsOpt = None,
    seed: Annotated[int, option("Seed: data order and sampling.")] = 0,
    save_every: SaveEveryOpt = 50,
    threads: ThreadsOpt = None,
    device: TrainDeviceOpt = "auto",
    progress: ProgressOpt = True,
) -> None:
    """GRPO after SFT for the compact RAU VLM (RAU's second stage); resumable.

    Sampled answers are rewarded for format, identification, box IoU and mask Dice.
    Recipe: scripts/rau_vlm_grpo_recipe.sh.

        rau train grpo --init-from src/rau/assets/refvlm --cache runs/ref/ws.npz --output-dir runs/ref/grpo
    """
    with user_errors():
        from rau.training.recipes.grpo import train_grpo

        weights = split_numbers(cache_weights, "--cache-weights")
        rw = _reward_weights(reward_weights) if reward_weights else None
        final = train_grpo(cache, output_dir, init_from=init_from, steps=steps, pairs_per_step=pairs_per_step,
                           structures_per_pair=structures_per_pair, group_size=group_size, temperature=temperature,
                           lr=lr, warmup=warmup, beta=beta, seed=seed, p_similar=p_similar, reward_weights=rw,
                           cache_weights=weights, save_every=save_every, threads=threads, device=device,
                           command=command_line(), progress=progress)
    typer.echo(f"final model: {final}")


def seg_cache(
    cache: Annotated[Path, option("Token cache (rau train chex-cache) whose images to store.", "--cache")],
    out: Annotated[Path, option("Output .npz: full LiteMedSAM embeddings (fp16) + masks in the encoder frame.")],
    dataset: Annotated[Optional[Path], option("Dataset folder (default: the one recorded in the cache).")] = None,
    progress: ProgressOpt = True,
) -> None:
    """Store what `rau train seg-head` trains on: each image's full LiteMedSAM embedding and masks."""
    with user_errors():
        from rau.training.recipes.seghead import build_seg_cache

        path = build_seg_cache(cache, out, dataset_root=dataset, progress=progress)
    typer.echo(f"seg cache: {path}")


def seg_head(
    cache: Annotated[list[Path], option("Token cache(s) (rau train chex-cache); repeat for several.", "--cache")],
    seg_cache: Annotated[list[Path], option("The matching seg cache(s) (rau train seg-cache), same order.", "--seg-cache")],
    output_dir: Annotated[Path, option("Run folder: checkpoints, loss.json/png (loss and Dice), final/. An existing run there is resumed.")],
    vlm: Annotated[Optional[Path], option("The compact RAU VLM the head serves (default: the shipped one); frozen.", "--vlm")] = None,
    steps: StepsOpt = 400,
    pairs_per_step: Annotated[int, option("Reference/target pairs per step.")] = 4,
    structures_per_pair: Annotated[int, option("Structures per pair (masks per pair).")] = 4,
    lr: PeakLrOpt = 1e-4,
    warmup: WarmupOpt = 20,
    cache_weights: CacheWeightsOpt = None,
    seed: SeedOpt = 0,
    box_prompt: Annotated[bool, option("Also prompt the decoder with the VLM's own answer box (beside the <seg> tokens).")] = True,
    seg_after: Annotated[str, option("Where <seg> follows the VLM's answer: 'mask' (after box + 16 mask codes) or 'box' "
                                   "(right after the box: 5 decoding steps at inference instead of 21; the shipped head).")] = "box",
    save_every: SaveEveryOpt = 50,
    threads: ThreadsOpt = None,
    device: TrainDeviceOpt = "auto",
    progress: ProgressOpt = True,
) -> None:
    """Train the <seg> query head of method rau-seg; resumable.

    The VLM's <seg> state -> LiteMedSAM mask decoder prompts; decoder fine-tuned, VLM frozen.
    Recipe: scripts/rau_seg_recipe.sh.
    """
    with user_errors():
        from rau.methods.rau_vlm import DEFAULT_DIR
        from rau.training.recipes.seghead import train_seghead

        weights = split_numbers(cache_weights, "--cache-weights")
        final = train_seghead(vlm or DEFAULT_DIR, cache, seg_cache, output_dir, steps=steps, pairs_per_step=pairs_per_step,
                              structures_per_pair=structures_per_pair, lr=lr, warmup=warmup, seed=seed,
                              box_prompt=box_prompt, seg_after=seg_after, cache_weights=weights, save_every=save_every, threads=threads, device=device,
                              command=command_line(), progress=progress)
    typer.echo(f"final model: {final}")
