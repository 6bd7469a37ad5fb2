"""Reading volumes and sequences: a 3D NIfTI, a folder holding one DICOM series, or a multi-frame
DICOM (cine) -> :class:`Volume`, a stack of 2D slices with the geometry of its label grid.

Example::

    from rau.data.volume_io import read_volume, volume_kind

    volume_kind("ct.nii.gz")                    # "nifti" ("dicom-series", "dicom-frames", None: 2D)
    vol = read_volume("ct.nii.gz", axis=2)      # vol.frames: (Z, H, W) float32 in [0, 1]

Slices are shown exactly as the single-image readers of :mod:`rau.data.medical` show them: a NIfTI
slice k equals ``read_nifti(path, slice_index=k, axis=axis)`` (canonical RAS, radiological display),
a DICOM slice or frame equals what ``read_dicom`` gives (rescale, file window or min-max,
MONOCHROME1 inverted). A reference drawn on one such slice therefore matches its own slice pixel
for pixel.

Geometry of the label grid (:attr:`Volume.affine`, :meth:`Volume.to_file_grid`): NIfTI source: the
source's voxel order, shape and affine (sform/qform code kept). DICOM series: ITK's patient
geometry of the series (origin, spacing, direction as SimpleITK reads it; LPS -> RAS), voxel grid
(column, row, slice). Multi-frame DICOM: frames along the 3rd axis with unit spacing, in-plane ITK's
identity direction (RAS affine ``diag(-col_mm, -row_mm, 1)``), as :mod:`rau.data.export` does for
2D images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rau.data.annotated import AnnotatedImage
from rau.data.medical import AXIS_NAMES
from rau.errors import RauInputError, one_line

#: Kinds of volume :func:`volume_kind` recognises.
KINDS = ("nifti", "dicom-series", "dicom-frames")


@dataclass
class Volume:
    """A stack of 2D slices read from one file or folder.

    Args:
        frames: (Z, H, W) float32 in [0, 1], each slice in display orientation (see the module
            docstring); Z counts along ``axis`` (NIfTI), the slice normal (DICOM series) or time
            (frames).
        affine: 4x4 RAS affine of the label grid written to ``labels.nii.gz`` (:meth:`to_file_grid`).
        kind: one of :data:`KINDS`.
        source: the file or folder read.
        axis: NIfTI: canonical axis the slices are taken along (2 axial, 1 coronal, 0 sagittal);
            None for DICOM.
        xform_code: NIfTI sform/qform code of ``affine`` (1 scanner, 2 aligned).
        meta: shared slice metadata (``modality``, ``spacing_mm`` (row, col), ``window``).
        orientation: NIfTI only: nibabel orientation of the source voxel axes (for :meth:`to_file_grid`).
    """

    frames: np.ndarray
    affine: np.ndarray
    kind: str
    source: Path
    axis: int | None = None
    xform_code: int = 2
    meta: dict[str, Any] = field(default_factory=dict)
    orientation: np.ndarray | None = None

    @property
    def n_slices(self) -> int:
        return int(self.frames.shape[0])

    @property
    def id(self) -> str:
        name = self.source.name
        for suffix in (".nii.gz", ".nii", ".dcm", ".dicom"):
            if name.lower().endswith(suffix):
                return name[: -len(suffix)]
        return name

    def slice_image(self, k: int) -> AnnotatedImage:
        """Slice ``k`` as an unlabeled target (meta: ``source``, ``slice_index``, ``axis``, ``n_slices``...)."""
        meta = {**self.meta, "id": f"{self.id}_slice{k:03d}", "source": str(self.source), "slice_index": k,
                "axis": self.axis, "n_slices": self.n_slices, "volume_kind": self.kind}
        return AnnotatedImage(self.frames[k], {}, meta)

    def to_file_grid(self, stack: np.ndarray) -> np.ndarray:
        """(Z, H, W) stack in display orientation -> the array ``labels.nii.gz`` holds, whose voxel
        grid ``affine`` describes: the source's voxel order for NIfTI, (column, row, slice) for DICOM."""
        stack = np.asarray(stack)
        if stack.shape != self.frames.shape:
            raise ValueError(f"stack: expected shape {self.frames.shape}, got {stack.shape}")
        if self.kind != "nifti":
            return np.ascontiguousarray(stack.transpose(2, 1, 0))
        from nibabel.orientations import apply_orientation, ornt_transform

        canonical = undisplay_stack(stack, int(self.axis))
        ras = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
        return np.ascontiguousarray(apply_orientation(canonical, ornt_transform(ras, self.orientation)))


def check_axis(axis: Any) -> None:
    """Raise unless ``axis`` is a NIfTI slicing axis: 0 (sagittal), 1 (coronal) or 2 (axial)."""
    if axis not in AXIS_NAMES:
        raise RauInputError(f"axis: expected 0 (sagittal), 1 (coronal) or 2 (axial), got {axis!r}")


