"""Reading images and masks from disk into :class:`AnnotatedImage`.

Formats: PNG/JPEG/TIFF/BMP (8- or 16-bit, grayscale or RGB), DICOM (``.dcm`` or files starting
with the DICM preamble), NIfTI (``.nii``/``.nii.gz``; a 2D image or one slice of a volume).
Masks: one binary image per structure (any value > 0 is inside), or a label map + names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from rau.data.annotated import AnnotatedImage
from rau.errors import RauInputError

RASTER_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
MASK_SUFFIXES = RASTER_SUFFIXES | {".nii", ".gz"}


def file_kind(path: Path) -> str:
    """``"nifti"``, ``"dicom"`` or ``"raster"``: by suffix, else by the DICM preamble (reads 132 bytes)."""
    name = path.name.lower()
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        return "nifti"
    if path.suffix.lower() in (".dcm", ".dicom"):
        return "dicom"
    if path.suffix.lower() in RASTER_SUFFIXES:
        return "raster"
    with path.open("rb") as fh:
        head = fh.read(132)
    return "dicom" if head[128:132] == b"DICM" else "raster"




def _check_file(path: str | Path, arg: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{arg}: {path} does not exist")
    if not path.is_file():
        raise RauInputError(f"{arg}: {path} is not a file")
    return path


def raster_to_float(array: np.ndarray, mode: str = "") -> np.ndarray:
    """Any 8/16-bit, float, gray/RGB(A) array -> (H, W) float32 in [0, 1].

    Integer images are scaled by their dtype's range (8-bit /255, 16-bit /65535 unless the data
    only use 12 bits, then min-max) so that a 16-bit export keeps its contrast; floats are min-max
    scaled. RGB is converted to luminance (ITU-R 601)."""
    a = np.asarray(array)
    if a.ndim == 3:
        if a.shape[2] == 4:
            a = a[..., :3]
        if a.shape[2] == 3:
            a = a.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        elif a.shape[2] == 1:
            a = a[..., 0]
    if a.ndim != 2:
        raise RauInputError(f"image: expected a 2D grayscale or RGB image, got shape {np.asarray(array).shape}")
    if np.issubdtype(np.asarray(array).dtype, np.integer) and np.asarray(array).dtype.itemsize == 1:
        return (a / 255.0).astype(np.float32)
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise RauInputError("image: contains NaN or infinite values; clean the input first")
    lo, hi = float(a.min()), float(a.max())
    if np.issubdtype(np.asarray(array).dtype, np.integer) and hi > 4095:
        return (a / 65535.0).astype(np.float32)
    if hi - lo < 1e-12:
        return np.zeros(a.shape, np.float32)
    return ((a - lo) / (hi - lo)).astype(np.float32)


def _read_raster(path: Path, arg: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "P":
                im = im.convert("RGB")
                mode = "RGB"
            if mode in ("I;16", "I;16B", "I;16L"):
                array = np.asarray(im, dtype=np.uint16)
            elif mode == "F":
                array = np.asarray(im, dtype=np.float32)
            elif mode == "I":
                array = np.asarray(im, dtype=np.int32)
            else:
                array = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise RauInputError(f"{arg}: cannot read {path} as an image ({exc.__class__.__name__}: {exc})") from None
    return array


def read_image(path: str | Path, *, arg: str = "image", slice_index: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Read an image file -> ((H, W) float32 in [0, 1], meta).

    ``slice_index`` picks a slice of a 3D NIfTI volume (default: the middle one)."""
    path = _check_file(path, arg)
    kind = file_kind(path)
    if kind == "dicom":
        from rau.data.medical import read_dicom

        image, meta = read_dicom(path)
    elif kind == "nifti":
        from rau.data.medical import read_nifti

        image, meta = read_nifti(path, slice_index=slice_index)
    else:
        raw = _read_raster(path, arg)
        try:
            image = raster_to_float(raw)
        except RauInputError as exc:
            raise RauInputError(f"{arg} {path}: {str(exc).split(': ', 1)[-1]}") from None
        meta = {"modality": None, "bit_depth": int(raw.dtype.itemsize * 8)}
    meta.setdefault("id", file_stem(path))
    meta["source"] = str(path)
    return image, meta


