"""DICOM and NIfTI readers on tiny synthetic files written to tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rau.data.annotated import AnnotatedImage
from rau.data.medical import apply_window, looks_like_ct, read_dicom, read_nifti, read_nifti_labels
from rau.errors import RauInputError

from conftest import SHARED
from tiny_data import write_dicom

TOTALSEG = SHARED / "ct_totalseg_examples"


# ----------------------------------------------------------------------------- DICOM helpers


@pytest.fixture()
def ramp() -> np.ndarray:
    # 16-bit stored values 0..4000 across columns; with slope 1, intercept -1024 -> -1024..2976 HU.
    return np.tile(np.linspace(0, 4000, 40).astype(np.uint16), (20, 1))


# ----------------------------------------------------------------------------- DICOM


def test_dicom_rescale_and_file_window(tmp_path: Path, ramp: np.ndarray) -> None:
    path = write_dicom(tmp_path / "ct.dcm", ramp, slope=1.0, intercept=-1024, window=(40, 400))
    image, meta = read_dicom(path)
    assert image.shape == (20, 40) and image.dtype == np.float32
    hu = ramp[0].astype(float) - 1024
    expected = np.clip((hu - (40 - 200)) / 400, 0, 1)
    np.testing.assert_allclose(image[0], expected, atol=1e-6)
    assert meta["modality"] == "CT"
    assert meta["spacing_mm"] == (0.5, 0.25)
    assert meta["window"] == (40.0, 400.0) and meta["rescale"] == (1.0, -1024.0)
    assert "Doe" not in repr(meta) and "SECRET" not in repr(meta)


def test_dicom_window_argument_and_multivalue(tmp_path: Path, ramp: np.ndarray) -> None:
    path = write_dicom(tmp_path / "ct.dcm", ramp, slope=2.0, intercept=-1000, window=([500, 40], [2000, 400]))
    image, meta = read_dicom(path)
    assert meta["window"] == (500.0, 2000.0)  # first of the multi-valued window
    values = ramp[0] * 2.0 - 1000
    np.testing.assert_allclose(image[0], np.clip((values - (500 - 1000)) / 2000, 0, 1), atol=1e-6)
    image2, meta2 = read_dicom(path, window=(0, 100))
    assert meta2["window"] == (0.0, 100.0)
    assert image2.min() == 0.0 and image2.max() == 1.0
    with pytest.raises(RauInputError, match="window"):
        read_dicom(path, window=(0, -5))


def test_dicom_minmax_without_window(tmp_path: Path, ramp: np.ndarray) -> None:
    image, meta = read_dicom(write_dicom(tmp_path / "plain.dcm", ramp, spacing=None, spacing_key=""))
    assert meta["window"] is None and "spacing_mm" not in meta
    assert image.min() == 0.0 and image.max() == pytest.approx(1.0)
    np.testing.assert_allclose(image[0], ramp[0] / 4000.0, atol=1e-6)


def test_dicom_monochrome1_inverted(tmp_path: Path, ramp: np.ndarray) -> None:
    path2 = write_dicom(tmp_path / "m2.dcm", ramp, modality="CR", spacing_key="ImagerPixelSpacing")
    path1 = write_dicom(tmp_path / "m1.dcm", ramp, photometric="MONOCHROME1", modality="CR")
    m2, meta2 = read_dicom(path2)
    m1, meta1 = read_dicom(path1)
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    assert meta1["photometric"] == "MONOCHROME1"
    assert meta2["spacing_mm"] == (0.5, 0.25)  # from ImagerPixelSpacing


def test_dicom_rgb_and_multiframe(tmp_path: Path) -> None:
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[..., 0] = 255
    image, _ = read_dicom(write_dicom(tmp_path / "rgb.dcm", rgb, modality="XC"))
    np.testing.assert_allclose(image, 0.299, atol=1e-6)
    frames = np.stack([np.full((5, 7), v, np.uint16) for v in (10, 20, 30)])
    frames[0, 0, 0] = 0
    image, meta = read_dicom(write_dicom(tmp_path / "mf.dcm", frames, modality="XA", frames=3))
    assert image.shape == (5, 7) and "first frame" in meta["note"] and meta["frames"] == 3
    assert image[0, 0] == 0.0 and image[1, 1] == 1.0


def test_dicom_errors(tmp_path: Path, ramp: np.ndarray) -> None:
    with pytest.raises(RauInputError, match="no.*pixel data") as err:
        read_dicom(write_dicom(tmp_path / "nopix.dcm", None))
    assert "nopix.dcm" in str(err.value) and "\n" not in str(err.value)
    text = tmp_path / "notes.dcm"
    text.write_text("hello, not a DICOM")
    with pytest.raises(RauInputError, match="not a DICOM"):
        read_dicom(text)
    good = write_dicom(tmp_path / "good.dcm", ramp)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(good.read_bytes()[:-900])  # pixel data cut short
    with pytest.raises(RauInputError, match="broken.dcm") as err:
        read_dicom(broken)
    assert "\n" not in str(err.value)
    garbled = bytearray(good.read_bytes())
    garbled[140:200] = b"\xff" * 60  # header elements overwritten: pydicom loses the pixel data
    (tmp_path / "garbled.dcm").write_bytes(bytes(garbled))
    with pytest.raises(RauInputError, match="garbled.dcm is corrupted"):
        read_dicom(tmp_path / "garbled.dcm")
    with pytest.raises(RauInputError, match="does not exist"):
        read_dicom(tmp_path / "missing.dcm")


def test_dicom_through_read_image(tmp_path: Path, ramp: np.ndarray) -> None:
    from rau.data.io import read_image

    path = write_dicom(tmp_path / "ct.dcm", ramp, slope=1.0, intercept=-1024, window=(40, 400))
    image, meta = read_image(path)
    assert image.shape == (20, 40) and meta["id"] == "ct" and meta["modality"] == "CT"


# ----------------------------------------------------------------------------- NIfTI


def _ras_volume() -> np.ndarray:
    """(X, Y, Z) = (6, 5, 4) HU volume whose voxel value encodes its position, plus air/bone."""
    x, y, z = np.meshgrid(np.arange(6), np.arange(5), np.arange(4), indexing="ij")
    vol = (100 * x + 10 * y + z).astype(np.int16)
    vol[0, 0, 0] = -1000
    vol[5, 4, 3] = 1500
    return vol


def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    import nibabel as nib

    nib.save(nib.Nifti1Image(data, np.diag([2.0, 3.0, 4.0, 1.0]) if affine is None else affine), str(path))
    return path


def test_nifti_ct_axial_orientation_and_window(tmp_path: Path) -> None:
    vol = _ras_volume()
    path = _save_nifti(tmp_path / "ct.nii.gz", vol)
    image, meta = read_nifti(path, slice_index=1, window=(300, 1000))
    assert image.shape == (5, 6)  # rows = Y (anterior->posterior), cols = X (right->left)
    raw = (image * 1000 + (300 - 500)).round()
    assert raw[0, 0] == 100 * 5 + 10 * 4 + 1  # top-left = most anterior, patient's right (max x)
    assert raw[-1, -1] == 0 * 100 + 0 * 10 + 1  # bottom-right = posterior, patient's left
    assert meta["spacing_mm"] == (3.0, 2.0) and meta["slice_index"] == 1 and meta["axis"] == 2
    assert meta["modality"] == "CT"
    _, default = read_nifti(path)
    assert default["window"] == (40.0, 400.0) and default["slice_index"] == 2


def test_nifti_canonical_reorientation(tmp_path: Path) -> None:
    # The same anatomy stored with x flipped (LAS, as most DICOM-derived NIfTIs): same display.
    vol = _ras_volume()
    ras = _save_nifti(tmp_path / "ras.nii", vol)
    affine = np.diag([-2.0, 3.0, 4.0, 1.0])
    affine[0, 3] = 10.0
    las = _save_nifti(tmp_path / "las.nii", vol[::-1].copy(), affine)
    for axis in (0, 1, 2):
        a, ma = read_nifti(ras, axis=axis, slice_index=1, window=(0, 4000))
        b, mb = read_nifti(las, axis=axis, slice_index=1, window=(0, 4000))
        np.testing.assert_array_equal(a, b)
        assert ma["spacing_mm"] == mb["spacing_mm"]
    coronal, meta = read_nifti(ras, axis=1, slice_index=2, window=(1000, 2000))
    assert coronal.shape == (4, 6) and meta["spacing_mm"] == (4.0, 2.0)
    raw = (coronal * 2000).round()
    assert raw[0, 0] == 100 * 5 + 10 * 2 + 3  # top-left = superior, patient's right
    sagittal, meta = read_nifti(ras, axis=0, slice_index=3, window=(1000, 2000))
    assert sagittal.shape == (4, 5) and meta["spacing_mm"] == (4.0, 3.0)
    assert (sagittal * 2000).round()[0, 0] == 300 + 40 + 3  # top-left = superior, anterior


def test_nifti_2d_non_ct_and_errors(tmp_path: Path) -> None:
    flat = np.arange(12, dtype=np.float32).reshape(4, 3) / 10  # (X=4, Y=3)
    path = _save_nifti(tmp_path / "flat.nii", flat)
    image, meta = read_nifti(path)
    assert image.shape == (3, 4) and meta["modality"] is None and meta["window"] is None
    np.testing.assert_allclose(image, (flat.T - flat.min()) / (flat.max() - flat.min()), atol=1e-6)
    vol = _ras_volume()
    path3 = _save_nifti(tmp_path / "ct.nii.gz", vol)
    with pytest.raises(RauInputError, match=r"0\.\.3") as err:
        read_nifti(path3, slice_index=4)
    assert "ct.nii.gz" in str(err.value)
    with pytest.raises(RauInputError, match="axis"):
        read_nifti(path3, axis=3)
    nan = vol.astype(np.float32)
    nan[1, 1, 1] = np.nan
    with pytest.raises(RauInputError, match="NaN"):
        read_nifti(_save_nifti(tmp_path / "nan.nii.gz", nan))
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"definitely not gzip")
    with pytest.raises(RauInputError, match="bad.nii.gz"):
        read_nifti(bad)


def test_looks_like_ct() -> None:
    assert looks_like_ct(np.array([-1024, 0, 400], np.int16))
    assert not looks_like_ct(np.array([0.0, 0.5, 1.0]))
    assert not looks_like_ct(np.array([-1000.3, 400.7, 10.2]))
    np.testing.assert_allclose(apply_window(np.array([0.0, 5.0, 10.0]), None), [0, 0.5, 1])


def test_nifti_labels_match_image_slice(tmp_path: Path) -> None:
    labels = np.zeros((6, 5, 4), np.uint8)
    labels[4:, :, :] = 1  # patient's right (high x)
    labels[:2, 3:, :] = 2  # patient's left, anterior
    labels[:2, :1, 1] = 3  # only in slice 1
    path = _save_nifti(tmp_path / "seg.nii.gz", labels)
    masks = read_nifti_labels(path, slice_index=2, names={1: "right", 2: "left_front", 3: "x"})
    assert set(masks) == {"right", "left_front"}  # label 3 absent from slice 2
    assert masks["right"].shape == (5, 6) and masks["right"].dtype == bool
    assert masks["right"][:, :2].all() and not masks["right"][:, 2:].any()  # image left
    assert masks["left_front"][:2, 4:].all() and masks["left_front"].sum() == 4  # top-right
    merged = read_nifti_labels(path, slice_index=1, names={1: "both", 2: "both"})
    assert merged["both"].sum() == 2 * 5 + 2 * 2
    default = read_nifti_labels(path, slice_index=1)
    assert set(default) == {"label_1", "label_2", "label_3"}
    with pytest.raises(RauInputError, match="non-integer"):
        read_nifti_labels(_save_nifti(tmp_path / "img.nii.gz", labels * 0.5 + 0.25))


@pytest.mark.skipif(not TOTALSEG.is_dir(), reason="shared TotalSegmentator example not available")
def test_totalseg_ct_slice_becomes_annotated_image() -> None:
    import csv

    with (TOTALSEG / "labels_abdomen_ct_3mm_seg_total.csv").open() as fh:
        names = {int(r["label_value"]): r["name"] for r in csv.DictReader(fh)}
    image, meta = read_nifti(TOTALSEG / "abdomen_ct_3mm.nii.gz", slice_index=15)
    masks = read_nifti_labels(TOTALSEG / "abdomen_ct_3mm_seg_total.nii.gz", slice_index=15, names=names)
    ann = AnnotatedImage(image, masks, {"id": "abdomen", **meta})
    assert meta["modality"] == "CT" and meta["spacing_mm"] == (3.0, 3.0)
    assert {"liver", "spleen"} <= set(ann.structures)
    cols = lambda m: np.nonzero(m)[1].mean()  # noqa: E731
    h, w = ann.shape
    assert cols(ann.masks["liver"]) < w / 2 < cols(ann.masks["spleen"])  # liver on the image left
    # vertebrae are posterior: lower in the image than the liver's centroid
    spine = [m for n, m in ann.masks.items() if n.startswith("vertebrae")]
    assert spine and np.nonzero(spine[0])[0].mean() > np.nonzero(ann.masks["liver"])[0].mean()