def display_stack(canonical: np.ndarray, axis: int) -> np.ndarray:
    """Canonical RAS volume (X, Y, Z) -> (N, H, W) stack of slices along ``axis``, each shown as
    :func:`rau.data.medical.read_nifti` shows it (radiological display; see its module docstring)."""
    check_axis(axis)
    if axis == 2:  # slice (Y, X): rows anterior -> posterior, columns right -> left
        return canonical[::-1, ::-1, :].transpose(2, 1, 0)
    if axis == 1:  # slice (Z, X): rows superior -> inferior, columns right -> left
        return canonical[::-1, :, ::-1].transpose(1, 2, 0)
    # axis 0, slice (Z, Y): rows superior -> inferior, columns anterior -> posterior
    return canonical[:, ::-1, ::-1].transpose(0, 2, 1)


def undisplay_stack(stack: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of :func:`display_stack`: (N, H, W) stack -> canonical RAS volume (X, Y, Z)."""
    check_axis(axis)
    if axis == 2:
        return stack.transpose(2, 1, 0)[::-1, ::-1, :]
    if axis == 1:
        return stack.transpose(2, 0, 1)[::-1, :, ::-1]
    return stack.transpose(0, 2, 1)[:, ::-1, ::-1]  # axis 0


def _nifti_shape(path: Path) -> tuple[int, ...] | None:
    import nibabel as nib

    try:
        shape = tuple(int(s) for s in nib.load(str(path)).shape)
    except Exception:  # noqa: BLE001 - unreadable: single-image mode reports it as it does today
        return None
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _dicom_frames(path: Path) -> int | None:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - not a readable DICOM: single-image mode reports it
        return None
    try:
        return int(float(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return None


def volume_kind(path: str | Path) -> str | None:
    """What a target path is: ``"nifti"`` (a 3D or 4D NIfTI), ``"dicom-series"`` (a folder),
    ``"dicom-frames"`` (a multi-frame DICOM), or None (a 2D image, a single-frame DICOM, a 2D or
    single-slice NIfTI, or a path that cannot be read: single-image mode handles it as before).

    Reads headers only."""
    from rau.data.io import file_kind

    path = Path(path)
    if path.is_dir():
        return "dicom-series"
    if not path.is_file():
        return None
    kind = file_kind(path)
    if kind == "nifti":
        shape = _nifti_shape(path)
        if shape is None or len(shape) < 3:
            return None
        return "nifti" if len(shape) > 3 or shape[2] > 1 or 0 in shape else None
    if kind == "dicom":
        frames = _dicom_frames(path)
        return "dicom-frames" if frames is not None and frames != 1 else None
    return None


def read_volume(path: str | Path, *, axis: int | None = None, arg: str = "--target") -> Volume:
    """Read a 3D NIfTI, a folder holding one DICOM series, or a multi-frame DICOM -> :class:`Volume`.

    Args:
        axis: NIfTI only: 2 axial (default), 1 coronal, 0 sagittal (canonical RAS axes).
    Raises:
        RauInputError: not a volume (a 2D image), a 4D NIfTI, an empty or blank volume, a folder
            with no DICOM series or with several, unreadable files, ``axis`` given for DICOM.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{arg}: {path} does not exist")
    kind = volume_kind(path)
    if kind is None:
        raise RauInputError(f"{arg}: {path} is a 2D image, not a volume (3D NIfTI, DICOM series folder or "
                            "multi-frame DICOM); leave --volume out to segment it as one image")
    if kind != "nifti" and axis is not None:
        raise RauInputError(f"axis: only for NIfTI volumes; {path} is a DICOM ({kind}), leave --axis out")
    reader = {"nifti": _read_nifti_volume, "dicom-series": _read_dicom_series, "dicom-frames": _read_dicom_frames}[kind]
    volume = reader(path, axis if axis is not None else 2, arg) if kind == "nifti" else reader(path, arg)
    if volume.n_slices == 0 or volume.frames.size == 0:
        raise RauInputError(f"{arg}: {path} is an empty volume (shape {volume.frames.shape}); pass a volume with slices")
    return volume


def _read_nifti_volume(path: Path, axis: int, arg: str) -> Volume:
    import nibabel as nib
    from nibabel.orientations import io_orientation

    from rau.data.medical import SOFT_TISSUE_WINDOW, apply_window, load_nifti, looks_like_ct

    check_axis(axis)
    shape = _nifti_shape(path)
    if len(shape) > 3:
        raise RauInputError(f"{arg}: {path} is a 4D NIfTI of shape {shape} ({shape[3]} volumes); "
                            "pass one 3D volume (split it, e.g. with fslsplit), or --no-volume for one slice of the first")
    if 0 in shape:
        raise RauInputError(f"{arg}: {path} is an empty volume (shape {shape}); pass a volume with slices")
    data, zooms, header, _ = load_nifti(path, arg)  # canonical RAS voxels and their zooms
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        raise RauInputError(f"{arg}: {path} contains NaN or infinite voxels; clean the volume first")
    _require_not_blank(data, path, arg)
    img = nib.load(str(path))  # header only: the source's own voxel order and affine
    window = SOFT_TISSUE_WINDOW if looks_like_ct(data, header) else None
    frames = np.stack([apply_window(plane, window) for plane in display_stack(np.asarray(data), axis)])
    rows_cols = {2: (1, 0), 1: (2, 0), 0: (2, 1)}[axis]
    meta = {"modality": "CT" if window is not None else None, "window": window,
            "spacing_mm": tuple(float(zooms[i]) for i in rows_cols),
            "orientation": "radiological display of the canonical RAS volume"}
    code = int(img.header["sform_code"]) or int(img.header["qform_code"]) or 2
    return Volume(frames, np.asarray(img.affine, np.float64), "nifti", path, axis, code, meta, io_orientation(img.affine))


def _require_not_blank(values: np.ndarray, path: Path, arg: str) -> None:
    v = np.asarray(values)
    if v.size and float(v.min()) == float(v.max()):
        raise RauInputError(f"{arg}: {path} is a blank volume (every voxel is {float(v.min()):g}); nothing to segment")


def _series_list(folder: Path) -> list[tuple[str, list[str]]]:
    """[(series uid, its files sorted along the slice normal as GDCM sorts them)] in a folder."""
    import SimpleITK as sitk

    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    return [(sid, list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid))) for sid in ids]


