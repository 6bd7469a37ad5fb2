"""CheXanatomy VLM: a Qwen2 decoder that reads a radiograph and answers with box and mask tokens.

Architecture (LLaVA-style, sized for a 2-core CPU; shared parts in :mod:`rau.models.decoder`):

- **Vision tower**: LiteMedSAM's pretrained TinyViT image encoder (:mod:`rau.encoders.litemedsam`;
  the only pretrained medical image weights available here), FROZEN. The radiograph is
  histogram-equalised, put in LiteMedSAM's 256 x 256 frame (longest side 256, aspect kept, padded
  bottom/right: for a square image the frame is the whole image, so location bins and the feature
  grid align), encoded to (256, 64, 64) and average-pooled to ``grid`` x ``grid`` (16 x 16) = 256
  image tokens. Training runs on cached features (:mod:`rau.data.caches`), which is what makes
  training on a CPU possible.
- **Projector**: LayerNorm -> Linear -> GELU -> Linear to the decoder width, plus a learned
  position embedding per image token.
- **Decoder**: ``transformers.Qwen2ForCausalLM`` (the language-model architecture of Qwen2.5-VL)
  built from a small config and trained from scratch, with its own vocabulary
  (:class:`~rau.models.chex.configuration.ChexVocab`, which also describes the task blocks).

Training is next-token prediction on the answer tokens (location tokens with Gaussian-smoothed
targets over neighbouring bins, :func:`rau.models.decoder.answer_loss`). Generation is greedy and
constrained to the grammar (a location slot can only emit a location token, a code slot a code), so
every answer decodes; the mask tokenizer still checks the box (inverted or empty boxes give "not
found" with a reason).

Folder format (``save_pretrained`` / ``from_pretrained``): ``config.json``
(:class:`~rau.models.chex.configuration.ChexConfig`), ``model.safetensors`` (projector, image
positions and decoder; not the frozen encoder) and optionally ``training.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rau.models.chex.configuration import FORMAT, ChexConfig, ChexVocab
from rau.models.decoder import (
    DecoderFolderModel,
    build_lm,
    build_projector,
    encode_features,
    init_geometry,
    lm_step,
)

__all__ = ["Answer", "ChexConfig", "ChexModel", "ChexVocab", "build_model"]


def _build_network(config: ChexConfig, vocab_size: int, loc_offset: int):
    import torch
    from torch import nn

    class ChexNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            c = config
            self.projector = build_projector(c)
            self.image_pos = nn.Parameter(torch.randn(c.grid * c.grid, c.hidden_size) * 0.02)
            self.lm = build_lm(c, vocab_size, c.grid * c.grid + 512)
            init_geometry(self.image_pos, self.lm, c, loc_offset)

        def image_embeds(self, features):
            x = features.flatten(2).transpose(1, 2).to(self.image_pos.dtype)  # (B, g*g, C)
            return self.projector(x) + self.image_pos

        def forward(self, features, input_ids):
            """(B, C, g, g) features + (B, T) ids -> (B, T, V) logits; logits[:, t] predicts ids[:, t]."""
            img = self.image_embeds(features)
            emb = torch.cat([img, self.lm.get_input_embeddings()(input_ids)], dim=1)
            logits = self.lm(inputs_embeds=emb, use_cache=False).logits
            return logits[:, img.shape[1] - 1 : -1]

    return ChexNet()


@dataclass
class Answer:
    """One generated answer: the answer token ids (model vocabulary), per-token probabilities of
    the chosen tokens, and for segment/detect the decoded loc/codes in tokenizer numbering."""

    task: str
    ids: list[int]
    probs: list[float]
    loc: tuple[int, ...] | None = None
    codes: tuple[int, ...] | None = None
    name: str | None = None

    @property
    def score(self) -> float:
        return float(np.exp(np.mean(np.log(np.clip(self.probs, 1e-9, 1.0))))) if self.probs else 0.0


class ChexModel(DecoderFolderModel):
    """The CheXanatomy VLM: config + vocabulary + network (frozen encoder loaded on demand)."""

    FORMAT, CONFIG, LABEL, OPTION = FORMAT, ChexConfig, "CheXanatomy model", "--chex"

    def __init__(self, config: ChexConfig, net=None, *, device: str = "cpu", training: dict | None = None):
        self.config, self.vocab, self.device = config, ChexVocab(config), device
        self.net = (net if net is not None else _build_network(config, len(self.vocab), self.vocab.loc_offset)).to(device)
        self.training = training or {}

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.net.parameters())
        return f"ChexModel({len(self.config.names)} structures, {n / 1e6:.2f}M parameters, vocab {len(self.vocab)})"

    # ---- inference
    def encode(self, images: Sequence[np.ndarray], progress: bool = False, precision: str | None = None):
        """Images -> (N, feature_dim, grid, grid) features (:func:`rau.models.decoder.encode_features`)."""
        return encode_features(images, self.config, device=self.device, progress=progress, precision=precision)

    def generate(self, features, prompts: list[tuple[str, list[int]]]) -> list[Answer]:
        """Greedy, grammar-constrained answers for prompts on ONE image's features (1, C, g, g).

        ``prompts``: (task, prompt ids) of one task kind per call (equal lengths), batched; the
        image prefix is computed once and shared through the KV cache."""
        import torch

        if not prompts:
            return []
        tasks = {t for t, _ in prompts}
        if len(tasks) != 1 or len({len(p) for _, p in prompts}) != 1:
            raise ValueError("generate: one task kind (and prompt length) per call")
        task = tasks.pop()
        n = len(prompts)
        net, vocab = self.net, self.vocab
        was_training = net.training
        net.eval()
        with torch.inference_mode():
            feats = torch.as_tensor(features, dtype=torch.float32, device=self.device)
            img = net.image_embeds(feats).expand(n, -1, -1)
            ids = torch.tensor([p for _, p in prompts], dtype=torch.long, device=self.device)
            emb = torch.cat([img, net.lm.get_input_embeddings()(ids)], dim=1)
            logits, past = lm_step(net.lm, None, inputs_embeds=emb)
            chosen, probs = [], []
            for pos in range(vocab.answer_length(task)):
                allowed = torch.as_tensor(vocab.allowed(task, pos), device=self.device)
                p = torch.softmax(logits[:, allowed].float(), dim=-1)
                best = p.argmax(-1)
                tok = allowed[best]
                chosen.append(tok)
                probs.append(p.gather(-1, best[:, None])[:, 0])
                if pos + 1 < vocab.answer_length(task):
                    logits, past = lm_step(net.lm, past, input_ids=tok[:, None])
        net.train(was_training)
        toks = torch.stack(chosen, 1).cpu().numpy()
        prob = torch.stack(probs, 1).cpu().numpy()
        return [self._answer(task, row, pr) for row, pr in zip(toks, prob)]

    def _answer(self, task: str, row, probs) -> Answer:
        vocab = self.vocab
        a = Answer(task, [int(t) for t in row], [float(v) for v in probs])
        if task == "name":
            a.name = vocab.ids_to_name(a.ids)
        else:
            a.loc = tuple(int(t) - vocab.loc_offset for t in row[:4])
            if task == "segment":
                a.codes = tuple(int(t) - vocab.seg_offset for t in row[4:])
        return a

    def segment(self, features, names: Sequence[str]) -> dict[str, Answer]:
        prompts = [("segment", self.vocab.block("segment", name=n)[0]) for n in names]
        return dict(zip(names, self.generate(features, prompts)))

    def detect(self, features, names: Sequence[str]) -> dict[str, Answer]:
        prompts = [("detect", self.vocab.block("detect", name=n)[0]) for n in names]
        return dict(zip(names, self.generate(features, prompts)))

    def name_boxes(self, features, locs: Sequence[Sequence[int]]) -> list[tuple[str, dict[str, float]]]:
        """Name the structure in each box (location tokens): scores every known name by its
        likelihood (teacher-forced, one batch) -> (best name, {name: probability})."""
        import torch
        import torch.nn.functional as F

        names, vocab, net = self.config.names, self.vocab, self.net
        results = []
        with torch.inference_mode():
            feats = torch.as_tensor(features, dtype=torch.float32, device=self.device).expand(len(names), -1, -1, -1)
            for loc in locs:
                seqs = [vocab.block("name", loc=loc, name=n)[0] for n in names]
                ids = torch.tensor(seqs, dtype=torch.long, device=self.device)
                logp = F.log_softmax(net(feats, ids).float(), -1)
                q = vocab.config.q_words
                ll = logp[:, -q:].gather(-1, ids[:, -q:, None])[..., 0].sum(-1)
                p = torch.softmax(ll, 0).cpu().numpy()
                results.append((names[int(p.argmax())], {n: float(v) for n, v in zip(names, p)}))
        return results


def build_model(names: Sequence[str], seed: int = 0, device: str = "cpu", **overrides) -> ChexModel:
    """A fresh model (random decoder) for ``names``; ``overrides`` change :class:`ChexConfig` fields."""
    import torch

    torch.manual_seed(seed)
    return ChexModel(ChexConfig(names=list(names), **overrides), device=device)
