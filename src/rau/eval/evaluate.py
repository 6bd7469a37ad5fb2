"""Evaluation of a method over a target set with references from a reference set (``rau eval``).

Protocol (also in docs/RESULTS.md):
- targets: the target set's images (optionally a slice of the id-sorted list, optionally ``limit``
  of them drawn with ``seed``); each keeps its ground-truth masks for scoring only.
- reference: for each target, the reference-set image with the highest thumbnail NCC
  (:mod:`rau.references.thumbnails`), never the target itself (same file or identical pixels), also when
  both sets are one folder; ``reference="random"`` draws one with ``seed`` instead, and
  ``reference="coverage"`` takes, among the most similar, the one expected to cover most of what the
  target shows (:mod:`rau.references.coverage`).
- the method is asked for every requested structure the reference annotates.
- segmentation/box metrics: per (target, structure in the target's ground truth). A structure
  the reference lacks cannot be predicted and counts as a miss (Dice 0, box IoU 0).
- identification: per (target, structure asked): the answer "yes"/"no" (visible) against the
  ground truth; methods that do not answer are judged by whether they returned a mask.
- "mean" is the macro average over structures (each structure once); "mean_micro" over pairs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rau.data.dataset import Dataset
from rau.errors import RauInputError
from rau.geometry import box_iou, mask_to_box
from rau.metrics import dice, hd95, iou, mean_or_nan
from rau.references.thumbnails import ThumbnailBank

METRIC_KEYS = ("dice", "iou", "hd95", "box_iou", "box_acc50")
#: How ``evaluate`` picks each target's reference(s) (``rau eval --reference-choice``).
REFERENCE_CHOICES = ("similar", "random", "coverage")
#: An output is "right" when its Dice with the truth reaches this (issue 17's definition).
RIGHT_DICE = 0.5


def select_targets(ds: Dataset, limit: int | None, seed: int) -> Dataset:
    if limit is None or limit >= len(ds):
        return ds
    if limit <= 0:
        raise RauInputError(f"--limit: must be a positive number of targets, got {limit}")
    rng = np.random.default_rng(seed)
    keep = sorted(rng.choice(len(ds), size=limit, replace=False).tolist())
    return Dataset(ds.root, [ds.entries[i] for i in keep], ds.layout)


def build_bank(references: Dataset, progress: bool = True) -> ThumbnailBank:
    from tqdm.auto import tqdm

    from rau.data.io import read_image

    images = (read_image(e.image_path, arg="reference image")[0]
              for e in tqdm(references.entries, desc="indexing references", disable=not progress))
    return ThumbnailBank.build([e.id for e in references.entries],
                               [str(e.image_path.resolve()) for e in references.entries], images)


def score_target(result, target, structures_asked: list[str], wanted: set[str] | None,
                 min_confidence: float | None = None) -> list[dict[str, Any]]:
    """One row per structure of the target's ground truth (and per asked structure for identification).

    Asked structures also get ``right`` (the output is right: Dice >= 0.5 where the structure is
    in the target, no mask where it is absent), ``confidence``, ``flag`` and ``features`` (see
    :mod:`rau.methods.confidence`), and ``abstain`` (it would be withheld at ``min_confidence``)."""
    from rau.methods.confidence import abstention_reason
    rows = []
    truth = {s: m for s, m in target.masks.items() if wanted is None or s in wanted}
    spacing = tuple(target.meta.get("spacing_mm") or (1.0, 1.0))
    for name in sorted(set(truth) | set(structures_asked)):
        r = result.structures.get(name)
        row: dict[str, Any] = {"target": target.id, "reference": result.reference_id, "structure": name,
                               "in_truth": name in truth, "asked": name in structures_asked}
        if name in structures_asked and r is not None:
            said_yes = (r.answer or "").strip().lower().startswith("yes") and r.found
            withheld = abstention_reason(r, min_confidence or 0.0) is not None
            row["id_correct"] = bool(said_yes == (name in truth))
            # what the user gets at the default threshold: a withheld structure is answered "no"
            row["id_delivered"] = bool((said_yes and not withheld) == (name in truth))
            row["score"] = r.score
            row.update(found=r.found, confidence=r.confidence, flag=r.flag, features=r.features,
                       abstain=withheld, presence=r.presence, absent=r.absent is not None)
            if name not in truth:
                row["right"] = not r.found
        if name in truth:
            gt = truth[name]
            pred = r.mask if r is not None and r.mask is not None else np.zeros_like(gt)
            pbox = r.box_xyxy_px if r is not None else None
            b_iou = box_iou(pbox, mask_to_box(gt))
            row.update(dice=dice(pred, gt), iou=iou(pred, gt), hd95=hd95(pred, gt, spacing),
                       box_iou=b_iou, box_acc50=float(b_iou >= 0.5))
            if "score" in row:
                row["right"] = bool(row["dice"] >= RIGHT_DICE)
        rows.append(row)
    return rows


def confidence_summary(rows: list[dict[str, Any]], correct_dice: float = 0.5) -> dict[str, Any]:
    """How well the method's per-structure score separates right from wrong answers.

    Over (target, structure) pairs that were asked and are in the ground truth: a localization is
    "correct" when its Dice >= ``correct_dice``; ``auroc`` is the AUROC of the score for that
    (0.5 = the score says nothing, 1 = it ranks every correct answer above every wrong one)."""
    from rau.metrics import auroc

    pairs = [r for r in rows if r["in_truth"] and "score" in r]
    correct = [r["dice"] >= correct_dice for r in pairs]
    return {"auroc": auroc([r["score"] for r in pairs], correct), "n": len(pairs),
            "n_correct": int(sum(correct)), "correct_if_dice_at_least": correct_dice}


def calibration_summary(rows: list[dict[str, Any]], calibration=None, bins: int = 10) -> dict[str, Any]:
    """How well the calibrated ``confidence`` predicts right vs wrong over every asked structure
    (present or absent): ``auroc``, ``ece`` (expected calibration error, ``bins`` equal-width bins),
    ``reliability`` (per bin: mean confidence, share right, count), and at the calibration's
    threshold: ``abstain_wrong`` (share of wrong outputs withheld), ``abstain_right`` (share of right
    masks withheld: false abstention; a right "not there" loses nothing when withheld) and
    ``no_mask_all`` (share of outputs that deliver no mask, withheld or answered "not there": on
    the wrong-input split every output should); ``presence_auroc``: the presence probability
    separating structures in the target from absent ones, ``absent_right`` / ``absent_wrong``: the
    shares of present / absent structures the presence model calls absent. NaN where the rows have
    no confidence (or no presence)."""
    from rau.metrics import auroc

    asked = [r for r in rows if "right" in r]
    scored = [r for r in asked if r.get("confidence") is not None]
    right = np.array([r["right"] for r in scored], bool)
    conf = np.array([r["confidence"] for r in scored], np.float64)
    withheld = np.array([bool(r.get("abstain")) for r in asked], bool)
    ok = np.array([r["right"] for r in asked], bool)
    mask = np.array([bool(r.get("found", True)) for r in asked], bool)
    out: dict[str, Any] = {"n": len(asked), "n_right": int(ok.sum()), "n_scored": len(scored),
                           "auroc": auroc(conf, right) if len(scored) else float("nan"),
                           "ece": float("nan"), "reliability": [],
                           "threshold": calibration.threshold if calibration is not None else None,
                           "abstain_wrong": float(withheld[~ok].mean()) if (~ok).any() else float("nan"),
                           "abstain_right": float(withheld[ok & mask].mean()) if (ok & mask).any() else float("nan"),
                           "no_mask_all": float((withheld | ~mask).mean()) if len(asked) else float("nan")}
    pres = [r for r in asked if r.get("presence") is not None]
    inside = np.array([bool(r["in_truth"]) for r in pres], bool)
    called = np.array([bool(r.get("absent")) for r in pres], bool)
    out.update(n_presence=len(pres),
               presence_auroc=auroc([r["presence"] for r in pres], inside) if pres else float("nan"),
               absent_right=float(called[inside].mean()) if inside.any() else float("nan"),
               absent_wrong=float(called[~inside].mean()) if (~inside).any() else float("nan"))
    if len(scored):
        edges = np.linspace(0, 1, bins + 1)
        idx = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
        ece = 0.0
        for b in range(bins):
            sel = idx == b
            if sel.any():
                out["reliability"].append({"bin": [float(edges[b]), float(edges[b + 1])], "confidence": float(conf[sel].mean()),
                                           "right": float(right[sel].mean()), "n": int(sel.sum())})
                ece += sel.mean() * abs(conf[sel].mean() - right[sel].mean())
        out["ece"] = float(ece)
    return out


def summarize(rows: list[dict[str, Any]]) -> tuple[dict, dict, dict]:
    """-> (per_structure, mean (macro over structures), mean_micro)."""
    per: dict[str, dict[str, Any]] = {}
    for name in sorted({r["structure"] for r in rows}):
        seg = [r for r in rows if r["structure"] == name and r["in_truth"]]
        ident = [r for r in rows if r["structure"] == name and "id_correct" in r]
        entry: dict[str, Any] = {"n": len(seg)}
        for k in METRIC_KEYS:
            entry[k] = mean_or_nan([r[k] for r in seg])
        entry["id_acc"] = mean_or_nan([float(r["id_correct"]) for r in ident])
        entry["id_delivered"] = mean_or_nan([float(r["id_delivered"]) for r in ident if "id_delivered" in r])
        entry["n_id"] = len(ident)
        per[name] = entry
    scored = {n: e for n, e in per.items() if e["n"] > 0}
    mean = {k: mean_or_nan([e[k] for e in scored.values()]) for k in METRIC_KEYS}
    mean["id_acc"] = mean_or_nan([e["id_acc"] for e in per.values() if e["n_id"] > 0])
    mean["id_delivered"] = mean_or_nan([e["id_delivered"] for e in per.values() if e["n_id"] > 0])
    seg_rows = [r for r in rows if r["in_truth"]]
    micro = {k: mean_or_nan([r[k] for r in seg_rows]) for k in METRIC_KEYS}
    micro["id_acc"] = mean_or_nan([float(r["id_correct"]) for r in rows if "id_correct" in r])
    micro["id_delivered"] = mean_or_nan([float(r["id_delivered"]) for r in rows if "id_delivered" in r])
    return per, mean, micro


def evaluate(
    targets: Dataset,
    references: Dataset,
    method,
    *,
    structures: list[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
    reference: str = "similar",
    progress: bool = True,
    config: dict[str, Any] | None = None,
    bank=None,
    k: int = 1,
) -> dict[str, Any]:
    """Run ``method`` on every target with its chosen reference(s); return the RESULT.json document.

    ``bank``: a :class:`rau.references.bank.ReferenceBank` over ``references`` that picks the references by
    embedding retrieval instead of thumbnail NCC. ``k`` > 1: the method runs once per reference
    (the top k, or k random ones) and the results are fused (:func:`rau.references.bank.fuse_results`)."""
    from tqdm.auto import tqdm

    from rau.methods.confidence import result_threshold
    from rau.references.bank import predict_with_references

    if reference not in REFERENCE_CHOICES:
        raise RauInputError(f"--reference-choice: expected one of {', '.join(REFERENCE_CHOICES)}, got {reference!r}")
    if structures:
        known = set(targets.structures) | set(references.structures)
        unknown = [s for s in structures if s not in known]
        if unknown:
            raise RauInputError(f"--structures: {', '.join(map(repr, unknown))} appear in neither dataset "
                                f"(known: {', '.join(sorted(known))})")
    wanted = set(structures) if structures else None
    chosen = select_targets(targets, limit, seed)
    if not isinstance(k, int) or k < 1:
        raise RauInputError(f"--k-references: must be a positive integer, got {k!r}")
    thumbs = build_bank(references, progress) if bank is None or reference == "random" else None
    ref_by_id = {e.id: e for e in references.entries}
    rng = np.random.default_rng(seed)
    rows, seconds, pairs = [], [], []
    # the user's default (rau localize): the threshold of the calibration that assessed each result, or
    # without one the rules alone (blank, noise, mirrored); 0 here once hid the rules' withholding for
    # uncalibrated methods
    calibration_for = getattr(method, "calibration_for", None)
    calibration = calibration_for(k) if calibration_for else getattr(method, "calibration", None)
    used = set()  # the thresholds the results were withheld at (a method may assess some with another calibration)
    for entry in tqdm(chosen.entries, desc=f"eval {method.name}", disable=not progress):
        target = chosen.load(entry, structures)
        ref_ids = _choose_references(target, entry, thumbs, bank, reference, k, rng, ref_by_id)
        refs = [references.load(ref_by_id[r], structures) for r in ref_ids]
        result, asked = predict_with_references(method, refs, shown_to(method, target))
        seconds.append(result.seconds)
        pairs.append({"target": target.id, "reference": ref_ids[0] if k == 1 else ref_ids})
        threshold = result_threshold(result, None, calibration)
        used.add(threshold)
        rows.extend(score_target(result, target, asked, wanted, threshold))
    per, mean, micro = summarize(rows)
    summary = calibration_summary(rows, calibration)
    if len(used) == 1 and summary.get("threshold") is not None:
        summary["threshold"] = used.pop()
    return {
        "method": method.name,
        "per_structure": per,
        "mean": mean,
        "mean_micro": micro,
        "confidence": confidence_summary(rows),
        "calibration": summary,
        "seconds_per_target": float(np.mean(seconds)) if seconds else float("nan"),
        "n_targets": len(chosen),
        "config": {**(config or {}), "reference_choice": reference, "seed": seed, "limit": limit,
                   "structures": structures, "pairs": pairs,
                   # the VLM methods' mode (Method.segment_all); absent where the method has no such choice
                   **({"segment_all": method.segment_all} if getattr(method, "segment_all", None) is not None else {})},
        "targets": rows,
    }


def _choose_references(target, entry, thumbs, bank, reference: str, k: int, rng, ref_by_id) -> list[str]:
    from rau.references.coverage import choose_by_coverage, pool_size

    source = str(entry.image_path.resolve())
    want = pool_size(reference, k)
    if reference == "random" or bank is None:
        ranked = thumbs.rank(target.image, exclude_source=source)
        if not ranked:
            raise RauInputError("--references: no reference left once the target itself is excluded")
        if reference == "random":
            pick = rng.choice(len(ranked), size=min(k, len(ranked)), replace=False)
            return [ranked[int(i)][0] for i in pick]
        ids = [r[0] for r in ranked[:want]]
    else:
        ids = [r[0] for r in bank.search(target.image, want, exclude_source=source)]
    if reference == "coverage":
        return choose_by_coverage(target.image, ids, lambda i: ref_by_id[i].structures, k)
    return ids[:k]


def shown_to(method, target):
    """Methods never see the target's ground truth, except the oracle, whose point it is."""
    if method.reads_target_truth:
        return target
    from rau.data.annotated import AnnotatedImage

    return AnnotatedImage(target.image, {}, dict(target.meta))