def _describe_series(uid: str, files: list[str]) -> str:
    import pydicom

    try:
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        what = " ".join(str(ds.get(k, "") or "") for k in ("Modality", "SeriesDescription")).strip()
    except Exception:  # noqa: BLE001 - the description is a courtesy
        what = ""
    return f"{uid} ({what + ', ' if what else ''}{len(files)} files)"


def _read_dicom_series(folder: Path, arg: str) -> Volume:
    from rau.data.medical import read_dicom

    series = _series_list(folder)
    if not series:
        raise RauInputError(f"{arg}: {folder} holds no DICOM series (an empty volume); pass a folder of DICOM slices")
    if len(series) > 1:
        names = "; ".join(_describe_series(uid, files) for uid, files in series)
        raise RauInputError(f"{arg}: {folder} holds {len(series)} DICOM series: {names}; "
                            "pass a folder holding only the one to segment")
    files = series[0][1]
    if len(files) == 1 and volume_kind(files[0]) == "dicom-frames":
        return _read_dicom_frames(Path(files[0]), arg)
    read = [read_dicom(f, arg=arg) for f in files]
    slices, first_meta = [image for image, _ in read], read[0][1]
    shapes = sorted({s.shape for s in slices})
    if len(shapes) > 1:
        raise RauInputError(f"{arg}: the slices of {folder} differ in size ({shapes}); pass one series of equal slices")
    affine = _series_affine(files, arg, folder)
    frames = np.stack(slices)
    _require_not_blank(frames, folder, arg)
    meta = {k: first_meta.get(k) for k in ("modality", "spacing_mm", "window") if first_meta.get(k) is not None}
    return Volume(frames, affine, "dicom-series", folder, None, 1, meta)


def _series_affine(files: list[str], arg: str, folder: Path) -> np.ndarray:
    """RAS affine of the (column, row, slice) grid of a series, from SimpleITK's geometry (LPS)."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise RauInputError(f"{arg}: SimpleITK cannot read the series in {folder} ({one_line(exc)})") from None
    return lps_to_ras_affine(image.GetDirection(), image.GetSpacing(), image.GetOrigin())


def lps_to_ras_affine(direction: Any, spacing: Any, origin: Any) -> np.ndarray:
    """ITK geometry (3x3 direction flattened row-major, spacing, origin; LPS) -> 4x4 RAS affine."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(direction, np.float64).reshape(3, 3) @ np.diag(np.asarray(spacing, np.float64))
    lps[:3, 3] = np.asarray(origin, np.float64)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _read_dicom_frames(path: Path, arg: str) -> Volume:
    import pydicom

    from rau.data.medical import dicom_gray, dicom_pixels, dicom_rgb, dicom_spacing

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001 - truncated/corrupted files raise assorted errors
        raise RauInputError(f"{arg}: cannot read {path} as DICOM ({one_line(exc)})") from None
    if _dicom_frames(path) == 0:
        raise RauInputError(f"{arg}: {path} is an empty multi-frame DICOM (NumberOfFrames 0); pass one with frames")
    pixels = dicom_pixels(ds, path, arg, [])
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if pixels.ndim < 3 or pixels.shape[0] == 0:
        raise RauInputError(f"{arg}: {path} is an empty multi-frame DICOM (pixel shape {pixels.shape}); pass frames")
    _require_not_blank(pixels, path, arg)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    frames, window = [], None
    for frame in pixels:
        if samples == 3:
            image = dicom_rgb(frame)
        else:
            image, window, _ = dicom_gray(ds, frame, None)
            image = (1.0 - image).astype(np.float32) if photometric == "MONOCHROME1" else image
        frames.append(image)
    row_mm, col_mm = dicom_spacing(ds) or (1.0, 1.0)
    meta = {"modality": str(ds.get("Modality")) if ds.get("Modality") else None, "window": window,
            "spacing_mm": (float(row_mm), float(col_mm))}
    affine = np.diag([-float(col_mm), -float(row_mm), 1.0, 1.0])  # ITK's identity direction (LPS), unit time step
    return Volume(np.stack(frames).astype(np.float32), affine, "dicom-frames", path, None, 2, meta)
