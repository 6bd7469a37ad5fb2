"""Readers for medical formats (DICOM, NIfTI) -> ``((H, W) float32 in [0, 1], meta)``.

Pure apart from reading the file; heavy libraries (pydicom, nibabel) are imported inside the
functions. Every failure on user input raises :class:`~rau.errors.RauInputError` with a one-line
message naming the file and the fix.

Intensity conventions
---------------------
- DICOM: stored values -> ``value * RescaleSlope + RescaleIntercept`` (e.g. Hounsfield units) ->
  window -> [0, 1]. The window is the ``window`` argument, else the file's first
  WindowCenter/WindowWidth, else the image's min-max. A window (center, width) maps linearly
  ``center - width/2 -> 0`` and ``center + width/2 -> 1`` and clips outside (the plain linear form,
  not DICOM's ``c - 0.5, w - 1`` variant). MONOCHROME1 (bright = low value) is inverted after
  windowing so that bright always means dense. RGB is converted to luminance (ITU-R 601) and
  min-max scaled (8-bit RGB: /255).
- NIfTI: ``get_fdata`` values (``scl_slope``/``scl_inter`` applied). A volume that looks like CT
  (see :func:`looks_like_ct`) gets a soft-tissue window (center 40 HU, width 400 HU) unless
  ``window`` is given; anything else is min-max scaled over the returned slice.

NIfTI orientation (display rule)
--------------------------------
A 3D volume is first reoriented to the closest canonical RAS+ voxel order (nibabel
``as_closest_canonical``: voxel axis 0 runs towards the patient's Right, axis 1 towards Anterior,
axis 2 towards Superior); ``slice_index`` counts along that canonical axis (axis 2: 0 = most
inferior slice). The slice is then shown in the radiological convention:

- ``axis=2`` (axial): rows run anterior -> posterior (top = anterior), columns run patient right ->
  left (the patient's right on the image left). Result shape (Y, X).
- ``axis=1`` (coronal): rows run superior -> inferior, columns patient right -> left. Shape (Z, X).
- ``axis=0`` (sagittal): rows run superior -> inferior, columns anterior -> posterior (the patient
  faces the image left). Shape (Z, Y).

A 2D NIfTI (or a volume with a single slice along axis 2) is returned "as is": the array's first
voxel axis becomes the columns and the second the rows (``data.T``, the view SimpleITK and ITK
writers round-trip a PNG to), with no flips. ``spacing_mm`` is (row, col) in millimetres from
the header zooms.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from rau.errors import RauInputError

SOFT_TISSUE_WINDOW = (40.0, 400.0)
"""Default CT window (center, width) in HU for NIfTI CT volumes."""

_LUMA = np.array([0.299, 0.587, 0.114])
AXIS_NAMES = {0: "sagittal", 1: "coronal", 2: "axial"}


# ----------------------------------------------------------------------------- shared helpers


def _check_window(window: Any, arg: str = "window") -> tuple[float, float] | None:
    if window is None:
        return None
    try:
        center, width = (float(v) for v in window)
    except (TypeError, ValueError):
        raise RauInputError(f"{arg}: expected (center, width) numbers, got {window!r}") from None
    if not (np.isfinite(center) and np.isfinite(width)) or width <= 0:
        raise RauInputError(f"{arg}: width must be a finite number > 0, got (center, width) = {window!r}")
    return center, width


def apply_window(values: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    """Map values to [0, 1]: a linear (center, width) window clipped outside, or min-max if None.

    A constant image maps to zeros. Returns float32 of the same shape."""
    v = np.asarray(values, dtype=np.float64)
    if window is None:
        lo, hi = float(v.min()), float(v.max())
    else:
        lo, hi = window[0] - window[1] / 2.0, window[0] + window[1] / 2.0
    if hi - lo < 1e-12:
        return np.zeros(v.shape, np.float32)
    return np.clip((v - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _check_path(path: str | Path, arg: str) -> Path:
    path = Path(path)
    if not path.is_file():
        what = "does not exist" if not path.exists() else "is not a file"
        raise RauInputError(f"{arg}: {path} {what}; pass the path of an existing file")
    return path


# ----------------------------------------------------------------------------- DICOM


def _dicom_first(value: Any) -> float | None:
    """First value of a possibly multi-valued DICOM number (WindowCenter can be a MultiValue)."""
    if value is None or value == "":
        return None
    try:
        if not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):
            value = value[0] if len(value) else None
        return None if value is None else float(value)
    except (TypeError, ValueError, IndexError):
        return None


def dicom_spacing(ds: Any) -> tuple[float, float] | None:
    """(row, col) pixel spacing in mm of a pydicom dataset (PixelSpacing, else ImagerPixelSpacing), or None."""
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(key)
        if value is not None:
            try:
                row, col = (float(v) for v in value)
                return row, col
            except (TypeError, ValueError):
                continue
    return None


def dicom_pixels(ds: Any, path: Path, arg: str, warned: list[str]) -> np.ndarray:
    """The stored pixel array of ``ds`` (frames first for multi-frame); ``warned``: pydicom's read warnings,
    naming the corruption when the pixel data element is missing. Raises RauInputError."""
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        if warned:  # pydicom stopped early: the pixel data element was lost to corruption
            raise RauInputError(
                f"{arg}: {path} is corrupted, no pixel data could be read (pydicom: {warned[0]}); re-export the file"
            )
        raise RauInputError(
            f"{arg}: {path} is a DICOM without pixel data (e.g. a report or a presentation state); "
            "pass an image DICOM"
        )
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for bad/undecodable pixels
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        msg = (str(exc).splitlines() or [exc.__class__.__name__])[0].split(" - ")[0]
        if syntax is not None and syntax.is_compressed:
            hint = f"{syntax.name} needs a decoder plugin (pylibjpeg or gdcm), or the file is corrupted"
        else:
            hint = "the file is truncated or corrupted; re-export it"
        raise RauInputError(f"{arg}: cannot decode the pixel data of {path}: {msg}; {hint}") from None


def read_dicom(
    path: str | Path, *, window: tuple[float, float] | None = None, arg: str = "image"
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a DICOM image -> ((H, W) float32 in [0, 1], meta).

    Args:
        path: a DICOM file (with or without the DICM preamble).
        window: (center, width) in modality units (HU for CT) after RescaleSlope/Intercept;
            default: the file's first WindowCenter/WindowWidth, else min-max.
        arg: argument name used in error messages.
    Returns:
        ``image`` (H, W) float32 in [0, 1] (bright = dense, MONOCHROME1 inverted) and ``meta`` with
        ``modality``, ``spacing_mm`` (row, col) when the file has PixelSpacing or
        ImagerPixelSpacing, ``photometric``, ``window`` (the one used, None for min-max),
        ``rescale`` (slope, intercept), ``frames`` and ``note`` (multi-frame). No patient data is
        copied into ``meta``.
    Raises:
        RauInputError: not a DICOM, corrupted, no pixel data, undecodable pixels, bad ``window``.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = _check_path(path, arg)
    window = _check_window(window)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path)
    except InvalidDicomError:
        raise RauInputError(f"{arg}: {path} is not a DICOM file (no DICM header); pass a .dcm image") from None
    except Exception as exc:  # noqa: BLE001 - truncated/corrupted files raise assorted errors
        raise RauInputError(
            f"{arg}: cannot read {path} as DICOM, the file looks corrupted ({exc.__class__.__name__}: {exc})"
        ) from None
    pixels = dicom_pixels(ds, path, arg, [str(w.message) for w in caught])
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = int(_dicom_first(ds.get("NumberOfFrames")) or 1)
    meta: dict[str, Any] = {
        "modality": str(ds.get("Modality")) if ds.get("Modality") else None,
        "photometric": photometric,
        "frames": frames,
    }
    spacing = dicom_spacing(ds)
    if spacing is not None:
        meta["spacing_mm"] = spacing
    if frames > 1:
        pixels = pixels[0]
        meta["note"] = f"multi-frame DICOM with {frames} frames: the first frame is used"
    if samples == 3 or (pixels.ndim == 3 and pixels.shape[-1] == 3):
        image = dicom_rgb(pixels)
        meta.update(window=None, rescale=None)
    else:
        image, used_window, rescale = dicom_gray(ds, pixels, window)
        if photometric == "MONOCHROME1":
            image = (1.0 - image).astype(np.float32)
        meta.update(window=used_window, rescale=rescale)
    if image.ndim != 2:
        raise RauInputError(f"{arg}: {path} holds pixel data of shape {pixels.shape}, not a 2D image")
    if not np.all(np.isfinite(image)):
        raise RauInputError(f"{arg}: {path} pixel data contain NaN or infinite values")
    return image, meta


def dicom_rgb(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3+) RGB pixels -> (H, W) float32 luminance in [0, 1] (8-bit: /255, else min-max)."""
    luma = pixels[..., :3].astype(np.float64) @ _LUMA
    if pixels.dtype == np.uint8:
        return (luma / 255.0).astype(np.float32)
    return apply_window(luma, None)


