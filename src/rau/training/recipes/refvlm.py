"""`rau train vlm --compact`: train the compact RAU VLM on reference/target pairs of cached features.

Data: token caches of :mod:`rau.data.caches` (``rau train chex-cache``: frozen LiteMedSAM features,
box tokens and mask codes per image and structure). A training pair takes two images of the SAME
cache (same anatomy): a target, and as reference with probability ``p_similar`` one of its
``neighbours`` nearest images by pooled-feature cosine (what retrieval or the evaluation's
"similar" reference gives at test time), otherwise any other image. Up to ``structures_per_pair``
structures annotated in the reference become blocks; the answer is ``<yes>`` + the target's box
and mask tokens, or ``<no>`` when the target lacks the structure (ARCADE: segments vary per
image). Step ``s`` draws its batch from ``numpy.random.default_rng([seed, s, rank, n_proc])``
alone, so a resumed run sees exactly the data of an uninterrupted one.

Output folder, checkpoints and resume: as :mod:`rau.training.recipes.chex` (the same helpers): config.json,
loss.json/loss.png, checkpoint-<step>/ (atomic, last two kept), final/ (``RefVlmModel.from_pretrained``).
Rerunning the same command resumes; a different configuration in the same folder is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from rau.data.caches import TokenCache, load_cache
from rau.training.engine import run_training
from rau.errors import RauInputError
from rau.models.decoder import answer_loss
from rau.models.refvlm.configuration import RefVlmConfig
from rau.models.refvlm.modeling import RefVlmModel


def neighbours(cache: TokenCache, k: int) -> np.ndarray:
    """(N, k) indices of each image's k most similar other images (cosine of centred pooled features)."""
    x = cache.features.astype(np.float32).reshape(len(cache), cache.features.shape[1], -1).mean(-1)
    x = x - x.mean(0, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True).clip(1e-8)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    k = max(1, min(k, len(cache) - 1))
    return np.argsort(-sim, axis=1)[:, :k]


def load_pair_caches(caches: Sequence[str | Path], n_neighbours: int, cache_weights: Sequence[float] | None = None):
    """Token caches to draw pairs from -> (caches, each one's neighbour table, sampling weights
    summing to 1: ``cache_weights`` or by size). Every cache needs 2 annotated images."""
    loaded = [load_cache(c) for c in caches]
    for path, c in zip(caches, loaded):
        if len(c) < 2 or not c.present().any():
            raise RauInputError(f"cache: {path} needs at least 2 images with annotated structures to make pairs")
    w = np.array(cache_weights if cache_weights is not None else [len(c) for c in loaded], float)
    if len(w) != len(loaded) or not (w >= 0).all() or w.sum() <= 0:
        raise RauInputError(f"cache_weights: expected {len(loaded)} non-negative weights, got {list(w)}")
    return loaded, [neighbours(c, n_neighbours) for c in loaded], w / w.sum()


def pick_reference(rng: np.random.Generator, near: np.ndarray, target: int, n: int, p_similar: float) -> int:
    """A reference for ``target``: with probability ``p_similar`` one of its neighbours, else any
    other of the ``n`` images (never the target itself)."""
    if rng.random() < p_similar:
        return int(near[target, rng.integers(near.shape[1])])
    return int((target + 1 + rng.integers(n - 1)) % n)


def make_pair(model: RefVlmModel, rng: np.random.Generator, cache: TokenCache, near: np.ndarray, target: int,
              structures_per_pair: int, p_similar: float) -> tuple[int, list[list[int]]]:
    """(reference index, blocks) for ``target``: each block = prompt + answer ids."""
    ref = pick_reference(rng, near, target, len(cache), p_similar)
    present = cache.present()
    in_ref = np.flatnonzero(present[ref])
    picks = rng.permutation(in_ref)[:structures_per_pair]
    v = model.vocab
    blocks = []
    for j in picks:
        visible = bool(present[target, j])
        block = v.prompt(cache.loc[ref, j], cache.codes[ref, j])
        block += v.answer(cache.loc[target, j] if visible else None, cache.codes[target, j] if visible else None)
        blocks.append(block)
    return ref, blocks


