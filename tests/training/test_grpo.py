"""GRPO after SFT for the compact RAU VLM, with tiny random-weight models: rewards, group
advantages, log-probabilities consistent with the sampler, the policy-gradient direction, the KL
anchor left untouched, and a killed run that resumes identically."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from tiny_data import TINY, tiny_token_cache

from rau.data.caches import save_cache
from rau.tokens.masktok import load_default
from rau.errors import CheckpointError, RauInputError
from rau.eval.refvlm_tokens import bin_box_iou
from rau.training.recipes.grpo import (
    REWARD_WEIGHTS,
    answer_rewards,
    box_iou_bins,
    group_advantages,
    grpo_loss,
    train_grpo,
)
from rau.models.refvlm.modeling import RefVlmModel, answer_logprobs, build_model, generate


@pytest.fixture(scope="module")
def tokenizer():
    return load_default()


@pytest.fixture
def model(one_torch_thread) -> RefVlmModel:
    return build_model(seed=0, **TINY)


def test_box_iou_bins_matches_the_evaluation_and_inverted_boxes_score_zero():
    rng = np.random.default_rng(0)
    a = np.sort(rng.integers(0, 1024, (50, 2, 2)), axis=1).transpose(0, 2, 1).reshape(50, 4)[:, [0, 2, 1, 3]]
    b = np.sort(rng.integers(0, 1024, (50, 2, 2)), axis=1).transpose(0, 2, 1).reshape(50, 4)[:, [0, 2, 1, 3]]
    got = box_iou_bins(a, b)
    assert np.allclose(got, [bin_box_iou(x, y) for x, y in zip(a, b)])
    assert box_iou_bins([[10, 10, 5, 20]], [[0, 0, 30, 30]])[0] == 0.0


def test_group_advantages_are_standardised_per_group_and_zero_for_a_uniform_group():
    r = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    a = group_advantages(r, 4)
    assert np.allclose(a[:4].mean(), 0) and np.allclose(a[:4].std(), 1, atol=1e-3)
    assert np.all(a[4:] == 0)
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(r, 3)


def test_rewards_for_right_wrong_absent_and_inverted_answers(model, tokenizer):
    v = model.vocab
    truth_yes = v.answer([100, 100, 600, 700], list(range(16)))
    truth_no = v.answer(None, None)
    inverted = v.answer([600, 100, 100, 700], list(range(16)))
    answers = np.array([truth_yes, v.answer([100, 100, 350, 700], list(range(16))), truth_no, truth_yes, inverted])
    truth = np.array([truth_yes, truth_yes, truth_yes, truth_no, truth_yes])
    r = answer_rewards(answers, truth, v, tokenizer)
    assert r["identification"].tolist() == [1, 1, 0, 0, 1]
    assert r["format"].tolist() == [1, 1, 1, 1, 0]
    assert r["box_iou"][0] == 1 and 0.4 < r["box_iou"][1] < 0.6 and r["box_iou"][2:].tolist() == [0, 0, 0]
    assert r["mask_dice"][0] == 1 and r["mask_dice"][1] < 1
    assert r["total"][0] == pytest.approx(sum(REWARD_WEIGHTS.values()))
    assert r["total"][0] > r["total"][1] > r["total"][3]
    with pytest.raises(RauInputError, match="unknown"):
        answer_rewards(answers, truth, v, tokenizer, {"iou": 1.0})


def _sample(model, n_blocks=3, group=4, seed=0):
    v = model.vocab
    torch.manual_seed(seed)
    rf, tf = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    prompts = torch.tensor([v.prompt([0, 0, 500, 500], [k] * 16) for k in range(n_blocks)]).repeat_interleave(group, 0)
    pair = torch.tensor([0, 1, 1][:n_blocks]).repeat_interleave(group, 0)
    toks, probs, _ = generate(model.net, v, rf, tf, prompts, pair, temperature=1.0,
                              generator=torch.Generator().manual_seed(seed))
    return rf, tf, prompts, pair, toks.clone(), probs


def test_logprobs_match_the_sampler_and_only_count_tokens_before_padding(model):
    v = model.vocab
    rf, tf, prompts, pair, toks, probs = _sample(model)
    toks[:, 0] = v.id["<yes>"]  # generate reports the probabilities of the decoded (<yes>) path
    blocks = torch.cat([prompts, toks], 1)
    logp, mask = answer_logprobs(model.net(rf, tf, blocks, pair), blocks, v)
    assert logp.shape == mask.shape == (len(blocks), v.answer_length) and mask.all()
    assert torch.allclose(logp[:, 1:].exp(), probs[:, 1:], atol=1e-4)
    toks[0, 0], toks[0, 1:] = v.id["<no>"], v.id["<pad>"]
    _, mask = answer_logprobs(model.net(rf, tf, torch.cat([prompts, toks], 1), pair), torch.cat([prompts, toks], 1), v)
    assert mask[0].tolist() == [True] + [False] * (v.answer_length - 1)


def test_the_update_raises_likelihood_of_better_than_average_answers(model):
    v = model.vocab
    rf, tf, prompts, pair, toks, _ = _sample(model)
    blocks = torch.cat([prompts, toks], 1)
    adv = torch.tensor([1.0, -1.0] * (len(blocks) // 2))
    logp, mask = answer_logprobs(model.net(rf, tf, blocks, pair), blocks, v)
    loss, kl = grpo_loss(logp, logp.detach(), logp.detach(), adv, mask, beta=0.0)
    assert float(kl) == 0.0
    loss.backward()
    for name, p in model.net.named_parameters():
        assert p.grad is not None, name  # every trainable part gets a policy gradient
    with torch.no_grad():
        for p in model.net.parameters():
            p -= 1e-3 * p.grad
        after, _ = answer_logprobs(model.net(rf, tf, blocks, pair), blocks, v)
    gain = ((after - logp.detach()) * mask).sum(1) / mask.sum(1)
    assert float((gain * adv).sum()) > 0  # the surrogate's own direction: up where A > 0, down where A < 0
    assert gain[adv > 0].mean() > gain[adv < 0].mean()


def _grpo(cache, out, init, steps, **kw):
    return train_grpo([cache], out, init_from=init, steps=steps, pairs_per_step=2, structures_per_pair=2, group_size=4,
                      lr=1e-3, warmup=1, save_every=kw.pop("save_every", 5), progress=False, device="cpu", **kw)


def test_grpo_runs_logs_rewards_keeps_the_anchor_and_resumes_identically(model, tmp_path):
    from safetensors.torch import load_file

    save_cache(tiny_token_cache(), tmp_path / "c.npz")
    model.save_pretrained(tmp_path / "sft")
    before = load_file(str(tmp_path / "sft" / "model.safetensors"))
    ref = _grpo(tmp_path / "c.npz", tmp_path / "a", tmp_path / "sft", 10)
    hist = json.loads((tmp_path / "a" / "loss.json").read_text())["history"]
    assert len(hist) == 10 and all({"reward", "kl", "identification"} <= set(h) for h in hist)
    assert hist[0]["kl"] == pytest.approx(0.0, abs=1e-6) and hist[-1]["kl"] > 0  # the policy moved away from the anchor
    after = load_file(str(tmp_path / "sft" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)  # the SFT folder (KL anchor) is untouched
    trained = load_file(str(ref / "model.safetensors"))
    assert any(not torch.equal(before[k], trained[k]) for k in before)
    _grpo(tmp_path / "c.npz", tmp_path / "k", tmp_path / "sft", 10)
    shutil.rmtree(tmp_path / "k" / "checkpoint-10")  # "killed" after its step-5 checkpoint
    shutil.rmtree(tmp_path / "k" / "final")
    resumed = _grpo(tmp_path / "c.npz", tmp_path / "k", tmp_path / "sft", 10)
    b = load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(trained[k], b[k]) for k in trained)
    with pytest.raises(RauInputError, match="other settings"):
        _grpo(tmp_path / "c.npz", tmp_path / "k", tmp_path / "sft", 10, beta=0.5)
    ckpt = tmp_path / "k" / "checkpoint-10" / "model.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        _grpo(tmp_path / "c.npz", tmp_path / "k", tmp_path / "sft", 10)
    with pytest.raises(RauInputError, match="group_size"):
        train_grpo([tmp_path / "c.npz"], tmp_path / "z", init_from=tmp_path / "sft", steps=2, group_size=1, progress=False)
