"""Configuration of the memory-conditioned segmenter (:mod:`rau.models.memseg.modeling`, issue 15).

:class:`MemSegConfig` sizes the three trained parts: SAM2's memory encoder (the reference mask
downsampled and fused with the reference's LiteMedSAM features), SAM2's memory attention (the
target's features attend to the memory of K reference frames) and LiteMedSAM's mask decoder.
:meth:`MemSegConfig.sam2_config` fills the small ``transformers`` ``Sam2VideoConfig`` those SAM2
classes are built from. Pure: no torch at import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rau.errors import RauInputError

FORMAT = "rau-memseg-v1"
FRAME = 256  # LiteMedSAM's padded input frame: reference and output masks live in it
EMBED_GRID = 64  # LiteMedSAM's embedding side (FRAME / 4)
EMBED_DIM = 256  # LiteMedSAM's embedding channels = its mask decoder's width
#: transformers' Sam2VideoMemoryAttentionLayer builds its memory cross-attention with kv_in_dim=64
#: hard-coded, so the memory encoder must emit 64 channels.
SAM2_MEMORY_DIM = 64
#: Allowed grids. SAM2's mask downsampler multiplies channels by 4 per stride-2 layer, so coarser
#: grids (stride 32+ from the 256 frame) would grow it to millions of parameters.
GRIDS = (16, 32, 64)


@dataclass
class MemSegConfig:
    """Sizes of the memory segmenter.

    hidden_size: width of the target features, the memory attention and the mask decoder (must be
    LiteMedSAM's 256); memory_dim: channels of a memory token (must be 64, see SAM2_MEMORY_DIM);
    memory_layers / heads / feed_forward: SAM2 memory-attention depth, heads, MLP width;
    fuser_layers / fuser_intermediate: the memory encoder's ConvNeXt fuser blocks;
    grid: cells per side that memory attention and the decoder run on (64 = LiteMedSAM's full
    embedding; 32 or 16 average-pool the embeddings first, attention ~16x cheaper per halving);
    decoder_grid: cells per side of the mask decoder (None: ``grid``); finer than ``grid`` (e.g. 64
    with grid 32), the decoder reads the target's full-resolution embedding plus the memory
    attention's change to it, upsampled: SAM2's high-resolution features into the decoder, at the
    cost of the decoder alone, so thin structures keep LiteMedSAM's 256-pixel mask detail;
    dropout: memory-attention dropout (SAM2: 0.1); box_prompt: the decoder also reads a target box
    (LiteMedSAM's frozen box encoding); mask_prompt: the decoder also reads a dense mask prompt in
    the target frame (SAM's mask input through LiteMedSAM's fine-tuned mask downscaling): at
    inference the references' mean mask placed as is, or a registration-warped one, a location
    prior that memory attention and the image correct; mask_scale / mask_bias: a {0, 1} reference mask enters the
    memory encoder as ``mask * scale + bias`` (SAM2's sigmoid_scale/bias_for_mem_enc); readout: a trained
    readout path (:func:`rau.models.memseg.readout.readout` through a learned key projection, on a
    ``readout_grid`` grid) carries the reference masks' values to the target, and its map is the
    decoder's default dense prior (STM/XMem's memory read: the value is the mask itself, so a shape
    never trained on is carried, not redrawn); readout_residual (needs readout): the output is the
    decoder's dense prior on the logit scale (the readout, or a prior the caller gives, e.g. a
    registration-warped mask) plus the decoder's logits times a learned gain (``residual_gain`` at
    init): the decoder corrects the mask it is given instead of drawing a new one.
    """

    hidden_size: int = EMBED_DIM
    memory_dim: int = SAM2_MEMORY_DIM
    memory_layers: int = 2
    heads: int = 1
    feed_forward: int = 2048
    fuser_layers: int = 2
    fuser_intermediate: int = 1024
    grid: int = EMBED_GRID
    decoder_grid: int | None = None
    dropout: float = 0.1
    box_prompt: bool = False
    mask_prompt: bool = False
    mask_scale: float = 20.0
    mask_bias: float = -10.0
    readout: bool = False
    readout_grid: int = EMBED_GRID
    readout_residual: bool = False
    residual_gain: float = 0.5
    format: str = FORMAT

    def __post_init__(self) -> None:
        if self.format != FORMAT:
            raise RauInputError(f"format: expected {FORMAT!r}, got {self.format!r}")
        if self.hidden_size != EMBED_DIM:
            raise RauInputError(f"hidden_size: must be LiteMedSAM's {EMBED_DIM} (its mask decoder's width), got {self.hidden_size!r}")
        if self.memory_dim != SAM2_MEMORY_DIM:
            raise RauInputError(f"memory_dim: transformers' SAM2 memory attention hard-codes {SAM2_MEMORY_DIM}, got {self.memory_dim!r}")
        for name in ("memory_layers", "heads", "feed_forward", "fuser_layers", "fuser_intermediate"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RauInputError(f"{name}: expected an integer >= 1, got {value!r}")
        if self.hidden_size % self.heads or (self.hidden_size // self.heads) % 4:
            raise RauInputError(f"heads: hidden_size {self.hidden_size} / heads {self.heads} must be a multiple of 4 "
                                "(SAM2's axial RoPE splits each head into row and column pairs)")
        if self.grid not in GRIDS:
            raise RauInputError(f"grid: expected one of {GRIDS} (cells per side of LiteMedSAM's {EMBED_GRID}-cell embedding), "
                                f"got {self.grid!r}")
        if self.decoder_grid is not None and (self.decoder_grid not in GRIDS or self.decoder_grid < self.grid):
            raise RauInputError(f"decoder_grid: expected None or one of {GRIDS} not coarser than grid {self.grid}, "
                                f"got {self.decoder_grid!r}")
        if self.readout_grid not in GRIDS:
            raise RauInputError(f"readout_grid: expected one of {GRIDS}, got {self.readout_grid!r}")
        if self.readout and not self.mask_prompt:
            raise RauInputError("readout: the trained readout is the decoder's dense prior, so it needs mask_prompt=True")
        if self.readout_residual and not self.readout:
            raise RauInputError("readout_residual: the decoder corrects the readout, so it needs readout=True")
        if not float(self.residual_gain) > 0:
            raise RauInputError(f"residual_gain: expected a value > 0, got {self.residual_gain!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise RauInputError(f"dropout: expected a value in [0, 1), got {self.dropout!r}")

    @property
    def out_grid(self) -> int:
        """Cells per side the mask decoder runs on."""
        return self.decoder_grid or self.grid

    @property
    def mask_stride(self) -> int:
        """Frame pixels per memory cell: the memory encoder's mask downsampling (4 at grid 64)."""
        return FRAME // self.grid

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MemSegConfig:
        """From a folder's config.json: CheckpointError unless its format is FORMAT (unknown keys ignored)."""
        from rau.models.decoder import config_from_dict

        return config_from_dict(cls, values, FORMAT, "memory segmenter")

    def sam2_config(self):
        """The ``transformers.Sam2VideoConfig`` that sizes SAM2's memory encoder and memory
        attention for this config (the vision, prompt and decoder sub-configs are unused)."""
        from transformers import Sam2VideoConfig

        config = Sam2VideoConfig(
            memory_attention_hidden_size=self.hidden_size, memory_attention_num_layers=self.memory_layers,
            memory_attention_num_attention_heads=self.heads, memory_attention_downsample_rate=1,
            memory_attention_feed_forward_hidden_size=self.feed_forward, memory_attention_dropout=self.dropout,
            memory_attention_rope_dropout=self.dropout, memory_attention_rope_feat_sizes=[self.grid, self.grid],
            memory_encoder_hidden_size=self.hidden_size, memory_encoder_output_channels=self.memory_dim,
            mask_downsampler_embed_dim=self.hidden_size, mask_downsampler_stride=2,
            mask_downsampler_total_stride=self.mask_stride, memory_fuser_num_layers=self.fuser_layers,
            memory_fuser_embed_dim=self.hidden_size, memory_fuser_intermediate_dim=self.fuser_intermediate,
            sigmoid_scale_for_mem_enc=self.mask_scale, sigmoid_bias_for_mem_enc=self.mask_bias,
        )
        # Standalone SAM2 modules read the attention kernel from the config (None warns and runs
        # eager attention, which materialises a (grid^2 x K grid^2) matrix per head).
        config._attn_implementation = "sdpa"
        return config
