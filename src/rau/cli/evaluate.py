"""Evaluation commands: ``rau eval``, ``report``, ``bench`` and the model-level evaluations
``eval-tokens`` (compact RAU VLM), ``eval-chex-tokens`` (CheXanatomy), ``eval-unet``, ``eval-masktok``.

    rau eval --targets DATASET --references DATASET --out result.json
    rau report a.json b.json --plot dice.png
    rau eval-tokens --model src/rau/assets/refvlm --references runs/chex/drr_train.npz --targets runs/chex/drr_test.npz
    rau eval-unet --checkpoint runs/unet/drr/final --data runs/drr/test --out runs/unet/eval.json
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from rau.cli.common import (
    ChexOpt,
    DeviceOpt,
    LoraOpt,
    MethodOpt,
    PrecisionOpt,
    ProgressOpt,
    Sam2Opt,
    FollowOpt,
    SecondOpinionOpt,
    AngiogramMasksOpt,
    SegmentAllOpt,
    MemSegOpt,
    RefinerOpt,
    SegHeadOpt,
    SegOpt,
    StructOpt,
    UnetOpt,
    VlmOpt,
    command_line,
    method_options,
    option,
    parse_range,
    set_threads,
    split_names,
    user_errors,
)


def _sub_bank(bank, keep: list[int]):
    from dataclasses import replace

    return replace(bank, ids=[bank.ids[i] for i in keep], sources=[bank.sources[i] for i in keep],
                   digests=[bank.digests[i] for i in keep], vectors=bank.vectors[keep])


def _bank_over(bank: Path, rset):
    """The bank at ``bank`` restricted to the images of ``rset``, and ``rset`` in the bank's order."""
    from rau.references.bank import ReferenceBank

    ref_bank = ReferenceBank.load(bank)
    missing = sorted({e.id for e in rset.entries} - set(ref_bank.ids))
    if missing:
        raise ValueError(f"--bank: {bank} does not index {len(missing)} of the --references images (e.g. {missing[0]}); "
                         "build it over the same folder and range")
    rset = rset.subset([i for i in ref_bank.ids if i in {e.id for e in rset.entries}])
    keep = [i for i, n in enumerate(ref_bank.ids) if n in {e.id for e in rset.entries}]
    return _sub_bank(ref_bank, keep), rset


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
    reference_choice: Annotated[str, typer.Option(help="similar: most similar reference by thumbnail NCC (or by --bank); random: seeded random; "
                                                  "coverage: of the 10 most similar, the one expected to cover most of what the target shows "
                                                  "(the visibility model's reading; coronary segments).")] = "similar",
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
    memseg: MemSegOpt = None,
    follow_unknown: FollowOpt = True,
    segment_all: SegmentAllOpt = True,
    second_opinion: SecondOpinionOpt = True,
    angiogram_masks: AngiogramMasksOpt = "refiner",
    refiner: RefinerOpt = None,
    precision: PrecisionOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Evaluate a method on a target dataset with references from a reference dataset."""
    with user_errors():
        from rau.atomic import write_json
        from rau.data.dataset import load_dataset
        from rau.eval.evaluate import evaluate, markdown_table, model_config
        from rau.methods import DEFAULT_METHOD, create_method

        tset = load_dataset(targets, arg="--targets")
        rset = load_dataset(references, arg="--references")
        tr, rr = parse_range(target_range, "--target-range"), parse_range(reference_range, "--reference-range")
        tset, rset = tset.slice(tr), rset.slice(rr)
        for ds, arg in ((tset, "--target-range"), (rset, "--reference-range")):
            if len(ds) == 0:
                raise ValueError(f"{arg}: selects no image")
        name = method or DEFAULT_METHOD
        options = method_options(device, vlm, lora, sam2, segmenter, seed, unet, chex, seg_head, precision, memseg, refiner=refiner,
                                 follow_unknown=follow_unknown, segment_all=segment_all, second_opinion=second_opinion,
                                 angiogram_masks=angiogram_masks)
        m = create_method(name, **options)
        config = {"targets": str(targets), "references": str(references), "target_range": target_range,
                  "reference_range": reference_range, "method": name, "device": device, **model_config(options),
                  "segmenter": segmenter, "argv": sys.argv[1:]}
        ref_bank = None
        if bank is not None:
            ref_bank, rset = _bank_over(bank, rset)
        config.update(bank=str(bank) if bank else None, k_references=k_references)
        report = evaluate(tset, rset, m, structures=split_names(structures), limit=limit, seed=seed,
                          reference=reference_choice, progress=progress, config=config, bank=ref_bank, k=k_references)
        write_json(out, report)
    typer.echo(f"\n{report['method']}: {report['n_targets']} targets, {report['seconds_per_target']:.2f} s/target\n")
    typer.echo(markdown_table(report))


def report(
    results: Annotated[list[Path], typer.Argument(help="RESULT.json files of `rau eval` runs on the same targets.")],
    per_structure: Annotated[bool, typer.Option(help="Also print per-structure Dice, one column per method.")] = True,
    plot: Annotated[Optional[Path], typer.Option(help="Also draw a bar chart of Dice per structure and method to this PNG.")] = None,
    title: Annotated[str, typer.Option(help="Title of the --plot figure.")] = "",
) -> None:
    """Compare `rau eval` results side by side (Markdown), e.g. for docs/RESULTS.md."""
    import json

    with user_errors():
        from rau.eval.evaluate import comparison_table, dice_by_structure_table

        docs = []
        for p in results:
            if not p.is_file():
                raise FileNotFoundError(f"results: {p} does not exist")
            try:
                docs.append(json.loads(p.read_text()))
            except json.JSONDecodeError as exc:
                raise ValueError(f"results: {p} is not a RESULT.json of `rau eval` ({exc})") from None
    typer.echo(comparison_table(docs))
    if plot is not None:
        from rau.eval.plots import dice_bar_chart

        dice_bar_chart(docs, plot, title)
    if per_structure:
        typer.echo("")
        typer.echo(dice_by_structure_table(docs))


def bench(
    out: Annotated[Path, typer.Option(help="Output folder: <split>_<method>.json, dice_<split>.png, overlays, BENCH.md.")] = Path("runs/bench"),
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated methods (default: rau-seg,rau,reg-refine,registration,reg-box,reg-fuse,oracle-box; add rau-refine, rau-box, rau-tokens, chexanatomy with --chex, sam2-memory, reg-memseg, rau-memseg, oracle-memory with --memseg).")] = None,
    splits: Annotated[Optional[str], typer.Option(help="Comma-separated splits: wingspan, arcade, drr, drr-unseen, wrong (deliberately wrong inputs) (default: all); "
                                                    "the calibration splits calib-wingspan, calib-arcade, calib-drr, calib-wrong on request.")] = None,
    overlays: Annotated[Optional[str], typer.Option(help="Comma-separated methods to draw best/worst overlays for (default: the first non-oracle method).")] = None,
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
    memseg: MemSegOpt = None,
    follow_unknown: FollowOpt = True,
    segment_all: SegmentAllOpt = True,
    refiner: RefinerOpt = None,
    second_opinion: SecondOpinionOpt = True,
    angiogram_masks: AngiogramMasksOpt = "refiner",
    k_references: Annotated[int, typer.Option(help="K > 1: each target gets the top K references of a LiteMedSAM bank (built per split), results fused by majority vote.")] = 1,
    precision: PrecisionOpt = None,
    calibration: Annotated[Optional[str], typer.Option(help="Confidence calibration JSON for the (single) method, or 'none'. Default: each method's shipped one (rau calibrate).")] = None,
    progress: ProgressOpt = True,
) -> None:
    """Run every method on the same pairs of the fixed splits and write the comparison (BENCH.md)."""
    with user_errors():
        from rau.eval.bench import main_bench

        path = main_bench(out, methods=split_names(methods, "--methods"), split_names=split_names(splits, "--splits"),
                          data=data, drr_dir=drr_dir, quick=quick, limit=limit, seed=seed, progress=progress,
                          argv=sys.argv[1:], k=k_references, overlay_methods=split_names(overlays, "--overlays"),
                          method_options={**method_options(device, vlm, lora, sam2, segmenter, seed, unet, chex, seg_head,
                                                           precision, memseg, refiner=refiner, follow_unknown=follow_unknown, segment_all=segment_all,
                                                           second_opinion=second_opinion, angiogram_masks=angiogram_masks),
                                          **({"calibration": calibration} if calibration else {})})
    typer.echo(path.read_text())


def calibrate(
    method: MethodOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="Calibration JSON to write (default: the method's shipped file, src/rau/assets/calibration/<method>.json; "
                                                    "<method>_k.json with --k-references, <method>[_k]_decode.json with --decode-unknown, "
                                                    "<method>[_k][_decode]_visible.json with --segment-visible).")] = None,
    work: Annotated[Path, typer.Option(help="Folder for the calibration runs (<split>_<method>.json; reused when present, so a killed run resumes).")] = Path("runs/calib"),
    data: Annotated[Path, typer.Option(help="Folder holding wingspan_cxr/ and arcade_syntax/.")] = Path("../shared/datasets"),
    drr_dir: Annotated[Path, typer.Option(help="DRR folders (train/ as references; calib/ rendered here on first use).")] = Path("runs/drr"),
    quick: Annotated[bool, typer.Option(help="8 targets per calibration split (a smoke run).")] = False,
    seed: Annotated[int, typer.Option(help="Seed for target subsets, registration sampling and the folds.")] = 0,
    k_references: Annotated[int, typer.Option(help="Calibrate the results of K references (top K of a LiteMedSAM bank "
                                                   "per target, as rau bench --k-references K); default file "
                                                   "<method>_k.json, read whenever the method fuses K > 1 references.")] = 1,
    splits: Annotated[Optional[str], typer.Option(help="Comma-separated calibration splits (default calib-wingspan,"
                                                       "calib-arcade,calib-drr,calib-wrong; calib-arcade-val in place of "
                                                       "calib-arcade for a model trained on all of ARCADE train, e.g. the "
                                                       "memory segmenter).")] = None,
    device: DeviceOpt = "cpu",
    vlm: VlmOpt = None,
    seg_head: SegHeadOpt = None,
    memseg: MemSegOpt = None,
    follow_unknown: FollowOpt = True,
    segment_all: SegmentAllOpt = True,
    refiner: RefinerOpt = None,
    second_opinion: SecondOpinionOpt = True,
    angiogram_masks: AngiogramMasksOpt = "refiner",
    memory_route: Annotated[bool, typer.Option("--memory-route", help="Method reg-refine: fit the confidence of the masks "
                                               "its memory segmenter delivers on angiograms (the outputs with a second "
                                               "opinion), alone; default file <method>_memory.json.")] = False,
    unet: UnetOpt = None,
    chex: ChexOpt = None,
    precision: PrecisionOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Fit a method's calibrated confidence on the calibration splits (never scored by rau bench) and write it."""
    with user_errors():
        from rau.errors import RauInputError
        from rau.eval.calibrate import run_calibration
        from rau.methods.confidence import calibration_path
        from rau.methods.registry import DEFAULT_METHOD

        name = method or DEFAULT_METHOD
        if k_references < 1:
            raise RauInputError(f"--k-references: must be a positive integer, got {k_references}")
        options = method_options(device, vlm, None, None, None, seed, unet, chex, seg_head, precision, memseg, refiner=refiner,
                                 follow_unknown=follow_unknown, segment_all=segment_all, second_opinion=second_opinion,
                                 angiogram_masks=angiogram_masks)
        if memory_route:
            from rau.methods.registry import method_options as checked_options

            if k_references > 1 or not getattr(checked_options(name, **options), "delivers_memory_masks", False):
                raise RauInputError(f"--memory-route: method {name!r} delivers no second opinion's masks with these options "
                                    "(reg-refine with one reference, --second-opinion and --angiogram-masks memory)")
        target = out or calibration_path(name, k_references > 1, decode=not follow_unknown, visible=not segment_all,
                                         memory=memory_route)
        cal = run_calibration(name, target, work, data=data, drr_dir=drr_dir, quick=quick, seed=seed, progress=progress,
                              k=k_references, splits=split_names(splits, "--splits") if splits else None,
                              argv=sys.argv[1:], method_options=options, memory_route=memory_route)
    r = cal.record
    orient = f"min orientation agreement {cal.min_orientation:+.3f}" if cal.min_orientation is not None else "no orientation rule"
    rules = "kind, fit, orientation, mirrored" if cal.min_orientation is not None else "kind, fit, mirrored"
    typer.echo(f"{name}: {r['n_outputs']} outputs ({r['n_right']} right, {r['n_gated']} caught by the pair rules: {rules}), "
               f"threshold {cal.threshold:.3f}, min fit {cal.min_fit:.3f}, {orient} -> {target}")
    for rule, pooled in cal.rule_pooled.items():  # the confidence of what each rule withholds
        top = sorted(cal.rule_rates.get(rule, {}).items(), key=lambda kv: -kv[1])[:3]
        typer.echo(f"  withheld by '{rule}': share right {pooled:.2f} pooled (shrinkage {r.get('rule_strength', {}).get(rule, 0):g}); "
                   f"highest: {', '.join(f'{k} {v:.2f}' for k, v in top)}")
    pres = cal.presence_model()
    if pres is not None:  # out-of-fold, per split with absent structures
        oof = {s: v for s, v in pres.record.get("out_of_fold", {}).items() if v.get("identification", 1.0) < 1.0}
        typer.echo(f"  presence: {pres.record.get('n_absent', 0)} absent of {pres.record.get('n', 0)} outputs, threshold "
                   f"{pres.threshold:.3f}; " + "; ".join(f"{s}: AUROC {v['auroc']:.3f}, identification {v['identification']:.3f}, "
                                                       f"right masks called absent {v['right_masks_withheld']:.3f}"
                                                       for s, v in oof.items()))
    else:
        typer.echo("  presence: no model (too few structures absent from their targets on these splits)")


