"""The compact RAU VLM: a Qwen2 decoder that reads an annotated reference and a target and answers,
for every structure of the reference, whether it is in the target, its box and its mask.

It is RAU's localizer (arXiv 2509.22404) cut to what trains and runs on a 2-core CPU:

- **Vision tower**: LiteMedSAM's pretrained TinyViT encoder, FROZEN (the only pretrained medical
  image weights available offline; :func:`rau.models.decoder.encode_features`): each image is
  histogram-equalised, put in LiteMedSAM's 256 x 256 frame (longest side 256, aspect kept, padded
  bottom/right; a square image fills it), encoded and pooled to 16 x 16 tokens. The target's
  encoding is the one LiteMedSAM's mask decoder uses too, so one encoder pass per target serves
  localizer and segmenter (:class:`rau.methods.rau_vlm.RefVlmLocalizer`), and training runs on
  cached features.
- **Projector**: shared LayerNorm -> Linear -> GELU -> Linear, a learned position embedding per
  image cell and a learned role embedding (reference / target).
- **Decoder**: ``transformers.Qwen2ForCausalLM`` (the language model of Qwen2.5-VL) built from a
  small config and trained from scratch, with its own vocabulary: a few specials, 1024 location
  tokens, the mask tokenizer's 512 codes.

Sequence: 256 reference tokens, 256 target tokens (the shared prefix), then one block per
structure. The reference annotation enters as tokens, RAU's "annotation drawn on the reference"
in token form: the structure's reference box (4 location tokens) and reference mask (16 codes of
the shipped mask tokenizer, :mod:`rau.tokens.masktok`)::

    <q> rloc x4 rseg x16 <ans> | <yes> tloc x4 tseg x16        (structure visible in the target)
    <q> rloc x4 rseg x16 <ans> | <no>                            (not visible; the rest is padding)

Structure NAMES are never shown: what to find is defined by the reference annotation alone, so one
model serves any anatomy it was trained on (chest X-ray, DRR, coronary angiography). Every block
attends to the prefix and to itself only (blocks are independent): the prefix is computed once and
its KV cache shared by all structures, in training (gradients flow through the cache) and in
inference (all structures of a target decoded in one batch). Generation is greedy and constrained
to the grammar, so every answer decodes.

Shared decoder parts: :mod:`rau.models.decoder`. Folder format: ``config.json``
(:class:`~rau.models.refvlm.configuration.RefVlmConfig`), ``model.safetensors``, optional
``training.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rau.models.decoder import (
    DecoderFolderModel,
    build_lm,
    build_projector,
    cache_key,
    encode_features,
    init_geometry,
    lm_step,
)
from rau.models.refvlm.configuration import FORMAT, RefVlmConfig, RefVocab

__all__ = ["BOX_TOKENS", "RefVlmConfig", "RefVlmModel", "RefVocab", "StructureAnswer", "answer_logprobs", "assign_boxes",
           "build_model", "generate", "select_cache"]


def select_cache(past, index):
    """Rows ``index`` (may repeat) of a decoder KV cache, keeping the autograd graph: every
    structure block of a pair reuses that pair's prefix. Handles transformers 5.x
    (``batch_select_indices``) and older ``key_cache`` lists."""
    if hasattr(past, "batch_select_indices"):
        past.batch_select_indices(index)
        return past
    for i in range(len(past.key_cache)):  # pragma: no cover - older transformers
        past.key_cache[i], past.value_cache[i] = past.key_cache[i][index], past.value_cache[i][index]
    return past


def _build_network(config: RefVlmConfig, vocab_size: int, loc_offset: int):
    import torch
    from torch import nn

    class RefVlmNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            c = config
            self.projector = build_projector(c)
            self.image_pos = nn.Parameter(torch.zeros(c.grid * c.grid, c.hidden_size))
            self.image_role = nn.Parameter(torch.randn(2, c.hidden_size) * 0.02)  # 0 reference, 1 target
            self.lm = build_lm(c, vocab_size, 2 * c.grid * c.grid + 256)
            init_geometry(self.image_pos, self.lm, c, loc_offset)

        def prefix_embeds(self, ref_features, tgt_features):
            """(B, C, g, g) x 2 -> (B, 2 g^2, hidden): reference tokens, then target tokens."""
            parts = []
            for role, f in enumerate((ref_features, tgt_features)):
                x = f.flatten(2).transpose(1, 2).to(self.image_pos.dtype)
                parts.append(self.projector(x) + self.image_pos + self.image_role[role])
            return torch.cat(parts, dim=1)

        def prefix(self, ref_features, tgt_features):
            """The shared prefix -> its KV cache."""
            _, past = lm_step(self.lm, None, inputs_embeds=self.prefix_embeds(ref_features, tgt_features))
            return past

        def forward(self, ref_features, tgt_features, blocks, pair_index):
            """Teacher-forced logits of structure blocks.

            ``blocks`` (N, T) ids, ``pair_index`` (N,) which pair (row of the features) each block
            belongs to -> (N, T, V) logits where logits[:, t] predicts blocks[:, t] (t >= 1)."""
            past = select_cache(self.prefix(ref_features, tgt_features), pair_index)
            logits = self.lm(input_ids=blocks, use_cache=True, **{cache_key(self.lm.forward): past}).logits
            return torch.cat([logits[:, :1] * 0, logits[:, :-1]], dim=1)

    return RefVlmNet()


#: Answer tokens up to and including the box: ``<yes>``/``<no>`` + 4 location tokens.
BOX_TOKENS = 5


@dataclass
class StructureAnswer:
    """One structure: visible?, P(yes), loc/codes (tokenizer numbering) and the chosen tokens' probabilities."""

    visible: bool
    p_yes: float
    loc: tuple[int, ...]
    codes: tuple[int, ...]
    probs: list[float]

    @property
    def box_score(self) -> float:
        """Geometric mean probability of the 4 location tokens."""
        return float(np.exp(np.mean(np.log(np.clip(self.probs[1:5], 1e-9, 1.0)))))


