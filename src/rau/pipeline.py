"""Python API: ``rau.localize(reference, target)`` for one target (:func:`localize_from_bank` with
a reference bank), and writing its outputs; :func:`rau.batch.localize_many` runs a batch.

Example::

    import rau
    ref = rau.load_annotated("ref.png", "ref_masks/")          # <structure>.png binary masks
    result = rau.localize(ref, "target.png", out_dir="out/")   # default method: reg-refine
    result.structures["heart"].box_xyxy_px

    from rau.batch import localize_many
    for item in localize_many(ref, ["scans/", "more/*.dcm"], method="registration", out_dir="out/"):
        item.target, item.status, item.outcome                 # status: ok, skipped or error
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from rau.data.annotated import AnnotatedImage, TargetResult
from rau.errors import RauInputError, one_line
from rau.render import draw_annotation, save_png

#: How :func:`localize_from_bank` picks the reference(s) from a bank (``rau localize --reference-choice``).
BANK_CHOICES = ("similar", "coverage")


def check_bank_choice(reference_choice: str, with_bank: bool = True,
                      without: str = "with --reference the reference is given") -> None:
    """A one-line error unless ``reference_choice`` is one of :data:`BANK_CHOICES`, and, where no bank is given
    (``with_bank`` False), unless it is ``similar``: a given reference is not chosen (``without`` ends that line)."""
    if reference_choice not in BANK_CHOICES:
        raise RauInputError(f"--reference-choice: expected one of {', '.join(BANK_CHOICES)}, got {reference_choice!r}")
    if reference_choice != "similar" and not with_bank:
        raise RauInputError(f"--reference-choice: chooses among a --bank's references; {without}")


def read_as_angiogram(result: TargetResult) -> bool:
    """True when ``result`` is ``reg-refine``'s on a target its image-kind model read as a coronary angiogram:
    its coronary outputs then carry the memory segmenter's agreement (the ``second_opinion`` feature, one
    reference). Which masks it delivered is its ``--angiogram-masks`` option; with the refiner's (the default),
    ``rau localize`` and ``rau serve`` say that the memory segmenter's are right about twice as often there."""
    return result.method == "reg-refine" and any(r.features and "second_opinion" in r.features
                                                 for r in result.structures.values())


def _as_target(target: AnnotatedImage | str | Path) -> AnnotatedImage:
    if isinstance(target, AnnotatedImage):
        return target
    from rau.data.io import load_annotated

    return load_annotated(target, arg="--target")


def check_reference(reference: AnnotatedImage, structures: list[str] | None) -> None:
    """Raise unless ``structures`` (None: all) are in the reference and none of its masks is empty."""
    if structures is not None:
        unknown = [s for s in structures if s not in reference.masks]
        if unknown:
            raise RauInputError(
                f"--structures: {', '.join(map(repr, unknown))} not in the reference "
                f"(it has: {', '.join(sorted(reference.masks))})"
            )
    reference.require_nonempty(structures)


def localize(
    reference: AnnotatedImage,
    target: AnnotatedImage | str | Path,
    *,
    method=None,
    structures: list[str] | None = None,
    out_dir: str | Path | None = None,
    formats: Sequence[str] | None = None,
    min_confidence: float | None = None,
    **method_options: Any,
) -> TargetResult:
    """Identify, localize and segment the reference's structures in one target.

    Args:
        reference: annotated reference (its masks name the structures).
        target: an AnnotatedImage or an image path (PNG/JPEG/DICOM/NIfTI); any size.
        method: a registry name (default ``reg-refine``) or a :class:`rau.methods.Method`.
        structures: subset of the reference's structures (default: all).
        out_dir: if given, write result.json, masks/<structure>.png and overlay.png there (atomically).
        formats: with ``out_dir``, extra export formats (``nifti``, ``coco``, ``dicom-seg``;
            :func:`rau.data.export.write_formats`) written into it too.
        min_confidence: withhold (no mask, answer "no", the reason) each structure whose calibrated
            confidence is below it; default: the method's calibrated threshold
            (:mod:`rau.methods.confidence`); blank, noise and no-fit targets are withheld at any
            threshold above 0, and 0 keeps every output.
    """
    from rau.methods import Method, create_method
    from rau.methods.confidence import abstain, resolve_min_confidence, result_threshold

    check_reference(reference, structures)
    target_img = _as_target(target)
    format_writer(formats)
    m = method if isinstance(method, Method) else create_method(method, **method_options)
    resolve_min_confidence(min_confidence, m.calibration)  # a bad value fails before the method runs
    result = m.predict(reference, target_img, structures)
    result = abstain(result, result_threshold(result, min_confidence, m.calibration))
    if out_dir is not None:
        write_result(result, target_img, out_dir, formats)
    return result


