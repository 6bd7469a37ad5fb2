"""Train the CheXanatomy VLM by next-token prediction on cached features (resumable, accelerate).

One training sequence = one image's tokens followed by ``tasks_per_seq`` task blocks (detect /
segment / name, see :mod:`rau.models.chex.configuration`) about structures annotated in that image; only answer
tokens are supervised. Step ``s`` draws its batch from ``numpy.random.default_rng([seed, s])``
alone, so a resumed run sees exactly the data of an uninterrupted one.

Output folder::

    config.json           the run: ChexConfig, hyper-parameters, caches, command, versions
    loss.json, loss.png   per-step loss and lr (atomic rewrites)
    checkpoint-<step>/    model.safetensors, optimizer.pt, state.json (last 2 kept; written to a
                          .tmp-* folder and renamed, so a kill leaves the previous one intact)
    final/                the trained model (ChexModel.from_pretrained) + training.json

Rerunning the same command resumes from the latest checkpoint; a different configuration in the
same folder raises RauInputError. The accelerate loop runs unchanged on a GPU (bf16 autocast) and
under ``accelerate launch`` (data is split by process rank).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from rau.data.caches import TokenCache, load_cache
from rau.models.chex.configuration import ChexConfig
from rau.models.chex.modeling import ChexModel
from rau.models.decoder import answer_loss
from rau.errors import RauInputError
from rau.training.engine import run_training

DEFAULT_TASK_MIX = {"segment": 0.5, "detect": 0.25, "name": 0.25}


def make_sequence(model: ChexModel, rng: np.random.Generator, cache: TokenCache, index: int, name_map: list[int | None],
                  tasks_per_seq: int, task_mix: dict[str, float]) -> tuple[list[int], list[bool], list[bool]]:
    """(ids, answer mask, location mask) for image ``index`` of ``cache`` (task tokens only; the
    image tokens are prepended by the network)."""
    vocab = model.vocab
    present = [j for j in np.flatnonzero(cache.present()[index]) if name_map[j] is not None]
    if not present:
        return [], [], []
    picks = rng.permutation(present)[:tasks_per_seq]
    kinds, p = list(task_mix), np.array(list(task_mix.values()), float)
    ids: list[int] = []
    ans: list[bool] = []
    locm: list[bool] = []
    for j in picks:
        task = kinds[rng.choice(len(kinds), p=p / p.sum())]
        name = model.config.names[name_map[j]]
        loc = [int(v) for v in cache.loc[index, j]]
        codes = [int(v) for v in cache.codes[index, j]] if task == "segment" else None
        block, n_ans = vocab.block(task, name=name, loc=loc, codes=codes)
        ids += block
        ans += [False] * (len(block) - n_ans) + [True] * n_ans
        is_loc = [task in ("detect", "segment") and k < 4 for k in range(n_ans)]
        locm += [False] * (len(block) - n_ans) + is_loc
    return ids, ans, locm


def make_batch(model: ChexModel, caches: list[TokenCache], name_maps: list[list[int | None]], weights: np.ndarray,
               seed: int, step: int, batch_size: int, tasks_per_seq: int, task_mix: dict[str, float],
               rank: int = 0, n_proc: int = 1):
    """Batch of step ``step`` for process ``rank``: (features, ids, answer mask, loc mask) tensors."""
    import torch

    rng = np.random.default_rng([seed, step, rank, n_proc])
    feats, seqs = [], []
    while len(seqs) < batch_size:
        c = int(rng.choice(len(caches), p=weights))
        i = int(rng.integers(len(caches[c])))
        seq = make_sequence(model, rng, caches[c], i, name_maps[c], tasks_per_seq, task_mix)
        if seq[0]:
            feats.append(caches[c].features[i])
            seqs.append(seq)
    t = max(len(s[0]) for s in seqs)
    pad = model.vocab.id["<pad>"]
    ids = torch.full((len(seqs), t), pad, dtype=torch.long)
    ans = torch.zeros((len(seqs), t), dtype=torch.bool)
    locm = torch.zeros((len(seqs), t), dtype=torch.bool)
    for b, (s_ids, s_ans, s_loc) in enumerate(seqs):
        ids[b, : len(s_ids)] = torch.tensor(s_ids)
        ans[b, : len(s_ids)] = torch.tensor(s_ans)
        locm[b, : len(s_ids)] = torch.tensor(s_loc)
    return torch.from_numpy(np.stack(feats).astype(np.float32)), ids, ans, locm


def train_chex(caches: Sequence[str | Path], out_dir: str | Path, *, steps: int, batch_size: int = 8, lr: float = 5e-4,
               warmup: int = 100, seed: int = 0, tasks_per_seq: int = 8, task_mix: dict[str, float] | None = None,
               loc_sigma: float = 4.0, init_from: str | Path | None = None, config: dict[str, Any] | None = None,
               save_every: int = 200, log_every: int = 10, threads: int | None = None, device: str = "auto",
               cache_weights: Sequence[float] | None = None, command: str | None = None, progress: bool = True) -> Path:
    """Train (or fine-tune from ``init_from``) on token caches -> ``out_dir/final``. Resumable."""
    import torch


    if steps < 1 or batch_size < 1 or tasks_per_seq < 1 or not lr > 0:
        raise RauInputError("steps, batch_size and tasks_per_seq must be >= 1 and lr > 0")
    if threads:
        torch.set_num_threads(threads)
    task_mix = dict(task_mix or DEFAULT_TASK_MIX)
    loaded = [load_cache(c) for c in caches]
    if init_from is not None:
        model = ChexModel.from_pretrained(init_from)
    else:
        names: list[str] = []
        for c in loaded:
            names += [n for n in c.names if n not in names]
        torch.manual_seed(seed)
        model = ChexModel(ChexConfig(names=names, **(config or {})))
    known = {n: k for k, n in enumerate(model.config.names)}
    name_maps = [[known.get(n) for n in c.names] for c in loaded]
    usable = [bool((c.present()[:, [j for j, m in enumerate(nm) if m is not None]]).any()) for c, nm in zip(loaded, name_maps)]
    if not any(usable):
        raise RauInputError(f"caches: no image holds a structure the model knows ({', '.join(model.config.names)})")
    w = np.array(cache_weights if cache_weights is not None else [len(c) for c in loaded], float)
    if len(w) != len(loaded) or not (w >= 0).all() or w.sum() <= 0:
        raise RauInputError(f"cache_weights: expected {len(loaded)} non-negative weights, got {list(w)}")
    w = w * np.array(usable, float)  # a cache without a usable structure is never drawn
    weights = w / w.sum()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_key = {"caches": [str(Path(c).resolve()) for c in caches], "steps": steps, "batch_size": batch_size, "lr": lr,
               "warmup": warmup, "seed": seed, "tasks_per_seq": tasks_per_seq, "task_mix": task_mix, "loc_sigma": loc_sigma,
               "init_from": str(init_from) if init_from else None, "config": asdict(model.config),
               "cache_weights": [float(v) for v in weights]}
    def step_loss(net, step, acc):
        feats, ids, ans, locm = make_batch(model, loaded, name_maps, weights, seed, step, batch_size, tasks_per_seq,
                                           task_mix, acc.process_index, acc.num_processes)
        feats, ids, ans, locm = (t.to(acc.device) for t in (feats, ids, ans, locm))
        with acc.autocast():
            logits = net(feats, ids)
        return answer_loss(logits, ids, ans, locm, loc_offset=model.vocab.loc_offset, bins=model.config.bins,
                           loc_sigma=loc_sigma)

    return run_training(model, out, run_key, step_loss, steps=steps, lr=lr, warmup=warmup, save_every=save_every,
                        log_every=log_every, device=device, command=command, progress=progress, desc="train chex", loss_label="loss (answer tokens)")
