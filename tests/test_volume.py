"""Volumes and sequences (`rau.volume`, `rau localize --target VOLUME`): a synthetic 3D NIfTI
(a drifting blob, a non-identity affine) segmented by propagation with `registration`; a DICOM
series and a multi-frame DICOM on a stub method; the pure propagation order; the bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from rau.cli.app import app
from rau.data.annotated import AnnotatedImage, StructureResult, TargetResult
from rau.data.volume_io import display_stack, read_volume, volume_kind
from rau.errors import RauInputError
from rau.methods import Method
from rau.volume import best_matching_slice, propagate, propagation_order

from conftest import disk, write_png
from tiny_data import write_dicom

runner = CliRunner()

#: voxel (i, j, k) -> RAS mm: i runs left, j posterior (LPS-like, as DICOM-derived files are), with a small shear.
AFFINE = np.array([[-0.8, 0.05, 0.0, 40.0], [0.0, -0.8, 0.0, 30.0], [0.0, 0.0, 2.5, -60.0], [0, 0, 0, 1]])


def blob_volume(n: int = 24, size: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(image, truth) of file shape (size, size, n): a bright disk drifting 1 px per slice (0.5 px
    along the other axis), its radius growing from 6 to about 8 px."""
    rng = np.random.default_rng(seed)
    image = 0.3 + 0.03 * rng.standard_normal((size, size, n))
    truth = np.zeros((size, size, n), bool)
    for k in range(n):
        truth[:, :, k] = disk((size, size), (12 + k, 16 + 0.5 * k), 6 + k / 12)
    image[truth] = 0.9
    return image.astype(np.float32), truth


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    import nibabel as nib

    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.fixture
def blob_nifti(tmp_path):
    """vol.nii.gz (24 slices of 48x48), truth.nii.gz and the reference: slice 12 as rau shows it, with its true mask."""
    from rau.data.medical import read_nifti, read_nifti_labels

    image, truth = blob_volume()
    vol = save_nifti(tmp_path / "vol.nii.gz", image)
    lab = save_nifti(tmp_path / "truth.nii.gz", truth.astype(np.uint8))
    pixels, _ = read_nifti(vol, slice_index=12)
    reference = AnnotatedImage(pixels, {"blob": read_nifti_labels(lab, slice_index=12)["label_1"]}, {"id": "ref"})
    return vol, truth, reference


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


class ShiftStub(Method):
    """Returns the reference's masks unchanged; structure ``drop`` vanishes on slice ``drop_at``.
    Records (reference id, target slice, structures) per call."""

    def __init__(self, drop_at: int | None = None):
        self.name, self.calls, self.drop_at = "stub", [], drop_at

    def predict(self, reference, target, structures=None):
        names = list(structures or reference.structures)
        self.calls.append((reference.id, target.meta["slice_index"], names))
        out = {}
        for s in names:
            mask = reference.masks[s].copy()
            if s == "drop" and target.meta["slice_index"] == self.drop_at:
                mask[:] = False
            out[s] = StructureResult(s, "yes", None, 0.5, mask if mask.any() else None)
        return TargetResult(target.id, reference.id, self.name, out, 0.0)


# ----------------------------------------------------------------------------- pure parts


def test_propagation_order_goes_from_the_start_to_both_ends():
    assert propagation_order(5, 2) == [(2, None), (3, 2), (4, 3), (1, 2), (0, 1)]
    assert propagation_order(3, 0) == [(0, None), (1, 0), (2, 1)]
    assert propagation_order(3, 2) == [(2, None), (1, 2), (0, 1)]
    assert propagation_order(1, 0) == [(0, None)]
    order = propagation_order(24, 7)
    assert sorted(k for k, _ in order) == list(range(24))
    seen = set()
    for k, src in order:  # every reference slice is segmented before it is used
        assert src is None or src in seen
        seen.add(k)
    with pytest.raises(ValueError, match="outside"):
        propagation_order(4, 4)


def test_best_matching_slice_finds_the_reference_slice():
    image, _ = blob_volume(n=8, size=32)
    frames = np.moveaxis(image, 2, 0)
    k, ncc = best_matching_slice(frames[5], frames)
    assert k == 5 and ncc == pytest.approx(1.0, abs=1e-5)