def localize_from_bank(
    bank,
    target: AnnotatedImage | str | Path,
    *,
    k: int = 1,
    method=None,
    structures: list[str] | None = None,
    out_dir: str | Path | None = None,
    min_fit: float | None = None,
    formats: Sequence[str] | None = None,
    min_confidence: float | None = None,
    reference_choice: str = "similar",
    **method_options: Any,
) -> TargetResult:
    """Like :func:`localize`, with the reference(s) retrieved from a :class:`rau.references.bank.ReferenceBank`
    (path or object): the top ``k`` by embedding similarity; with k > 1 the method runs once per
    reference and the results are fused (:func:`rau.references.bank.fuse_results`).
    ``reference_choice="coverage"``: of the most similar, those expected to cover most of what the target
    shows (:mod:`rau.references.coverage`; coronary segments, where the most similar often lacks some).

    ``min_fit``: abstain ("no" for every structure, with the reason) when even the best reference's
    similarity is below it, i.e. the bank holds nothing like the target (other anatomy, a mirrored
    image); :meth:`rau.references.bank.ReferenceBank.fit_threshold` calibrates it on the bank alone.
    ``formats``, ``min_confidence``: as in :func:`localize`."""
    from rau.methods import Method, create_method
    from rau.methods.confidence import abstain, result_threshold
    from rau.references.bank import ReferenceBank, predict_with_references
    from rau.references.coverage import choose_by_coverage, pool_size

    format_writer(formats)
    check_bank_choice(reference_choice)
    bank = bank if isinstance(bank, ReferenceBank) else ReferenceBank.load(bank)
    target_img = _as_target(target)
    hits = bank.search(target_img.image, pool_size(reference_choice, k))
    if min_fit is not None and hits[0][1] < min_fit:
        result = _abstain(target_img, hits[0], min_fit, structures, bank)
        if out_dir is not None:
            write_result(result, target_img, out_dir, formats)
        return result
    ds = bank.dataset()
    by_id = {e.id: e for e in ds.entries}
    if reference_choice == "coverage":
        score = dict(hits)
        hits = [(i, score[i]) for i in choose_by_coverage(target_img.image, [h[0] for h in hits], lambda i: by_id[i].structures, k)]
    m = method if isinstance(method, Method) else create_method(method, **method_options)
    refs = [ds.load(by_id[ref_id]) for ref_id, _ in hits]
    unknown = [s for s in structures or [] if s not in refs[0].masks]
    if unknown:
        raise RauInputError(f"--structures: {', '.join(map(repr, unknown))} not in the retrieved reference {hits[0][0]} "
                            f"(it has: {', '.join(sorted(refs[0].masks))})")
    result, _ = predict_with_references(m, refs, target_img, structures)
    abstain(result, result_threshold(result, min_confidence, m.calibration_for(len(refs))))
    if out_dir is not None:
        write_result(result, target_img, out_dir, formats)
    return result


def _abstain(target: AnnotatedImage, hit: tuple[str, float], min_fit: float, structures, bank) -> TargetResult:
    from rau.data.annotated import StructureResult

    names = structures if structures is not None else sorted({s for e in bank.dataset().entries for s in e.structures})
    reason = f"no reference fits this target (best similarity {hit[1]:.3f} < {min_fit:.3f}, {hit[0]})"
    return TargetResult(target.id, hit[0], "abstain", {n: StructureResult(n, "no", None, 0.0, None, reason, confidence=0.0, flag=reason, abstained=True)
                                                          for n in names})


