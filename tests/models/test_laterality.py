"""The laterality model: its score is exactly odd under mirroring, its model folder, a tiny run whose
killed twin resumes to the same weights and learns a side, and the shipped model behind the
"mirrored" rule on the bundled chest pair."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rau.errors import CheckpointError, RauInputError
from rau.models.laterality.configuration import LateralityConfig
from rau.models.laterality.modeling import LateralityModel
from tests.conftest import assert_killed_run_resumes, disk, write_png

TINY = dict(image_size=32, width=4)
SAMPLES = Path(__file__).resolve().parents[2] / "samples"


def _sided(i: int, shape=(80, 72)) -> np.ndarray:
    """A smooth image with a large bright disk on the image's right and a small one on its left."""
    rng = np.random.default_rng(i)
    h, w = shape
    img = 0.2 + 0.05 * rng.random(shape)
    img[disk(shape, (h * (0.45 + 0.1 * rng.random()), w * 0.7), h * 0.2)] = 0.9
    img[disk(shape, (h * 0.4, w * 0.25), h * 0.07)] = 0.6
    return img.astype(np.float32)


def test_score_is_odd_under_mirroring_and_the_folder_round_trips(tmp_path, one_torch_thread):
    model = LateralityModel(LateralityConfig(**TINY))
    img = _sided(0)
    s = model.score(img)
    assert model.score(img[:, ::-1].copy()) == pytest.approx(-s, abs=1e-5)
    assert model.agreement(img, img) >= 0 and model.agreement(img, img[:, ::-1].copy()) <= 0
    folder = model.save_pretrained(tmp_path / "m")
    again = LateralityModel.from_pretrained(folder)
    assert again.config == model.config and again.score(img) == pytest.approx(s, abs=1e-6)
    (folder / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="laterality weights"):
        LateralityModel.from_pretrained(folder)
    with pytest.raises(RauInputError, match="image_size"):
        LateralityConfig(image_size=40)
    for bad in (0, -1.0, float("nan"), "2"):
        with pytest.raises(RauInputError, match="temperature"):
            LateralityConfig(temperature=bad)
    with pytest.raises(RauInputError, match="grayscale"):
        model.score(np.zeros((8, 8, 3), np.float32))


def test_tiny_laterality_trains_and_a_killed_run_resumes_to_the_same_weights(tmp_path, one_torch_thread):
    from safetensors.torch import load_file

    from rau.training.recipes.laterality import train_laterality

    root = tmp_path / "ds"
    for i in range(8):
        img = _sided(i)
        write_png(root / "images" / f"case_{i}.png", img)
        write_png(root / "masks" / "disk" / f"case_{i}.png", img > 0.8)
    sources = [(root, None, 8)]
    kw = dict(steps=30, batch_size=8, lr=3e-3, checkpoint_every=10, progress=False, threads=1,
              config=LateralityConfig(**TINY))
    whole = assert_killed_run_resumes(train_laterality, sources, tmp_path, **kw)
    a = load_file(str(whole / "model.safetensors"))
    model = LateralityModel.from_pretrained(whole)
    assert model.training["recipe"] == "laterality"
    unseen = _sided(100)
    assert model.score(unseen) > 0 > model.score(unseen[:, ::-1].copy())
    with pytest.raises(RauInputError, match="need at least 4"):
        train_laterality([(root, slice(0, 2), 2)], tmp_path / "few", **kw)
    # with held-out images the temperature is fitted after training; the weights stay those of the run
    for i in range(8, 14):
        write_png(root / "images" / f"case_{i}.png", _sided(i))
    calibrated = train_laterality(sources, tmp_path / "whole", heldout=[(root, slice(8, 14), 6)], **kw)
    c = load_file(str(calibrated / "model.safetensors"))
    assert all(np.allclose(a[k].numpy(), c[k].numpy()) for k in a)
    again = LateralityModel.from_pretrained(calibrated)
    t = again.config.temperature
    assert t >= 0.5 and again.training["temperature"]["value"] == t and again.training["temperature"]["n_images"] == 6
    assert again.p_usual(unseen) == pytest.approx(1 / (1 + np.exp(-again.score(unseen) / t)))


def test_fit_temperature_is_the_likelihood_optimum():
    from rau.training.recipes.laterality import fit_temperature

    rng = np.random.default_rng(0)
    true_t = 2.0
    # scores whose "usual" probability is sigmoid(s / 2): a usual image draws s, a mirrored one -s
    s = rng.normal(3.0, 4.0, 4000)
    usual = rng.random(4000) < 1 / (1 + np.exp(-s / true_t))
    scores = np.where(usual, s, -s)
    assert fit_temperature(scores) == pytest.approx(true_t, rel=0.15)
    # none read the wrong way round: no finite optimum, and the trained reading (T = 0.5) stays
    assert fit_temperature(np.array([30.0, 40.0])) == 0.5
    with pytest.raises(RauInputError, match="at least 2"):
        fit_temperature(np.array([1.0]))


def test_the_shipped_model_drives_the_mirrored_rule_on_the_bundled_chest_pair():
    from rau.data.io import read_image
    from rau.methods.confidence import REASON_MIRROR, default_laterality, mirror_reason, pair_features

    assert default_laterality() is not None
    ref = read_image(SAMPLES / "chest_xray" / "reference.png")[0]
    target = read_image(SAMPLES / "chest_xray" / "target.png")[0]
    same, mirrored = pair_features(ref, target), pair_features(ref, target[:, ::-1].copy())
    assert same["laterality"] > 0.5 and mirror_reason(same) is None
    assert mirrored["laterality"] < -0.5 and mirror_reason(mirrored).startswith(REASON_MIRROR)
    # the laterality decides where present; the registration gain only without it
    assert mirror_reason({"laterality": 0.9, "mirror_fit_gain": 0.3}) is None
    assert mirror_reason({"mirror_fit_gain": 0.3}).startswith(REASON_MIRROR)
