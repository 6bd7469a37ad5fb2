"""U-Net baseline on a tiny config (32 px, few channels) and synthetic dataset folders: shapes,
overfitting, save/load, resume after a kill, few-shot id restriction, corrupted weights, CLI."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from rau.errors import CheckpointError, RauInputError  # noqa: E402
from rau.models.unet.modeling import (  # noqa: E402
    UNetConfig,
    UNetSegmenter,
    build_network,
    evaluate_unet,
    few_shot_ids,
    main,
    train_unet,
)

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
    seg = UNetSegmenter(build_network(tiny_config()), tiny_config())
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
    after = evaluate_unet(out, folder_dataset, ids=ids, progress=False)
    for s in ("blob", "square"):
        assert after["per_structure"][s]["mean"] > 0.8, after["per_structure"]
        assert after["per_structure"][s]["mean"] > before["per_structure"][s]["mean"] + 0.3
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] == 120 and record["data"]["ids"] == ids and record["augment"] is False
    assert (out / "loss.png").is_file() and len(json.loads((out / "loss.json").read_text())["loss"]) == 120


def test_save_load_identity(tmp_path):
    seg = UNetSegmenter(build_network(tiny_config(seed=3)), tiny_config(seed=3))
    seg.save_pretrained(tmp_path / "ck", training={"command": "test"})
    loaded = UNetSegmenter.from_pretrained(tmp_path / "ck")
    assert loaded.config == seg.config
    image = np.random.default_rng(1).random((40, 36)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict_probs(image), seg.predict_probs(image))


def test_resume_after_kill_equals_uninterrupted_run(folder_dataset, tmp_path):
    full = train(folder_dataset, tmp_path / "full")

    def kill(step, loss):
        if step == 3:  # after the step-2 checkpoint; step 3 is lost as in a real kill
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(folder_dataset, tmp_path / "killed", callback=kill)
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == ["step_0000002"]
    resumed = train(folder_dataset, tmp_path / "killed")
    a, b = weights(full), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loss = [json.loads((d / "loss.json").read_text())["loss"] for d in (full, resumed)]
    assert loss[0] == loss[1]


def test_resume_refuses_checkpoints_of_another_run(folder_dataset, tmp_path):
    train(folder_dataset, tmp_path / "run", steps=2)
    with pytest.raises(CheckpointError, match="different run"):
        train(folder_dataset, tmp_path / "run", steps=2, lr=1e-2)
    train(folder_dataset, tmp_path / "run", steps=2, lr=1e-2, resume=False)  # starting over is allowed


def test_fine_tuning_restricts_to_train_ids(folder_dataset, tmp_path):
    base = train(folder_dataset, tmp_path / "base", steps=2)
    ft = train_unet(folder_dataset, tmp_path / "ft", init_from=base, train_ids=["case_2"], steps=2, batch_size=2,
                    lr=1e-3, progress=False)
    record = json.loads((ft / "training.json").read_text())
    assert record["data"]["ids"] == ["case_2"] and record["data"]["n_images"] == 1
    assert record["init_from"] == str(base.resolve())
    assert UNetSegmenter.from_pretrained(ft).config == UNetSegmenter.from_pretrained(base).config
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


def test_corrupted_weights_raise_checkpoint_error(tmp_path):
    UNetSegmenter(build_network(tiny_config()), tiny_config()).save_pretrained(tmp_path / "ck")
    path = tmp_path / "ck" / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError) as err:
        UNetSegmenter.from_pretrained(tmp_path / "ck")
    assert "\n" not in str(err.value) and str(err.value).startswith("checkpoint:")
    with pytest.raises(CheckpointError, match="not a U-Net checkpoint folder"):
        UNetSegmenter.from_pretrained(tmp_path / "missing")


def test_command_line_train_and_eval(folder_dataset, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["train", "--data", str(folder_dataset), "--out", str(out), "--structures", "blob,square",
               "--steps", "2", "--batch-size", "2", "--image-size", "32", "--channels", "4,4,8,8,16,4",
               "--id-range", "0:3", "--few-shot", "2", "--no-progress"])
    assert rc == 0
    record = json.loads((out / "training.json").read_text())
    assert record["command"].startswith("python -m rau.models.unet.modeling train") and record["data"]["n_images"] == 2
    rc = main(["eval", "--checkpoint", str(out), "--data", str(folder_dataset), "--id-range", "3:",
               "--out", str(tmp_path / "e.json"), "--overlays", str(tmp_path / "o.png"), "--no-progress"])
    assert rc == 0 and (tmp_path / "o.png").is_file()
    assert json.loads((tmp_path / "e.json").read_text())["ids"] == ["case_3"]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "nope"), "--data", str(folder_dataset)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: checkpoint:") and "\n" not in err
