"""Inference commands: ``rau localize``, ``rau index``, ``rau methods``.

    rau localize --reference ref.png --reference-masks ref_masks/ --target tgt.png --out out/
    rau index --dataset DATASET --id-range 0:160 --out bank.npz
    rau localize --bank bank.npz --target tgt.png --out out/
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rau.cli.common import (
    ChexOpt,
    DeviceOpt,
    LoraOpt,
    MethodOpt,
    PrecisionOpt,
    Sam2Opt,
    MemSegOpt,
    SegHeadOpt,
    SegOpt,
    StructOpt,
    UnetOpt,
    VlmOpt,
    method_options,
    parse_range,
    split_names,
    user_errors,
)


def localize(
    target: Annotated[Path, typer.Option(help="Target image to interpret; any size.")],
    out: Annotated[Path, typer.Option(help="Output folder: result.json, masks/<structure>.png, overlay.png (written atomically).")],
    reference: Annotated[Optional[Path], typer.Option(help="Reference image (PNG/JPEG/DICOM/NIfTI). Or use --bank.")] = None,
    reference_masks: Annotated[Optional[Path], typer.Option(help="Folder of <structure>.png binary masks of the reference (same size as it).")] = None,
    bank: Annotated[Optional[Path], typer.Option(help="Reference bank (rau index): retrieve the reference(s) instead of --reference.")] = None,
    k_references: Annotated[int, typer.Option(help="With --bank: fuse the results of the top K references (majority vote).")] = 1,
    min_fit: Annotated[Optional[str], typer.Option(help="With --bank: abstain when the best reference's similarity is below this value, or 'auto' (the bank's own 5% quantile).")] = None,
    structures: StructOpt = None,
    method: MethodOpt = None,
    device: DeviceOpt = "cpu",
    vlm: VlmOpt = None,
    lora: LoraOpt = None,
    sam2: Sam2Opt = None,
    segmenter: SegOpt = None,
    unet: UnetOpt = None,
    chex: ChexOpt = None,
    seg_head: SegHeadOpt = None,
    memseg: MemSegOpt = None,
    precision: PrecisionOpt = None,
) -> None:
    """Identify, localize (box) and segment (mask) each reference structure in one target image."""
    with user_errors():
        from rau.data.io import load_annotated
        from rau.pipeline import localize as run
        from rau.pipeline import localize_from_bank

        options = method_options(device, vlm, lora, sam2, segmenter, unet=unet, chex=chex, seg_head=seg_head,
                                 precision=precision, memseg=memseg)
        if (bank is None) == (reference is None):
            raise ValueError("--reference/--bank: give a reference (--reference and --reference-masks) or a --bank, not both")
        if bank is None and reference_masks is None:
            raise ValueError("--reference-masks: required with --reference (a folder of <structure>.png masks)")
        tgt = load_annotated(target, arg="--target")
        if bank is not None:
            from rau.references.bank import ReferenceBank

            b = ReferenceBank.load(bank)
            threshold = None
            if min_fit is not None:
                try:
                    threshold = b.fit_threshold() if min_fit == "auto" else float(min_fit)
                except ValueError:
                    raise ValueError(f"--min-fit: expected a number or 'auto', got {min_fit!r}") from None
            result = localize_from_bank(b, tgt, k=k_references, method=method, structures=split_names(structures),
                                        out_dir=out, min_fit=threshold, **options)
        else:
            ref = load_annotated(reference, reference_masks, arg="--reference")
            result = run(ref, tgt, method=method, structures=split_names(structures), out_dir=out, **options)
    found = sum(r.found for r in result.structures.values())
    typer.echo(f"{result.method}: {found}/{len(result.structures)} structures found in {result.seconds:.2f} s -> {out}/result.json")


def index(
    dataset: Annotated[Path, typer.Option(help="Annotated dataset folder to index (images/ + masks/, or COCO).")],
    out: Annotated[Path, typer.Option(help="Bank file to write (.npz).")],
    encoder: Annotated[str, typer.Option(help="litemedsam (default), thumbnail, or module:function.")] = "litemedsam",
    id_range: Annotated[Optional[str], typer.Option(help="START:STOP slice of the id-sorted images, e.g. 0:160.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Build a reference bank: embed every annotated image once, for `localize/eval --bank`."""
    with user_errors():
        from rau.data.dataset import load_dataset
        from rau.references.bank import build_bank

        ds = load_dataset(dataset, arg="--dataset").slice(parse_range(id_range, "--id-range"))
        b = build_bank(ds, encoder=encoder, progress=progress)
        b.save(out)
    typer.echo(f"{len(b)} images indexed with {encoder} ({b.vectors.shape[1]} values each) -> {out}")


def methods() -> None:
    """List the registered methods."""
    from rau.methods import DEFAULT_METHOD, METHODS

    for name in METHODS:
        mark = " (default)" if name == DEFAULT_METHOD else ""
        typer.echo(f"{name}{mark}")
