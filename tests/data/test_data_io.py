import json

import numpy as np
import pytest
from PIL import Image

from rau.data.annotated import AnnotatedImage
from rau.data.dataset import load_dataset, polygons_to_mask
from rau.data.io import load_annotated, read_image, read_label_map, read_mask
from rau.errors import RauInputError
from rau.references.thumbnails import ThumbnailBank

from conftest import synthetic_pair, write_png


def test_8bit_16bit_rgb_images(tmp_path):
    img, _ = synthetic_pair((40, 50))
    p8 = write_png(tmp_path / "a.png", img)
    p16 = tmp_path / "b.png"
    Image.fromarray((img * 4000).astype(np.uint16)).save(p16)
    prgb = tmp_path / "c.png"
    Image.fromarray(np.repeat((img * 255).astype(np.uint8)[..., None], 3, axis=2)).save(prgb)
    for p in (p8, p16, prgb):
        arr, meta = read_image(p)
        assert arr.shape == (40, 50) and arr.dtype == np.float32
        assert 0.0 <= arr.min() and arr.max() <= 1.0 and arr.max() > 0.5
    a8, _ = read_image(p8)
    argb, _ = read_image(prgb)
    assert np.allclose(a8, argb, atol=2 / 255)


def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("this is not an image")
    with pytest.raises(RauInputError, match="cannot read"):
        read_image(bad, arg="--target")
    with pytest.raises(FileNotFoundError, match="--target"):
        read_image(tmp_path / "nope.png", arg="--target")


def test_mask_size_mismatch(tmp_path):
    write_png(tmp_path / "m.png", np.ones((10, 10), bool))
    with pytest.raises(RauInputError, match="must match"):
        read_mask(tmp_path / "m.png", (12, 10))


def test_nan_image_rejected(tmp_path):
    arr = np.ones((8, 8), np.float32)
    arr[2, 3] = np.nan
    p = tmp_path / "nan.tif"
    Image.fromarray(arr, mode="F").save(p)
    with pytest.raises(RauInputError, match="NaN"):
        read_image(p)
    with pytest.raises(RauInputError, match="NaN"):
        AnnotatedImage(arr)


def test_empty_and_missing_structure(pair_files):
    ref = load_annotated(pair_files / "ref.png", pair_files / "ref_masks")
    assert set(ref.structures) == {"blob", "square"}
    ref.masks["blob"][:] = False
    with pytest.raises(RauInputError, match="empty"):
        ref.require_nonempty()
    with pytest.raises(RauInputError, match="not annotated"):
        ref.require_nonempty(["liver"])


def test_label_map(tmp_path):
    lm = np.zeros((10, 10), np.uint8)
    lm[1:3, 1:3] = 1
    lm[5:8, 5:8] = 2
    write_png(tmp_path / "lm.png", lm)
    masks = read_label_map(tmp_path / "lm.png", {1: "a", 2: "b", 3: "c"})
    assert set(masks) == {"a", "b"} and masks["b"].sum() == 9


def test_folder_dataset(folder_dataset):
    ds = load_dataset(folder_dataset)
    assert ds.layout == "folder" and len(ds) == 4 and ds.structures == ["blob", "square"]
    item = ds[2]
    assert item.shape == (100, 90) and item.masks["blob"].shape == (100, 90)


def test_coco_dataset(tmp_path):
    root = tmp_path / "coco"
    write_png(root / "images" / "1.png", np.zeros((32, 32), np.uint8))
    doc = {"images": [{"id": 7, "file_name": "1.png", "width": 32, "height": 32}],
           "categories": [{"id": 1, "name": "6"}],
           "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "segmentation": [[4, 4, 20, 4, 20, 10, 4, 10]]}]}
    (root / "annotations.json").write_text(json.dumps(doc))
    ds = load_dataset(root)
    assert ds.layout == "coco" and ds.structures == ["6"]
    m = ds[0].masks["6"]
    assert m.shape == (32, 32) and m[5:10, 5:20].all() and not m[15:].any()
    assert polygons_to_mask([[0, 0, 1, 1]], (4, 4)).sum() == 0  # degenerate polygon ignored


def test_bad_dataset_folder(tmp_path):
    with pytest.raises(RauInputError, match="neither"):
        load_dataset(tmp_path)


def test_retrieval_never_returns_itself(folder_dataset, tmp_path):
    ds = load_dataset(folder_dataset)
    imgs = [d.image for d in ds]
    sources = [str(e.image_path.resolve()) for e in ds.entries]
    bank = ThumbnailBank.build([e.id for e in ds.entries], sources, imgs)
    for i, img in enumerate(imgs):
        ranked = bank.rank(img, exclude_source=sources[i])
        assert ds.entries[i].id not in [r[0] for r in ranked]
        assert len(ranked) == len(imgs) - 1
    # an identical copy under another path is still the target itself
    assert ds.entries[0].id not in [r[0] for r in bank.rank(imgs[0].copy())]


def test_dataset_slice_keeps_id_order(folder_dataset):
    ds = load_dataset(folder_dataset)
    part = ds.slice(slice(1, 3))
    assert [e.id for e in part.entries] == ["case_1", "case_2"] and ds.slice(None) is ds
