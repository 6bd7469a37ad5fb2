"""`rau train grpo`: Group Relative Policy Optimization after SFT for the compact RAU VLM (RAU's
second training stage, arXiv 2509.22404 section 2, on the same model classes).

Why not TRL's ``GRPOTrainer``: it drives a ``generate()``-capable causal LM on text/image
processor inputs; the compact VLM reads two cached feature grids through its own projector and
decodes under a grammar, which GRPOTrainer cannot express. This is the same algorithm as a small,
tested loop on :func:`rau.training.engine.run_training` (accelerate, resume, checkpoints, loss log):

1. Draw the step's reference/target pairs exactly as SFT does (:func:`rau.training.recipes.refvlm.make_batch`).
2. For every structure block, sample ``group_size`` answers from the current policy under the
   answer grammar (:func:`rau.models.refvlm.modeling.generate`, temperature ``temperature``).
3. Score each answer (:func:`answer_rewards`): format (a well-formed box with extent, as :meth:`rau.tokens.masktok.MaskTokenizer.decode` requires),
   identification (``<yes>``/``<no>`` right), box IoU and mask Dice against the target's tokens.
4. Advantage = the reward standardised within its group (:func:`group_advantages`).
5. Loss (:func:`grpo_loss`): the clipped policy-gradient surrogate per answer token plus
   ``beta`` x the k3 estimate of KL(policy || SFT model), averaged per answer, then over answers.
   One policy update per sample (mu = 1), so the ratio is 1 at the update and clipping is inert;
   it is kept so that mu > 1 would be correct.

Rewards are computed in token space, where both images are the unit square: box IoU of the
1024-bin boxes, and Dice of the masks decoded by the shipped mask tokenizer on a 64 x 64 canvas
(the truth is the target's own tokens, i.e. its mask through the tokenizer round trip). A
structure absent from the target earns only the identification reward, for answering ``<no>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from rau.training.engine import run_training
from rau.errors import RauInputError
from rau.models.refvlm.configuration import RefVocab
from rau.models.refvlm.modeling import RefVlmModel, answer_logprobs, generate
from rau.training.recipes.refvlm import load_pair_caches, make_batch

#: Default reward weights (total = the weighted sum).
REWARD_WEIGHTS = {"format": 0.5, "identification": 1.0, "box_iou": 1.0, "mask_dice": 0.5}
CANVAS = 64


def box_iou_bins(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of (N, 4) inclusive (ymin, xmin, ymax, xmax) bin boxes; an inverted box has IoU 0."""
    a, b = np.asarray(a, np.int64).reshape(-1, 4), np.asarray(b, np.int64).reshape(-1, 4)
    lo, hi = np.maximum(a[:, :2], b[:, :2]), np.minimum(a[:, 2:], b[:, 2:])
    inter = np.prod(np.clip(hi - lo + 1, 0, None), axis=1)
    area = lambda r: np.prod(np.clip(r[:, 2:] - r[:, :2] + 1, 0, None), axis=1)  # noqa: E731
    union = area(a) + area(b) - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def decode_canvas(tokenizer, loc: np.ndarray, codes: np.ndarray, size: int = CANVAS) -> np.ndarray:
    """(N, 4) bins + (N, n_codes) codes -> (N, size, size) bool masks on the unit-square canvas
    (an inverted or zero-extent box gives an empty mask)."""
    import torch

    from rau.tokens.loc import loc_tokens_to_box, paste_probs

    n = len(loc)
    out = np.zeros((n, size, size), bool)
    if n == 0:
        return out
    with torch.no_grad():
        crops = torch.sigmoid(tokenizer.model.decode_codes(torch.as_tensor(np.asarray(codes), dtype=torch.long)))[:, 0].numpy()
    bins = tokenizer.config.bins
    for i in range(n):
        if loc[i, 2] <= loc[i, 0] or loc[i, 3] <= loc[i, 1]:
            continue
        out[i] = paste_probs(crops[i], loc_tokens_to_box(loc[i], (size, size), bins), (size, size)) >= 0.5
    return out