def dicom_gray(
    ds: Any, pixels: np.ndarray, window: tuple[float, float] | None
) -> tuple[np.ndarray, tuple[float, float] | None, tuple[float, float]]:
    """Gray pixels -> (image (H, W) float32 in [0, 1] after rescale and ``window`` (else the file's, else
    min-max), the window used, (slope, intercept)); MONOCHROME1 is not inverted here."""
    slope = _dicom_first(ds.get("RescaleSlope"))
    intercept = _dicom_first(ds.get("RescaleIntercept"))
    slope = 1.0 if slope is None or slope == 0 else slope
    intercept = 0.0 if intercept is None else intercept
    values = pixels.astype(np.float64) * slope + intercept
    if window is None:
        center, width = _dicom_first(ds.get("WindowCenter")), _dicom_first(ds.get("WindowWidth"))
        if center is not None and width is not None and width > 0:
            window = (center, width)
    return apply_window(values, window), window, (slope, intercept)


# ----------------------------------------------------------------------------- NIfTI


def looks_like_ct(volume: np.ndarray, header: Any = None) -> bool:
    """True when a volume is probably CT in Hounsfield units.

    Rule: the header's ``descrip`` mentions CT, or the values are integer-like with a minimum
    at or below -500 (air is about -1000 HU) and a maximum at or above 300 (bone)."""
    if header is not None:
        try:
            descrip = bytes(np.asarray(header["descrip"]).tobytes()).decode("latin-1").upper()
            if "CT" in descrip.replace("\x00", " ").split():
                return True
        except (KeyError, TypeError, ValueError):
            pass
    v = np.asarray(volume)
    if v.size == 0:
        return False
    lo, hi = float(np.nanmin(v)), float(np.nanmax(v))
    if lo > -500 or hi < 300:
        return False
    sample = v.ravel()[:: max(1, v.size // 100_000)]
    return bool(np.all(np.abs(sample - np.round(sample)) < 1e-3))


def load_nifti(path: str | Path, arg: str) -> tuple[np.ndarray, tuple[float, ...], Any, str | None]:
    """-> (canonical RAS data (>= 2D), zooms of the canonical axes, header, note)."""
    import nibabel as nib

    path = _check_path(path, arg)
    try:
        img = nib.load(str(path))
        if len(img.shape) >= 3 and img.shape[2] > 1:  # a single-slice file stays "as is", like a 2D one
            img = nib.as_closest_canonical(img)
        data = np.asanyarray(img.dataobj)
        zooms = tuple(float(z) for z in img.header.get_zooms())
    except Exception as exc:  # noqa: BLE001 - nibabel raises assorted errors for bad files
        msg = str(exc).splitlines()[0] if str(exc) else ""
        raise RauInputError(
            f"{arg}: cannot read {path} as NIfTI ({exc.__class__.__name__}: {msg}); pass a .nii or .nii.gz file"
        ) from None
    note = None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        note = f"4D NIfTI with {data.shape[3]} volumes: the first volume is used"
        data = data[..., 0]
    if data.ndim not in (2, 3):
        raise RauInputError(f"{arg}: {path} has shape {data.shape}; expected a 2D image or a 3D volume")
    return data, zooms, img.header, note


def display_slice(
    data: np.ndarray, zooms: tuple[float, ...], slice_index: int | None, axis: int, path: Path, arg: str
) -> tuple[np.ndarray, tuple[float, float], dict[str, Any]]:
    """Canonical data -> (display-oriented 2D array, (row, col) spacing, meta about the slice)."""
    if data.ndim == 2 or (data.ndim == 3 and data.shape[2] == 1 and axis == 2):
        plane = data if data.ndim == 2 else data[:, :, 0]
        if slice_index not in (None, 0):
            raise RauInputError(f"slice_index: {path} is a 2D image; pass slice_index=None or 0, got {slice_index}")
        return plane.T, (zooms[1], zooms[0]), {"slice_index": None, "axis": None}
    if axis not in AXIS_NAMES:
        raise RauInputError(f"axis: expected 0 (sagittal), 1 (coronal) or 2 (axial), got {axis!r}")
    n = data.shape[axis]
    index = n // 2 if slice_index is None else slice_index
    if not isinstance(index, (int, np.integer)) or isinstance(index, bool) or not 0 <= index < n:
        raise RauInputError(
            f"slice_index: {slice_index!r} is outside the valid range 0..{n - 1} along axis {axis} "
            f"({AXIS_NAMES[axis]}) of {path}"
        )
    index = int(index)
    if axis == 2:  # (X, Y) -> rows anterior->posterior, cols right->left
        plane, spacing = data[::-1, ::-1, index].T, (zooms[1], zooms[0])
    elif axis == 1:  # (X, Z) -> rows superior->inferior, cols right->left
        plane, spacing = data[::-1, index, ::-1].T, (zooms[2], zooms[0])
    else:  # (Y, Z) -> rows superior->inferior, cols anterior->posterior
        plane, spacing = data[index, ::-1, ::-1].T, (zooms[2], zooms[1])
    return np.ascontiguousarray(plane), spacing, {"slice_index": index, "axis": axis, "n_slices": n}


def read_nifti(
    path: str | Path,
    *,
    slice_index: int | None = None,
    axis: int = 2,
    window: tuple[float, float] | None = None,
    arg: str = "image",
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a 2D NIfTI image or one slice of a 3D volume -> ((H, W) float32 in [0, 1], meta).

    Args:
        path: ``.nii`` or ``.nii.gz``.
        slice_index: index along ``axis`` of the canonical RAS volume (default: the middle slice).
        axis: 2 axial, 1 coronal, 0 sagittal (see the module docstring for the display rule).
        window: (center, width) in the file's units (HU for CT). Default: soft tissue
            (40, 400) for a CT volume, min-max of the slice otherwise.
    Returns:
        image and meta with ``modality`` ("CT" or None), ``spacing_mm`` (row, col),
        ``slice_index``, ``axis``, ``n_slices``, ``window`` (None = min-max) and ``orientation``.
    Raises:
        RauInputError: unreadable file, NaN values, slice out of range, bad axis or window.
    """
    path = Path(path)
    window = _check_window(window)
    data, zooms, header, note = load_nifti(path, arg)
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        raise RauInputError(f"{arg}: {path} contains NaN or infinite voxels; clean the volume first")
    is_ct = looks_like_ct(data, header)
    plane, spacing, info = display_slice(data, zooms, slice_index, axis, path, arg)
    if window is None and is_ct:
        window = SOFT_TISSUE_WINDOW
    meta: dict[str, Any] = {
        "modality": "CT" if is_ct else None,
        "spacing_mm": (float(spacing[0]), float(spacing[1])),
        "window": window,
        "orientation": "radiological display of the canonical RAS volume" if info["axis"] is not None else "as stored (data.T)",
        **info,
    }
    if note:
        meta["note"] = note
    return apply_window(plane, window), meta


def read_nifti_labels(
    path: str | Path,
    *,
    slice_index: int | None = None,
    axis: int = 2,
    names: dict[int, str] | None = None,
    arg: str = "label map",
) -> dict[str, np.ndarray]:
    """Read a NIfTI label map -> {name: (H, W) bool} for the same slice and orientation as
    :func:`read_nifti` with the same ``slice_index`` and ``axis``.

    Args:
        names: label value -> structure name; labels not in ``names`` are ignored and several
            values with the same name are merged. Default: every nonzero label as ``label_<value>``.
    Returns:
        Only the structures present in the slice (absent labels are left out, like
        :func:`rau.data.io.read_label_map`).
    Raises:
        RauInputError: unreadable file, non-integer or NaN voxels, slice out of range, bad axis.
    """
    path = Path(path)
    data, zooms, _, _ = load_nifti(path, arg)
    values = np.asarray(data)
    if np.issubdtype(values.dtype, np.floating):
        if not np.all(np.isfinite(values)):
            raise RauInputError(f"{arg}: {path} contains NaN or infinite voxels; a label map must hold integers")
        if np.any(np.abs(values - np.round(values)) > 1e-3):
            raise RauInputError(f"{arg}: {path} holds non-integer values; pass an integer label map, not an image")
        values = np.round(values)
    plane, _, _ = display_slice(values.astype(np.int64), zooms, slice_index, axis, path, arg)
    present = [int(v) for v in np.unique(plane) if v != 0]
    table = {v: f"label_{v}" for v in present} if names is None else {int(k): str(n) for k, n in names.items()}
    out: dict[str, np.ndarray] = {}
    for value in present:
        if value in table:
            name = table[value]
            out[name] = out[name] | (plane == value) if name in out else plane == value
    return out
