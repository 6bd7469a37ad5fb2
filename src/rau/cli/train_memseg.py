"""Training commands of the memory segmenter (issue 15): ``rau train memseg-cache``
(full LiteMedSAM embeddings + frame masks of a dataset), ``rau train memseg`` and ``rau train
seg-head-memseg`` (rau-seg's ``<seg>`` head for the memory segmenter); mounted under
``rau train`` by :mod:`rau.cli.app`.

CPU-sized example (grid 32: memory attention at LiteMedSAM's full 64 x 64 grid costs seconds per
pair on a CPU):

    rau train memseg-cache --data runs/drr/train --out runs/memseg/drr_train.npz
    rau train memseg --cache runs/memseg/drr_train.npz --output-dir runs/memseg/run --steps 20 \\
        --exclude '*clavicle*' --exclude '*scapula*' --grid 32
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rau.cli.common import ExcludeOpt, ProgressOpt, ThreadsOpt, command_line, option, user_errors



def memseg_cache(
    data: Annotated[Path, option("Dataset folder (images/ + masks/<structure>/, or COCO).", "--data")],
    out: Annotated[Path, option("Output .npz: fp16 LiteMedSAM embeddings + bit-packed masks in the encoder frame.")],
    exclude: ExcludeOpt = None,
    images: Annotated[Optional[str], option("Id-sorted image range START:STOP (e.g. 0:160, a training part); default all.")] = None,
    frames: Annotated[bool, option("Store the uint8 encoder input instead of the embedding (64 KB, not 2 MB, per image): a "
                                   "frame cache, encoded where `rau train memseg` runs (e.g. sent to a GPU machine).")] = False,
    progress: ProgressOpt = True,
) -> None:
    """Store what `rau train memseg` trains on: each image's full LiteMedSAM embedding and masks."""
    with user_errors():
        from rau.cli.common import parse_range
        from rau.training.recipes.memseg import build_memseg_cache

        path = build_memseg_cache(data, out, exclude_structures=exclude or (), image_range=parse_range(images, "--images"),
                                  frames=frames, progress=progress)
    typer.echo(f"memseg cache: {path}")


def memseg(
    cache: Annotated[list[Path], option("Memseg cache(s) (rau train memseg-cache); repeat for several.", "--cache")],
    output_dir: Annotated[Path, option("Run folder: checkpoints, loss.json/png, final/. An existing run there is resumed.")],
    steps: Annotated[int, option("Optimizer steps.")] = 2000,
    batch_size: Annotated[int, option("Reference/target pairs per step.")] = 2,
    k_references: Annotated[int, option("Reference frames in memory per pair (with --vary-k: the most).")] = 1,
    vary_k: Annotated[bool, option("Each step draws its number of reference frames in 1..--k-references.")] = False,
    lr: Annotated[float, option("AdamW peak learning rate (cosine to 10%).")] = 1e-4,
    warmup: Annotated[int, option("Linear warmup steps.")] = 20,
    exclude: ExcludeOpt = None,
    grid: Annotated[int, option("Cells per side for memory attention and decoder: 64 (LiteMedSAM's), 32 or 16.")] = 64,
    decoder_grid: Annotated[Optional[int], option("Cells per side of the mask decoder (default: --grid); 64 with --grid 32 keeps full mask detail.")] = None,
    stop_after: Annotated[Optional[int], option("End this call after N steps of the --steps schedule (checkpoint, no final/); rerun without it to go on.")] = None,
    init_from: Annotated[Optional[Path], option("Memseg model or checkpoint folder whose weights start the run.")] = None,
    memory_layers: Annotated[int, option("Memory-attention layers.")] = 2,
    box_prompt: Annotated[bool, option("The decoder also reads a target box.")] = False,
    mask_prompt: Annotated[bool, option("The decoder also reads the references' mask as a dense prior in the target frame.")] = False,
    pseudo: Annotated[float, option("Share of pairs on pseudo-structures (unions, halves, boundary bands of labelled ones).")] = 0.0,
    target_prior: Annotated[float, option("With --mask-prompt: share of pairs whose prior is the target's own mask, smoothly deformed "
                                          "(a registration-like prior, so the model learns to read reg-memseg's warped mask).")] = 0.0,
    prior_amplitude: Annotated[float, option("--target-prior: the largest displacement-field scale, a fraction of the side.")] = 0.03,
    prior_shift: Annotated[float, option("--target-prior: the largest shift, a fraction of the side.")] = 0.04,
    readout: Annotated[bool, option("With --mask-prompt: a trained readout path (the reference masks' values carried by learned "
                                    "feature similarity) is the decoder's default prior.")] = False,
    readout_grid: Annotated[int, option("--readout: cells per side of the readout (64, 32 or 16).")] = 64,
    readout_weight: Annotated[float, option("--readout: weight of the readout's own BCE + Dice in the loss.")] = 1.0,
    readout_only: Annotated[bool, option("--readout: train the readout path alone (no decoder pass; fast).")] = False,
    readout_residual: Annotated[bool, option("--readout: the output is the prior (the readout) on the logit scale plus the "
                                             "decoder's logits times a learned gain: the decoder corrects it.")] = False,
    residual_gain: Annotated[float, option("--readout-residual: the decoder's gain at init.")] = 0.5,
    seed: Annotated[int, option("Seed: init and pairs.")] = 0,
    save_every: Annotated[int, option("Checkpoint every N steps.")] = 50,
    threads: ThreadsOpt = None,
    device: Annotated[str, option("auto (GPU if present), cpu or cuda.")] = "auto",
    progress: ProgressOpt = True,
) -> None:
    """Train the memory segmenter (reference image + mask in memory -> target mask); resumable."""
    with user_errors():
        from rau.models.memseg.configuration import MemSegConfig
        from rau.training.recipes.memseg import train_memseg

        config = MemSegConfig(grid=grid, decoder_grid=decoder_grid, memory_layers=memory_layers, box_prompt=box_prompt,
                              mask_prompt=mask_prompt, readout=readout, readout_grid=readout_grid,
                              readout_residual=readout_residual, residual_gain=residual_gain)
        final = train_memseg(cache, output_dir, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                             readout_weight=readout_weight if readout else 0.0, readout_only=readout_only,
                             k_references=k_references, vary_k=vary_k, exclude=exclude or (), pseudo=pseudo, target_prior=target_prior,
                             prior_deform=(prior_amplitude, prior_shift), init_from=init_from, stop_after=stop_after, save_every=save_every,
                             warmup=warmup, config=config, device=device, threads=threads,
                             command=command_line(), progress=progress)
    typer.echo(f"{'final model' if final.name == 'final' else 'stopped at'}: {final}")