def file_stem(path: Path) -> str:
    """A file's name without its image suffix: ``a.nii.gz`` -> ``a``, ``b.dcm`` -> ``b``, ``c.png`` -> ``c``."""
    name = path.name
    for suffix in (".nii.gz", ".nii", ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_mask(path: str | Path, shape: tuple[int, int] | None = None, *, arg: str = "mask", slice_index: int | None = None) -> np.ndarray:
    """Read a binary mask file -> (H, W) bool (any value > 0 is inside).

    ``shape``: the image's (H, W); a mask of another size raises RauInputError."""
    path = _check_file(path, arg)
    if file_kind(path) == "nifti":
        from rau.data.medical import read_nifti_labels

        labels = read_nifti_labels(path, slice_index=slice_index)
        mask = np.zeros(next(iter(labels.values())).shape, bool) if labels else None
        for m in labels.values():
            mask |= m
        if mask is None:
            raise RauInputError(f"{arg}: {path} holds no labelled voxel")
    else:
        raw = _read_raster(path, arg)
        if raw.ndim == 3:
            raw = raw[..., :3].max(axis=2)
        mask = raw > 0
    if shape is not None and mask.shape != tuple(shape):
        raise RauInputError(
            f"{arg}: {path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image is "
            f"{shape[1]}x{shape[0]}; masks must match their image pixel for pixel"
        )
    return mask


def read_label_map(path: str | Path, names: dict[int, str], shape: tuple[int, int] | None = None, *, arg: str = "label map") -> dict[str, np.ndarray]:
    """Label map (H, W) of integer labels -> {name: bool mask} for the labels in ``names``."""
    path = _check_file(path, arg)
    raw = _read_raster(path, arg)
    if raw.ndim != 2:
        raise RauInputError(f"{arg}: {path} must be a single-channel integer label map, got shape {raw.shape}")
    if shape is not None and raw.shape != tuple(shape):
        raise RauInputError(f"{arg}: {path} size {raw.shape[::-1]} differs from its image {tuple(shape)[::-1]}")
    return {name: raw == value for value, name in names.items() if (raw == value).any()}


def read_mask_dir(mask_dir: str | Path, shape: tuple[int, int], *, arg: str = "--reference-masks") -> dict[str, np.ndarray]:
    """A folder of ``<structure>.png`` binary masks -> {structure: (H, W) bool}."""
    mask_dir = Path(mask_dir)
    if not mask_dir.is_dir():
        raise FileNotFoundError(f"{arg}: {mask_dir} is not a folder of <structure>.png masks")
    files = sorted(p for p in mask_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    masks = {}
    for p in files:
        name = file_stem(p)
        masks[name] = read_mask(p, shape, arg=f"{arg} {p.name}")
    if not masks:
        raise RauInputError(f"{arg}: {mask_dir} holds no mask files; expected <structure>.png binary masks")
    return masks


def load_annotated(
    image: str | Path,
    masks: str | Path | dict[str, str | Path] | None = None,
    *,
    arg: str = "image",
    slice_index: int | None = None,
) -> AnnotatedImage:
    """Load an image and (optionally) its masks: a folder of ``<structure>.png`` or a dict name -> path.

    Example::

        ref = rau.load_annotated("ref.png", "ref_masks/")
    """
    pixels, meta = read_image(image, arg=arg, slice_index=slice_index)
    if masks is None:
        named: dict[str, np.ndarray] = {}
    elif isinstance(masks, dict):
        named = {n: read_mask(p, pixels.shape, arg=f"mask {n!r}", slice_index=slice_index) for n, p in masks.items()}
    else:
        named = read_mask_dir(masks, pixels.shape, arg=f"{arg} masks")
    return AnnotatedImage(pixels, named, meta)