def eval_tokens(
    model: Annotated[Path, option("A compact RAU VLM folder (`rau train refvlm` final/, or src/rau/assets/refvlm).")],
    references: Annotated[Path, option("Token cache (`rau train chex-cache`) the references are drawn from.")],
    targets: Annotated[Path, option("Token cache of the targets.")],
    limit: Annotated[Optional[int], option("Evaluate the first N targets (default: all).")] = None,
    out: Annotated[Optional[Path], option("Also write the results to this JSON file.")] = None,
) -> None:
    """Token-level check of a compact RAU VLM on caches: identification, box IoU (seconds)."""
    with user_errors():
        from rau.data.caches import load_cache
        from rau.eval.refvlm_tokens import evaluate_cache
        from rau.models.refvlm.modeling import RefVlmModel

        res = evaluate_cache(RefVlmModel.from_pretrained(model), load_cache(references), load_cache(targets), limit)
        res.update({"model": str(model), "references": str(references), "targets": str(targets)})
        if out is not None:
            from rau.atomic import write_json

            write_json(out, res, indent=1)
    typer.echo(f"{targets.name}: id acc {res['id_acc']:.3f}  box IoU {res['box_iou']:.3f}  acc@0.5 {res['box_acc50']:.3f}"
               f"  ({res['n_targets']} targets, {res['n_rows']} structures)")