def test_slices_are_shown_as_the_single_image_reader_shows_them(tmp_path):
    import nibabel as nib

    from rau.data.medical import read_nifti

    image, _ = blob_volume(n=5, size=16)
    vol = save_nifti(tmp_path / "v.nii.gz", image)
    for axis in (0, 1, 2):
        v = read_volume(vol, axis=axis)
        for k in range(v.n_slices):
            np.testing.assert_array_equal(v.frames[k], read_nifti(vol, slice_index=k, axis=axis)[0])
        ids = np.arange(image.size, dtype=np.int64).reshape(image.shape)  # the display grid maps back to the file's
        canonical = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(ids.astype(np.float64), AFFINE)).dataobj)
        np.testing.assert_array_equal(v.to_file_grid(display_stack(canonical, axis)), ids)


def test_volume_kind_leaves_2d_targets_to_single_image_mode(tmp_path, pair_files):
    image, _ = blob_volume(n=4, size=16)
    assert volume_kind(save_nifti(tmp_path / "v.nii.gz", image)) == "nifti"
    assert volume_kind(save_nifti(tmp_path / "one.nii.gz", image[:, :, :1])) is None
    assert volume_kind(pair_files / "target.png") is None
    assert volume_kind(write_dicom(tmp_path / "one.dcm", np.ones((4, 4), np.uint16))) is None
    assert volume_kind(write_dicom(tmp_path / "mf.dcm", np.ones((3, 4, 4), np.uint16), modality="XA", frames=3)) == "dicom-frames"
    assert volume_kind(tmp_path) == "dicom-series"
    assert volume_kind(tmp_path / "missing.nii.gz") is None


# ----------------------------------------------------------------------------- NIfTI with a real method


def test_nifti_volume_propagates_with_registration(blob_nifti, tmp_path):
    import nibabel as nib

    from rau.data.medical import read_nifti_labels

    vol, truth, reference = blob_nifti
    out = tmp_path / "out"
    res = propagate(reference, vol, method="registration", out_dir=out, progress=False)
    assert res.start == 12 and res.slices_done == 24 and res.found == ["blob"]
    assert res.labels.shape == (24, 48, 48) and res.labels.dtype == np.uint16
    good = sum(dice(res.mask("blob")[k], read_nifti_labels(tmp_path / "truth.nii.gz", slice_index=k)["label_1"]) > 0.7
               for k in range(24))
    assert good >= 22, good
    img = nib.load(str(out / "labels.nii.gz"))
    assert img.shape == truth.shape and np.allclose(img.affine, AFFINE, atol=1e-5)
    labels = np.asarray(img.dataobj)
    assert set(np.unique(labels)) <= {0, 1} and dice(labels == 1, truth) > 0.8  # in the source's own voxel grid
    doc = json.loads((out / "slices.json").read_text())
    assert [s["index"] for s in doc["slices"]] == list(range(24)) and doc["start"] == 12
    refs = {s["index"]: s["reference"] for s in doc["slices"]}
    assert refs[12] == "user" and refs[13] == "slice 12" and refs[11] == "slice 12" and refs[0] == "slice 1"
    single = json.loads((out / "result.json").read_text())
    assert single["structures"]["blob"]["found"] and (out / "overlay.png").is_file() and (out / "masks" / "blob.png").is_file()
    assert "blob" in (out / "labels_labels.txt").read_text()


# ----------------------------------------------------------------------------- DICOM series and cine (stub)