class RefVlmModel(DecoderFolderModel):
    """The compact RAU VLM: config + vocabulary + network (frozen encoder loaded on demand).
    Persistence (model folder, fp16 option, errors) is :class:`rau.models.decoder.DecoderFolderModel`'s."""

    FORMAT, CONFIG, LABEL, OPTION = FORMAT, RefVlmConfig, "RAU VLM", "--vlm"

    def __init__(self, config: RefVlmConfig, net=None, *, device: str = "cpu", training: dict | None = None):
        self.config, self.vocab, self.device = config, RefVocab(config), device
        v = self.vocab
        self.net = (net if net is not None else _build_network(config, len(v), v.loc_offset)).to(device)
        self.training = training or {}

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.net.parameters())
        return f"RefVlmModel({n / 1e6:.2f}M parameters, vocab {len(self.vocab)})"

    # ---- inference
    def encode(self, images: Sequence[np.ndarray], progress: bool = False, precision: str | None = None):
        """Images -> (N, feature_dim, grid, grid) features (:func:`rau.models.decoder.encode_features`)."""
        return encode_features(images, self.config, device=self.device, progress=progress, precision=precision)

    def answer(self, ref_features, tgt_features, ref_tokens: Sequence[tuple[Sequence[int], Sequence[int]]],
               *, return_cache: bool = False, box_only: bool = False):
        """Greedy, grammar-constrained answers for every reference structure (its (loc, codes)
        tokens) on one pair of (1, C, g, g) features: the prefix is computed once, all structures
        decode in one batch. ``return_cache``: -> (answers, the decoding's KV cache, one row per
        structure; see :func:`generate`). ``box_only``: stop after the box (answers' ``codes`` are
        empty; 5 decoding steps instead of 21)."""
        import torch

        n = len(ref_tokens)
        if n == 0:
            return ([], None) if return_cache else []
        vocab = self.vocab
        rf = torch.as_tensor(ref_features, dtype=torch.float32, device=self.device)
        tf = torch.as_tensor(tgt_features, dtype=torch.float32, device=self.device)
        prompts = torch.tensor([vocab.prompt(loc, codes) for loc, codes in ref_tokens], dtype=torch.long, device=self.device)
        toks, prob, p_yes, *past = generate(self.net, vocab, rf, tf, prompts, torch.zeros(n, dtype=torch.long, device=self.device),
                                            return_cache=return_cache, n_tokens=BOX_TOKENS if box_only else None)
        out = []
        for row, pr, py in zip(toks.cpu().numpy(), prob.cpu().numpy(), p_yes.cpu().numpy()):
            out.append(StructureAnswer(bool(py >= 0.5), float(py), tuple(int(t) - vocab.loc_offset for t in row[1:5]),
                                       tuple(int(t) - vocab.seg_offset for t in row[5:]), [float(v) for v in pr]))
        return (out, past[0]) if return_cache else out

    def box_loglik(self, ref_features, tgt_features, ref_tokens: Sequence[tuple[Sequence[int], Sequence[int]]],
                   candidates: Sequence[Sequence[int]]) -> np.ndarray:
        """(N structures, M candidate boxes) log-likelihood of each candidate's 4 location tokens
        after structure i's prompt and ``<yes>`` (teacher-forced, one batch over the shared prefix).
        The cost matrix of :func:`assign_boxes`."""
        import torch
        import torch.nn.functional as F

        n, m = len(ref_tokens), len(candidates)
        if n == 0 or m == 0:
            return np.zeros((n, m))
        v, net = self.vocab, self.net
        rows = [v.prompt(loc, codes) + [v.id["<yes>"], *(v.loc_offset + int(t) for t in cand)]
                for loc, codes in ref_tokens for cand in candidates]
        was_training = net.training
        net.eval()
        with torch.inference_mode():
            rf = torch.as_tensor(ref_features, dtype=torch.float32, device=self.device)
            tf = torch.as_tensor(tgt_features, dtype=torch.float32, device=self.device)
            ids = torch.tensor(rows, dtype=torch.long, device=self.device)
            logp = F.log_softmax(net(rf, tf, ids, torch.zeros(len(rows), dtype=torch.long, device=self.device)).float(), -1)
            ll = logp[:, -4:].gather(-1, ids[:, -4:, None])[..., 0].sum(-1)
        net.train(was_training)
        return ll.reshape(n, m).cpu().numpy()


