"""U-Net baseline on a tiny config (32 px, few channels) and synthetic dataset folders: shapes,
overfitting, save/load, resume after a kill on the training engine, few-shot id selection,
corrupted weights, evaluation outputs."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from rau.errors import CheckpointError, RauInputError  # noqa: E402
from rau.eval.unet import evaluate_unet  # noqa: E402
from rau.methods.unet import UNetSegmenter  # noqa: E402
from rau.models.unet.configuration import UNetConfig  # noqa: E402
from rau.models.unet.modeling import UNetModel  # noqa: E402
from rau.training.recipes.unet import few_shot_ids, pick_ids, train_unet  # noqa: E402

TINY = dict(structures=["blob", "square"], image_size=32, channels=(4, 4, 8, 8, 16, 4))


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models on one thread


def tiny_config(**kw):
    return UNetConfig(**{**TINY, **kw})


def train(root, out, **kw):
    args = dict(config=tiny_config(), steps=6, batch_size=2, lr=3e-3, checkpoint_every=2, progress=False)
    return train_unet(root, out, **{**args, **kw})


def weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("kw, arg", [
    (dict(image_size=30), "image_size"), (dict(channels=(4, 4, 8)), "channels"),
    (dict(preprocessing="clahe"), "preprocessing"), (dict(structures=[]), "structures"),
    (dict(structures=["a", "a"]), "structures"), (dict(norm="group"), "norm"),
])
def test_config_validation_names_the_argument(kw, arg):
    with pytest.raises(RauInputError, match=f"^{arg}:"):
        tiny_config(**kw)


def test_masks_at_target_size_for_non_square_target():
    seg = UNetSegmenter(UNetModel(tiny_config()))
    target = np.random.default_rng(0).random((50, 70)).astype(np.float32)
    out = seg.segment(target, {"blob": None, "square": (1, 2, 30, 40), "heart": None})
    assert set(out) == {"blob", "square", "heart"}
    assert out["heart"] is None  # not a structure of this model
    for name in ("blob", "square"):
        assert out[name].mask.shape == (50, 70) and out[name].mask.dtype == bool
        assert out[name].prob.shape == (50, 70) and 0.0 <= out[name].score <= 1.0
    assert seg.segment(target, {"heart": None}) == {"heart": None}
    np.testing.assert_allclose(seg.predict_probs(target, ["square"])[0], seg.predict_probs(target)[1], atol=1e-6)
    assert seg.name == "unet" and not seg.uses_reference and not seg.needs_boxes


def test_tiny_model_overfits_two_images(folder_dataset, tmp_path):
    ids = ["case_0", "case_1"]
    before = evaluate_unet(train(folder_dataset, tmp_path / "r0", steps=1, lr=1e-9, train_ids=ids),
                           folder_dataset, ids=ids, progress=False)
    out = train(folder_dataset, tmp_path / "fit", steps=120, lr=1e-2, train_ids=ids, augment=False,
                checkpoint_every=1000)
    assert out == tmp_path / "fit" / "final"
    after = evaluate_unet(tmp_path / "fit", folder_dataset, ids=ids, progress=False)  # a run folder loads final/
    for s in ("blob", "square"):
        assert after["per_structure"][s]["mean"] > 0.8, after["per_structure"]
        assert after["per_structure"][s]["mean"] > before["per_structure"][s]["mean"] + 0.3
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] == 120 and record["data"]["ids"] == ids and record["augment"] is False
    assert record["optimizer"] == "Adam" and set(record["metrics"]["train_dice_no_aug"]) == {"blob", "square"}
    history = json.loads((out.parent / "loss.json").read_text())["history"]
    assert (out.parent / "loss.png").is_file() and len(history) == 120
    assert history[0]["lr"] == pytest.approx(1e-2) and history[-1]["lr"] == pytest.approx(1e-3, rel=1e-2)


def test_save_load_identity(tmp_path):
    model = UNetModel(tiny_config(seed=3))
    model.save_pretrained(tmp_path / "ck", training={"command": "test"})
    loaded = UNetModel.from_pretrained(tmp_path / "ck")
    assert loaded.config == model.config and loaded.training == {"command": "test"}
    image = np.random.default_rng(1).random((40, 36)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict_probs(image), model.predict_probs(image))
    seg = UNetSegmenter.from_pretrained(tmp_path / "ck")
    np.testing.assert_array_equal(seg.predict_probs(image), model.predict_probs(image))


def test_resume_after_kill_equals_uninterrupted_run(folder_dataset, tmp_path):
    full = train(folder_dataset, tmp_path / "full")

    def kill(step, record):
        if step == 3:  # after the step-2 checkpoint; step 3 is lost as in a real kill
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(folder_dataset, tmp_path / "killed", on_step=kill)
    killed = tmp_path / "killed"
    assert sorted(p.name for p in killed.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2"]
    assert not (killed / "final").exists()
    resumed = train(folder_dataset, killed)
    a, b = weights(full), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loss = [json.loads((d.parent / "loss.json").read_text())["history"] for d in (full, resumed)]
    assert loss[0] == loss[1]
    assert sorted(p.name for p in killed.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-4",
                                                                                         "checkpoint-6"]
    assert UNetModel.from_pretrained(killed / "checkpoint-6").config == tiny_config()  # a checkpoint is a model folder


def test_resume_refuses_checkpoints_of_another_run(folder_dataset, tmp_path):
    train(folder_dataset, tmp_path / "run", steps=2)
    with pytest.raises(RauInputError, match="other settings"):
        train(folder_dataset, tmp_path / "run", steps=2, lr=1e-2)
    train(folder_dataset, tmp_path / "run", steps=2, lr=1e-2, resume=False)  # starting over is allowed


def test_fine_tuning_restricts_to_train_ids(folder_dataset, tmp_path):
    base = train(folder_dataset, tmp_path / "base", steps=2)
    for init in (base, base.parent):  # the model folder or its run folder
        ft = train_unet(folder_dataset, tmp_path / f"ft_{init.name}", init_from=init, train_ids=["case_2"], steps=2,
                        batch_size=2, lr=1e-3, progress=False)
        record = json.loads((ft / "training.json").read_text())
        assert record["data"]["ids"] == ["case_2"] and record["data"]["n_images"] == 1
        assert record["init_from"] == str(base.resolve())
        assert UNetModel.from_pretrained(ft).config == UNetModel.from_pretrained(base).config
    with pytest.raises(RauInputError, match="^train_ids:"):
        train_unet(folder_dataset, tmp_path / "bad", init_from=base, train_ids=["nope"], steps=1, progress=False)
    with pytest.raises(RauInputError, match="^structures:"):
        train_unet(folder_dataset, tmp_path / "bad", init_from=base, structures=["blob"], steps=1, progress=False)


def test_few_shot_ids_are_seeded_and_nested():
    ids = [f"img_{i:03d}" for i in range(160)]
    k5, k20 = few_shot_ids(ids, 5, seed=0), few_shot_ids(ids, 20, seed=0)
    assert len(k5) == 5 and len(k20) == 20 and set(k5) <= set(k20)
    assert k5 == few_shot_ids(ids, 5, seed=0) and k5 != few_shot_ids(ids, 5, seed=1)
    with pytest.raises(RauInputError, match="^--few-shot:"):
        few_shot_ids(ids, 161, seed=0)


def test_pick_ids_by_range_and_few_shot(folder_dataset):
    assert pick_ids([folder_dataset]) is None
    assert pick_ids([folder_dataset], "3:") == ["case_3"]
    two = pick_ids([folder_dataset], "0:3", few_shot=2)
    assert len(two) == 2 and set(two) <= {"case_0", "case_1", "case_2"}
    with pytest.raises(RauInputError, match="^--id-range:"):
        pick_ids([folder_dataset], "9:")
    with pytest.raises(RauInputError, match="exactly one --data"):
        pick_ids([folder_dataset, folder_dataset], "0:2")


def test_corrupted_weights_raise_checkpoint_error(tmp_path):
    UNetModel(tiny_config()).save_pretrained(tmp_path / "ck")
    path = tmp_path / "ck" / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError) as err:
        UNetSegmenter.from_pretrained(tmp_path / "ck")
    assert "\n" not in str(err.value) and str(err.value).startswith("checkpoint:")
    with pytest.raises(CheckpointError, match="not a U-Net checkpoint folder"):
        UNetSegmenter.from_pretrained(tmp_path / "missing")


def test_evaluate_writes_results_and_overlays(folder_dataset, tmp_path):
    UNetModel(tiny_config()).save_pretrained(tmp_path / "ck")
    res = evaluate_unet(tmp_path / "ck", folder_dataset, ids=["case_3"], out=tmp_path / "e.json",
                        overlays=tmp_path / "o.png", progress=False)
    assert (tmp_path / "o.png").is_file() and json.loads((tmp_path / "e.json").read_text())["ids"] == ["case_3"]
    assert set(res["per_structure"]) == {"blob", "square"} and 0.0 <= res["mean_dice"] <= 1.0