def result_to_json(result: TargetResult, target: AnnotatedImage) -> dict[str, Any]:
    """The ``result.json`` document (mask paths relative to the output folder)."""
    structures = {}
    for name, r in result.structures.items():
        structures[name] = {
            "label": r.label,
            "answer": r.answer,
            "box_xyxy": [round(float(v), 2) for v in r.box_xyxy_px] if r.box_xyxy_px is not None else None,
            "score": round(float(r.score), 4),
            "mask": f"masks/{name}.png",
            "found": r.found,
            "reason": r.reason,
            "confidence": None if r.confidence is None else round(float(r.confidence), 4),
            "presence": None if r.presence is None else round(float(r.presence), 4),
            "abstained": bool(r.abstained),
            "copied": bool(r.copied),
        }
        if r.features and "p_yes" in r.features:  # the RAU VLM's P(visible); below 0.5 it answered "not visible"
            structures[name]["vlm_p_yes"] = round(float(r.features["p_yes"]), 4)
        if r.features and "second_opinion" in r.features:  # Dice with the second segmenter's mask (reg-refine, angiograms)
            structures[name]["second_opinion"] = round(float(r.features["second_opinion"]), 4)
    return {
        "method": result.method,
        "target": target.meta.get("source", target.id),
        "reference": result.reference_id,
        "image_size_wh": [target.shape[1], target.shape[0]],
        "box_convention": "pixel-edge xyxy in target pixels (x1, y1 exclusive)",
        "seconds": round(result.seconds, 3),
        "structures": structures,
    }


def write_result(result: TargetResult, target: AnnotatedImage, out_dir: str | Path,
                 formats: Sequence[str] | None = None) -> Path:
    """Write result.json, masks/<structure>.png (0/255, target size) and overlay.png, and the extra
    export ``formats`` if any (:func:`rau.data.export.write_formats`: nifti, coco, dicom-seg).

    Everything is written into a temporary sibling folder first and renamed at the end, so a
    failure (an export that refuses this target included) leaves no partial ``out_dir`` behind."""
    with staged_folder(out_dir) as tmp:
        h, w = target.shape
        masks = {}
        for name, r in result.structures.items():
            mask = r.mask if r.mask is not None else np.zeros((h, w), bool)
            masks[name] = mask
            save_png(mask.astype(np.uint8) * 255, tmp / "masks" / f"{name}.png")
        boxes = {n: r.box_xyxy_px for n, r in result.structures.items()}
        save_png(draw_annotation(target.image, masks, boxes=boxes), tmp / "overlay.png")
        (tmp / "result.json").write_text(json.dumps(result_to_json(result, target), indent=2))
        if formats:
            format_writer(formats)(result, target, tmp, list(formats))
    return Path(out_dir)


@contextmanager
def staged_folder(out_dir: str | Path) -> Iterator[Path]:
    """Write an output folder all or nothing: yields a temporary sibling of ``out_dir`` to write
    into, renamed to ``out_dir`` (replacing an existing one) when the block ends; removed, with
    ``out_dir`` left as it was, when the block raises."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield stage
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
            stage.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            stage.rename(out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def format_writer(formats: Sequence[str] | None):
    """:func:`rau.data.export.write_formats` when extra formats are asked for, their names checked
    (call it before any model loads to fail early), else None."""
    if not formats:
        return None
    try:
        from rau.data import export
    except ImportError as exc:
        raise RauInputError(f"--formats: the exporters cannot be loaded ({one_line(exc)}); leave --formats out") from None
    export.parse_formats(list(formats))
    return export.write_formats


#: Batch mode moved to :mod:`rau.batch`; these names stay importable from here.
_BATCH_NAMES = ("BatchItem", "SUMMARY_COLUMNS", "SUMMARY_EVERY_S", "TARGET_SUFFIXES", "error_line", "expand_targets",
                "localize_many", "merge_summaries", "output_names", "read_result", "shard_from_env", "write_summary")


def __getattr__(name: str):
    # Lazy: rau.batch imports this module.
    if name in _BATCH_NAMES:
        import rau.batch

        return getattr(rau.batch, name)
    raise AttributeError(f"module 'rau.pipeline' has no attribute {name!r}")
