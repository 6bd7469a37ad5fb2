"""Test support shared by several test folders: tiny synthetic files and caches."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rau.data.caches import TokenCache

#: A tiny compact RAU VLM config (random weights, trains in seconds).
TINY = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64, feature_dim=8, grid=4)


def write_dicom(
    path: Path,
    pixels: np.ndarray | None,
    *,
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple | None = None,
    spacing: tuple[float, float] | None = (0.5, 0.25),
    spacing_key: str = "PixelSpacing",
    modality: str = "CT",
    frames: int | None = None,
) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "SECRET-123"
    ds.Modality = modality
    if spacing is not None:
        setattr(ds, spacing_key, [str(spacing[0]), str(spacing[1])])
    if slope is not None:
        ds.RescaleSlope = str(slope)
        ds.RescaleIntercept = str(intercept or 0)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if pixels is not None:
        rgb = pixels.ndim == 3 + int(frames is not None)
        shape = pixels.shape[1:] if frames else pixels.shape
        ds.Rows, ds.Columns = int(shape[0]), int(shape[1])
        ds.SamplesPerPixel = 3 if rgb else 1
        ds.PhotometricInterpretation = "RGB" if rgb else photometric
        if rgb:
            ds.PlanarConfiguration = 0
        if frames:
            ds.NumberOfFrames = frames
        bits = pixels.dtype.itemsize * 8
        ds.BitsAllocated = ds.BitsStored = bits
        ds.HighBit = bits - 1
        ds.PixelRepresentation = int(np.issubdtype(pixels.dtype, np.signedinteger))
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def tiny_token_cache(n: int = 12, seed: int = 0, names: tuple[str, ...] = ("a", "b", "c")) -> TokenCache:
    """Features whose channel j is a bright 2x2 block where structure j (of 3 ``names``) is: learnable."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(0, 0.1, (n, 8, 4, 4)).astype(np.float16)
    loc = np.full((n, 3, 4), -1, np.int64)
    codes = np.full((n, 3, 16), -1, np.int64)
    for i in range(n):
        for j in range(3):
            if (i + j) % 5 == 4:
                continue  # some structures absent: the answer is <no>
            r, c = rng.integers(0, 3, 2)
            feats[i, j, r : r + 2, c : c + 2] += 2.0
            loc[i, j] = [r * 256, c * 256, (r + 2) * 256 - 1, (c + 2) * 256 - 1]
            codes[i, j] = (np.arange(16) + j) % 512
    return TokenCache(feats, loc, codes, [f"img{i}" for i in range(n)], list(names), {})