def markdown_table(report: dict[str, Any]) -> str:
    """Per-structure table + mean row, for the terminal and docs/RESULTS.md."""
    head = "| structure | n | Dice | IoU | HD95 px | box IoU | box acc@0.5 | id acc |\n|---|---|---|---|---|---|---|---|"
    lines = [head]

    def fmt(v):
        return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3f}"

    for name, e in report["per_structure"].items():
        lines.append(f"| {name} | {e['n']} | {fmt(e['dice'])} | {fmt(e['iou'])} | {fmt(e['hd95'])} | "
                     f"{fmt(e['box_iou'])} | {fmt(e['box_acc50'])} | {fmt(e['id_acc'])} |")
    m = report["mean"]
    lines.append(f"| **mean** | {report['n_targets']} targets | {fmt(m['dice'])} | {fmt(m['iou'])} | {fmt(m['hd95'])} | "
                 f"{fmt(m['box_iou'])} | {fmt(m['box_acc50'])} | {fmt(m['id_acc'])} |")
    return "\n".join(lines)


def model_config(method_options: dict[str, Any]) -> dict[str, Any]:
    """The model folders (str or None), the resolved encoder precision and, where decoding every
    structure was asked (``--decode-unknown``), ``follow_unknown: false``, and where the second opinion
    was turned off (``--no-second-opinion``), ``second_opinion: false``, and ``angiogram_masks`` where it is not
    the default ("refiner") of a run's method options, as
    its RESULT.json ``config`` records them (what :func:`report_label` reads)."""
    from rau.encoders.litemedsam import resolve_precision

    keys = ("vlm", "lora", "sam2", "unet", "chex", "seg_head")
    return {**{k: str(method_options[k]) if method_options.get(k) else None for k in keys},
            "precision": resolve_precision(method_options.get("precision"), method_options.get("device", "cpu")),
            **({"follow_unknown": False} if method_options.get("follow_unknown") is False else {}),
            **({"second_opinion": False} if method_options.get("second_opinion") is False else {}),
            **({"angiogram_masks": method_options["angiogram_masks"]}
               if method_options.get("angiogram_masks", "refiner") != "refiner" else {})}