def write_series(folder: Path, n: int = 5, uid: str | None = None, description: str = "axial") -> list[float]:
    """n CT slices 0.6 mm apart along z, filenames in reverse z order; returns each slice's value."""
    import pydicom
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    uid, study, frame = uid or generate_uid(), generate_uid(), generate_uid()
    values = []
    for k in range(n):
        pixels = np.full((8, 12), 100 + 50 * k, np.uint16)
        pixels[2:5, 3:7] = 1000  # a square in every slice
        path = write_dicom(folder / f"{n - k:03d}.dcm", pixels, spacing=(0.5, 0.25))
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, uid, frame
        ds.SeriesDescription, ds.InstanceNumber = description, k + 1
        ds.ImagePositionPatient = [-3.0, 7.0, 10.0 + 0.6 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceThickness = "0.6"
        ds.save_as(path, enforce_file_format=True)
        values.append(100 + 50 * k)
    return values


def square_reference(shape=(8, 12), name="square") -> AnnotatedImage:
    mask = np.zeros(shape, bool)
    mask[2:5, 3:7] = True
    return AnnotatedImage(np.where(mask, 1.0, 0.1).astype(np.float32), {name: mask, "drop": mask.copy()}, {"id": "ref"})


def test_dicom_series_sorted_along_the_normal_with_itk_geometry(tmp_path):
    import SimpleITK as sitk

    series = tmp_path / "series"
    write_series(series)
    vol = read_volume(series)
    assert vol.kind == "dicom-series" and vol.frames.shape == (5, 8, 12)
    means = [float(f[0, 0]) for f in vol.frames]  # min-max per slice: the background rises with z
    assert vol.n_slices == 5 and means == sorted(means)
    stub, out = ShiftStub(drop_at=3), tmp_path / "out"
    res = propagate(square_reference(), vol, method=stub, start=1, out_dir=out, progress=False)
    assert [c[1] for c in stub.calls] == [1, 2, 3, 4, 0]
    assert stub.calls[3] == ("series slice 3", 4, ["square"])  # 'drop' vanished on slice 3: not asked on 4
    lab = sitk.ReadImage(str(out / "labels.nii.gz"))
    ref = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series)))
    np.testing.assert_allclose(lab.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(lab.GetSpacing(), ref.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(lab.GetDirection(), ref.GetDirection(), atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(lab), res.labels)
    doc = json.loads((out / "slices.json").read_text())
    assert doc["slices"][4]["structures"]["drop"]["found"] is False
    assert "vanished" in doc["slices"][4]["structures"]["drop"]["reason"]
    assert doc["slices"][2]["structures"]["drop"]["found"] is True


def test_multiframe_dicom_frames_along_the_third_axis(tmp_path):
    import nibabel as nib

    frames = np.stack([np.full((8, 12), 10 * (k + 1), np.uint16) for k in range(6)])
    frames[:, 2:5, 3:7] = 500
    path = write_dicom(tmp_path / "cine.dcm", frames, modality="XA", frames=6, spacing=(0.3, 0.2))
    reference = square_reference()
    stub = ShiftStub()
    res = propagate(reference, path, method=stub, out_dir=tmp_path / "out", progress=False)
    assert res.volume.kind == "dicom-frames" and res.slices_done == 6 and len(stub.calls) == 6
    img = nib.load(str(tmp_path / "out" / "labels.nii.gz"))
    assert img.shape == (12, 8, 6) and np.allclose(img.affine, np.diag([-0.2, -0.3, 1.0, 1.0]))
    np.testing.assert_array_equal(np.asarray(img.dataobj).transpose(2, 1, 0), res.labels)


def test_propagation_stops_when_every_structure_vanished(tmp_path):
    frames = np.stack([np.full((8, 12), 10 * (k + 1), np.uint16) for k in range(6)])
    frames[:, 2:5, 3:7] = 500
    path = write_dicom(tmp_path / "cine.dcm", frames, modality="XA", frames=6)
    mask = np.zeros((8, 12), bool)
    mask[2:5, 3:7] = True
    stub = ShiftStub(drop_at=4)
    res = propagate(AnnotatedImage(np.where(mask, 1.0, 0.1), {"drop": mask}, {"id": "r"}), path, method=stub,
                    start=2, progress=False)
    assert [c[1] for c in stub.calls] == [2, 3, 4, 1, 0]  # slice 5 never reached
    assert res.slices[5].result is None and res.slices[5].reference_label is None
    assert res.slices_done == 5 and not res.labels[4:].any() and res.labels[:4].any()


# ----------------------------------------------------------------------------- bad input


def _bad_volume(case: str, tmp_path: Path) -> tuple[Path, dict]:
    image, _ = blob_volume(n=4, size=16)
    if case == "4d":
        return save_nifti(tmp_path / "v4.nii.gz", np.stack([image, image], axis=-1)), {}
    if case == "blank":
        return save_nifti(tmp_path / "blank.nii.gz", np.zeros((16, 16, 4), np.float32)), {}
    if case == "empty_folder":
        (tmp_path / "nothing").mkdir()
        return tmp_path / "nothing", {}
    if case == "two_series":
        write_series(tmp_path / "mixed", n=2, uid="1.2.3.4", description="first")
        write_series(tmp_path / "mixed_b", n=2, uid="1.2.3.5", description="second")
        for f in (tmp_path / "mixed_b").iterdir():
            f.rename(tmp_path / "mixed" / f"b{f.name}")
        return tmp_path / "mixed", {}
    return save_nifti(tmp_path / "v.nii.gz", image), {"start": 4}


@pytest.mark.parametrize("case,message", [("4d", "4D NIfTI"), ("blank", "blank volume"), ("empty_folder", "no DICOM series"),
                                          ("two_series", "2 DICOM series"), ("start", "outside the valid range 0..3")])
def test_bad_volumes_are_one_line_and_write_nothing(case, message, tmp_path):
    path, kwargs = _bad_volume(case, tmp_path)
    out = tmp_path / "out"
    stub = ShiftStub()
    with pytest.raises(RauInputError, match=message) as err:
        propagate(square_reference(), path, method=stub, out_dir=out, progress=False, **kwargs)
    assert "\n" not in str(err.value) and not out.exists() and not stub.calls
    if case == "two_series":
        assert "1.2.3.4" in str(err.value) and "1.2.3.5" in str(err.value) and "first" in str(err.value)


def test_empty_nifti_volume_is_refused(tmp_path):
    path = save_nifti(tmp_path / "empty.nii.gz", np.zeros((16, 16, 0), np.float32))
    with pytest.raises(RauInputError, match="empty volume"):
        read_volume(path)


# ----------------------------------------------------------------------------- command line


@pytest.fixture
def small_nifti(tmp_path):
    """A 4-slice 48x48 blob volume and its slice 2 as reference.png + reference_masks/blob.png."""
    from rau.data.medical import read_nifti, read_nifti_labels

    image, truth = blob_volume(n=4, size=48)
    vol = save_nifti(tmp_path / "vol.nii.gz", image)
    lab = save_nifti(tmp_path / "truth.nii.gz", truth.astype(np.uint8))
    write_png(tmp_path / "reference.png", read_nifti(vol, slice_index=2)[0])
    write_png(tmp_path / "reference_masks" / "blob.png", read_nifti_labels(lab, slice_index=2)["label_1"])
    return tmp_path


def cli_args(folder: Path, target: Path, out: Path, *extra: str) -> list[str]:
    return ["localize", "--reference", str(folder / "reference.png"), "--reference-masks", str(folder / "reference_masks"),
            "--target", str(target), "--out", str(out), "--method", "registration", "--no-progress", *extra]


def test_cli_volume_auto_and_no_volume(small_nifti):
    out = small_nifti / "out"
    res = runner.invoke(app, cli_args(small_nifti, small_nifti / "vol.nii.gz", out, "--start-slice", "1"))
    assert res.exit_code == 0, res.output
    line = res.output.strip().splitlines()[-1]
    assert "4/4 slices" in line and "1/1 structures found" in line and str(out / "labels.nii.gz") in line
    assert json.loads((out / "slices.json").read_text())["start"] == 1
    flat = small_nifti / "flat"
    res = runner.invoke(app, cli_args(small_nifti, small_nifti / "vol.nii.gz", flat, "--no-volume"))
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in flat.iterdir()) == ["masks", "overlay.png", "result.json"]


def test_cli_2d_target_unchanged_and_volume_errors(small_nifti, pair_files):
    out = pair_files / "out2d"
    args = ["localize", "--reference", str(pair_files / "ref.png"), "--reference-masks", str(pair_files / "ref_masks"),
            "--target", str(pair_files / "target.png"), "--out", str(out), "--method", "registration", "--no-progress"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and sorted(p.name for p in out.iterdir()) == ["masks", "overlay.png", "result.json"]
    res = runner.invoke(app, [*args, "--volume"])
    assert res.exit_code == 2 and "not a volume" in res.output and len(res.output.strip().splitlines()) == 1
    bad = small_nifti / "bad"
    res = runner.invoke(app, cli_args(small_nifti, small_nifti / "vol.nii.gz", bad, "--start-slice", "4"))
    assert res.exit_code == 2 and res.output.startswith("error: --start-slice") and not bad.exists()
