"""CheXanatomy VLM with tiny random-weight decoders: vocabulary, shapes, gradients, constrained
generation, save/load, corrupted folders, training (loss falls) and resume after a kill."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rau.data.caches import TokenCache, load_cache, save_cache
from rau.errors import CheckpointError, RauInputError
from rau.models.chex.configuration import ChexConfig
from rau.models.chex.modeling import ChexModel, build_model
from rau.models.decoder import answer_loss
from rau.training.recipes.chex import make_batch, train_chex
from tiny_data import tiny_token_cache

TINY = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64, feature_dim=8, grid=4)
NAMES = ["left_lung", "right_lung", "heart", "vertebra_T1"]


@pytest.fixture
def model(one_torch_thread) -> ChexModel:
    return build_model(NAMES, seed=0, **TINY)


def _cache(n: int = 12, seed: int = 0) -> TokenCache:
    """The shared tiny cache (tests/tiny_data.py) with chest structure names."""
    return tiny_token_cache(n, seed, names=("left_lung", "heart", "vertebra_T1"))


def test_vocab_blocks_and_unknown_names(model):
    v = model.vocab
    ids, n_ans = v.block("segment", name="left_lung", loc=[0, 1, 2, 3], codes=list(range(16)))
    assert len(ids) == 1 + 4 + 1 + 20 and n_ans == 20
    assert ids[-16:] == [v.seg_offset + c for c in range(16)] and ids[-20:-16] == [v.loc_offset + k for k in range(4)]
    ids, n_ans = v.block("name", loc=[0, 1, 2, 3], name="heart")
    assert n_ans == 4 and v.ids_to_name(ids[-4:]) == "heart"
    assert v.block("detect", name="vertebra_T1")[1] == 0  # prompt only
    assert v.knows("right_lung") and not v.knows("left_kidney")
    with pytest.raises(RauInputError, match="left_kidney"):
        v.name_ids("left_kidney")
    with pytest.raises(RauInputError, match="q_words"):
        ChexConfig(names=["a_b_c_d_e"])


@pytest.mark.parametrize(("field", "value"), [("image_size", 512), ("preprocessing", "clahe"), ("vision", "tinyvit")])
def test_vision_fields_describe_litemedsam(field, value):
    assert ChexConfig(names=["heart"], preprocessing="minmax").preprocessing == "minmax"  # the older option
    with pytest.raises(RauInputError, match=field):
        ChexConfig(names=["heart"], **{field: value})


def test_forward_shapes_loss_and_gradients_reach_exactly_the_trainable_parts(model):
    ids, _ = model.vocab.block("segment", name="heart", loc=[10, 20, 500, 600], codes=list(range(16)))
    x = torch.tensor([ids, ids])
    logits = model.net(torch.randn(2, 8, 4, 4), x)
    assert logits.shape == (2, len(ids), len(model.vocab))
    ans = torch.zeros_like(x, dtype=torch.bool)
    ans[:, -20:] = True
    locm = torch.zeros_like(ans)
    locm[:, -20:-16] = True
    loss = answer_loss(logits, x, ans, locm, loc_offset=model.vocab.loc_offset, bins=1024)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    for name, p in model.net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the frozen image encoder is not part of the trained network
    assert not any("image_encoder" in n for n, _ in model.net.named_parameters())


def test_soft_location_loss_prefers_near_misses(model):
    v = model.vocab
    ids = torch.tensor([[v.loc_offset + 500]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    near, far = torch.full((1, 1, len(v)), -10.0), torch.full((1, 1, len(v)), -10.0)
    near[0, 0, v.loc_offset + 503] = 10.0
    far[0, 0, v.loc_offset + 900] = 10.0
    kw = dict(loc_offset=v.loc_offset, bins=1024, loc_sigma=4.0)
    assert answer_loss(near, ids, mask, mask, **kw) < answer_loss(far, ids, mask, mask, **kw)


def test_constrained_generation_always_well_formed(model):
    feats = torch.randn(1, 8, 4, 4)
    seg = model.segment(feats, ["heart", "left_lung"])
    for ans in seg.values():
        assert len(ans.loc) == 4 and all(0 <= t < 1024 for t in ans.loc)
        assert len(ans.codes) == 16 and all(0 <= c < 512 for c in ans.codes)
        assert 0.0 < ans.score <= 1.0
    det = model.detect(feats, ["vertebra_T1"])["vertebra_T1"]
    assert len(det.loc) == 4 and det.codes is None
    name, probs = model.name_boxes(feats, [[0, 0, 512, 512]])[0]
    assert name in NAMES and abs(sum(probs.values()) - 1) < 1e-4


def test_save_load_roundtrip_and_corrupted_folders(model, tmp_path):
    folder = model.save_pretrained(tmp_path / "m", training={"command": "test"})
    loaded = ChexModel.from_pretrained(folder)
    feats = torch.randn(1, 8, 4, 4)
    assert model.segment(feats, ["heart"])["heart"].loc == loaded.segment(feats, ["heart"])["heart"].loc
    assert loaded.training == {"command": "test"}
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        ChexModel.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"format": "something-else", "names": ["x"]}))
    with pytest.raises(CheckpointError, match="not a CheXanatomy"):
        ChexModel.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="not a CheXanatomy model folder"):
        ChexModel.from_pretrained(tmp_path / "nothing")


def test_cache_roundtrip_and_batches(tmp_path, model):
    cache = _cache()
    save_cache(cache, tmp_path / "c.npz")
    back = load_cache(tmp_path / "c.npz")
    assert back.names == cache.names and np.array_equal(back.loc, cache.loc)
    name_map = [model.config.names.index(n) for n in back.names]
    feats, ids, ans, locm = make_batch(model, [back], [name_map], np.array([1.0]), 0, 0, 4, 2,
                                       {"segment": 1.0, "detect": 1.0, "name": 1.0})
    assert feats.shape == (4, 8, 4, 4) and ids.shape == ans.shape == locm.shape
    assert bool((locm <= ans).all()) and ans.any()
    again = make_batch(model, [back], [name_map], np.array([1.0]), 0, 0, 4, 2, {"segment": 1.0, "detect": 1.0, "name": 1.0})
    assert torch.equal(ids, again[1])  # a batch depends only on (seed, step)
    (tmp_path / "bad.npz").write_bytes(b"not a cache")
    with pytest.raises(CheckpointError):
        load_cache(tmp_path / "bad.npz")


def _train(cache_path, out, steps, **kw):
    return train_chex([cache_path], out, steps=steps, batch_size=4, tasks_per_seq=2, lr=3e-3, warmup=2, seed=0,
                      config=TINY, save_every=kw.pop("save_every", 5), progress=False, device="cpu", **kw)


def test_tiny_model_learns_and_a_killed_run_resumes_identically(tmp_path, one_torch_thread):
    save_cache(_cache(), tmp_path / "c.npz")
    final = _train(tmp_path / "c.npz", tmp_path / "a", 40, save_every=20)
    losses = [h["loss"] for h in json.loads((tmp_path / "a" / "loss.json").read_text())["history"]]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert (final / "model.safetensors").is_file() and (final / "training.json").is_file()
    # uninterrupted 10 steps vs. a run "killed" after its step-5 checkpoint and rerun
    ref = _train(tmp_path / "c.npz", tmp_path / "b", 10)
    _train(tmp_path / "c.npz", tmp_path / "k", 10)
    import shutil

    shutil.rmtree(tmp_path / "k" / "checkpoint-10")
    shutil.rmtree(tmp_path / "k" / "final")
    resumed = _train(tmp_path / "c.npz", tmp_path / "k", 10)
    from safetensors.torch import load_file

    a, b = load_file(str(ref / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # same folder, other settings: refused, nothing overwritten
    with pytest.raises(RauInputError, match="other settings"):
        train_chex([tmp_path / "c.npz"], tmp_path / "k", steps=10, batch_size=2, config=TINY, progress=False, device="cpu")
    # a truncated checkpoint is a clear error, not a silent restart
    ckpt = tmp_path / "k" / "checkpoint-10" / "optimizer.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        _train(tmp_path / "c.npz", tmp_path / "k", 10)


def test_cli_cache_train_eval_end_to_end(folder_dataset, tmp_path, one_torch_thread):
    """rau train chex-cache -> rau train chex (2 steps, tiny) -> rau eval --method chexanatomy."""
    from typer.testing import CliRunner

    from rau.cli.app import app

    runner = CliRunner()
    cache = tmp_path / "c.npz"
    res = runner.invoke(app, ["train", "chex-cache", "--dataset", str(folder_dataset), "--out", str(cache), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert load_cache(cache).features.shape == (4, 256, 16, 16)
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", "chex", "--cache", str(cache), "--output-dir", str(run), "--steps", "2",
                              "--batch-size", "2", "--tasks-per-seq", "2", "--hidden-size", "32", "--num-layers", "1",
                              "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert (run / "final" / "config.json").is_file() and (run / "loss.png").is_file()
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["eval", "--targets", str(folder_dataset), "--references", str(folder_dataset), "--out", str(out),
                              "--method", "chexanatomy", "--chex", str(run / "final"), "--limit", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["config"]["chex"] == str(run / "final") and set(report["per_structure"]) == {"blob", "square"}
    res = runner.invoke(app, ["eval", "--targets", str(folder_dataset), "--references", str(folder_dataset), "--out", str(out),
                              "--method", "chexanatomy", "--no-progress"])
    from rau.methods.chexanatomy import DEFAULT_CHEX_DIR

    if (DEFAULT_CHEX_DIR / "model.safetensors").is_file():  # no --chex: the shipped model runs
        assert res.exit_code == 0, res.output
        assert json.loads(out.read_text())["config"]["chex"] is None
    else:
        assert res.exit_code == 2 and "--chex" in res.output


def test_token_evaluation_naming_and_detect(model, tmp_path):
    from rau.eval.chex_tokens import evaluate_tokens

    save_cache(_cache(4), tmp_path / "c.npz")
    res = evaluate_tokens(model, tmp_path / "c.npz")
    assert set(res["per_structure"]) <= {"left_lung", "heart", "vertebra_T1"} and res["images"] == 4
    for e in res["per_structure"].values():
        assert 0.0 <= e["naming_acc"] <= 1.0 and 0.0 <= e["detect_box_iou"] <= 1.0 and e["n"] > 0


def test_training_refuses_caches_without_known_structures(tmp_path):
    cache = _cache(3)
    cache.names = ["kidney", "liver", "spleen"]  # none of them is known to a model trained on NAMES
    save_cache(cache, tmp_path / "c.npz")
    folder = build_model(NAMES, seed=0, **TINY).save_pretrained(tmp_path / "m")
    with pytest.raises(RauInputError, match="no image holds"):
        train_chex([tmp_path / "c.npz"], tmp_path / "run", steps=2, init_from=folder, progress=False, device="cpu")
    assert not (tmp_path / "run" / "final").exists()
