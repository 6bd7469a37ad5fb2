"""Training commands ``rau train masktok`` (the mask tokenizer, a VQ-VAE) and ``rau train unet``
(CheXanatomy's U-Net baseline); mounted under ``rau train`` by :mod:`rau.cli.app`.

CPU-sized examples (seconds to minutes):

    rau train masktok --data runs/drr/train --out runs/masktok/smoke --steps 20 --batch-size 16
    rau train unet --data runs/drr/train --out runs/unet/smoke --structures right_lung,heart --steps 5 --image-size 64
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rau.cli.common import ProgressOpt, command_line, option, set_threads, split_names, split_numbers, user_errors

DataOpt = Annotated[list[Path], option("Dataset folder (images/ + masks/<structure>/, or COCO); repeat for several.", "--data")]
SaveEveryOpt = Annotated[int, option("Checkpoint every N steps (and at the end).")]


def masktok(
    data: DataOpt,
    out: Annotated[Path, option("Run folder: checkpoints, loss log, final/ (the tokenizer). An existing run there is resumed.")],
    steps: Annotated[int, option("Optimizer steps.")] = 1500,
    batch_size: Annotated[int, option("Mask crops per step.")] = 128,
    lr: Annotated[float, option("Peak learning rate.")] = 2e-3,
    seed: Annotated[int, option("Seed: init, batches and augmentation.")] = 0,
    codebook_size: Annotated[Optional[int], option("Codes in the codebook (default: 512).")] = None,
    code_dim: Annotated[Optional[int], option("Width of a code vector (default: 32).")] = None,
    channels: Annotated[Optional[str], option("Comma-separated widths, one per stride-2 stage (default: 16,32,64,96).")] = None,
    jitter: Annotated[float, option("Box jitter, as a fraction of the box side.")] = 0.05,
    flip: Annotated[bool, option("Random left-right flips of the crops.", "--flip/--no-flip")] = True,
    restart_until: Annotated[float, option("Re-seed dead codes during this first fraction of the steps.")] = 0.9,
    save_every: SaveEveryOpt = 100,
    threads: Annotated[int, option("torch CPU threads (results are reproducible for a fixed count).")] = 1,
    device: Annotated[str, option("torch device: cpu, cuda ...")] = "cpu",
    progress: ProgressOpt = True,
) -> None:
    """Train the mask tokenizer (VQ-VAE: a box + 16 codes per mask) on dataset masks; resumable."""
    with user_errors():
        widths = split_numbers(channels, "--channels", int)
        set_threads(threads)
        from rau.tokens.vqvae import MaskTokConfig
        from rau.training.recipes.masktok import train_masktok

        given = {"codebook_size": codebook_size, "code_dim": code_dim, "channels": tuple(widths) if widths else None}
        config = MaskTokConfig(**{k: v for k, v in given.items() if v is not None})
        tok = train_masktok(data, out, steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=device,
                            config=config, save_every=save_every, jitter=jitter, flip=flip,
                            restart_until=restart_until, command=command_line(), progress=progress)
    metrics = (getattr(tok, "training", None) or {}).get("final_metrics", {})
    typer.echo(f"{tok!r} -> {out}: {metrics}")


def unet(
    data: DataOpt,
    out: Annotated[Path, option("Run folder: checkpoints, loss log, final/ (the model). An existing run there is resumed.")],
    structures: Annotated[Optional[str], option("Comma-separated output structures (from scratch); fine-tuning keeps the checkpoint's.")] = None,
    steps: Annotated[int, option("Optimizer steps.")] = 2000,
    batch_size: Annotated[int, option("Images per step.")] = 8,
    lr: Annotated[float, option("Peak learning rate (cosine to 10%).")] = 1e-3,
    seed: Annotated[int, option("Seed: init, batches and augmentation.")] = 0,
    image_size: Annotated[int, option("Square network input side, a multiple of 16 (new models only).")] = 256,
    channels: Annotated[Optional[str], option("6 comma-separated BasicUNet widths (new models only; default: 16,32,64,128,256,16).")] = None,
    preprocessing: Annotated[str, option("equalize or minmax (new models only).")] = "equalize",
    norm: Annotated[str, option("instance or batch (new models only).")] = "instance",
    init_from: Annotated[Optional[Path], option("Trained U-Net folder to fine-tune.")] = None,
    id_range: Annotated[Optional[str], option("START:STOP slice of the id-sorted images (one --data folder).")] = None,
    few_shot: Annotated[Optional[int], option("Then keep K ids of that range, drawn with --few-shot-seed.")] = None,
    few_shot_seed: Annotated[int, option("Seed of the --few-shot draw.")] = 0,
    augment: Annotated[bool, option("Augment: scale, shift, rotation, intensity.", "--augment/--no-augment")] = True,
    resume: Annotated[bool, option("Continue the run in --out from its latest checkpoint (--no-resume: start over).", "--resume/--no-resume")] = True,
    save_every: SaveEveryOpt = 100,
    threads: Annotated[int, option("torch CPU threads.")] = 1,
    device: Annotated[str, option("torch device: cpu, cuda ...")] = "cpu",
    progress: ProgressOpt = True,
) -> None:
    """Train or fine-tune the U-Net baseline (fixed structures, no reference); resumable."""
    with user_errors():
        widths = split_numbers(channels, "--channels", int)
        names = split_names(structures)
        if init_from is None and names is None:
            raise ValueError("--structures: required when training from scratch (e.g. right_lung,left_lung,heart)")
        from rau.models.unet.configuration import UNetConfig
        from rau.training.recipes.unet import pick_ids, train_unet

        train_ids = pick_ids(data, id_range, few_shot, few_shot_seed)
        config = None
        if init_from is None:
            extra = {"channels": tuple(widths)} if widths else {}
            config = UNetConfig(structures=names, image_size=image_size, preprocessing=preprocessing, norm=norm,
                                seed=seed, **extra)
        final = train_unet(data, out, steps=steps, batch_size=batch_size, lr=lr, seed=seed, init_from=init_from,
                           train_ids=train_ids, augment=augment, resume=resume, device=device, threads=threads,
                           config=config, checkpoint_every=save_every, progress=progress, command=command_line())
    typer.echo(f"final model: {final}")
