"""The image-kind model: probabilities per kind and the folder round trip, a tiny run on three
synthetic kinds whose killed twin resumes to the same weights and tells unseen images apart, and
the shipped model behind the "reference does not fit" rule on the bundled sample pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rau.errors import CheckpointError, RauInputError
from rau.models.imagekind.configuration import ImageKindConfig
from rau.models.imagekind.modeling import ImageKindModel
from tests.conftest import assert_killed_run_resumes, disk, write_png

TINY = dict(image_size=32, width=4, kinds=["disks", "stripes", "other"])
SAMPLES = Path(__file__).resolve().parents[2] / "samples"


def _disks(i: int, shape=(80, 72)) -> np.ndarray:
    rng = np.random.default_rng(i)
    img = 0.2 + 0.05 * rng.random(shape)
    for _ in range(2):
        c = rng.uniform(0.25, 0.75, 2) * shape
        img[disk(shape, c, shape[0] * 0.18)] = 0.9
    return img.astype(np.float32)


def _stripes(i: int, shape=(80, 72)) -> np.ndarray:
    rng = np.random.default_rng(i)
    xx = np.arange(shape[1])[None, :] + 0 * np.arange(shape[0])[:, None]
    return (0.5 + 0.4 * np.sin(xx / rng.uniform(2.0, 3.0)) + 0.05 * rng.random(shape)).astype(np.float32)


def test_probabilities_and_the_folder_round_trip(tmp_path, one_torch_thread):
    model = ImageKindModel(ImageKindConfig(**TINY))
    img = _disks(0)
    p = model.probs(img)
    assert p.shape == (3,) and p.sum() == pytest.approx(1.0) and (p >= 0).all()
    assert model.agreement(img, img) == pytest.approx(float(p @ p))
    assert model.predict_kind(img)[0] in TINY["kinds"]
    folder = model.save_pretrained(tmp_path / "m")
    again = ImageKindModel.from_pretrained(folder)
    assert again.config == model.config and np.allclose(again.probs(img), p, atol=1e-6)
    (folder / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="image-kind weights"):
        ImageKindModel.from_pretrained(folder)
    with pytest.raises(RauInputError, match="kinds"):
        ImageKindConfig(kinds=["one"])
    with pytest.raises(RauInputError, match="grayscale"):
        model.probs(np.zeros((8, 8, 3), np.float32))


def test_tiny_image_kind_trains_and_a_killed_run_resumes_to_the_same_weights(tmp_path, one_torch_thread):
    from rau.training.recipes.imagekind import train_imagekind

    roots = {}
    for kind, make in (("disks", _disks), ("stripes", _stripes)):
        root = roots[kind] = tmp_path / kind
        for i in range(6):
            img = make(i)
            write_png(root / "images" / f"case_{i}.png", img)
            write_png(root / "masks" / "any" / f"case_{i}.png", img > 0.8)
    sources = {"disks": [(roots["disks"], None, 6, ("case_5",))], "stripes": [(roots["stripes"], None, 6, ())],
               "other": [("noise", 6)]}
    kw = dict(steps=30, batch_size=12, lr=3e-3, checkpoint_every=10, progress=False, threads=1,
              config=ImageKindConfig(**TINY))
    whole = assert_killed_run_resumes(train_imagekind, sources, tmp_path, **kw)
    model = ImageKindModel.from_pretrained(whole)
    assert model.training["recipe"] == "image-kind"
    assert model.training["data"]["per_kind"] == {"disks": 5, "stripes": 6, "other": 6}
    assert model.predict_kind(_disks(100))[0] == "disks" and model.predict_kind(_stripes(100))[0] == "stripes"
    assert model.agreement(_disks(101), _stripes(101)) < 0.5 < model.agreement(_disks(101), _disks(102))
    with pytest.raises(RauInputError, match="kinds the config does not have"):
        train_imagekind({**sources, "cats": sources["other"]}, tmp_path / "bad", **kw)
    with pytest.raises(RauInputError, match="of kind 'other'"):
        train_imagekind({**sources, "other": []}, tmp_path / "few", **kw)


def test_the_shipped_model_drives_the_kind_rule_on_the_bundled_samples():
    """Chest against chest and angiogram against angiogram are the same kind; an angiogram read against
    the chest reference does not fit, whatever the thumbnail fit, with the reason."""
    from rau.data.io import read_image
    from rau.methods.confidence import REASON_FIT, default_imagekind, kind_reason, pair_features

    model = default_imagekind()
    assert model is not None and model.config.kinds == ["chest radiograph", "coronary angiogram", "other"]
    chest = [read_image(SAMPLES / "chest_xray" / f"{n}.png")[0] for n in ("reference", "target")]
    angio = [read_image(SAMPLES / "angiogram" / f"{n}.png")[0] for n in ("reference", "target")]
    assert model.predict_kind(chest[1])[0] == "chest radiograph" and model.predict_kind(angio[1])[0] == "coronary angiogram"
    for ref, target in (chest, angio):
        pair = pair_features(ref, target)
        assert pair["kind"] > 0.9 and kind_reason(pair) is None
    other = pair_features(chest[0], angio[1])
    assert other["kind"] < 0.1 and kind_reason(other).startswith(REASON_FIT)
