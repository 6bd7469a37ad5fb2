"""Writing a rau result in the formats other tools open: NIfTI label map, COCO JSON, DICOM SEG.

=============  ====================  ======================================================
``--formats``  file (in ``out_dir``)  opened by
=============  ====================  ======================================================
``nifti``      ``labels.nii.gz``     3D Slicer, ITK-SNAP, napari (+ ``labels_labels.txt``,
                                     an ITK-SNAP label description, and ``labels_labels.json``)
``coco``       ``coco.json``         CVAT, pycocotools, FiftyOne, Label Studio
``dicom-seg``  ``seg.dcm``           3D Slicer, OHIF, highdicom (DICOM targets only)
=============  ====================  ======================================================

Rules shared by the three writers:

- Label values come from :func:`label_table`: every structure of the result, found or not, gets
  1..N in the result's order (0 is background), so a fixed structure list gives the same values
  on every target. COCO category ids are the same values.
- Only *found* structures (:attr:`StructureResult.found`) get pixels, an annotation or a segment.
- Overlaps (NIfTI label map only; COCO and DICOM SEG keep each mask whole): **the smaller structure
  wins** a pixel claimed by several, so a small structure inside a large one stays visible; equal
  areas go to the structure listed first.

Geometry of the NIfTI label map (voxel grid: ``labels.T[:, :, None]``, shape (W, H, 1) = (X, Y, 1);
``rau``'s own reader turns it back into the (H, W) map):

- target read from a NIfTI file: the affine places every pixel on the source voxel it was shown
  from (the slice of the canonical volume, undoing the display flips of :mod:`rau.data.medical`);
  a 2D or single-slice source keeps its affine unchanged. Slicer and ITK-SNAP overlay it on the
  source volume in world space.
- target read from a DICOM file with ImagePositionPatient/ImageOrientationPatient/PixelSpacing
  (CT, MR): the patient geometry (LPS -> RAS), as ITK reads the DICOM itself.
- anything else (PNG, projection radiographs, in-memory images): the geometry ITK gives the image
  file itself: origin 0, ITK's identity direction (LPS; RAS affine diag(-sx, -sy, 1)), spacing
  ``meta["spacing_mm"]`` (row, col) when known, else 1.

The source file named in ``target.meta["source"]`` is re-read (header only for NIfTI) for its
geometry and, for DICOM SEG, for the identifiers it must reference.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from rau.atomic import write_bytes, write_json, write_text
from rau.data.annotated import AnnotatedImage, StructureResult, TargetResult
from rau.errors import RauInputError, one_line

FORMATS = ("nifti", "coco", "dicom-seg")
"""Format names accepted by :func:`write_formats` (the CLI's ``--formats``)."""

FILENAMES = {"nifti": "labels.nii.gz", "coco": "coco.json", "dicom-seg": "seg.dcm"}

OVERLAP_RULE = "smaller structure wins; equal areas: the structure listed first"

# DICOM Type 2 attributes highdicom copies from the source: they may be empty but must exist, and
# anonymised files often drop them.
_DICOM_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber")
_DICOM_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


# ----------------------------------------------------------------------------- label values


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


def _found_masks(result: TargetResult, target: AnnotatedImage) -> dict[str, np.ndarray]:
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
    masks = _found_masks(result, target)
    order = list(masks)
    # Paint the largest first so smaller ones overwrite it; among equal areas the first listed last.
    paint = sorted(order, key=lambda n: (-int(masks[n].sum()), -order.index(n)))
    out = np.zeros(target.shape, np.uint16)
    for name in paint:
        out[masks[name]] = values[name]
    return out


# ----------------------------------------------------------------------------- sources


def _source(target: AnnotatedImage) -> tuple[Path | None, str | None]:
    """(path, "nifti" | "dicom" | "raster") of the file the target was read from, or (None, None).

    A NIfTI or DICOM source must still exist: its geometry and identifiers are read from it."""
    from rau.data.io import _kind

    source = target.meta.get("source")
    if not source:
        return None, None
    path = Path(source)
    if path.is_file():
        return path, _kind(path)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz", ".dcm", ".dicom")):
        raise RauInputError(
            f"target {target.id!r}: its source {path} no longer exists; keep the file in place "
            "until the result is exported (its geometry and identifiers are read from it)"
        )
    return path, "raster"


# ----------------------------------------------------------------------------- NIfTI


def _canonical_to_slice(axis: int, k: int, shape_c: tuple[int, int, int]) -> np.ndarray:
    """4x4 map from output voxels (i = column, j = row, 0) to canonical voxels of slice ``k``:
    the inverse of the radiological display flips in :func:`rau.data.medical._slice_2d`."""
    x, y, z = shape_c
    if axis == 2:
        rows = [[-1, 0, 0, x - 1], [0, -1, 0, y - 1], [0, 0, 1, k]]
    elif axis == 1:
        rows = [[-1, 0, 0, x - 1], [0, 0, 1, k], [0, -1, 0, z - 1]]
    else:
        rows = [[0, 0, 1, k], [-1, 0, 0, y - 1], [0, -1, 0, z - 1]]
    return np.array(rows + [[0, 0, 0, 1]], dtype=np.float64)


def _nifti_source_affine(path: Path, target: AnnotatedImage) -> tuple[np.ndarray, int]:
    """RAS affine of the output grid for a target read from NIfTI ``path``, and the xform code."""
    import nibabel as nib
    from nibabel.orientations import inv_ornt_aff, io_orientation

    img = nib.load(str(path))  # header only: the voxels are not read
    shape = tuple(int(s) for s in img.shape)
    code = int(img.header["sform_code"]) or int(img.header["qform_code"]) or 2
    axis, k = target.meta.get("axis"), target.meta.get("slice_index")
    if axis is None:  # 2D or single-slice: shown as data.T, no flips
        expected, affine = (shape[1], shape[0]), img.affine
    else:
        ornt = io_orientation(img.affine)
        canonical = img.affine @ inv_ornt_aff(ornt, shape[:3])
        shape_c = [0, 0, 0]
        for src_axis, (dst_axis, _) in enumerate(ornt):
            shape_c[int(dst_axis)] = shape[src_axis]
        x, y, z = shape_c
        expected = {2: (y, x), 1: (z, x), 0: (z, y)}[int(axis)]
        affine = canonical @ _canonical_to_slice(int(axis), int(k), (x, y, z))
    if tuple(expected) != target.shape:
        raise RauInputError(
            f"target {target.id!r}: its source {path} now gives a {expected} slice, not {target.shape}; "
            "the file changed since it was read, re-run on the current file"
        )
    return affine, code


def _dicom_patient_affine(path: Path) -> np.ndarray | None:
    """RAS affine from a single-frame DICOM's patient geometry, or None when it has none."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        return None  # per-frame geometry lives in functional groups: not used here
    try:
        iop = [float(v) for v in ds.ImageOrientationPatient]
        ipp = [float(v) for v in ds.ImagePositionPatient]
        row_mm, col_mm = (float(v) for v in ds.PixelSpacing)
        step = float(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0)
    except (AttributeError, TypeError, ValueError):
        return None
    if len(iop) != 6 or len(ipp) != 3:
        return None
    row_dir, col_dir = np.array(iop[:3]), np.array(iop[3:])
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_mm  # i (column index) runs along the row direction
    lps[:3, 1] = col_dir * row_mm
    lps[:3, 2] = np.cross(row_dir, col_dir) * step
    lps[:3, 3] = ipp
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def nifti_affine(target: AnnotatedImage) -> tuple[np.ndarray, int]:
    """(4x4 RAS affine of the grid ``labels.T[:, :, None]``, NIfTI xform code); see the module
    docstring for the three cases."""
    path, kind = _source(target)
    if kind == "nifti":
        return _nifti_source_affine(path, target)
    if kind == "dicom":
        affine = _dicom_patient_affine(path)
        if affine is not None:
            return affine, 1  # scanner-based
    row_mm, col_mm = target.meta.get("spacing_mm") or (1.0, 1.0)
    return np.diag([-float(col_mm), -float(row_mm), 1.0, 1.0]), 2  # ITK's identity direction (LPS)


def _nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def write_nifti_labels(result: TargetResult, target: AnnotatedImage, path: str | Path) -> Path:
    """Write the label map as NIfTI (uint16, shape (W, H, 1)) plus its label tables.

    Args:
        result: the result of :func:`rau.pipeline.localize` on ``target``.
        target: the image the result belongs to (its ``meta`` gives the geometry).
        path: ``.nii.gz`` (gzip-compressed) or ``.nii``.
    Returns:
        ``path``. Next to it: ``<stem>_labels.txt`` (ITK-SNAP label description: value, RGB,
        visibility, name) and ``<stem>_labels.json`` (values, names, colours, found, pixel
        counts, the overlap rule).
    """
    import nibabel as nib

    path = Path(path)
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        raise RauInputError(f"labels path: {path} must end in .nii.gz or .nii")
    labels = label_map(result, target)
    affine, code = nifti_affine(target)
    img = nib.Nifti1Image(np.ascontiguousarray(labels.T[:, :, None]), affine)
    img.set_sform(affine, code=code)
    img.set_qform(affine, code=code)
    img.header.set_xyzt_units(xyz="mm")
    img.header["descrip"] = f"rau {result.method} labels"[:79].encode()
    data = img.to_bytes()
    write_bytes(path, gzip.compress(data, mtime=0) if path.name.lower().endswith(".gz") else data)
    stem = path.with_name(_nifti_stem(path))
    table = _label_rows(result, labels)
    write_text(stem.with_name(stem.name + "_labels.txt"), itksnap_label_text(table))
    write_json(stem.with_name(stem.name + "_labels.json"), {
        "labels_file": path.name, "background": 0, "overlap_rule": OVERLAP_RULE,
        "method": result.method, "target": result.target_id, "reference": result.reference_id,
        "labels": table,
    })
    return path


def _label_rows(result: TargetResult, labels: np.ndarray) -> list[dict[str, Any]]:
    from rau.render import structure_color

    names = list(result.structures)
    return [
        {"value": value, "name": name, "color_rgb": list(structure_color(name, names)),
         "found": result.structures[name].found, "pixels": int((labels == value).sum())}
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


# ----------------------------------------------------------------------------- COCO


def coco_document(result: TargetResult, target: AnnotatedImage) -> dict[str, Any]:
    """The COCO dict: one image, every structure as a category (ids from :func:`label_table`),
    one annotation per found structure.

    Annotation fields: ``segmentation`` compressed RLE (``counts`` a str), ``bbox`` [x, y, w, h]
    in pixel-edge coordinates (the method's ``box_xyxy_px``, else the mask's tight box), ``area``
    (mask pixels), ``iscrowd`` 0, ``score``, and ``attributes`` {``answer``, ``reason``} (the CVAT
    place for extra values)."""
    from pycocotools import mask as mask_utils

    from rau.geometry import mask_to_box

    h, w = target.shape
    source = target.meta.get("source")
    image = {"id": 1, "file_name": Path(source).name if source else f"{target.id}.png", "width": w, "height": h}
    categories = [{"id": v, "name": n, "supercategory": "anatomy"} for v, n in label_table(result.structures)]
    ids = {c["name"]: c["id"] for c in categories}
    annotations = []
    for name, mask in _found_masks(result, target).items():
        r: StructureResult = result.structures[name]
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        x0, y0, x1, y1 = r.box_xyxy_px if r.box_xyxy_px is not None else mask_to_box(mask)
        annotations.append({
            "id": len(annotations) + 1, "image_id": 1, "category_id": ids[name],
            "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
            "area": float(mask.sum()), "iscrowd": 0, "score": float(r.score),
            "attributes": {"answer": r.answer, "reason": r.reason},
        })
    from rau import __version__

    info = {"description": f"rau {result.method}: {result.target_id} localized from {result.reference_id}",
            "version": __version__, "method": result.method, "reference": result.reference_id}
    return {"info": info, "images": [image], "categories": categories, "annotations": annotations}


def write_coco(result: TargetResult, target: AnnotatedImage, path: str | Path) -> Path:
    """Write :func:`coco_document` as JSON to ``path`` (atomically); returns ``path``."""
    return write_json(path, coco_document(result, target))


# ----------------------------------------------------------------------------- DICOM SEG


def _check_dicom_seg(result: TargetResult, target: AnnotatedImage) -> Path:
    """The target's source DICOM, after checking that a SEG can be written for this result."""
    path, kind = _source(target)
    if kind != "dicom":
        got = f"{path.name}" if path else "an image with no source file"
        raise RauInputError(
            f"--formats: dicom-seg needs a DICOM target (a SEG references its source instance), got {got}; "
            f"use nifti or coco"
        )
    if not _found_masks(result, target):
        raise RauInputError(
            f"--formats: dicom-seg: no structure was found in {target.id!r} and a SEG needs at least one "
            "segment; use nifti or coco"
        )
    return path


def _read_dicom_for_seg(path: Path, target: AnnotatedImage) -> Any:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    missing = [k for k in _DICOM_UIDS if not ds.get(k)]
    if missing:
        raise RauInputError(
            f"--formats: dicom-seg: {path.name} lacks {', '.join(missing)}, which a SEG must reference; "
            "use nifti or coco"
        )
    if (int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) != target.shape:
        raise RauInputError(
            f"--formats: dicom-seg: {path.name} is {ds.get('Columns')}x{ds.get('Rows')} (WxH) but the target "
            f"is {target.shape[1]}x{target.shape[0]}; the file changed since it was read"
        )
    for key in _DICOM_TYPE2:
        if key not in ds:
            setattr(ds, key, "")  # Type 2: empty is a valid value
    return ds


def _segment_descriptions(names: list[str], all_names: list[str], method: str) -> list[Any]:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from rau import __version__
    from rau.render import structure_color

    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"rau {method}"[:64], family=codes.cid7162.ArtificialIntelligence, version=__version__
    )
    return [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name[:64],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.AnatomicalStructure,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*structure_color(name, all_names)),
        )
        for number, name in enumerate(names, start=1)
    ]


