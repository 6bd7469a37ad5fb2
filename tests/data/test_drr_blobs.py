"""Random 3D shapes for follow-the-reference training: drawn from the seed alone, disjoint, kept out of
the avoided (held-out) labels, of each kind."""

from __future__ import annotations

import numpy as np
import pytest

from rau.data.drr_blobs import blob_labelmap
from rau.errors import RauInputError


def _phantom():
    """A 60^3 'CT' at 2 mm: a body cylinder (0 HU) in air, a bone rod (700 HU) and a 'clavicle' label."""
    z, y, x = np.meshgrid(*[np.arange(60)] * 3, indexing="ij")
    hu = np.full((60, 60, 60), -1000.0, np.float32)
    hu[(y - 30) ** 2 + (x - 30) ** 2 < 27 ** 2] = 0.0
    hu[(y - 30) ** 2 + (x - 20) ** 2 < 4 ** 2] = 700.0
    labels = np.zeros(hu.shape, np.int32)
    labels[:, 40:50, 25:35] = 73
    return hu, labels


def test_shapes_are_seeded_disjoint_and_never_in_an_avoided_label():
    hu, labels = _phantom()
    a = blob_labelmap(hu, (2, 2, 2), n=6, seed=3, labels=labels, avoid=(73,), min_voxels=50)
    b = blob_labelmap(hu, (2, 2, 2), n=6, seed=3, labels=labels, avoid=(73,), min_voxels=50)
    assert np.array_equal(a, b) and a.dtype == np.uint8
    assert set(np.unique(a).tolist()) == set(range(7))  # 6 shapes (one value each) + background
    assert not a[labels == 73].any()  # the held-out family never enters a shape
    assert not a[hu < -500].any()  # inside the body only
    assert not np.array_equal(a, blob_labelmap(hu, (2, 2, 2), n=6, seed=4, labels=labels, avoid=(73,), min_voxels=50))


@pytest.mark.parametrize("kind", ["bone", "tube", "region"])
def test_each_kind(kind):
    hu, _ = _phantom()
    vol = blob_labelmap(hu, (2, 2, 2), n=2, seed=0, kinds=(kind,), min_voxels=30)
    assert (vol == 1).sum() >= 30 and (vol == 2).sum() >= 30
    if kind == "bone":
        assert (hu[vol > 0] > 200).all()


def test_bad_arguments_name_the_fix():
    hu, _ = _phantom()
    with pytest.raises(RauInputError, match="kinds"):
        blob_labelmap(hu, (2, 2, 2), n=1, seed=0, kinds=("cube",))
    with pytest.raises(RauInputError, match="3D"):
        blob_labelmap(hu[0], (2, 2), n=1, seed=0)
    with pytest.raises(RauInputError, match="HU"):
        blob_labelmap(np.full((10, 10, 10), -1000.0), (2, 2, 2), n=1, seed=0)


def _write_phantom(folder, labels_shape=None):
    import nibabel as nib

    hu, labels = _phantom()
    if labels_shape is not None:
        labels = np.zeros(labels_shape, np.int32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(hu, affine), str(folder / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(labels, affine), str(folder / "labels.nii.gz"))
    return folder / "ct.nii.gz", folder / "labels.nii.gz", labels


def test_written_label_map_keeps_the_ct_grid_and_avoids_the_named_labels(tmp_path):
    import nibabel as nib

    from rau.data.drr_blobs import write_blob_labelmap

    ct, lab, labels = _write_phantom(tmp_path)
    ct_out, lab_path, csv_path = write_blob_labelmap(tmp_path / "out", n=3, seed=2, ct=ct, labelmap=lab,
                                                     label_names={73: "clavicula_left"}, avoid_names=("clavicul",))
    vol = nib.load(str(lab_path))
    assert ct_out == ct.resolve() and np.allclose(vol.affine, nib.load(str(ct)).affine)
    data = np.asarray(vol.dataobj)
    assert set(np.unique(data).tolist()) == {0, 1, 2, 3} and not data[labels == 73].any()
    assert csv_path.read_text().splitlines() == ["value,name", "1,blob_2_01", "2,blob_2_02", "3,blob_2_03"]
    with pytest.raises(RauInputError, match="avoid_names"):
        write_blob_labelmap(tmp_path / "out", n=1, seed=2, ct=ct, labelmap=lab, label_names={73: "rib"}, avoid_names=("clavicul",))


def test_a_label_map_off_the_ct_grid_is_refused_before_drawing(tmp_path):
    from rau.data.drr_blobs import write_blob_labelmap

    ct, lab, _ = _write_phantom(tmp_path, labels_shape=(30, 30, 30))
    with pytest.raises(RauInputError, match="^labelmap: .*voxel grid"):
        write_blob_labelmap(tmp_path / "out", n=1, seed=0, ct=ct, labelmap=lab, label_names={1: "x"}, avoid_names=("x",))
    assert not (tmp_path / "out").exists()
