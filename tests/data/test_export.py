"""Exports (NIfTI labels, COCO, DICOM SEG) read back with the tools' own libraries, on tiny files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rau.data.annotated import AnnotatedImage, StructureResult, TargetResult
from rau.data.export import (
    FORMATS,
    label_map,
    label_table,
    nifti_affine,
    write_coco,
    write_dicom_seg,
    write_formats,
    write_nifti_labels,
)
from rau.data.io import load_annotated
from rau.errors import RauInputError

from tiny_data import write_dicom

H, W = 20, 30
NAMES = ["heart", "missing", "spine"]  # label values 1, 2, 3; "missing" is not found


def _masks() -> dict[str, np.ndarray]:
    heart = np.zeros((H, W), bool)
    heart[2:7, 3:10] = True
    spine = np.zeros((H, W), bool)
    spine[11:18, 20:23] = True
    spine[17, 12:20] = True  # an L shape: its tight box differs from the method's box below
    return {"heart": heart, "spine": spine}


def _result(target_id: str = "target") -> TargetResult:
    m = _masks()
    return TargetResult(target_id, "ref", "tiny", {
        "heart": StructureResult("heart", "yes", (3.0, 2.0, 10.0, 7.0), 0.9, m["heart"]),
        "missing": StructureResult("missing", "no", None, 0.1, None, "not visible"),
        "spine": StructureResult("spine", "yes", (11.5, 10.0, 23.0, 18.0), 0.7, m["spine"]),
    })


def _expected_labels() -> np.ndarray:
    m = _masks()
    return m["heart"] * 1 + m["spine"] * 3


def _png_target(tmp_path: Path) -> AnnotatedImage:
    rng = np.random.default_rng(0)
    path = tmp_path / "target.png"
    Image.fromarray(rng.integers(0, 255, (H, W), dtype=np.uint8)).save(path)
    return load_annotated(path)


def _dicom_target(tmp_path: Path, *, projection: bool = False) -> tuple[AnnotatedImage, object]:
    """A CT slice with patient geometry, or (projection) a DX without a frame of reference and
    without the Type 2 study attributes anonymisers drop."""
    import pydicom
    from pydicom.uid import generate_uid

    pixels = (np.arange(H * W).reshape(H, W) * 7 % 4000).astype(np.uint16)
    path = write_dicom(tmp_path / "target.dcm", pixels, modality="DX" if projection else "CT")
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    if projection:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # DX
    else:
        ds.FrameOfReferenceUID = generate_uid()
        ds.ImagePositionPatient = [-12.5, 30.0, 41.0]
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # a sagittal slice: rows run A, columns run I
        ds.SliceThickness = "2.0"
        for key in ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
                    "AccessionNumber", "ReferringPhysicianName"):
            setattr(ds, key, "")
    ds.save_as(path, enforce_file_format=True)
    return load_annotated(path), ds


# ----------------------------------------------------------------------------- label values


def test_label_table_is_stable_and_rejects_repeats() -> None:
    assert label_table(NAMES) == [(1, "heart"), (2, "missing"), (3, "spine")]
    assert label_table([]) == []
    with pytest.raises(RauInputError, match="unique"):
        label_table(["a", "b", "a"])


def test_label_map_smaller_structure_wins_then_first_listed() -> None:
    target = AnnotatedImage(np.zeros((8, 8), np.float32))
    big = np.zeros((8, 8), bool)
    big[1:7, 1:7] = True
    small = np.zeros((8, 8), bool)
    small[2:4, 2:4] = True
    twin_a, twin_b = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    twin_a[6:8, 0:2] = True
    twin_b[6:8, 1:3] = True  # same area as twin_a, overlapping it at (6..7, 1)
    result = TargetResult("t", "r", "m", {
        "small": StructureResult("small", mask=small), "big": StructureResult("big", mask=big),
        "twin_a": StructureResult("twin_a", mask=twin_a), "twin_b": StructureResult("twin_b", mask=twin_b),
    })
    labels = label_map(result, target)
    assert labels.dtype == np.uint16
    assert (labels[small] == 1).all()  # inside "big" but smaller
    assert labels[1, 1] == 2
    assert labels[6, 1] == 3 and labels[7, 2] == 4  # equal areas: twin_a (listed first) keeps the overlap


# ----------------------------------------------------------------------------- NIfTI


def test_nifti_png_target_round_trip_and_itk_geometry(tmp_path: Path) -> None:
    import nibabel as nib
    import SimpleITK as sitk

    from rau.data.medical import read_nifti_labels

    target = _png_target(tmp_path)
    path = write_nifti_labels(_result(), target, tmp_path / "out" / "labels.nii.gz")
    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    assert data.dtype == np.uint16 and data.shape == (W, H, 1)
    np.testing.assert_array_equal(data[:, :, 0].T, _expected_labels())
    # rau's own reader gives the masks back under their names
    back = read_nifti_labels(path, names={1: "heart", 2: "missing", 3: "spine"})
    assert set(back) == {"heart", "spine"}
    for name, mask in _masks().items():
        np.testing.assert_array_equal(back[name], mask)
    # ITK (the reader of ITK-SNAP and Slicer) puts the label map on the PNG's own grid
    png, lab = sitk.ReadImage(str(target.meta["source"])), sitk.ReadImage(str(path))
    assert lab.GetSize()[:2] == png.GetSize()
    np.testing.assert_allclose(lab.GetOrigin()[:2], png.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(lab.GetSpacing()[:2], png.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(np.array(lab.GetDirection()).reshape(3, 3)[:2, :2], np.eye(2), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(lab)[0], _expected_labels())
    # label tables: ITK-SNAP text and JSON
    rows = [ln for ln in (tmp_path / "out" / "labels_labels.txt").read_text().splitlines() if not ln.startswith("#")]
    assert [r.split('"')[1] for r in rows] == ["Clear Label"] + NAMES
    assert [int(r.split()[0]) for r in rows] == [0, 1, 2, 3]
    table = json.loads((tmp_path / "out" / "labels_labels.json").read_text())
    assert [(r["value"], r["name"], r["found"]) for r in table["labels"]] == [
        (1, "heart", True), (2, "missing", False), (3, "spine", True)]
    assert table["labels"][0]["pixels"] == int(_masks()["heart"].sum())
    assert "smaller" in table["overlap_rule"]


def test_nifti_2d_source_keeps_its_affine(tmp_path: Path) -> None:
    import nibabel as nib

    affine = np.array([[0.0, -0.7, 0, 15], [0.8, 0.0, 0, -3], [0, 0, 2.5, 40], [0, 0, 0, 1]])
    source = tmp_path / "slice.nii.gz"
    rng = np.random.default_rng(1)
    nib.save(nib.Nifti1Image(rng.normal(size=(W, H, 1)).astype(np.float32), affine), str(source))
    target = load_annotated(source)
    assert target.shape == (H, W)
    path = write_nifti_labels(_result(), target, tmp_path / "labels.nii")
    img = nib.load(str(path))
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(img.dataobj)[:, :, 0].T, _expected_labels())
    assert int(img.header["sform_code"]) > 0 and int(img.header["qform_code"]) > 0


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_nifti_volume_slice_lands_on_its_source_voxels(tmp_path: Path, axis: int) -> None:
    """Every output pixel's world position is the source voxel rau displayed at that pixel."""
    import nibabel as nib

    from rau.data.medical import display_slice, load_nifti, read_nifti

    shape = (5, 6, 7)
    # voxel axes run towards Inferior, Left, Anterior: far from canonical RAS
    affine = np.array([[0, -2.0, 0, 10], [0, 0, 3.0, -5], [-1.5, 0, 0, 7], [0, 0, 0, 1]])
    ids = np.arange(np.prod(shape), dtype=np.int32).reshape(shape)
    source = tmp_path / "volume.nii.gz"
    nib.save(nib.Nifti1Image(ids, affine), str(source))
    image, meta = read_nifti(source, slice_index=1, axis=axis)
    meta["source"] = str(source)
    target = AnnotatedImage(image, {}, meta)
    data, zooms, _, _ = load_nifti(source, "image")
    shown_ids, _, _ = display_slice(data, zooms, 1, axis, source, "image")  # voxel id at each pixel

    out_affine, code = nifti_affine(target)
    assert code > 0
    rows, cols = np.mgrid[: target.shape[0], : target.shape[1]]
    out_vox = np.stack([cols.ravel(), rows.ravel(), np.zeros(cols.size), np.ones(cols.size)])
    src_vox = np.linalg.inv(affine) @ out_affine @ out_vox
    np.testing.assert_allclose(src_vox, np.rint(src_vox), atol=1e-6)
    i, j, k = np.rint(src_vox[:3]).astype(int)
    np.testing.assert_array_equal(ids[i, j, k], shown_ids.ravel())

    mask = np.zeros(target.shape, bool)
    mask[0, : target.shape[1] // 2] = True
    result = TargetResult("v", "r", "m", {"s": StructureResult("s", mask=mask)})
    written = nib.load(str(write_nifti_labels(result, target, tmp_path / "labels.nii.gz")))
    np.testing.assert_allclose(written.affine, out_affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(written.dataobj)[:, :, 0].T, mask.astype(np.uint16))


# ----------------------------------------------------------------------------- COCO


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside pycocotools
def test_coco_round_trip_with_pycocotools(tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    target = _png_target(tmp_path)
    path = write_coco(_result(), target, tmp_path / "coco.json")
    coco = COCO(str(path))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == NAMES
    assert coco.loadImgs(1)[0] == {"id": 1, "file_name": "target.png", "width": W, "height": H}
    anns = coco.loadAnns(coco.getAnnIds(imgIds=1))
    by_name = {coco.loadCats(a["category_id"])[0]["name"]: a for a in anns}
    assert set(by_name) == {"heart", "spine"}  # "missing" was not found: no annotation
    for name, mask in _masks().items():
        a = by_name[name]
        np.testing.assert_array_equal(coco.annToMask(a).astype(bool), mask)
        assert isinstance(a["segmentation"]["counts"], str)
        assert a["area"] == float(mask.sum()) and a["iscrowd"] == 0
        assert a["attributes"]["answer"] == "yes"
    assert by_name["spine"]["bbox"] == [11.5, 10.0, 11.5, 8.0]  # the method's box, as [x, y, w, h]
    assert by_name["spine"]["score"] == pytest.approx(0.7)


# ----------------------------------------------------------------------------- DICOM SEG


def test_dicom_seg_round_trip_with_highdicom(tmp_path: Path) -> None:
    import highdicom as hd

    target, source = _dicom_target(tmp_path)
    path = write_dicom_seg(_result(), target, tmp_path / "seg.dcm")
    seg = hd.seg.segread(str(path))
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["heart", "spine"]  # found only, in order
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "rau tiny"
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    ref = seg.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == source.SeriesInstanceUID
    assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID], combine_segments=False)
    assert pixels.shape == (1, H, W, 2)
    np.testing.assert_array_equal(pixels[0, ..., 0].astype(bool), _masks()["heart"])
    np.testing.assert_array_equal(pixels[0, ..., 1].astype(bool), _masks()["spine"])


