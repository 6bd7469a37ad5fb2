"""Inference commands: ``rau localize``, ``rau index``, ``rau methods``.

    rau localize --reference ref.png --reference-masks ref_masks/ --target tgt.png --out out/
    rau localize --reference ref.png --reference-masks ref_masks/ --targets scans/ --targets 'more/*.dcm' --out out/
    accelerate launch --num_processes 4 -m rau.cli.app localize ... --targets scans/ --out out/   # then add --merge-only
    rau index --dataset DATASET --id-range 0:160 --out bank.npz
    rau localize --bank bank.npz --target tgt.png --out out/
    rau localize --reference ref.png --reference-masks ref_masks/ --target ct.nii.gz --out out/   # a volume: slice by slice
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rau.cli.common import (
    ChexOpt,
    DeviceOpt,
    LoraOpt,
    FollowOpt,
    SecondOpinionOpt,
    AngiogramMasksOpt,
    SegmentAllOpt,
    MemSegOpt,
    RefinerOpt,
    MethodOpt,
    PrecisionOpt,
    ProgressOpt,
    Sam2Opt,
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


#: Said once when the default delivered its refiner's masks on targets it read as coronary angiograms
#: (:func:`rau.pipeline.read_as_angiogram`, and no ``--angiogram-masks memory``).
ANGIOGRAM_NOTE = ("note: {what}; there the memory segmenter's masks (--angiogram-masks memory, "
                  "or --method sam2-memory) are right about twice as often as the default's refiner masks "
                  "(docs/RESULTS.md, 'What a user gets on angiograms')")


def localize(
    out: Annotated[Path, typer.Option(help="Output folder: result.json, masks/<structure>.png, overlay.png (written atomically). With --targets: one such folder per target + summary.csv.")],
    target: Annotated[Optional[Path], typer.Option(help="Target image to interpret; any size. Or use --targets. A volume (3D NIfTI, "
        "a folder holding one DICOM series, a multi-frame DICOM) is segmented slice by slice (see --volume).")] = None,
    targets: Annotated[Optional[list[str]], typer.Option(
        "--targets", help="Batch mode (repeatable): a folder (its image files), a quoted glob pattern or a file. Models load once; "
        "out/<target stem>/ per target (a repeated stem gets _2, _3...) and out/summary.csv (target x structure). "
        "A target that fails is reported and skipped; exit code 1 if any failed, 0 otherwise. "
        "Under `accelerate launch` each process takes its share and writes summary.rank<r>.csv (join them with --merge-only).")] = None,
    reference: Annotated[Optional[Path], typer.Option(help="Reference image (PNG/JPEG/DICOM/NIfTI). Or use --bank.")] = None,
    reference_masks: Annotated[Optional[Path], typer.Option(help="Folder of <structure>.png binary masks of the reference (same size as it).")] = None,
    bank: Annotated[Optional[Path], typer.Option(help="Reference bank (rau index): retrieve the reference(s) instead of --reference.")] = None,
    k_references: Annotated[int, typer.Option(help="With --bank: fuse the results of the top K references (majority vote).")] = 1,
    min_fit: Annotated[Optional[str], typer.Option(help="With --bank: abstain when the best reference's similarity is below this value, or 'auto' (the bank's own 5% quantile).")] = None,
    reference_choice: Annotated[str, typer.Option(help="With --bank: similar (the most similar references) or coverage (of the 10 most "
        "similar, those expected to cover most of what the target shows, by the visibility model: coronary segments).")] = "similar",
    min_confidence: Annotated[Optional[float], typer.Option(help="Withhold each structure whose calibrated confidence (result.json "
        "'confidence': the probability that the output is right) is below this, with the reason (no mask, answer 'no', "
        "'abstained': true). Default: the method's calibrated threshold (blank, noise and no-fit targets are withheld at any threshold > 0); "
        "0 keeps every output.")] = None,
    calibration: Annotated[Optional[str], typer.Option(help="Confidence calibration JSON (rau calibrate), or 'none' for no "
        "confidence. Default: the method's shipped one.")] = None,
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
    follow_unknown: FollowOpt = True,
    segment_all: SegmentAllOpt = True,
    second_opinion: SecondOpinionOpt = True,
    angiogram_masks: AngiogramMasksOpt = "refiner",
    refiner: RefinerOpt = None,
    precision: PrecisionOpt = None,
    formats: Annotated[Optional[str], typer.Option(help="Also export each result as these comma-separated formats: nifti, coco, dicom-seg (default: none).")] = None,
    overwrite: Annotated[bool, typer.Option(help="With --targets: recompute targets whose folder already holds a complete result (default: skip them).")] = False,
    merge_only: Annotated[bool, typer.Option(help="Only join the shards' summary.rank<r>.csv in --out into summary.csv (after `accelerate launch`); runs nothing.")] = False,
    progress: ProgressOpt = True,
    volume: Annotated[Optional[bool], typer.Option("--volume/--no-volume", help="Volume mode for --target: segment the slice (frame) "
        "best matching the reference, then propagate slice by slice both ways; out/ also gets labels.nii.gz (+ label tables) and "
        "slices.json. Default: on for a 3D NIfTI, a DICOM series folder or a multi-frame DICOM, off for anything else. "
        "--no-volume: one slice as before (the middle slice, the first frame).")] = None,
    start_slice: Annotated[Optional[int], typer.Option(help="Volume mode: segment this slice (0-based) with the reference first (default: the best match).")] = None,
    axis: Annotated[Optional[int], typer.Option(help="Volume mode, NIfTI: slice along 2 axial (default), 1 coronal or 0 sagittal.")] = None,
) -> None:
    """Identify, localize (box) and segment (mask) each reference structure in one target image (--target) or many (--targets)."""
    with user_errors():
        from rau.batch import merge_summaries
        from rau.data.io import load_annotated
        from rau.pipeline import localize as run
        from rau.pipeline import check_bank_choice, localize_from_bank, read_as_angiogram

        if merge_only:
            typer.echo(f"shard summaries merged -> {merge_summaries(out)}")
            return
        if (target is None) == (not targets):
            raise ValueError("--target/--targets: give one target (--target) or a batch (--targets), not both")
        vol = None
        options = method_options(device, vlm, lora, sam2, segmenter, unet=unet, chex=chex, seg_head=seg_head,
                                 precision=precision, memseg=memseg, refiner=refiner, follow_unknown=follow_unknown, segment_all=segment_all,
                                 second_opinion=second_opinion,
                                 angiogram_masks=angiogram_masks)
        if calibration:
            options["calibration"] = calibration
        if (bank is None) == (reference is None):
            raise ValueError("--reference/--bank: give a reference (--reference and --reference-masks) or a --bank, not both")
        if bank is None and reference_masks is None:
            raise ValueError("--reference-masks: required with --reference (a folder of <structure>.png masks)")
        check_bank_choice(reference_choice, bank is not None)
        names, export = split_names(structures), split_names(formats, "--formats")
        if _volume_mode(target, volume, start_slice, axis):
            vol = _localize_volume(target, reference, reference_masks, bank, export, out=out, method=method,
                                   structures=names, start=start_slice, axis=axis, progress=progress, **options)
        elif targets:
            source, threshold = _reference_source(reference, reference_masks, bank, min_fit)
            counts, angiograms = _localize_batch(source, targets, out=out, method=method, structures=names,
                                                 formats=export, overwrite=overwrite, progress=progress,
                                                 k=k_references, min_fit=threshold, min_confidence=min_confidence,
                                                 reference_choice=reference_choice, **options)
        else:
            tgt = load_annotated(target, arg="--target")
            source, threshold = _reference_source(reference, reference_masks, bank, min_fit)
            if bank is not None:
                result = localize_from_bank(source, tgt, k=k_references, method=method, structures=names,
                                            out_dir=out, min_fit=threshold, formats=export,
                                            min_confidence=min_confidence, reference_choice=reference_choice, **options)
            else:
                result = run(source, tgt, method=method, structures=names, out_dir=out, formats=export,
                             min_confidence=min_confidence, **options)
    if targets:
        _batch_report(counts, out, angiograms if angiogram_masks == "refiner" else 0)
        return
    if vol is not None:
        typer.echo(f"{vol.method}: {vol.slices_done}/{vol.volume.n_slices} slices done, {len(vol.found)}/{len(vol.structures)} "
                   f"structures found in {vol.seconds:.2f} s -> {out / 'labels.nii.gz'}")
        return
    found = sum(r.found for r in result.structures.values())
    withheld = sum(r.abstained for r in result.structures.values())
    note = f", {withheld} withheld ({next(r.reason for r in result.structures.values() if r.abstained)})" if withheld else ""
    typer.echo(f"{result.method}: {found}/{len(result.structures)} structures found{note} in {result.seconds:.2f} s -> {out}/result.json")
    if angiogram_masks == "refiner" and read_as_angiogram(result):
        typer.echo(ANGIOGRAM_NOTE.format(what="the target reads as a coronary angiogram"), err=True)


def _volume_mode(target: Optional[Path], volume: Optional[bool], start_slice: Optional[int], axis: Optional[int]) -> bool:
    """Whether --target is run as a volume: --volume/--no-volume, else what the path is
    (:func:`rau.data.volume_io.volume_kind`); the volume options are refused outside volume mode."""
    from rau.data.volume_io import volume_kind

    if target is None:
        if volume or start_slice is not None or axis is not None:
            raise ValueError("--volume/--start-slice/--axis: volume mode takes one --target, not --targets")
        return False
    on = volume if volume is not None else volume_kind(target) is not None
    if not on and (start_slice is not None or axis is not None):
        why = "--no-volume is given" if volume is False else f"{target} is a 2D image"
        raise ValueError(f"--start-slice/--axis: only for volume targets and {why}; leave them out")
    return on


def _localize_volume(target: Path, reference: Optional[Path], reference_masks: Optional[Path], bank: Optional[Path],
                     formats: Optional[list[str]], *, out: Path, **kwargs):
    """Volume mode (:func:`rau.volume.propagate`): the volume read first, then the reference."""
    from rau.data.volume_io import read_volume
    from rau.volume import propagate

    if bank is not None:
        raise ValueError("--bank: volume mode needs --reference and --reference-masks (or --no-volume for one slice)")
    if formats:
        raise ValueError("--formats: volume mode writes labels.nii.gz itself; leave --formats out (or --no-volume for one slice)")
    vol = read_volume(target, axis=kwargs.pop("axis"))
    source, _ = _reference_source(reference, reference_masks, None, None)
    return propagate(source, vol, out_dir=out, **kwargs)


def _reference_source(reference: Optional[Path], reference_masks: Optional[Path], bank: Optional[Path], min_fit: Optional[str]):
    """(the loaded reference or bank, the --min-fit threshold or None)."""
    from rau.data.io import load_annotated

    if bank is None:
        return load_annotated(reference, reference_masks, arg="--reference"), None
    from rau.references.bank import ReferenceBank

    b = ReferenceBank.load(bank)
    if min_fit is None:
        return b, None
    try:
        return b, (b.fit_threshold() if min_fit == "auto" else float(min_fit))
    except ValueError:
        raise ValueError(f"--min-fit: expected a number or 'auto', got {min_fit!r}") from None


def _localize_batch(source, targets: list[str], *, out: Path, **kwargs) -> tuple[dict[str, int], int]:
    """Run the batch, a bad target reported on stderr as it comes -> (how many targets per status, how many of
    the done ones the default read as angiograms: :func:`rau.pipeline.read_as_angiogram`)."""
    import sys

    from tqdm.auto import tqdm

    from rau.batch import error_line, localize_many
    from rau.pipeline import read_as_angiogram

    counts, angiograms = {"ok": 0, "skipped": 0, "error": 0}, 0
    for item in localize_many(source, targets, out_dir=out, **kwargs):
        if item.status == "error":
            tqdm.write(f"error: {error_line(item.outcome)}", file=sys.stderr)  # above the progress bar, not through it
        elif item.status == "ok" and read_as_angiogram(item.outcome):
            angiograms += 1
        counts[item.status] += 1
    return counts, angiograms


def _batch_report(counts: dict[str, int], out: Path, angiograms: int = 0) -> None:
    """One line on the batch, and the angiogram note when ``angiograms`` targets got the default's refiner masks
    on what it read as an angiogram; exit code 1 when a target failed."""
    from rau.batch import shard_from_env

    rank, world = shard_from_env()
    summary = out / ("summary.csv" if world == 1 else f"summary.rank{rank}.csv")
    shard = f" (shard {rank + 1}/{world})" if world > 1 else ""
    typer.echo(f"{sum(counts.values())} targets{shard}: {counts['ok']} done, {counts['skipped']} skipped (already done), "
               f"{counts['error']} failed -> {summary}")
    if angiograms:
        typer.echo(ANGIOGRAM_NOTE.format(what=f"{angiograms} of them read as coronary angiograms"), err=True)
    if counts["error"]:
        raise typer.Exit(code=1)


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
