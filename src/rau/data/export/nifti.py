"""NIfTI label map export: ``labels.nii.gz`` (uint16) + ``labels_labels.txt`` (ITK-SNAP label
description) + ``labels_labels.json``, opened by 3D Slicer, ITK-SNAP and napari.

Geometry of the label map (voxel grid: ``labels.T[:, :, None]``, shape (W, H, 1) = (X, Y, 1);
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

The source file named in ``target.meta["source"]`` is re-read (header only) for its geometry.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from rau.atomic import write_bytes, write_json, write_text
from rau.data.annotated import AnnotatedImage, TargetResult
from rau.data.export.common import OVERLAP_RULE, itksnap_label_text, label_map, label_rows, source_file
from rau.errors import RauInputError


def _canonical_to_slice(axis: int, k: int, shape_c: tuple[int, int, int]) -> np.ndarray:
    """4x4 map from output voxels (i = column, j = row, 0) to canonical voxels of slice ``k``:
    the inverse of the radiological display flips in :func:`rau.data.medical.display_slice`."""
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
    path, kind = source_file(target)
    if kind == "nifti":
        return _nifti_source_affine(path, target)
    if kind == "dicom":
        affine = _dicom_patient_affine(path)
        if affine is not None:
            return affine, 1  # scanner-based
    row_mm, col_mm = target.meta.get("spacing_mm") or (1.0, 1.0)
    return np.diag([-float(col_mm), -float(row_mm), 1.0, 1.0]), 2  # ITK's identity direction (LPS)


def nifti_bytes(data: np.ndarray, affine: np.ndarray, code: int, description: str, *, compress: bool = True) -> bytes:
    """A NIfTI-1 file (uint16 ``data``, sform = qform = ``affine`` with ``code``, mm), gzip-compressed
    (reproducibly: no timestamp) unless ``compress`` is False."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data, np.uint16), affine)
    img.set_sform(affine, code=code)
    img.set_qform(affine, code=code)
    img.header.set_xyzt_units(xyz="mm")
    img.header["descrip"] = description[:79].encode()
    raw = img.to_bytes()
    return gzip.compress(raw, mtime=0) if compress else raw


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
    from rau.data.io import file_stem

    path = Path(path)
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        raise RauInputError(f"labels path: {path} must end in .nii.gz or .nii")
    labels = label_map(result, target)
    affine, code = nifti_affine(target)
    data = nifti_bytes(np.ascontiguousarray(labels.T[:, :, None]), affine, code, f"rau {result.method} labels",
                       compress=path.name.lower().endswith(".gz"))
    write_bytes(path, data)
    stem = path.with_name(file_stem(path))
    found = [name for name, r in result.structures.items() if r.found]
    table = label_rows(result.structures, found, labels, "pixels")
    write_text(stem.with_name(stem.name + "_labels.txt"), itksnap_label_text(table))
    write_json(stem.with_name(stem.name + "_labels.json"), {
        "labels_file": path.name, "background": 0, "overlap_rule": OVERLAP_RULE,
        "method": result.method, "target": result.target_id, "reference": result.reference_id,
        "labels": table,
    })
    return path
