"""The compact RAU VLM with tiny random-weight decoders: grammar, shared-prefix forward (gradients
reach every trainable part through the KV cache), blocks independent of each other, constrained
answers, save/load and corrupted folders, pair batches, training (loss falls), resume after a
kill, and the CLI end to end (cache -> rau train refvlm -> rau eval --method rau --vlm)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from rau.data.caches import save_cache
from rau.errors import CheckpointError, RauInputError
from rau.models.decoder import answer_loss
from rau.models.refvlm.modeling import RefVlmModel, build_model
from rau.training.recipes.refvlm import make_batch, neighbours, train_refvlm
from tiny_data import TINY, tiny_token_cache



@pytest.fixture
def model(one_torch_thread) -> RefVlmModel:
    return build_model(seed=0, **TINY)


def test_vocab_prompt_answer_and_grammar(model):
    v = model.vocab
    prompt = v.prompt([1, 2, 3, 4], list(range(16)))
    assert len(prompt) == v.prompt_length == 22 and prompt[0] == v.id["<q>"] and prompt[-1] == v.id["<ans>"]
    yes = v.answer([10, 20, 30, 40], list(range(16)))
    no = v.answer(None, None)
    assert len(yes) == len(no) == v.answer_length == 21
    assert yes[0] == v.id["<yes>"] and no[0] == v.id["<no>"] and set(no[1:]) == {v.id["<pad>"]}
    assert set(v.allowed(0)) == {v.id["<yes>"], v.id["<no>"]}
    assert v.allowed(1).min() == v.loc_offset and v.allowed(5).min() == v.seg_offset
    with pytest.raises(RauInputError, match="reference tokens"):
        v.prompt([1, 2, 3], list(range(16)))


def _blocks(model, n):
    v = model.vocab
    return torch.tensor([v.prompt([0, 0, 500, 500], list(range(16))) + v.answer([100 * k, 50, 700, 900], [k] * 16)
                         for k in range(n)])


def test_shared_prefix_forward_gradients_reach_every_trainable_parameter(model):
    ids = _blocks(model, 3)
    rf, tf = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    logits = model.net(rf, tf, ids, torch.tensor([0, 1, 1]))
    assert logits.shape == (3, ids.shape[1], len(model.vocab))
    p = model.vocab.prompt_length
    ans = torch.zeros_like(ids, dtype=torch.bool)
    ans[:, p:] = True
    locm = torch.zeros_like(ans)
    locm[:, p + 1 : p + 5] = True
    loss = answer_loss(logits, ids, ans, locm, loc_offset=model.vocab.loc_offset, bins=1024)
    loss.backward()
    for name, param in model.net.named_parameters():  # role embedding and projector too: through the cache
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert not any("image_encoder" in n for n, _ in model.net.named_parameters())  # the encoder stays frozen


def test_blocks_are_independent_and_match_a_single_pass(model):
    """A block's logits do not depend on the other blocks of its pair (each sees prefix + itself)."""
    model.net.eval()
    ids = _blocks(model, 3)
    rf, tf = torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4)
    with torch.no_grad():
        together = model.net(rf, tf, ids, torch.zeros(3, dtype=torch.long))
        alone = model.net(rf, tf, ids[1:2], torch.zeros(1, dtype=torch.long))
    assert torch.allclose(together[1, 1:], alone[0, 1:], atol=1e-4)


def test_constrained_answers_always_well_formed(model):
    answers = model.answer(torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4),
                           [([0, 0, 500, 500], list(range(16))), ([10, 10, 900, 900], [3] * 16)])
    assert len(answers) == 2
    for a in answers:
        assert 0.0 <= a.p_yes <= 1.0 and a.visible == (a.p_yes >= 0.5)
        assert len(a.loc) == 4 and all(0 <= t < 1024 for t in a.loc)
        assert len(a.codes) == 16 and all(0 <= c < 512 for c in a.codes)
        assert 0.0 < a.box_score <= 1.0
    assert model.answer(torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4), []) == []