def seg_head_memseg(
    cache: Annotated[list[Path], option("Memseg cache(s) (rau train memseg-cache); repeat for several.", "--cache")],
    output_dir: Annotated[Path, option("Run folder: checkpoints, loss.json/png, final/. An existing run there is resumed.")],
    vlm: Annotated[Optional[Path], option("The compact RAU VLM whose <seg> query is projected (default: the shipped one); frozen.", "--vlm")] = None,
    memseg: Annotated[Optional[Path], option("The memory segmenter the query prompts (default: the shipped one); frozen.", "--memseg")] = None,
    steps: Annotated[int, option("Optimizer steps.")] = 400,
    batch_size: Annotated[int, option("Reference/target pairs per step (one structure each).")] = 8,
    lr: Annotated[float, option("AdamW peak learning rate (cosine to 10%).")] = 3e-4,
    warmup: Annotated[int, option("Linear warmup steps.")] = 20,
    exclude: ExcludeOpt = None,
    seed: Annotated[int, option("Seed: init and pairs.")] = 0,
    save_every: Annotated[int, option("Checkpoint every N steps.")] = 50,
    threads: ThreadsOpt = None,
    device: Annotated[str, option("auto (GPU if present), cpu or cuda.")] = "auto",
    progress: ProgressOpt = True,
) -> None:
    """Train rau-seg's <seg> head for the memory segmenter (the paper's RAU); resumable.

    The VLM's <seg> state -> prompt tokens of the memory segmenter's decoder, beside the reference
    mask moved into the VLM's box as its prior; VLM and memory segmenter frozen. Recipe:
    scripts/rau_seg_memseg_recipe.sh.
    """
    with user_errors():
        from rau.methods.memseg import DEFAULT_MEMSEG_DIR
        from rau.methods.rau_vlm import DEFAULT_DIR
        from rau.training.recipes.seghead import train_seghead_memseg

        final = train_seghead_memseg(vlm or DEFAULT_DIR, memseg or DEFAULT_MEMSEG_DIR, cache, output_dir, steps=steps,
                                     batch_size=batch_size, lr=lr, warmup=warmup, seed=seed, exclude=exclude or (),
                                     save_every=save_every, threads=threads, device=device, command=command_line(),
                                     progress=progress)
    typer.echo(f"final model: {final}")
