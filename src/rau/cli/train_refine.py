"""Training commands of the registration refiner: ``rau train refine-cache`` (registration outputs
of a dataset part) and ``rau train refine``; mounted under ``rau train`` by :mod:`rau.cli.app`.

CPU-sized example:

    rau train refine-cache --data runs/drr/train --out runs/refine/drr.npz --exclude '*clavicle*'
    rau train refine --cache runs/refine/drr.npz --output-dir runs/refine/run --steps 20
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rau.cli.common import ExcludeOpt, ProgressOpt, ThreadsOpt, command_line, option, user_errors


def refine_cache(
    data: Annotated[Path, option("Dataset folder (images/ + masks/<structure>/, or COCO).", "--data")],
    out: Annotated[Path, option("Output .npz: target, warped reference and per structure warped + true masks.")],
    exclude: ExcludeOpt = None,
    images: Annotated[Optional[str], option("Id-sorted image range START:STOP (e.g. 0:160, a training part); default all.")] = None,
    limit: Annotated[Optional[int], option("At most N targets (a seeded subset); references come from the whole range.")] = None,
    top: Annotated[int, option("The reference is drawn among the N most similar images (thumbnail NCC).")] = 3,
    image_size: Annotated[int, option("Side at which the cache stores images and masks.")] = 256,
    seed: Annotated[int, option("Seed: subset and reference draws.")] = 0,
    threads: Annotated[Optional[int], option("ITK threads for registration (default: ITK's).", "--threads")] = None,
    progress: ProgressOpt = True,
) -> None:
    """Register each image of a dataset part onto a similar one and store what `rau train refine` reads."""
    with user_errors():
        from rau.cli.common import parse_range
        from rau.training.recipes.refine import build_refine_cache

        if threads is not None:
            import SimpleITK as sitk

            if threads < 1:
                raise ValueError(f"--threads: expected an integer >= 1, got {threads}")
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
        path = build_refine_cache(data, out, exclude=exclude or (), image_range=parse_range(images, "--images"),
                                  image_size=image_size, top=top, limit=limit, seed=seed, progress=progress)
    typer.echo(f"refine cache: {path}")


def refine(
    cache: Annotated[list[Path], option("Refine cache(s) (rau train refine-cache); repeat for several.", "--cache")],
    output_dir: Annotated[Path, option("Run folder: checkpoints, loss.json/png, final/. An existing run there is resumed.")],
    steps: Annotated[int, option("Optimizer steps.")] = 2000,
    batch_size: Annotated[int, option("(pair, structure) windows per step.")] = 16,
    lr: Annotated[float, option("AdamW peak learning rate (cosine to 10%).")] = 1e-3,
    warmup: Annotated[int, option("Linear warmup steps.")] = 50,
    exclude: ExcludeOpt = None,
    stop_after: Annotated[Optional[int], option("End this call after N steps of the --steps schedule (checkpoint, no final/); rerun without it to go on.")] = None,
    seed: Annotated[int, option("Seed: init and samples.")] = 0,
    save_every: Annotated[int, option("Checkpoint every N steps.")] = 100,
    threads: ThreadsOpt = None,
    device: Annotated[str, option("auto (GPU if present), cpu or cuda.")] = "auto",
    progress: ProgressOpt = True,
) -> None:
    """Train the registration refiner (target + warped reference + warped mask -> target mask); resumable."""
    with user_errors():
        from rau.training.recipes.refine import train_refiner

        final = train_refiner(cache, output_dir, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup,
                              exclude=exclude or (), stop_after=stop_after, seed=seed, save_every=save_every,
                              device=device, threads=threads, command=command_line(), progress=progress)
    typer.echo(f"{'final model' if final.name == 'final' else 'stopped at'}: {final}")
