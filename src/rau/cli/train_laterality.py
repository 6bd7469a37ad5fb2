"""``rau train laterality``: the model behind the "mirrored" check of the confidence
(:mod:`rau.models.laterality`); mounted under ``rau train`` by :mod:`rau.cli.app`.

Shipped default (``src/rau/assets/laterality``), about 2 minutes on 2 CPU cores:

    rau train laterality --output-dir runs/laterality --drr-dir runs/drr_full
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rau.cli.common import ProgressOpt, TrainDeviceOpt, command_line, option, user_errors


def laterality(
    output_dir: Annotated[Path, option("Run folder: checkpoints, loss.json/png, final/. An existing run there is resumed.")],
    data: Annotated[Path, option("Folder holding wingspan_cxr/ and arcade_syntax/.")] = Path("../shared/datasets"),
    drr_dir: Annotated[Path, option("DRR folders (train/ is read; rendered there on first use).")] = Path("runs/drr"),
    steps: Annotated[int, option("Optimizer steps.")] = 600,
    batch_size: Annotated[int, option("Images per step.")] = 64,
    lr: Annotated[float, option("AdamW peak learning rate (cosine to 10%).")] = 1e-3,
    seed: Annotated[int, option("Seed: init, batches and augmentation.")] = 0,
    threads: Annotated[int, option("torch CPU threads.")] = 2,
    save_every: Annotated[int, option("Checkpoint every N steps.")] = 100,
    device: TrainDeviceOpt = "cpu",
    progress: ProgressOpt = True,
) -> None:
    """Train the laterality model (which way round an image is) on Wingspan 0..119, DRR train poses and ARCADE train."""
    with user_errors():
        from rau.eval.bench import ensure_drr
        from rau.training.recipes.laterality import laterality_sources, train_laterality

        if steps < 1 or batch_size < 1 or lr <= 0 or save_every < 1:  # before any DRR is rendered
            from rau.errors import RauInputError

            raise RauInputError(f"--steps, --batch-size, --save-every must be >= 1 and --lr > 0, "
                                f"got {steps}, {batch_size}, {save_every}, {lr}")
        ensure_drr(drr_dir, False)
        final = train_laterality(laterality_sources(data, drr_dir), output_dir, steps=steps, batch_size=batch_size,
                                 lr=lr, seed=seed, device=device, threads=threads, checkpoint_every=save_every,
                                 progress=progress, command=command_line())
    typer.echo(f"laterality model: {final}")