def dice_masks(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Dice of (N, H, W) bool masks (two empty masks: 1)."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    s = a.sum(1) + b.sum(1)
    return np.where(s > 0, 2.0 * (a & b).sum(1) / np.maximum(s, 1), 1.0)


def answer_rewards(answers: np.ndarray, truth: np.ndarray, vocab: RefVocab, tokenizer,
                   weights: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """Reward components and ``total`` of (N, answer_length) answer ids against the (N,
    answer_length) true answers (``<yes>`` + box + codes, or ``<no>`` + padding)."""
    w = {**REWARD_WEIGHTS, **(weights or {})}
    unknown = set(w) - set(REWARD_WEIGHTS)
    if unknown:
        raise RauInputError(f"reward weights: unknown {sorted(unknown)}; known: {', '.join(REWARD_WEIGHTS)}")
    answers, truth = np.asarray(answers), np.asarray(truth)
    yes, no = vocab.id["<yes>"], vocab.id["<no>"]
    said_yes, is_yes = answers[:, 0] == yes, truth[:, 0] == yes
    loc = answers[:, 1:5] - vocab.loc_offset
    codes = answers[:, 5:] - vocab.seg_offset
    in_loc = ((loc >= 0) & (loc < vocab.config.bins)).all(1)
    in_seg = ((codes >= 0) & (codes < vocab.config.codebook_size)).all(1)
    upright = (loc[:, 2] > loc[:, 0]) & (loc[:, 3] > loc[:, 1])  # as MaskTokenizer.decode: a box has extent
    fmt = np.where(said_yes, in_loc & in_seg & upright, answers[:, 0] == no).astype(float)
    ident = (said_yes == is_yes).astype(float)
    both = said_yes & is_yes & (fmt > 0)
    iou, dice = np.zeros(len(answers)), np.zeros(len(answers))
    if both.any():
        tloc, tcodes = truth[both, 1:5] - vocab.loc_offset, truth[both, 5:] - vocab.seg_offset
        iou[both] = box_iou_bins(loc[both], tloc)
        dice[both] = dice_masks(decode_canvas(tokenizer, loc[both], codes[both]), decode_canvas(tokenizer, tloc, tcodes))
    parts = {"format": fmt, "identification": ident, "box_iou": iou, "mask_dice": dice}
    parts["total"] = sum(w[k] * v for k, v in parts.items())
    return parts


def group_advantages(rewards: np.ndarray, group_size: int, eps: float = 1e-4) -> np.ndarray:
    """GRPO's advantage: each reward minus its group's mean, over the group's std (groups are
    consecutive runs of ``group_size``); a group whose answers all score alike gets 0."""
    r = np.asarray(rewards, float)
    if r.size % group_size:
        raise ValueError(f"group_advantages: {r.size} rewards do not split into groups of {group_size}")
    g = r.reshape(-1, group_size)
    return ((g - g.mean(1, keepdims=True)) / (g.std(1, keepdims=True) + eps)).reshape(-1)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, clip_eps: float = 0.2, beta: float = 0.04):
    """GRPO objective (to minimise) and its KL term: per token ``-min(ratio A, clip(ratio) A) +
    beta k3``, k3 = exp(ref - logp) - (ref - logp) - 1; averaged over each answer's counted tokens,
    then over answers. ``logp``/``old_logp``/``ref_logp``/``mask`` are (N, T), ``advantages`` (N,)."""
    import torch

    m = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    a = advantages[:, None].to(logp.dtype)
    surrogate = torch.minimum(ratio * a, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * a)
    d = ref_logp - logp
    kl = torch.exp(d) - d - 1
    per_answer = lambda x: (x * m).sum(1) / m.sum(1).clamp(min=1)  # noqa: E731
    return (per_answer(-surrogate + beta * kl)).mean(), per_answer(kl).mean().detach()


def train_grpo(caches: Sequence[str | Path], out_dir: str | Path, *, init_from: str | Path, steps: int,
               pairs_per_step: int = 4, structures_per_pair: int = 4, group_size: int = 8, temperature: float = 1.0,
               lr: float = 2e-5, warmup: int = 10, beta: float = 0.04, clip_eps: float = 0.2, seed: int = 0,
               p_similar: float = 0.5, n_neighbours: int = 10, reward_weights: dict[str, float] | None = None,
               cache_weights: Sequence[float] | None = None, save_every: int = 50, log_every: int = 5,
               threads: int | None = None, device: str = "auto", command: str | None = None,
               progress: bool = True) -> Path:
    """GRPO fine-tuning of the SFT model ``init_from`` on token caches -> ``out_dir/final``. Resumable
    (a batch and its samples depend only on (seed, step)); the KL anchor is ``init_from``, frozen."""
    import torch

    from rau.tokens.masktok import load_default

    if steps < 1 or pairs_per_step < 1 or structures_per_pair < 1 or group_size < 2:
        raise RauInputError("steps, pairs_per_step and structures_per_pair must be >= 1 and group_size >= 2")
    if not lr > 0 or not temperature > 0 or beta < 0 or not 0 < clip_eps < 1 or not 0 <= p_similar <= 1:
        raise RauInputError("lr and temperature must be > 0, beta >= 0, clip_eps in (0, 1) and p_similar in [0, 1]")
    if threads:
        torch.set_num_threads(threads)
    loaded, nears, weights = load_pair_caches(caches, n_neighbours, cache_weights)
    model = RefVlmModel.from_pretrained(init_from)
    anchor = RefVlmModel.from_pretrained(init_from).net.requires_grad_(False).eval()
    tokenizer = load_default()
    if tokenizer.config.codebook_size != model.config.codebook_size or tokenizer.config.n_codes != model.config.n_codes:
        raise RauInputError("the shipped mask tokenizer does not match the model's codebook; GRPO's Dice reward needs it")
    rw = {**REWARD_WEIGHTS, **(reward_weights or {})}
    answer_rewards(np.zeros((0, model.vocab.answer_length), int), np.zeros((0, model.vocab.answer_length), int),
                   model.vocab, tokenizer, rw)  # validates the weights' names
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_key = {"kind": "refvlm-grpo", "caches": [str(Path(c).resolve()) for c in caches], "steps": steps,
               "pairs_per_step": pairs_per_step, "structures_per_pair": structures_per_pair, "group_size": group_size,
               "temperature": temperature, "lr": lr, "warmup": warmup, "beta": beta, "clip_eps": clip_eps, "seed": seed,
               "p_similar": p_similar, "n_neighbours": n_neighbours, "reward_weights": rw,
               "init_from": str(Path(init_from).resolve()), "config": asdict(model.config),
               "cache_weights": [float(v) for v in weights]}
    vocab, p0 = model.vocab, model.vocab.prompt_length

    def step_loss(net, step, acc):
        rf, tf, ids, pair, _, _ = (t.to(acc.device) for t in make_batch(
            model, loaded, nears, weights, seed, step, pairs_per_step, structures_per_pair, p_similar,
            acc.process_index, acc.num_processes))
        prompts = ids[:, :p0].repeat_interleave(group_size, 0)
        pair_g = pair.repeat_interleave(group_size, 0)
        gen = torch.Generator().manual_seed(int(np.random.default_rng([seed, step, acc.process_index, 7]).integers(2**62)))
        with acc.autocast():
            toks, _, _ = generate(acc.unwrap_model(net), vocab, rf, tf, prompts, pair_g, temperature=temperature, generator=gen)
        toks = toks.clone()
        toks[toks[:, 0] == vocab.id["<no>"], 1:] = vocab.id["<pad>"]
        truth = ids[:, p0:].repeat_interleave(group_size, 0)
        parts = answer_rewards(toks.cpu().numpy(), truth.cpu().numpy(), vocab, tokenizer, rw)
        adv = torch.as_tensor(group_advantages(parts["total"], group_size), dtype=torch.float32, device=acc.device)
        blocks = torch.cat([prompts, toks], dim=1)
        anchor.to(acc.device)
        with acc.autocast():
            logp, mask = answer_logprobs(net(rf, tf, blocks, pair_g), blocks, vocab)
            with torch.no_grad():
                ref_logp, _ = answer_logprobs(anchor(rf, tf, blocks, pair_g), blocks, vocab)
        loss, kl = grpo_loss(logp, logp.detach(), ref_logp, adv, mask, clip_eps=clip_eps, beta=beta)
        truth_yes = truth[:, 0].cpu().numpy() == vocab.id["<yes>"]
        extras = {"reward": float(parts["total"].mean()), "kl": float(kl),
                  "identification": float(parts["identification"].mean())}
        if truth_yes.any():  # quality of the sampled answers where the structure is there
            extras.update(box_iou=float(parts["box_iou"][truth_yes].mean()),
                          mask_dice=float(parts["mask_dice"][truth_yes].mean()))
        return loss, extras

    return run_training(model, out, run_key, step_loss, steps=steps, lr=lr, warmup=warmup, save_every=save_every,
                        log_every=log_every, device=device, command=command, progress=progress, desc="grpo rau vlm",
                        loss_label="loss (GRPO objective + KL)")