def report_label(report: dict[str, Any]) -> str:
    """Method name, plus the checkpoint folder's name for methods that load one (rau, unet, sam2, chexanatomy)."""
    config = report.get("config", {})
    tags = [Path(config[k]).name if Path(config[k]).name != "final" else Path(config[k]).parent.name
            for k in ("vlm", "unet", "sam2", "chex", "seg_head") if config.get(k)]
    if config.get("reference_choice") == "random":
        tags.append("random ref")
    else:
        if config.get("reference_choice") == "coverage":
            tags.append("coverage ref")
        if config.get("bank"):
            tags.append(f"bank {Path(config['bank']).stem}")
    if (config.get("k_references") or 1) > 1:
        tags.append(f"k={config['k_references']}")
    return f"{report['method']} ({', '.join(tags)})" if tags else report["method"]


def comparison_table(reports: list[dict[str, Any]]) -> str:
    """Methods side by side (one row per report): mean metrics and seconds per target."""
    def fmt(v):
        return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3f}"

    lines = ["| method | targets | Dice | IoU | HD95 px | box IoU | box acc@0.5 | id acc | id delivered | s/target | score AUROC |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        m = r["mean"]
        conf = (r.get("confidence") or confidence_summary(r.get("targets", [])))["auroc"]
        lines.append(f"| {report_label(r)} | {r['n_targets']} | {fmt(m['dice'])} | {fmt(m['iou'])} | {fmt(m['hd95'])} | "
                     f"{fmt(m['box_iou'])} | {fmt(m['box_acc50'])} | {fmt(m['id_acc'])} | {fmt(m.get('id_delivered'))} | "
                     f"{r['seconds_per_target']:.2f} | {fmt(conf)} |")
    return "\n".join(lines)


def confidence_table(reports: list[dict[str, Any]]) -> str:
    """Calibrated confidence per method (rows asked, share right, AUROC right vs wrong, ECE, the
    threshold, the shares withheld of wrong outputs and of right masks, and the share of outputs
    that deliver no mask)."""
    def fmt(v):
        return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3f}"

    lines = ["| method | outputs | right | confidence AUROC | ECE | threshold | withheld: wrong | withheld: right masks | "
             "no mask delivered | presence AUROC | called absent: present / absent |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        c = r.get("calibration")
        if not c:
            continue
        share = c["n_right"] / c["n"] if c["n"] else float("nan")
        lines.append(f"| {report_label(r)} | {c['n']} | {fmt(share)} | {fmt(c['auroc'])} | {fmt(c['ece'])} | "
                     f"{fmt(c['threshold'])} | {fmt(c['abstain_wrong'])} | {fmt(c['abstain_right'])} | {fmt(c['no_mask_all'])} | "
                     f"{fmt(c.get('presence_auroc'))} | {fmt(c.get('absent_right'))} / {fmt(c.get('absent_wrong'))} |")
    return "\n".join(lines)


def dice_by_structure_table(reports: list[dict[str, Any]]) -> str:
    """Per-structure Dice, one column per method."""
    names = sorted({s for r in reports for s, e in r["per_structure"].items() if e["n"] > 0},
                   key=lambda s: (len(s), s))
    head = "| structure | n | " + " | ".join(report_label(r) for r in reports) + " |"
    lines = [head, "|---|---|" + "---|" * len(reports)]
    for s in names:
        n = max(r["per_structure"].get(s, {}).get("n", 0) for r in reports)
        cells = []
        for r in reports:
            e = r["per_structure"].get(s)
            cells.append("-" if not e or not e["n"] else f"{e['dice']:.3f}")
        lines.append(f"| {s} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