def eval_chex_tokens(
    model: Annotated[Path, option("A CheXanatomy model folder (`rau train chex` final/).")],
    cache: Annotated[Path, option("Token cache (`rau train chex-cache`) of the images to ask about.")],
    out: Annotated[Path, option("Results JSON to write.")],
    limit: Annotated[Optional[int], option("Evaluate the first N images (default: all).")] = None,
    threads: Annotated[int, option("torch CPU threads.")] = 1,
) -> None:
    """Token-level check of a CheXanatomy model: naming from the true box, "detect X" box IoU."""
    import json

    with user_errors():
        set_threads(threads)
        from rau.atomic import write_json
        from rau.eval.chex_tokens import evaluate_tokens
        from rau.models.chex.modeling import ChexModel

        res = evaluate_tokens(ChexModel.from_pretrained(model), cache, limit=limit)
        res["command"] = command_line()
        write_json(out, res, indent=1)
    typer.echo(json.dumps(res["mean"]))
    for n, e in res["per_structure"].items():
        typer.echo(f"{n:20s} n={e['n']:3d} naming {e['naming_acc']:.3f} detect box IoU {e['detect_box_iou']:.3f}")


def eval_unet(
    checkpoint: Annotated[Path, option("A trained U-Net folder (`rau train unet` OUT/final).")],
    data: Annotated[Path, option("Dataset folder (images/ + masks/<structure>/, or COCO).")],
    id_range: Annotated[Optional[str], option("START:STOP slice of the id-sorted images, e.g. 160:200.")] = None,
    out: Annotated[Optional[Path], option("Results JSON to write.")] = None,
    overlays: Annotated[Optional[Path], option("PNG with contours of --n-overlays images spread over the set.")] = None,
    n_overlays: Annotated[int, option("Images in the --overlays figure.")] = 6,
    threads: Annotated[int, option("torch CPU threads.")] = 1,
    progress: ProgressOpt = True,
) -> None:
    """Dice per structure of a trained U-Net on a dataset, at the images' own size."""
    import json

    with user_errors():
        from rau.eval.unet import evaluate_unet
        from rau.training.recipes.unet import pick_ids

        ids = pick_ids([data], id_range)
        res = evaluate_unet(checkpoint, data, ids=ids, out=out, overlays=overlays, n_overlays=n_overlays,
                            threads=threads, progress=progress)
    typer.echo(json.dumps({"per_structure_dice": {s: v["mean"] for s, v in res["per_structure"].items()},
                           "mean_dice": res["mean_dice"], "seconds_per_image": res["seconds_per_image"]}))


