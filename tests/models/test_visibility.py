"""The visibility model: probabilities per structure and the folder round trip, a tiny multi-label
run whose killed twin resumes to the same weights and tells which synthetic structure an unseen
image shows, and the confidence feature it gives (only to the structures it learnt)."""

from __future__ import annotations

import numpy as np
import pytest

from rau.errors import CheckpointError, RauInputError
from rau.models.visibility.configuration import VisibilityConfig
from rau.models.visibility.modeling import VisibilityModel
from tests.conftest import assert_killed_run_resumes, disk, write_png

TINY = dict(image_size=32, width=4, structures=["left_disk", "right_disk"])


def _image(i: int, left: bool, right: bool, shape=(80, 72)) -> np.ndarray:
    rng = np.random.default_rng(i)
    img = 0.2 + 0.05 * rng.random(shape)
    for on, x in ((left, 0.25), (right, 0.75)):
        if on:
            img[disk(shape, (shape[0] * rng.uniform(0.4, 0.6), shape[1] * x), shape[0] * 0.15)] = 0.9
    return img.astype(np.float32)


def test_probabilities_and_the_folder_round_trip(tmp_path, one_torch_thread):
    model = VisibilityModel(VisibilityConfig(**TINY))
    p = model.probs(_image(0, True, False))
    assert list(p) == TINY["structures"] and all(0 <= v <= 1 for v in p.values())
    folder = model.save_pretrained(tmp_path / "m")
    again = VisibilityModel.from_pretrained(folder)
    assert again.config == model.config and again.probs(_image(0, True, False)) == pytest.approx(p, abs=1e-6)
    (folder / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="visibility weights"):
        VisibilityModel.from_pretrained(folder)
    for bad in ([], ["a", "a"], [""]):
        with pytest.raises(RauInputError, match="structures"):
            VisibilityConfig(structures=bad)
    with pytest.raises(RauInputError, match="grayscale"):
        model.probs(np.zeros((8, 8, 3), np.float32))


def test_tiny_visibility_trains_and_a_killed_run_resumes_to_the_same_weights(tmp_path, one_torch_thread):
    from rau.training.recipes.visibility import learnable_structures, train_visibility

    root = tmp_path / "data"
    for i in range(16):
        left, right = i % 2 == 0, i % 4 < 2
        img = _image(i, left, right)
        write_png(root / "images" / f"case_{i}.png", img)
        for name, on in (("left_disk", left), ("right_disk", right)):
            if on:
                write_png(root / "masks" / name / f"case_{i}.png", img > 0.8)
        if i == 0:  # shown once: too rare to learn
            write_png(root / "masks" / "rare" / f"case_{i}.png", img > 0.8)
    sources = [(root, None, 16)]
    kw = dict(steps=40, batch_size=8, lr=3e-3, checkpoint_every=10, progress=False, threads=1,
              config=VisibilityConfig(**TINY))
    whole = assert_killed_run_resumes(train_visibility, sources, tmp_path, **kw)
    model = VisibilityModel.from_pretrained(whole)
    assert model.training["recipe"] == "visibility"
    assert model.training["data"]["positives"] == {"left_disk": 8, "right_disk": 8}
    p = model.probs(_image(100, True, False))
    assert p["left_disk"] > 0.5 > p["right_disk"]
    assert learnable_structures([["a", "b"], ["a"], ["a", "c"]], min_positives=1) == ["b", "c"]  # "a": in every image
    assert learnable_structures([["s10"], ["s9a"], ["s9"]] * 2, min_positives=2) == ["s9", "s9a", "s10"]
    # without a config the names come from the images: "rare" is shown once, too few to learn
    auto = train_visibility(sources, tmp_path / "auto", **{**kw, "config": None, "steps": 2})
    assert VisibilityModel.from_pretrained(auto).config.structures == ["left_disk", "right_disk"]


def test_the_confidence_reads_visibility_for_the_structures_it_learnt(tmp_path, one_torch_thread, monkeypatch):
    """``target_visibility`` gives the feature to learnt names only; in a calibration's feature matrix a
    row without it is NaN (the fit reads the column's mean there: tests/methods/test_confidence.py)."""
    from rau.eval.calibrate import feature_matrix
    from rau.methods import confidence

    model = VisibilityModel(VisibilityConfig(**TINY))
    monkeypatch.setattr(confidence, "default_visibility", lambda: model)
    img = _image(1, True, True)
    got = confidence.target_visibility(img, ["left_disk", "heart"])
    assert list(got) == ["left_disk"] and got["left_disk"] == pytest.approx(model.probs(img)["left_disk"])
    assert confidence.target_visibility(img, ["heart"]) == {}
    rows = [{"features": {"score": 0.1 * i, "visibility": 0.9 - 0.1 * i}} for i in range(4)] \
        + [{"features": {"score": 0.5}}]
    x = feature_matrix(rows, ["score", "visibility"])
    assert np.isnan(x[4, 1]) and not np.isnan(x[:4]).any()
    with pytest.raises(KeyError):
        feature_matrix([{"features": {"visibility": 0.5}}], ["score"])


def test_a_calibration_on_the_models_own_training_images_leaves_the_feature_out(tmp_path):
    """``rau calibrate`` on a split drawn from the visibility model's training folder (ARCADE train: the
    default ``calib-arcade``) would read the feature at its training fit; it is left out there."""
    from rau.eval.calibrate import visibility_trained_on
    from rau.methods.confidence import default_visibility

    model = VisibilityModel(VisibilityConfig(**TINY), training={"data": {"sources": [["data/arcade_syntax/train", None, 9]]}})
    assert visibility_trained_on(tmp_path / "arcade_syntax" / "train", model)
    assert not visibility_trained_on(tmp_path / "arcade_syntax" / "val", model)
    assert not visibility_trained_on(tmp_path / "arcade_syntax" / "train", VisibilityModel(VisibilityConfig(**TINY)))
    shipped = default_visibility()
    assert shipped is not None and len(shipped.config.structures) == 24 and "10a" not in shipped.config.structures
    assert visibility_trained_on("../shared/datasets/arcade_syntax/train")  # the shipped model's sources
