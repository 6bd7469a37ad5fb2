"""Volumes and sequences: segment a 3D NIfTI, a DICOM series or a multi-frame DICOM (cine) slice by
slice, propagating the result from slice to slice as SAM2 propagates through a video.

Example::

    import rau
    from rau.volume import propagate

    ref = rau.load_annotated("ref.png", "ref_masks/")                 # one annotated slice
    vol = propagate(ref, "ct.nii.gz", method="registration", out_dir="out/ct")
    vol.labels.shape, vol.start, vol.found                            # (Z, H, W) uint16, ...

How it runs (:func:`propagate`):

1. The start slice (``start``, else the slice whose 32x32 thumbnail correlates best with the
   reference image, :func:`best_matching_slice`) is segmented with the user's reference.
2. Then both ways, start -> last slice and start -> first slice (:func:`propagation_order`), each
   slice is segmented with the previous slice and its predicted masks as the reference. A structure
   whose mask vanishes stops propagating in that direction; a direction with no structure left stops.
   The method is built once and only its ``Method.predict`` is called.

Slices (:func:`read_volume`) are shown exactly as the single-image readers of
:mod:`rau.data.medical` show them: a NIfTI slice k equals ``read_nifti(path, slice_index=k, axis=axis)``
(canonical RAS, radiological display), a DICOM slice or frame equals what ``read_dicom`` gives
(rescale, file window or min-max, MONOCHROME1 inverted). A reference drawn on one such slice
therefore matches its own slice pixel for pixel.

Outputs in ``out_dir`` (written into a temporary sibling folder, renamed at the end):

- ``labels.nii.gz``: uint16 label map in the volume's geometry. NIfTI source: the source's voxel
  order, shape and affine (sform/qform code kept). DICOM series: ITK's patient geometry of the
  series (origin, spacing, direction as SimpleITK reads it; LPS -> RAS), voxel grid (column, row,
  slice). Multi-frame DICOM: frames along the 3rd axis with unit spacing, in-plane ITK's identity
  direction (RAS affine ``diag(-col_mm, -row_mm, 1)``), as :mod:`rau.data.export` does for 2D images.
- ``labels_labels.txt`` (ITK-SNAP label description) and ``labels_labels.json``: values from
  :func:`rau.data.export.label_table` (every structure 1..N in order, found or not), colours, voxel
  counts. Overlaps within a slice: :data:`rau.data.export.OVERLAP_RULE`.
- ``slices.json``: per slice its index, the reference it used (``"user"``, ``"slice k"`` or null
  when propagation never reached it) and per structure found/score/box.
- ``result.json``, ``masks/<structure>.png`` and ``overlay.png`` of the start slice, as single-image
  mode writes them (:func:`rau.pipeline.write_result`).
"""

from __future__ import annotations

import gzip
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rau.atomic import write_bytes, write_json, write_text
from rau.data.annotated import AnnotatedImage, StructureResult, TargetResult
from rau.errors import RauInputError, one_line

#: Kinds of volume :func:`volume_kind` recognises.
KINDS = ("nifti", "dicom-series", "dicom-frames")

_AXIS_NAMES = {0: "sagittal", 1: "coronal", 2: "axial"}


# ----------------------------------------------------------------------------- the volume


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


def display_stack(canonical: np.ndarray, axis: int) -> np.ndarray:
    """Canonical RAS volume (X, Y, Z) -> (N, H, W) stack of slices along ``axis``, each shown as
    :func:`rau.data.medical.read_nifti` shows it (radiological display; see its module docstring)."""
    if axis == 2:  # slice (Y, X): rows anterior -> posterior, columns right -> left
        return canonical[::-1, ::-1, :].transpose(2, 1, 0)
    if axis == 1:  # slice (Z, X): rows superior -> inferior, columns right -> left
        return canonical[::-1, :, ::-1].transpose(1, 2, 0)
    if axis == 0:  # slice (Z, Y): rows superior -> inferior, columns anterior -> posterior
        return canonical[:, ::-1, ::-1].transpose(0, 2, 1)
    raise RauInputError(f"axis: expected 0 (sagittal), 1 (coronal) or 2 (axial), got {axis!r}")