def write_dicom_seg(result: TargetResult, target: AnnotatedImage, path: str | Path) -> Path:
    """Write a binary DICOM Segmentation referencing the target's source DICOM instance.

    One segment per found structure, numbered 1..K in the result's order (not the label-table
    values: DICOM requires consecutive numbers), labelled with the structure name; the algorithm
    identification is ``rau <method>``. Patient/study identifiers are copied from the source, as a
    SEG must belong to its study.

    Raises:
        RauInputError: the target was not read from a DICOM file, the file lacks the UIDs a SEG
            references, nothing was found, or highdicom rejects the source.
    """
    import highdicom as hd
    from pydicom.uid import generate_uid

    from rau import __version__

    source = _check_dicom_seg(result, target)
    masks = _found_masks(result, target)
    ds = _read_dicom_for_seg(source, target)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    pixels = np.zeros((frames, *target.shape, len(masks)), bool)  # rau reads frame 0 of a multi-frame
    pixels[0] = np.stack(list(masks.values()), axis=-1)
    try:
        seg = hd.seg.Segmentation(
            source_images=[ds], pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=_segment_descriptions(list(masks), list(result.structures), result.method),
            series_instance_uid=generate_uid(), series_number=900, sop_instance_uid=generate_uid(),
            instance_number=1, manufacturer="rau", manufacturer_model_name=f"rau {result.method}"[:64],
            software_versions=__version__, device_serial_number="none", content_label="RAU",
            content_description=f"rau {result.method} from {result.reference_id}"[:64],
            series_description=f"rau {result.method} segmentation"[:64],
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise RauInputError(
            f"--formats: dicom-seg: highdicom cannot build a SEG for {source.name} ({one_line(exc)})"
        ) from None
    buf = io.BytesIO()
    seg.save_as(buf, enforce_file_format=True)
    return write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------- all formats


def parse_formats(formats: str | Iterable[str] | None) -> list[str]:
    """``"nifti,coco"`` or ``["nifti", "coco"]`` -> checked, de-duplicated list in the order given."""
    if formats is None:
        return []
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    out: list[str] = []
    for item in (str(i).strip().lower() for i in items):
        if not item:
            continue
        if item not in FORMATS:
            raise RauInputError(f"--formats: unknown format {item!r}; choose from {', '.join(FORMATS)}")
        if item not in out:
            out.append(item)
    return out


def write_formats(
    result: TargetResult, target: AnnotatedImage, out_dir: str | Path, formats: str | Iterable[str] | None
) -> list[Path]:
    """Write ``result`` in each of ``formats`` into ``out_dir`` (``labels.nii.gz``, ``coco.json``,
    ``seg.dcm``; see :data:`FILENAMES`), each file atomically.

    Names are checked first and the DICOM SEG (the one a source file can refuse) is written first,
    so a bad name or a SEG that cannot be built leaves ``out_dir`` untouched. Returns the main file
    of each format, in the order asked (the NIfTI label tables sit next to ``labels.nii.gz``)."""
    chosen = parse_formats(formats)
    if "dicom-seg" in chosen:
        _check_dicom_seg(result, target)
    writers = {"nifti": write_nifti_labels, "coco": write_coco, "dicom-seg": write_dicom_seg}
    out_dir = Path(out_dir)
    written = {name: writers[name](result, target, out_dir / FILENAMES[name])
               for name in sorted(chosen, key=lambda name: name != "dicom-seg")}
    return [written[name] for name in chosen]