def make_batch(model: RefVlmModel, caches: list[TokenCache], nears: list[np.ndarray], weights: np.ndarray, seed: int,
               step: int, batch_size: int, structures_per_pair: int, p_similar: float, rank: int = 0, n_proc: int = 1):
    """Batch of step ``step`` for process ``rank``: (ref features, target features, blocks,
    pair index, answer mask, location mask) tensors."""
    import torch

    rng = np.random.default_rng([seed, step, rank, n_proc])
    v = model.vocab
    rf, tf, blocks, pair = [], [], [], []
    while len(rf) < batch_size:
        c = int(rng.choice(len(caches), p=weights))
        t = int(rng.integers(len(caches[c])))
        r, bl = make_pair(model, rng, caches[c], nears[c], t, structures_per_pair, p_similar)
        if not bl:
            continue
        pair += [len(rf)] * len(bl)
        rf.append(caches[c].features[r])
        tf.append(caches[c].features[t])
        blocks += bl
    ids = torch.tensor(blocks, dtype=torch.long)
    p = v.prompt_length
    ans = torch.zeros_like(ids, dtype=torch.bool)
    ans[:, p:] = ids[:, p:] != v.id["<pad>"]
    locm = torch.zeros_like(ans)
    locm[:, p + 1 : p + 5] = ans[:, p + 1 : p + 5]
    as_t = lambda a: torch.from_numpy(np.stack(a).astype(np.float32))  # noqa: E731
    return as_t(rf), as_t(tf), ids, torch.tensor(pair, dtype=torch.long), ans, locm


def train_refvlm(caches: Sequence[str | Path], out_dir: str | Path, *, steps: int, batch_size: int = 8, lr: float = 1e-3,
                 warmup: int = 100, seed: int = 0, structures_per_pair: int = 6, p_similar: float = 0.5,
                 n_neighbours: int = 10, loc_sigma: float = 4.0, init_from: str | Path | None = None,
                 config: dict[str, Any] | None = None, save_every: int = 200, log_every: int = 10,
                 threads: int | None = None, device: str = "auto", cache_weights: Sequence[float] | None = None,
                 command: str | None = None, progress: bool = True) -> Path:
    """Train (or fine-tune from ``init_from``) on token caches -> ``out_dir/final``. Resumable."""
    import torch


    if steps < 1 or batch_size < 1 or structures_per_pair < 1 or not lr > 0 or not 0 <= p_similar <= 1:
        raise RauInputError("steps, batch_size and structures_per_pair must be >= 1, lr > 0 and p_similar in [0, 1]")
    if threads:
        torch.set_num_threads(threads)
    loaded, nears, weights = load_pair_caches(caches, n_neighbours, cache_weights)
    if init_from is not None:
        model = RefVlmModel.from_pretrained(init_from)
    else:
        torch.manual_seed(seed)
        model = RefVlmModel(RefVlmConfig(**(config or {})))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_key = {"kind": "refvlm", "caches": [str(Path(c).resolve()) for c in caches], "steps": steps,
               "batch_size": batch_size, "lr": lr, "warmup": warmup, "seed": seed,
               "structures_per_pair": structures_per_pair, "p_similar": p_similar, "n_neighbours": n_neighbours,
               "loc_sigma": loc_sigma, "init_from": str(init_from) if init_from else None,
               "config": asdict(model.config), "cache_weights": [float(v) for v in weights]}
    def step_loss(net, step, acc):
        batch = make_batch(model, loaded, nears, weights, seed, step, batch_size, structures_per_pair, p_similar,
                           acc.process_index, acc.num_processes)
        rf, tf, ids, pair, ans, locm = (t.to(acc.device) for t in batch)
        with acc.autocast():
            logits = net(rf, tf, ids, pair)
        return answer_loss(logits, ids, ans, locm, loc_offset=model.vocab.loc_offset, bins=model.config.bins,
                           loc_sigma=loc_sigma)

    return run_training(model, out, run_key, step_loss, steps=steps, lr=lr, warmup=warmup, save_every=save_every,
                        log_every=log_every, device=device, command=command, progress=progress, desc="train rau vlm",
                        loss_label="loss (answer tokens)")
