"""What the export writers share: label values, the label map and its tables, the target's source file.

Label values come from :func:`label_table`: every structure of the result, found or not, gets 1..N
in the result's order (0 is background). Only *found* structures (:attr:`StructureResult.found`)
get pixels. Overlaps in a label map follow :data:`OVERLAP_RULE`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from rau.data.annotated import AnnotatedImage, TargetResult
from rau.errors import RauInputError

OVERLAP_RULE = "smaller structure wins; equal areas: the structure listed first"


def label_table(names: Iterable[str]) -> list[tuple[int, str]]:
    """Stable label values: ``[(1, names[0]), (2, names[1]), ...]`` in the order given.

    Raises:
        RauInputError: a name repeats, or there are more than 65535 names (uint16 label maps).
    """
    names = [str(n) for n in names]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise RauInputError(f"structures: names must be unique for a label table, {repeated} repeat")
    if len(names) > 65535:
        raise RauInputError(f"structures: {len(names)} names do not fit a uint16 label map (65535 at most)")
    return [(value, name) for value, name in enumerate(names, start=1)]


def found_masks(result: TargetResult, target: AnnotatedImage) -> dict[str, np.ndarray]:
    """{name: (H, W) bool} of the found structures, in the result's order; sizes checked."""
    masks = {}
    for name, r in result.structures.items():
        if not r.found:
            continue
        mask = np.asarray(r.mask, dtype=bool)
        if mask.shape != target.shape:
            raise RauInputError(
                f"result mask {name!r}: shape {mask.shape} differs from the target {target.id!r} "
                f"{target.shape}; export the result with the target it was computed on"
            )
        masks[name] = mask
    return masks


def label_map(result: TargetResult, target: AnnotatedImage) -> np.ndarray:
    """(H, W) uint16 label map of the found structures (values from :func:`label_table`, 0 =
    background); overlaps follow :data:`OVERLAP_RULE`."""
    values = {name: value for value, name in label_table(result.structures)}
    masks = found_masks(result, target)
    order = list(masks)
    # Paint the largest first so smaller ones overwrite it; among equal areas the first listed last.
    paint = sorted(order, key=lambda n: (-int(masks[n].sum()), -order.index(n)))
    out = np.zeros(target.shape, np.uint16)
    for name in paint:
        out[masks[name]] = values[name]
    return out


def label_rows(names: Iterable[str], found: Iterable[str], labels: np.ndarray, count_key: str = "pixels") -> list[dict[str, Any]]:
    """Label table rows ``{"value", "name", "color_rgb", "found", <count_key>}`` of the structures
    ``names`` (values from :func:`label_table`), ``count_key`` counting each value in ``labels``."""
    from rau.render import structure_color

    names, found = list(names), set(found)
    return [
        {"value": value, "name": name, "color_rgb": list(structure_color(name, names)),
         "found": name in found, count_key: int((labels == value).sum())}
        for value, name in label_table(names)
    ]


def itksnap_label_text(rows: list[dict[str, Any]]) -> str:
    """ITK-SNAP label description file text (``IDX R G B A VIS MSH "LABEL"``) for ``rows`` of
    ``{"value", "name", "color_rgb"}``; value 0 is the clear label."""
    lines = ["# ITK-SnAP Label Description File (written by rau)",
             "# Columns: IDX R G B A(0..1) VIS(0/1) MESH(0/1) \"LABEL\""]
    lines.append(f'{0:5d} {0:5d} {0:4d} {0:4d} {0:8.2f} {0:2d} {0:2d}    "Clear Label"')
    for row in rows:
        r, g, b = row["color_rgb"]
        name = str(row["name"]).replace('"', "'")
        lines.append(f'{row["value"]:5d} {r:5d} {g:4d} {b:4d} {1:8.2f} {1:2d} {1:2d}    "{name}"')
    return "\n".join(lines) + "\n"


def source_file(target: AnnotatedImage) -> tuple[Path | None, str | None]:
    """(path, "nifti" | "dicom" | "raster") of the file the target was read from, or (None, None).

    A NIfTI or DICOM source must still exist: its geometry and identifiers are read from it."""
    from rau.data.io import file_kind

    source = target.meta.get("source")
    if not source:
        return None, None
    path = Path(source)
    if path.is_file():
        return path, file_kind(path)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz", ".dcm", ".dicom")):
        raise RauInputError(
            f"target {target.id!r}: its source {path} no longer exists; keep the file in place "
            "until the result is exported (its geometry and identifiers are read from it)"
        )
    return path, "raster"
