"""The mask tokenizer's network: :class:`MaskVQVAE`, a small conv VQ-VAE with an EMA codebook.

(B, 1, S, S) coverage crops in [0, 1] -> (B, grid * grid) code ids -> (B, 1, S, S) logits; S = 64 and
a 4 x 4 grid (16 tokens) by default. The tokenizer around it (masks <-> tokens, save/load, the
shipped weights) is :mod:`rau.tokens.masktok`.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rau.errors import RauInputError


@dataclass
class MaskTokConfig:
    """Architecture and VQ settings.

    size: crop side (64); grid: latent grid side (4 -> 16 tokens); channels: encoder widths, one
    per stride-2 stage, so ``size / grid == 2 ** len(channels)``; codebook_size K (<= 1000, ids are
    written with 3 digits); code_dim D; bins: location bins (1024); beta: commitment weight;
    decay: EMA decay of the codebook; dead_threshold: EMA usage count below which a code is
    re-seeded from the batch's latents; dice_weight: soft-Dice term added to the BCE loss."""

    size: int = 64
    grid: int = 4
    channels: tuple[int, ...] = (16, 32, 64, 96)
    codebook_size: int = 512
    code_dim: int = 32
    bins: int = 1024
    beta: float = 0.25
    decay: float = 0.99
    dead_threshold: float = 1.0
    dice_weight: float = 1.0

    def __post_init__(self) -> None:
        self.channels = tuple(self.channels)
        _require_int(self, "size", 8, 1024)
        _require_int(self, "grid", 1, 64)
        _require_int(self, "codebook_size", 2, 1000)
        _require_int(self, "code_dim", 1, 4096)
        _require_int(self, "bins", 2, 10000)
        if not self.channels or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in self.channels):
            raise RauInputError(f"channels: expected positive integers, one per stride-2 stage, got {self.channels!r}")
        if self.size != self.grid * 2 ** len(self.channels):
            raise RauInputError(
                f"channels: {len(self.channels)} stride-2 stages map size {self.size} to "
                f"{self.size / 2 ** len(self.channels):g}, not grid {self.grid}; use "
                f"log2(size / grid) stages"
            )
        for name, lo, hi in (("beta", 0.0, 100.0), ("decay", 0.0, 0.99999), ("dead_threshold", 0.0, 1e6), ("dice_weight", 0.0, 100.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                raise RauInputError(f"{name}: expected a number in [{lo}, {hi}], got {v!r}")

    @property
    def n_codes(self) -> int:
        return self.grid * self.grid


def _require_int(cfg: Any, name: str, lo: int, hi: int) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise RauInputError(f"{name}: expected an integer in [{lo}, {hi}], got {v!r}")


class _Stack(nn.Module):
    """Convs without normalisation (deterministic, batch-size independent)."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _encoder(cfg: MaskTokConfig) -> nn.Module:
    layers: list[nn.Module] = []
    cin = 1
    for c in cfg.channels:
        layers += [nn.Conv2d(cin, c, 4, 2, 1), nn.SiLU()]
        cin = c
    layers += [nn.Conv2d(cin, cin, 3, 1, 1), nn.SiLU(), nn.Conv2d(cin, cfg.code_dim, 1)]
    return _Stack(layers)


def _decoder(cfg: MaskTokConfig) -> nn.Module:
    widths = list(cfg.channels[::-1]) + [1]
    layers: list[nn.Module] = [nn.Conv2d(cfg.code_dim, widths[0], 3, 1, 1), nn.SiLU(),
                               nn.Conv2d(widths[0], widths[0], 3, 1, 1), nn.SiLU()]
    for a, b in pairwise(widths):
        layers.append(nn.ConvTranspose2d(a, b, 4, 2, 1))
        if b != 1:
            layers.append(nn.SiLU())
    return _Stack(layers)


class EMAQuantizer(nn.Module):
    """Vector quantizer with an EMA-updated codebook (K, D) and dead-code re-seeding.

    Buffers: ``embed`` (K, D) codebook; ``cluster_size`` (K,) EMA of how many latents each code
    takes per batch; ``embed_sum`` (K, D) EMA of their sum; ``initialized`` (1,) 0/1."""

    def __init__(self, codebook_size: int, code_dim: int, decay: float, dead_threshold: float):
        super().__init__()
        self.decay = decay
        self.dead_threshold = dead_threshold
        self.register_buffer("embed", torch.zeros(codebook_size, code_dim))
        self.register_buffer("cluster_size", torch.zeros(codebook_size))
        self.register_buffer("embed_sum", torch.zeros(codebook_size, code_dim))
        self.register_buffer("initialized", torch.zeros(1))

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """(N, D) latents -> (N,) nearest code ids (squared L2)."""
        dist = (z * z).sum(1, keepdim=True) - 2.0 * z @ self.embed.T + (self.embed * self.embed).sum(1)[None]
        return dist.argmin(1)

    def _pick(self, z: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
        return z[torch.randint(z.shape[0], (n,), generator=generator)]

    @torch.no_grad()
    def update(self, z: torch.Tensor, ids: torch.Tensor, generator: torch.Generator | None, restart: bool) -> None:
        """EMA codebook step on (N, D) latents ``z`` assigned to ``ids``; then re-seed dead codes."""
        onehot = F.one_hot(ids, self.embed.shape[0]).type(z.dtype)
        self.cluster_size.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(onehot.T @ z, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        k = self.embed.shape[0]
        smoothed = (self.cluster_size + 1e-5) / (n + k * 1e-5) * n
        self.embed.copy_(self.embed_sum / smoothed[:, None])
        if restart:
            dead = self.cluster_size < self.dead_threshold
            n_dead = int(dead.sum())
            if n_dead:
                fresh = self._pick(z, n_dead, generator)
                self.embed[dead] = fresh
                self.embed_sum[dead] = fresh
                self.cluster_size[dead] = 1.0

    @torch.no_grad()
    def init_from(self, z: torch.Tensor, generator: torch.Generator | None) -> None:
        """Seed the codebook with random latents of the first batch."""
        fresh = self._pick(z, self.embed.shape[0], generator)
        self.embed.copy_(fresh)
        self.embed_sum.copy_(fresh)
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(1.0)


@dataclass
class VQOutput:
    """logits (B, 1, S, S); codes (B, grid*grid) row-major; commit: commitment loss (scalar);
    perplexity: exp(entropy) of the batch's code usage."""

    logits: torch.Tensor
    codes: torch.Tensor
    commit: torch.Tensor
    perplexity: float


class MaskVQVAE(nn.Module):
    """(B, 1, 64, 64) coverage in [0, 1] -> (B, 16) code ids -> (B, 1, 64, 64) logits.

    Encoder: len(channels) stride-2 4x4 convs + a 3x3 conv + 1x1 to D; quantizer: :class:`EMAQuantizer`;
    decoder: two 3x3 convs + mirrored 4x4 stride-2 transposed convs to one logit channel."""

    def __init__(self, config: MaskTokConfig):
        super().__init__()
        self.config = config
        self.encoder = _encoder(config)
        self.decoder = _decoder(config)
        self.quantizer = EMAQuantizer(config.codebook_size, config.code_dim, config.decay, config.dead_threshold)

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) -> (B, g*g, D) latents, row-major over the grid."""
        z = self.encoder(x * 2.0 - 1.0)
        return z.flatten(2).transpose(1, 2)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) coverage -> (B, g*g) long code ids."""
        z = self.latents(x)
        b, n, d = z.shape
        return self.quantizer.lookup(z.reshape(b * n, d)).reshape(b, n)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, g*g) code ids -> (B, 1, S, S) logits."""
        q = self.quantizer.embed[codes]  # (B, n, D)
        return self._decode_latents(q)

    def _decode_latents(self, q: torch.Tensor) -> torch.Tensor:
        g = self.config.grid
        return self.decoder(q.transpose(1, 2).reshape(q.shape[0], -1, g, g))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None, restart: bool = False) -> VQOutput:
        """Training/eval pass with straight-through quantisation; updates the EMA codebook in
        training mode (``generator`` drives initialisation and dead-code re-seeding)."""
        z = self.latents(x)
        b, n, d = z.shape
        quant = self.quantizer
        # Nearest-code search and the EMA sums stay fp32 under bf16 autocast (the training engine's
        # mixed precision on CUDA): in bf16 the argmin and the codebook averages lose their digits.
        with torch.autocast(z.device.type, enabled=False) if z.device.type in ("cpu", "cuda") else nullcontext():
            flat = z.reshape(b * n, d).float()
            if self.training and not bool(quant.initialized.item()):
                quant.init_from(flat.detach(), generator)
            ids = quant.lookup(flat.detach())
            q = quant.embed[ids]
            commit = F.mse_loss(flat, q.detach())
            if self.training:
                quant.update(flat.detach(), ids, generator, restart)
            st = (flat + (q - flat).detach()).reshape(b, n, d)
        counts = torch.bincount(ids, minlength=quant.embed.shape[0]).float()
        p = counts / counts.sum()
        perplexity = float(torch.exp(-(p * torch.log(p + 1e-10)).sum()))
        return VQOutput(self._decode_latents(st), ids.reshape(b, n), commit, perplexity)


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