def test_save_load_roundtrip_half_and_corrupted_folders(model, tmp_path):
    folder = model.save_pretrained(tmp_path / "m", training={"command": "test"})
    loaded = RefVlmModel.from_pretrained(folder)
    rf, tf = torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4)
    refs = [([0, 0, 500, 500], list(range(16)))]
    assert model.answer(rf, tf, refs)[0].loc == loaded.answer(rf, tf, refs)[0].loc
    assert loaded.training == {"command": "test"}
    half = model.save_pretrained(tmp_path / "h", half=True)
    assert (half / "model.safetensors").stat().st_size < 0.6 * (folder / "model.safetensors").stat().st_size
    assert next(RefVlmModel.from_pretrained(half).net.parameters()).dtype == torch.float32
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        RefVlmModel.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"format": "rau-chexanatomy-v1"}))
    with pytest.raises(CheckpointError, match="not a RAU VLM"):
        RefVlmModel.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="not a RAU VLM folder"):
        RefVlmModel.from_pretrained(tmp_path / "nothing")


def test_pair_batches_are_deterministic_never_self_and_answer_no_for_absent(model):
    cache = tiny_token_cache()
    near = neighbours(cache, 3)
    assert near.shape == (12, 3) and not any(i in row for i, row in enumerate(near))
    rf, tf, ids, pair, ans, locm = make_batch(model, [cache], [near], np.array([1.0]), 0, 0, 6, 3, 0.5)
    assert rf.shape == tf.shape == (6, 8, 4, 4) and ids.shape[0] == pair.shape[0] == ans.shape[0]
    assert int(pair.max()) == 5 and bool((locm <= ans).all())
    v = model.vocab
    no_rows = ids[:, v.prompt_length] == v.id["<no>"]
    assert no_rows.any()  # absent structures are taught as <no> ...
    assert int(ans[no_rows].sum()) == int(no_rows.sum())  # ... supervising only that token
    again = make_batch(model, [cache], [near], np.array([1.0]), 0, 0, 6, 3, 0.5)
    assert torch.equal(ids, again[2]) and torch.equal(rf, again[0])
    for _ in range(5):  # the reference is never the target itself
        rf, tf, *_ = make_batch(model, [cache], [near], np.array([1.0]), 0, _, 6, 3, 0.0)
        assert not any(torch.equal(a, b) for a, b in zip(rf, tf))


def _train(cache_path, out, steps, **kw):
    return train_refvlm([cache_path], out, steps=steps, batch_size=4, structures_per_pair=3, lr=3e-3, warmup=2,
                        seed=0, config=TINY, save_every=kw.pop("save_every", 5), progress=False, device="cpu", **kw)