def test_dicom_seg_projection_radiograph_without_frame_of_reference(tmp_path: Path) -> None:
    import pydicom

    target, source = _dicom_target(tmp_path, projection=True)
    seg = pydicom.dcmread(write_dicom_seg(_result(), target, tmp_path / "seg.dcm"))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["heart", "spine"]
    assert seg.PatientBirthDate == "" and "FrameOfReferenceUID" not in seg
    frames = seg.pixel_array.astype(bool)  # one frame per segment
    np.testing.assert_array_equal(frames[0], _masks()["heart"])
    np.testing.assert_array_equal(frames[1], _masks()["spine"])
    src_refs = [f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                for f in seg.PerFrameFunctionalGroupsSequence]
    assert src_refs == [source.SOPInstanceUID] * 2


def test_nifti_from_dicom_matches_itk_patient_geometry(tmp_path: Path) -> None:
    import SimpleITK as sitk

    target, _ = _dicom_target(tmp_path)
    path = write_nifti_labels(_result(), target, tmp_path / "labels.nii.gz")
    dcm, lab = sitk.ReadImage(str(target.meta["source"])), sitk.ReadImage(str(path))
    np.testing.assert_allclose(lab.GetOrigin(), dcm.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(lab.GetDirection(), dcm.GetDirection(), atol=1e-4)
    np.testing.assert_allclose(lab.GetSpacing()[:2], dcm.GetSpacing()[:2], atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(lab)[0], _expected_labels())


# ----------------------------------------------------------------------------- write_formats and bad input


def test_write_formats_writes_each_file(tmp_path: Path) -> None:
    target, _ = _dicom_target(tmp_path)
    out = tmp_path / "out"
    written = write_formats(_result(), target, out, ["coco", "nifti", "dicom-seg", "coco"])
    assert written == [out / "coco.json", out / "labels.nii.gz", out / "seg.dcm"]
    assert sorted(p.name for p in out.iterdir()) == [
        "coco.json", "labels.nii.gz", "labels_labels.json", "labels_labels.txt", "seg.dcm"]
    assert write_formats(_result(), target, tmp_path / "none", []) == []
    assert set(FORMATS) == {"nifti", "coco", "dicom-seg"}


def test_unknown_format_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    target = _png_target(tmp_path)
    with pytest.raises(RauInputError) as err:
        write_formats(_result(), target, tmp_path / "out", "nifti,stl")
    msg = str(err.value)
    assert "\n" not in msg and "--formats" in msg and "'stl'" in msg and "nifti, coco, dicom-seg" in msg
    assert not (tmp_path / "out").exists()


def test_dicom_seg_on_png_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    target = _png_target(tmp_path)
    with pytest.raises(RauInputError, match=r"^--formats: dicom-seg needs a DICOM target") as err:
        write_formats(_result(), target, tmp_path / "out", ["nifti", "dicom-seg"])
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(RauInputError, match="dicom-seg needs a DICOM target"):
        write_dicom_seg(_result(), AnnotatedImage(np.zeros((H, W), np.float32)), tmp_path / "seg.dcm")


def test_dicom_seg_needs_a_found_structure_and_the_source_uids(tmp_path: Path) -> None:
    import pydicom

    target, _ = _dicom_target(tmp_path)
    nothing = TargetResult("t", "r", "m", {"missing": StructureResult("missing", "no")})
    with pytest.raises(RauInputError, match="no structure was found"):
        write_formats(nothing, target, tmp_path / "out", "dicom-seg")
    ds = pydicom.dcmread(target.meta["source"])
    del ds.StudyInstanceUID
    ds.save_as(target.meta["source"], enforce_file_format=True)
    with pytest.raises(RauInputError, match="lacks StudyInstanceUID"):
        write_dicom_seg(_result(), target, tmp_path / "seg.dcm")


def test_result_mask_of_another_size_is_rejected(tmp_path: Path) -> None:
    target = AnnotatedImage(np.zeros((H + 1, W), np.float32))
    with pytest.raises(RauInputError, match="differs from the target"):
        write_nifti_labels(_result(), target, tmp_path / "labels.nii.gz")


def test_seg_refused_by_highdicom_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    import pydicom
    from pydicom.uid import generate_uid

    # a multi-frame X-ray angiogram with no frame of reference: highdicom cannot map its frames
    path = write_dicom(tmp_path / "xa.dcm", np.zeros((3, H, W), np.uint16), frames=3, modality="XA")
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.12.1"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(RauInputError, match="highdicom cannot build a SEG") as err:
        write_formats(_result(), load_annotated(path), tmp_path / "out", "nifti,coco,dicom-seg")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
