"""Batch mode: one method run on many targets (:func:`localize_many`, ``rau localize --targets``),
the model built once; one output folder per target and a summary CSV, resumable and shardable.

Example::

    import rau
    from rau.batch import localize_many

    ref = rau.load_annotated("ref.png", "ref_masks/")
    for item in localize_many(ref, ["scans/", "more/*.dcm"], method="registration", out_dir="out/"):
        item.target, item.status, item.outcome                 # status: ok, skipped or error

Under ``accelerate launch`` (or ``torchrun``) each process takes its share of the targets
(:func:`shard_from_env`) and writes ``summary.rank<r>.csv``; :func:`merge_summaries` joins them.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from io import StringIO
from pathlib import Path
from typing import Any, NamedTuple

from rau.atomic import write_text
from rau.data.annotated import AnnotatedImage, StructureResult, TargetResult
from rau.data.io import file_stem, load_annotated, read_mask
from rau.errors import RauInputError, one_line
from rau.pipeline import (check_bank_choice, check_reference, format_writer, localize, localize_from_bank, result_to_json,
                          write_result)

#: What a folder given as a target contributes: the files rau.data.io reads, by suffix (DICOM files
#: without one are recognised by their DICM preamble). Hidden files are left out.
TARGET_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom", ".nii", ".nii.gz")

#: summary.csv: one row per target x structure; a failed target has one row, structure empty.
#: ``status``: ok, skipped (a complete earlier result, re-read) or error (``error``: why, one line).
SUMMARY_COLUMNS = ("target", "structure", "answer", "found", "score", "x0", "y0", "x1", "y1", "seconds", "status", "error",
                   "confidence", "abstained", "reason", "presence", "copied")

#: The summary is rewritten (atomically) after a target at most this often, so a killed batch leaves
#: a usable CSV at little cost on long batches; it is always written at the end.
SUMMARY_EVERY_S = 1.0


class BatchItem(NamedTuple):
    """One target of :func:`localize_many`. ``outcome``: its :class:`TargetResult` (status ``ok``;
    ``skipped``: read back from ``folder``) or the exception that stopped it (status ``error``)."""

    target: Path
    outcome: TargetResult | Exception
    status: str
    folder: Path


def _is_image(path: Path) -> bool:
    if path.name.startswith(".") or not path.is_file():
        return False
    if path.name.lower().endswith(TARGET_SUFFIXES):
        return True
    if path.suffix:
        return False
    try:
        with path.open("rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def expand_targets(specs: Sequence[str | Path], *, arg: str = "--targets") -> list[Path]:
    """Folders (their image files, sorted; not recursive), glob patterns (their files, sorted) and
    files -> target paths, in the order given, each file once. A spec that yields nothing is an error."""
    found: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            files, why = sorted(p for p in path.iterdir() if _is_image(p)), "holds no image file (PNG/JPEG/TIFF/BMP/DICOM/NIfTI)"
        elif path.exists():
            files, why = [path], ""
        elif any(c in str(spec) for c in "*?["):
            files, why = sorted(Path(p) for p in glob.glob(str(spec), recursive=True) if Path(p).is_file()), "matches no file"
        else:
            raise FileNotFoundError(f"{arg}: {spec} does not exist (give a folder, a quoted glob pattern such as 'scans/*.dcm', or a file)")
        if not files:
            raise RauInputError(f"{arg}: {spec} {why}")
        found.extend(files)
    seen: set[Path] = set()
    unique = []
    for p in found:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def output_names(targets: Sequence[Path]) -> list[str]:
    """One output folder name per target: its stem (``a.nii.gz`` -> ``a``); a stem already taken
    (case-insensitively) gets ``_2``, ``_3``... in list order, so a target list always maps to the
    same folders (every shard of a batch computes them on the whole list)."""
    names: list[str] = []
    taken: set[str] = set()
    for t in targets:
        stem = file_stem(Path(t))
        name, n = stem, 1
        while name.lower() in taken:
            n += 1
            name = f"{stem}_{n}"
        taken.add(name.lower())
        names.append(name)
    return names


def shard_from_env(environ=None) -> tuple[int, int]:
    """(rank, world size) of this process under ``accelerate launch`` or ``torchrun`` (RANK and
    WORLD_SIZE, else LOCAL_RANK and LOCAL_WORLD_SIZE); (0, 1) in a plain process."""
    env = os.environ if environ is None else environ
    for rank_key, world_key in (("RANK", "WORLD_SIZE"), ("LOCAL_RANK", "LOCAL_WORLD_SIZE")):
        if world_key not in env:
            continue
        try:
            rank, world = int(env.get(rank_key, "0")), int(env[world_key])
        except ValueError:
            raise RauInputError(f"{rank_key}/{world_key}: expected integers, got {env.get(rank_key)!r}/{env[world_key]!r}") from None
        if world < 1 or not 0 <= rank < world:
            raise RauInputError(f"{rank_key}={rank}, {world_key}={world}: expected 0 <= rank < world size")
        return rank, world
    return 0, 1


def error_line(exc: BaseException) -> str:
    """One line on why a target failed: our messages (and the file system's) as they are, anything
    else with its class name."""
    if isinstance(exc, (ValueError, OSError)):
        lines = str(exc).strip().splitlines()
        if lines:
            return lines[0]
    return one_line(exc)


def _finished(folder: Path, method_name: str, structures: list[str] | None, extra_files: Sequence[str] = ()) -> dict | None:
    """The result.json document of a complete earlier run of the same method in ``folder`` (the same
    structures when they are named, the export files asked for now), else None."""
    try:
        doc = json.loads((folder / "result.json").read_text())
        named = doc["structures"]
        masks = [folder / s["mask"] for s in named.values()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if doc.get("method") not in (method_name, "abstain"):
        return None
    if structures is not None and set(named) != set(structures):
        return None
    files = [folder / "overlay.png", *masks, *(folder / f for f in extra_files)]
    return doc if all(f.is_file() for f in files) else None


def _summary_rows(target: Path, status: str, doc: dict | None = None, seconds: float = 0.0, error: str = "") -> list[dict]:
    if doc is None:
        row = dict.fromkeys(SUMMARY_COLUMNS, "")
        row.update(target=str(target), seconds=round(seconds, 3), status=status, error=error)
        return [row]
    rows = []
    for name, s in doc["structures"].items():
        x0, y0, x1, y1 = s["box_xyxy"] if s["box_xyxy"] is not None else ("",) * 4
        rows.append({"target": str(target), "structure": name, "answer": s["answer"] or "",
                     "found": str(bool(s["found"])).lower(), "score": s["score"], "x0": x0, "y0": y0, "x1": x1, "y1": y1,
                     "seconds": doc["seconds"], "status": status, "error": "",
                     "confidence": "" if s.get("confidence") is None else s["confidence"],
                     "abstained": str(bool(s.get("abstained"))).lower(), "reason": s.get("reason") or "",
                     "presence": "" if s.get("presence") is None else s["presence"],
                     "copied": str(bool(s.get("copied"))).lower()})
    return rows


def write_summary(path: str | Path, rows: Sequence[dict]) -> Path:
    """The batch summary CSV (:data:`SUMMARY_COLUMNS`), atomically."""
    buf = StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return write_text(path, buf.getvalue())


def merge_summaries(out_dir: str | Path) -> Path:
    """``summary.csv`` from the shards' ``summary.rank<r>.csv`` (a batch under ``accelerate launch``),
    the targets back in their listed order (shard r took targets r, r + world, ...). A target found
    in several shard files (left by an earlier run with another world size) keeps the newest file's rows."""
    out_dir = Path(out_dir)
    shards = {int(m.group(1)): f for f in out_dir.glob("summary.rank*.csv")
              if (m := re.fullmatch(r"summary\.rank(\d+)\.csv", f.name))}
    if not shards:
        raise FileNotFoundError(f"--out: {out_dir} holds no summary.rank<r>.csv to merge (run the sharded batch first)")
    world = max(shards) + 1
    placed: dict[str, tuple[float, int, list[dict]]] = {}  # target -> (file mtime, position, rows)
    for rank, f in shards.items():
        mtime = f.stat().st_mtime
        with f.open(newline="") as fh:
            groups: list[list[dict]] = []
            for row in csv.DictReader(fh):
                if groups and groups[-1][0]["target"] == row["target"]:
                    groups[-1].append(row)
                else:
                    groups.append([row])
        for j, rows in enumerate(groups):
            target = rows[0]["target"]
            if target not in placed or placed[target][0] < mtime:
                placed[target] = (mtime, j * world + rank, rows)
    ordered = sorted(placed.values(), key=lambda v: v[1])
    return write_summary(out_dir / "summary.csv", [row for _, _, rows in ordered for row in rows])


def localize_many(
    reference,
    targets: Sequence[str | Path],
    *,
    out_dir: str | Path,
    method=None,
    structures: list[str] | None = None,
    formats: Sequence[str] | None = None,
    overwrite: bool = False,
    shard: tuple[int, int] | None = None,
    progress: bool = False,
    k: int = 1,
    min_fit: float | None = None,
    min_confidence: float | None = None,
    reference_choice: str = "similar",
    **method_options: Any,
) -> Iterator[BatchItem]:
    """Run one method on many targets: the method is built once, the reference checked once (the
    backends remember its encoding across targets). Yields a :class:`BatchItem` per target.

    Args:
        reference: an annotated reference, or a reference bank (:class:`rau.references.bank.ReferenceBank`
            or its path; then ``k``, ``min_fit`` and ``reference_choice`` as in :func:`localize_from_bank`).
        min_confidence: as in :func:`localize` (default: the method's calibrated threshold).
        targets: folders, glob patterns or files (:func:`expand_targets`).
        out_dir: one folder per target, named by :func:`output_names`, holding what
            :func:`write_result` writes (+ ``formats``), and the summary CSV (:data:`SUMMARY_COLUMNS`):
            ``summary.csv``, or ``summary.rank<r>.csv`` per shard (:func:`merge_summaries` joins them).
        overwrite: recompute targets whose folder already holds a complete result of this method
            (default: skip them, their rows re-read with status ``skipped``).
        shard: (rank, world size): this process takes targets i with i % world == rank. Default:
            :func:`shard_from_env`, so ``accelerate launch`` splits a batch with no other change.

    A target that cannot be read or fails is reported (status ``error``) and the batch goes on;
    bad arguments (no targets, unknown structure, method or format) raise before any model loads.
    """
    from rau.methods import Method, create_method

    paths = expand_targets(targets)
    names = output_names(paths)
    rank, world = shard if shard is not None else shard_from_env()
    mine = [(p, n) for i, (p, n) in enumerate(zip(paths, names)) if i % world == rank]
    if world > 1 and method_options.get("device") == "cuda":  # one GPU per process, as accelerate places them
        method_options["device"] = f"cuda:{os.environ.get('LOCAL_RANK', rank)}"
    format_writer(formats)
    if min_confidence is not None:
        from rau.methods.confidence import resolve_min_confidence

        resolve_min_confidence(min_confidence, None)  # checked before any model loads
    run = _runner(reference, structures, k, min_fit, min_confidence, reference_choice)
    m = method if isinstance(method, Method) else create_method(method, **method_options)
    summary = Path(out_dir) / ("summary.csv" if world == 1 else f"summary.rank{rank}.csv")
    return _run_batch(run, m, mine, Path(out_dir), summary, structures, formats, overwrite, progress)


def _runner(reference, structures: list[str] | None, k: int, min_fit: float | None, min_confidence: float | None,
            reference_choice: str = "similar"):
    """(method, target AnnotatedImage) -> TargetResult for this reference or bank, checked now."""
    check_bank_choice(reference_choice, not isinstance(reference, AnnotatedImage))
    if isinstance(reference, AnnotatedImage):
        check_reference(reference, structures)
        return lambda m, target: localize(reference, target, method=m, structures=structures,
                                          min_confidence=min_confidence)
    from rau.references.bank import ReferenceBank

    bank = reference if isinstance(reference, ReferenceBank) else ReferenceBank.load(reference)
    return lambda m, target: localize_from_bank(bank, target, k=k, method=m, structures=structures, min_fit=min_fit,
                                                min_confidence=min_confidence, reference_choice=reference_choice)


def _run_batch(run, m, mine, out_dir: Path, summary: Path, structures, formats, overwrite: bool,
               progress: bool) -> Iterator[BatchItem]:
    from tqdm.auto import tqdm

    rows: list[dict] = []
    written = 0.0
    try:
        for path, name in tqdm(mine, desc=f"localize ({m.name})", unit="target", disable=not progress):
            item, item_rows = _one_target(run, m, path, out_dir / name, structures, formats, overwrite)
            rows.extend(item_rows)
            if time.monotonic() - written >= SUMMARY_EVERY_S:
                write_summary(summary, rows)
                written = time.monotonic()
            yield item
    finally:
        write_summary(summary, rows)


def _one_target(run, m, path: Path, folder: Path, structures, formats, overwrite: bool) -> tuple[BatchItem, list[dict]]:
    start = time.perf_counter()
    doc = None if overwrite else _finished(folder, m.name, structures, _format_files(formats))
    if doc is not None:
        try:
            return BatchItem(path, read_result(folder), "skipped", folder), _summary_rows(path, "skipped", doc)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged earlier result: run the target again
    try:
        target = load_annotated(path, arg="--targets")
        result = run(m, target)
        write_result(result, target, folder, formats)
    except Exception as exc:  # noqa: BLE001 -- one bad target must not stop the batch; its row says why
        return BatchItem(path, exc, "error", folder), _summary_rows(path, "error", seconds=time.perf_counter() - start,
                                                                    error=error_line(exc))
    return BatchItem(path, result, "ok", folder), _summary_rows(path, "ok", result_to_json(result, target))


def read_result(out_dir: str | Path) -> TargetResult:
    """The :class:`TargetResult` an output folder holds (result.json + masks/), as written by
    :func:`write_result`; masks are read back at target size."""
    out_dir = Path(out_dir)
    doc = json.loads((out_dir / "result.json").read_text())
    structures = {}
    for name, s in doc["structures"].items():
        mask = read_mask(out_dir / s["mask"], arg=f"{out_dir} mask {name!r}")
        box = tuple(float(v) for v in s["box_xyxy"]) if s["box_xyxy"] is not None else None
        structures[name] = StructureResult(s["label"], s["answer"], box, float(s["score"]),
                                           mask if mask.any() else None, s["reason"], confidence=s.get("confidence"),
                                           abstained=bool(s.get("abstained")), presence=s.get("presence"),
                                           copied=bool(s.get("copied")))
    return TargetResult(file_stem(Path(doc["target"])), doc["reference"], doc["method"], structures, float(doc["seconds"]))


def _format_files(formats: Sequence[str] | None) -> list[str]:
    """The files the export ``formats`` put in an output folder (:data:`rau.data.export.FILENAMES`)."""
    if not formats:
        return []
    from rau.data import export

    return [export.FILENAMES[f] for f in export.parse_formats(list(formats))]