def test_tiny_model_learns_and_a_killed_run_resumes_identically(tmp_path, one_torch_thread):
    save_cache(tiny_token_cache(), tmp_path / "c.npz")
    final = _train(tmp_path / "c.npz", tmp_path / "a", 40, save_every=20)
    losses = [h["loss"] for h in json.loads((tmp_path / "a" / "loss.json").read_text())["history"]]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert (final / "model.safetensors").is_file() and (final / "training.json").is_file()
    ref = _train(tmp_path / "c.npz", tmp_path / "b", 10)
    _train(tmp_path / "c.npz", tmp_path / "k", 10)
    shutil.rmtree(tmp_path / "k" / "checkpoint-10")  # "killed" after its step-5 checkpoint
    shutil.rmtree(tmp_path / "k" / "final")
    resumed = _train(tmp_path / "c.npz", tmp_path / "k", 10)
    from safetensors.torch import load_file

    a, b = load_file(str(ref / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(RauInputError, match="other settings"):
        train_refvlm([tmp_path / "c.npz"], tmp_path / "k", steps=10, batch_size=2, config=TINY, progress=False, device="cpu")
    ckpt = tmp_path / "k" / "checkpoint-10" / "optimizer.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        _train(tmp_path / "c.npz", tmp_path / "k", 10)


def test_training_refuses_caches_that_cannot_make_pairs(tmp_path):
    one = tiny_token_cache(1)
    save_cache(one, tmp_path / "one.npz")
    with pytest.raises(RauInputError, match="at least 2 images"):
        train_refvlm([tmp_path / "one.npz"], tmp_path / "o", steps=2, config=TINY, progress=False, device="cpu")


def test_cli_cache_train_then_rau_methods_use_the_folder(folder_dataset, tmp_path, one_torch_thread):
    """rau train chex-cache -> rau train refvlm (2 steps, tiny) -> rau eval --method rau|rau-box|rau-tokens --vlm RUN."""
    from typer.testing import CliRunner

    from rau.cli.app import app

    runner = CliRunner()
    cache = tmp_path / "c.npz"
    res = runner.invoke(app, ["train", "chex-cache", "--dataset", str(folder_dataset), "--out", str(cache), "--no-progress"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", "refvlm", "--cache", str(cache), "--output-dir", str(run), "--steps", "2",
                              "--batch-size", "2", "--structures-per-pair", "2", "--hidden-size", "32", "--num-layers", "1",
                              "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert (run / "final" / "config.json").is_file() and (run / "loss.png").is_file()
    for method in ("rau", "rau-box", "rau-tokens"):
        out = tmp_path / f"{method}.json"
        res = runner.invoke(app, ["eval", "--targets", str(folder_dataset), "--references", str(folder_dataset),
                                  "--out", str(out), "--method", method, "--vlm", str(run / "final"), "--limit", "1",
                                  "--no-progress"])
        assert res.exit_code == 0, res.output
        report = json.loads(out.read_text())
        assert set(report["per_structure"]) == {"blob", "square"}
    res = runner.invoke(app, ["eval", "--targets", str(folder_dataset), "--references", str(folder_dataset),
                              "--out", str(tmp_path / "x.json"), "--method", "rau", "--vlm", str(tmp_path / "missing"),
                              "--no-progress"])
    assert res.exit_code == 2 and "error:" in res.output


def test_token_evaluation_on_caches(model, tmp_path):
    from rau.eval.refvlm_tokens import evaluate_cache

    res = evaluate_cache(model, tiny_token_cache(8, seed=1), tiny_token_cache(4, seed=2))
    assert res["n_targets"] == 4 and set(res["per_structure"]) <= {"a", "b", "c"}
    assert 0.0 <= res["id_acc"] <= 1.0 and 0.0 <= res["box_iou"] <= 1.0


def test_one_to_one_assignment_never_gives_two_structures_one_box(model):
    from rau.models.refvlm.modeling import assign_boxes

    ll = np.array([[-1.0, -5.0, -9.0], [-1.5, -9.0, -2.0]])  # both prefer box 0: the second yields
    assert list(assign_boxes(ll)) == [0, 2]
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(1, 6))
        out = assign_boxes(rng.normal(size=(n, n + int(rng.integers(0, 3)))))
        assert len(set(out.tolist())) == n
    with pytest.raises(ValueError, match="N, M>=N"):
        assign_boxes(np.zeros((3, 2)))
    refs = [([0, 0, 500, 500], list(range(16))), ([10, 10, 900, 900], [3] * 16)]
    ll = model.box_loglik(torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4), refs, [[0, 0, 10, 10], [5, 5, 600, 700], [1, 2, 3, 4]])
    assert ll.shape == (2, 3) and (ll < 0).all()


def test_localizer_shares_the_encoder_pass_for_any_aspect(tmp_path, one_torch_thread):
    """One preprocessing (LiteMedSAM's padded frame) for VLM and segmenter: a non-square target is
    encoded once too, and the shared features are the VLM's own encoding of it."""
    from conftest import synthetic_pair

    from rau.encoders.litemedsam import bf16_copy
    from rau.methods.medsam import MedSamSegmenter
    from rau.methods.rau_vlm import RefVlmLocalizer

    folder = build_model(seed=0, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                         grid=4).save_pretrained(tmp_path / "vlm")
    seg = MedSamSegmenter(precision="fp32")
    loc = RefVlmLocalizer(folder, shared_segmenter=seg)
    img, _ = synthetic_pair((64, 96))
    calls = []
    hooks = [enc.register_forward_hook(lambda *_: calls.append(1)) for enc in (seg.net.image_encoder, bf16_copy(seg.net.image_encoder))]
    try:
        shared = loc.features(img)
        seg.embed(img)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(calls) == 1
    assert torch.equal(shared.cpu(), loc.model.encode([img], precision="fp32"))