def undisplay_stack(stack: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of :func:`display_stack`: (N, H, W) stack -> canonical RAS volume (X, Y, Z)."""
    if axis == 2:
        return stack.transpose(2, 1, 0)[::-1, ::-1, :]
    if axis == 1:
        return stack.transpose(2, 0, 1)[::-1, :, ::-1]
    if axis == 0:
        return stack.transpose(0, 2, 1)[:, ::-1, ::-1]
    raise RauInputError(f"axis: expected 0 (sagittal), 1 (coronal) or 2 (axial), got {axis!r}")


# ----------------------------------------------------------------------------- reading


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
    from rau.data.io import _kind

    path = Path(path)
    if path.is_dir():
        return "dicom-series"
    if not path.is_file():
        return None
    kind = _kind(path)
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

    from rau.data.medical import SOFT_TISSUE_WINDOW, _load_nifti, apply_window, looks_like_ct

    if axis not in _AXIS_NAMES:
        raise RauInputError(f"axis: expected 0 (sagittal), 1 (coronal) or 2 (axial), got {axis!r}")
    shape = _nifti_shape(path)
    if len(shape) > 3:
        raise RauInputError(f"{arg}: {path} is a 4D NIfTI of shape {shape} ({shape[3]} volumes); "
                            "pass one 3D volume (split it, e.g. with fslsplit), or --no-volume for one slice of the first")
    if 0 in shape:
        raise RauInputError(f"{arg}: {path} is an empty volume (shape {shape}); pass a volume with slices")
    data, zooms, header, _ = _load_nifti(path, arg)  # canonical RAS voxels and their zooms
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

    from rau.data.medical import _dicom_gray, _dicom_pixels, _dicom_rgb, _dicom_spacing

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001 - truncated/corrupted files raise assorted errors
        raise RauInputError(f"{arg}: cannot read {path} as DICOM ({one_line(exc)})") from None
    if _dicom_frames(path) == 0:
        raise RauInputError(f"{arg}: {path} is an empty multi-frame DICOM (NumberOfFrames 0); pass one with frames")
    pixels = _dicom_pixels(ds, path, arg, [])
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if pixels.ndim < 3 or pixels.shape[0] == 0:
        raise RauInputError(f"{arg}: {path} is an empty multi-frame DICOM (pixel shape {pixels.shape}); pass frames")
    _require_not_blank(pixels, path, arg)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    frames, window = [], None
    for frame in pixels:
        if samples == 3:
            image = _dicom_rgb(frame)
        else:
            image, window, _ = _dicom_gray(ds, frame, None)
            image = (1.0 - image).astype(np.float32) if photometric == "MONOCHROME1" else image
        frames.append(image)
    row_mm, col_mm = _dicom_spacing(ds) or (1.0, 1.0)
    meta = {"modality": str(ds.get("Modality")) if ds.get("Modality") else None, "window": window,
            "spacing_mm": (float(row_mm), float(col_mm))}
    affine = np.diag([-float(col_mm), -float(row_mm), 1.0, 1.0])  # ITK's identity direction (LPS), unit time step
    return Volume(np.stack(frames).astype(np.float32), affine, "dicom-frames", path, None, 2, meta)


# ----------------------------------------------------------------------------- propagation (pure)


def propagation_order(n_slices: int, start: int) -> list[tuple[int, int | None]]:
    """The order slices are segmented in: ``[(slice, the slice whose result is its reference)]``.

    The start slice comes first with reference None (the user's reference), then start+1 .. n-1,
    each from the one before, then start-1 .. 0, each from the one after. Every slice appears once.

    >>> propagation_order(5, 2)
    [(2, None), (3, 2), (4, 3), (1, 2), (0, 1)]
    """
    if n_slices < 1:
        raise ValueError(f"n_slices: expected at least 1 slice, got {n_slices}")
    if not 0 <= start < n_slices:
        raise ValueError(f"start: {start} is outside 0..{n_slices - 1}")
    forward = [(k, k - 1) for k in range(start + 1, n_slices)]
    backward = [(k, k + 1) for k in range(start - 1, -1, -1)]
    return [(start, None), *forward, *backward]


def best_matching_slice(reference_image: np.ndarray, frames: np.ndarray) -> tuple[int, float]:
    """(index, NCC) of the slice of ``frames`` (Z, H, W) most similar to ``reference_image`` (H', W'),
    by normalised cross-correlation of 32x32 thumbnails (:func:`rau.references.thumbnails.thumbnail`);
    ties go to the lowest index."""
    from rau.references.thumbnails import thumbnail

    query = thumbnail(reference_image)
    scores = np.array([float(thumbnail(f) @ query) for f in frames])
    k = int(np.argmax(scores))
    return k, float(scores[k])


def check_start(start: Any, n_slices: int, source: Path | str) -> int:
    """A user's start slice, checked against the volume -> int."""
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or not 0 <= int(start) < n_slices:
        raise RauInputError(f"--start-slice: {start!r} is outside the valid range 0..{n_slices - 1} of {source} "
                            f"({n_slices} slices)")
    return int(start)


# ----------------------------------------------------------------------------- results


@dataclass
class SliceResult:
    """One slice: ``reference`` None = the user's reference, k = slice k's result; ``result`` None when
    propagation never reached the slice (every structure had vanished on the way)."""

    index: int
    reference: int | None
    result: TargetResult | None

    @property
    def reference_label(self) -> str | None:
        if self.result is None:
            return None
        return "user" if self.reference is None else f"slice {self.reference}"


@dataclass
class VolumeResult:
    """What :func:`propagate` returns.

    labels: (Z, H, W) uint16 label map in display orientation (slice k = ``volume.frames[k]``),
        values from :func:`rau.data.export.label_table` of ``structures`` (0 background).
    structures: the structure names, in label order.
    slices: one :class:`SliceResult` per slice, in index order.
    affine: 4x4 RAS affine of ``file_labels`` (what ``labels.nii.gz`` holds).
    """

    labels: np.ndarray
    structures: list[str]
    slices: list[SliceResult]
    affine: np.ndarray
    start: int
    start_rule: str
    method: str
    reference_id: str
    seconds: float
    volume: Volume

    def mask(self, name: str) -> np.ndarray:
        """(Z, H, W) bool mask of one structure (masks of overlapping structures are kept whole)."""
        if name not in self.structures:
            raise KeyError(f"{name!r} is not one of {self.structures}")
        out = np.zeros(self.labels.shape, bool)
        for s in self.slices:
            r = s.result.structures[name] if s.result is not None else None
            if r is not None and r.found:
                out[s.index] = r.mask
        return out

    @property
    def masks(self) -> dict[str, np.ndarray]:
        return {name: self.mask(name) for name in self.structures}

    @property
    def file_labels(self) -> np.ndarray:
        """``labels`` in the voxel order of ``labels.nii.gz`` (:meth:`Volume.to_file_grid`)."""
        return self.volume.to_file_grid(self.labels)

    @property
    def slices_done(self) -> int:
        return sum(s.result is not None for s in self.slices)

    @property
    def found(self) -> list[str]:
        """Structures found on at least one slice."""
        return [n for n in self.structures
                if any(s.result is not None and s.result.structures[n].found for s in self.slices)]


def _complete(result: TargetResult, structures: list[str], why: dict[str, str]) -> TargetResult:
    """The method's result with every structure, in order; those not asked are "no" with ``why``."""
    full = {name: result.structures.get(name) or StructureResult(name, "no", None, 0.0, None, why.get(name))
            for name in structures}
    return TargetResult(result.target_id, result.reference_id, result.method, full, result.seconds)


def _slice_reference(volume: Volume, k: int, result: TargetResult, names: list[str]) -> AnnotatedImage:
    masks = {n: result.structures[n].mask for n in names}
    meta = {**volume.meta, "id": f"{volume.id} slice {k}", "source": str(volume.source), "slice_index": k}
    return AnnotatedImage(volume.frames[k], masks, meta)


def _run(method, reference: AnnotatedImage, volume: Volume, structures: list[str], start: int,
         progress: bool) -> dict[int, SliceResult]:
    """Segment the slices in :func:`propagation_order` -> {slice: SliceResult} of the slices reached."""
    from tqdm.auto import tqdm

    done: dict[int, SliceResult] = {}
    order = propagation_order(volume.n_slices, start)
    for k, src in tqdm(order, desc="slices", unit="slice", disable=not progress):
        if src is None:
            ref, names, why = reference, structures, {}
        else:
            prev = done.get(src)
            if prev is None:
                continue  # this direction has stopped
            names = [n for n in structures if prev.result.structures[n].found]
            if not names:
                continue
            ref = _slice_reference(volume, src, prev.result, names)
            why = {n: f"stopped: its mask vanished before slice {src}" for n in structures if n not in names}
        result = method.predict(ref, volume.slice_image(k), names)
        done[k] = SliceResult(k, src, _complete(result, structures, why))
    return done


def _label_stack(volume: Volume, slices: list[SliceResult]) -> np.ndarray:
    from rau.data.export import label_map

    labels = np.zeros(volume.frames.shape, np.uint16)
    for s in slices:
        if s.result is not None:
            labels[s.index] = label_map(s.result, volume.slice_image(s.index))
    return labels


def propagate(
    reference: AnnotatedImage,
    volume_path: str | Path | Volume,
    *,
    method=None,
    structures: list[str] | None = None,
    start: int | None = None,
    axis: int | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    **method_options: Any,
) -> VolumeResult:
    """Segment the reference's structures in every slice (frame) of a volume by propagation.

    Args:
        reference: the annotated reference (one 2D image; any size).
        volume_path: a 3D NIfTI, a folder holding one DICOM series, a multi-frame DICOM, or a
            :class:`Volume` already read (:func:`read_volume`).
        method: a registry name (default ``rau-seg``) or a :class:`rau.methods.Method`; built once.
        structures: subset of the reference's structures (default: all).
        start: the slice segmented with the user's reference (default: the best match,
            :func:`best_matching_slice`).
        axis: NIfTI only: 2 axial (default), 1 coronal, 0 sagittal.
        out_dir: if given, write the outputs listed in the module docstring there.
        progress: show a progress bar over the slices.
        method_options: as :func:`rau.methods.create_method` takes them (``device``, ``seed``...),
            when ``method`` is a name.
    Raises:
        RauInputError: bad volume (see :func:`read_volume`), ``start`` out of range, unknown
            structure; all checked before the method is built and before anything is written.
    """
    from rau.methods import Method, create_method
    from rau.pipeline import _check_reference

    began = time.perf_counter()
    volume = volume_path if isinstance(volume_path, Volume) else read_volume(volume_path, axis=axis)
    _check_reference(reference, structures)
    names = list(structures) if structures is not None else reference.structures
    if start is None:
        start, ncc = best_matching_slice(reference.image, volume.frames)
        rule = f"best match with the reference (thumbnail NCC {ncc:.3f})"
    else:
        start, rule = check_start(start, volume.n_slices, volume.source), "given"
    m = method if isinstance(method, Method) else create_method(method, **method_options)
    done = _run(m, reference, volume, names, start, progress)
    slices = [done.get(k, SliceResult(k, None, None)) for k in range(volume.n_slices)]
    labels = _label_stack(volume, slices)
    result = VolumeResult(labels, names, slices, volume.affine, start, rule, m.name, reference.id,
                          time.perf_counter() - began, volume)
    if out_dir is not None:
        write_volume_result(result, out_dir)
    return result


# ----------------------------------------------------------------------------- writing


def nifti_bytes(data: np.ndarray, affine: np.ndarray, code: int, description: str) -> bytes:
    """A gzip-compressed NIfTI-1 file (uint16 ``data``, sform = qform = ``affine`` with ``code``, mm)."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data, np.uint16), affine)
    img.set_sform(affine, code=code)
    img.set_qform(affine, code=code)
    img.header.set_xyzt_units(xyz="mm")
    img.header["descrip"] = description[:79].encode()
    return gzip.compress(img.to_bytes(), mtime=0)


def label_rows(result: VolumeResult) -> list[dict[str, Any]]:
    """Label table rows ``{"value", "name", "color_rgb", "found", "voxels"}`` of a volume result."""
    from rau.data.export import label_table
    from rau.render import structure_color

    found = set(result.found)
    return [{"value": value, "name": name, "color_rgb": list(structure_color(name, result.structures)),
             "found": name in found, "voxels": int((result.labels == value).sum())}
            for value, name in label_table(result.structures)]


def slices_document(result: VolumeResult) -> dict[str, Any]:
    """The ``slices.json`` document."""
    rows = []
    for s in result.slices:
        structures = {}
        for name in result.structures:
            r = s.result.structures[name] if s.result is not None else None
            structures[name] = {
                "found": bool(r is not None and r.found),
                "score": round(float(r.score), 4) if r is not None else None,
                "box_xyxy": [round(float(v), 2) for v in r.box_xyxy_px] if r is not None and r.box_xyxy_px is not None else None,
                "reason": r.reason if r is not None else "not reached: every structure had vanished on the way",
            }
        rows.append({"index": s.index, "reference": s.reference_label, "reference_slice": s.reference,
                     "seconds": round(s.result.seconds, 3) if s.result is not None else None, "structures": structures})
    v = result.volume
    return {
        "source": str(v.source), "kind": v.kind, "axis": v.axis, "n_slices": v.n_slices,
        "slice_shape_hw": list(v.frames.shape[1:]), "method": result.method, "reference": result.reference_id,
        "start": result.start, "start_rule": result.start_rule, "structures": result.structures,
        "slices_done": result.slices_done, "found": result.found, "seconds": round(result.seconds, 3),
        "box_convention": "pixel-edge xyxy in slice pixels (x1, y1 exclusive), slices as rau shows them",
        "slices": rows,
    }


def write_volume_result(result: VolumeResult, out_dir: str | Path) -> Path:
    """Write every output of :func:`propagate` into ``out_dir`` (see the module docstring).

    Everything goes into a temporary sibling folder first, renamed at the end: a failure leaves no
    partial ``out_dir``; an existing ``out_dir`` is replaced."""
    from rau.data.export import OVERLAP_RULE, itksnap_label_text
    from rau.pipeline import write_result

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        first = result.slices[result.start]
        write_result(first.result, result.volume.slice_image(result.start), stage)
        description = f"rau {result.method} labels"
        write_bytes(stage / "labels.nii.gz", nifti_bytes(result.file_labels, result.affine, result.volume.xform_code, description))
        rows = label_rows(result)
        write_text(stage / "labels_labels.txt", itksnap_label_text(rows))
        write_json(stage / "labels_labels.json", {
            "labels_file": "labels.nii.gz", "background": 0, "overlap_rule": OVERLAP_RULE, "method": result.method,
            "target": str(result.volume.source), "reference": result.reference_id, "labels": rows,
        })
        write_json(stage / "slices.json", slices_document(result))
        _replace(stage, out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out_dir


def _replace(stage: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
        stage.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        stage.rename(out_dir)