def eval_masktok(
    data: Annotated[Path, option("Dataset folder (images/ + masks/<structure>/, or COCO).")],
    tokenizer: Annotated[Optional[Path], option("A mask tokenizer folder, or a `rau train masktok` run folder (default: the shipped one).")] = None,
    id_range: Annotated[Optional[str], option("START:STOP slice of the images (dataset order), e.g. 160:200.")] = None,
    structures: Annotated[Optional[str], option("Comma-separated structures (default: all of the dataset's).")] = None,
    out: Annotated[Optional[Path], option("Also write the results to this JSON file.")] = None,
    progress: ProgressOpt = True,
) -> None:
    """Round-trip Dice of a mask tokenizer (encode -> decode vs the original masks)."""
    with user_errors():
        rng = parse_range(id_range, "--id-range") or slice(None)
        names = split_names(structures)
        from rau.eval.masktok import roundtrip_dice
        from rau.tokens.masktok import MaskTokenizer, load_default

        tok = load_default() if tokenizer is None else MaskTokenizer.load(tokenizer)
        res = roundtrip_dice(tok, data, start=rng.start or 0, stop=rng.stop, structures=names,
                             progress=progress)
        res["tokenizer"] = str(tokenizer) if tokenizer is not None else "shipped"
        if out is not None:
            from rau.atomic import write_json

            write_json(out, res, indent=1)
    o = res["overall"]
    typer.echo(f"{data.name}: round-trip Dice {o['dice']:.4f} (crop only {o['crop_dice']:.4f}) over {o['n']} masks "
               f"of {res['images']} images")
    for name, e in res["per_structure"].items():
        typer.echo(f"{name:20s} n={e['n']:4d} dice {e['dice']:.4f} crop {e['crop_dice']:.4f}")