def generate(net, vocab: RefVocab, ref_features, tgt_features, prompts, pair_index, *, temperature: float = 0.0,
             generator=None, return_cache: bool = False, n_tokens: int | None = None):
    """Grammar-constrained answers of a batch of structure blocks (no gradients).

    ``prompts`` (N, prompt_length) ids, ``pair_index`` (N,) row of the (B, C, g, g) features each
    belongs to; the prefix of each pair is computed once. ``temperature`` 0 = greedy, else sampling
    with ``generator``. The box and mask are always decoded (after ``<yes>``, a ranked guess where
    the answer is ``<no>``). Returns (tokens (N, answer_length) with position 0 the chosen
    ``<yes>``/``<no>``, the chosen tokens' probabilities (N, answer_length) under the temperature-1
    distribution, P(yes) (N,)); with ``return_cache`` also the KV cache of every row's prefix, prompt
    and answer but its last token (what a ``<seg>`` query continues from). ``n_tokens``: stop after
    the first n answer tokens (5 = ``<yes>``/``<no>`` + the box: what a box-only ``<seg>`` head
    reads); default the whole answer."""
    import torch

    length = vocab.answer_length if n_tokens is None else int(n_tokens)
    if not 1 <= length <= vocab.answer_length:
        raise ValueError(f"n_tokens: {n_tokens} is not in 1..{vocab.answer_length}")
    was_training = net.training
    net.eval()
    with torch.inference_mode():
        past = select_cache(net.prefix(ref_features, tgt_features), pair_index)
        logits, past = lm_step(net.lm, past, input_ids=prompts)
        chosen, probs, p_yes, first = [], [], None, None
        for pos in range(length):
            allowed = torch.as_tensor(vocab.allowed(pos), device=prompts.device)
            z = logits[:, allowed].float()
            p = torch.softmax(z, dim=-1)
            if temperature > 0:
                pick = torch.multinomial(torch.softmax(z / temperature, dim=-1).cpu(), 1, generator=generator)[:, 0].to(p.device)
            else:
                pick = p.argmax(-1)
            tok = allowed[pick]
            if pos == 0:
                p_yes, first = p[:, 0], tok
                tok = torch.full_like(tok, vocab.id["<yes>"])  # decode the box and mask even after "no"
            chosen.append(tok)
            probs.append(p.gather(-1, pick[:, None])[:, 0])
            if pos + 1 < length:
                logits, past = lm_step(net.lm, past, input_ids=tok[:, None])
    net.train(was_training)
    toks = torch.stack(chosen, 1)
    toks[:, 0] = first
    if return_cache:
        return toks, torch.stack(probs, 1), p_yes, past
    return toks, torch.stack(probs, 1), p_yes


def answer_logprobs(logits, ids, vocab: RefVocab):
    """Per answer token log-probabilities under the grammar (the distribution :func:`generate`
    samples from): ``logits`` (N, T, V) teacher-forced (logits[:, t] predicts ids[:, t]) -> (N,
    answer_length) log p of ``ids``' answer tokens, and the mask of tokens that count (everything
    after a ``<no>`` is padding)."""
    import torch

    p0 = vocab.prompt_length
    z = logits[:, p0:].float()
    a = ids[:, p0:]
    groups = [(0, 1, vocab.allowed(0)), (1, 5, vocab.allowed(1)), (5, vocab.answer_length, vocab.allowed(5))]
    out = []
    for lo, hi, allowed in groups:
        allowed = torch.as_tensor(allowed, device=ids.device)
        lp = torch.log_softmax(z[:, lo:hi][..., allowed], dim=-1)
        idx = torch.searchsorted(allowed, a[:, lo:hi].clamp(min=int(allowed[0]), max=int(allowed[-1])))
        out.append(lp.gather(-1, idx[..., None])[..., 0])
    mask = torch.ones_like(a, dtype=torch.bool)
    mask[:, 1:] = (a[:, :1] == vocab.id["<yes>"])
    return torch.cat(out, dim=1), mask


def assign_boxes(loglik: np.ndarray) -> np.ndarray:
    """One-to-one assignment of candidate boxes to structures maximising the total log-likelihood
    (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``): row i -> column ``out[i]``, so
    two structures never claim the same box. Needs at least as many candidates as structures."""
    from scipy.optimize import linear_sum_assignment

    ll = np.asarray(loglik, float)
    if ll.ndim != 2 or ll.shape[1] < ll.shape[0]:
        raise ValueError(f"assign_boxes: need an (N, M>=N) matrix, got {ll.shape}")
    rows, cols = linear_sum_assignment(-ll)
    out = np.empty(ll.shape[0], int)
    out[rows] = cols
    return out


def build_model(seed: int = 0, device: str = "cpu", **overrides) -> RefVlmModel:
    """A fresh model (random decoder); ``overrides`` change :class:`RefVlmConfig` fields."""
    import torch

    torch.manual_seed(seed)
    return RefVlmModel(RefVlmConfig(**overrides), device=device)
