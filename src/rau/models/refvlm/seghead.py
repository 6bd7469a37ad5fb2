"""Segmentation from the VLM's own token (RAU's ``<SEG>`` query; issue 4, item 1): method ``rau-seg``.

After the compact RAU VLM has answered a structure (``<q> reference box + mask tokens <ans> <yes>
box + mask codes``), one more input position carries a learned ``<seg>`` embedding. Its last hidden
state, which has attended to the reference image, the reference annotation, the target image and
the answer, is projected by an MLP into ``n_queries`` prompt tokens of LiteMedSAM's mask decoder,
which decodes the mask from the target's image embedding (the same encoder pass that fed the VLM).
With ``box_prompt`` (the shipped head) the decoder also reads the VLM's answer box, encoded by
LiteMedSAM's frozen prompt encoder: the spatial cue says where, the ``<seg>`` query says what.
With ``seg_after="box"`` the ``<seg>`` position follows the box directly (``<yes> box <seg>``): the
VLM then decodes 5 answer tokens instead of 21 and its mask codes are never generated.

Trained: the ``<seg>`` embedding, the MLP and the mask decoder (initialised from LiteMedSAM's
pretrained one). Frozen: the VLM (gradients reach the ``<seg>`` embedding through it) and the image
encoder. The VLM's answer before ``<seg>`` is its own greedy answer, in training as at inference.

The paper feeds the query to SAM2 with the reference image and mask in SAM2's memory. There are no
SAM2 weights here, so the reference reaches the mask decoder only through the VLM: its image and
its annotation tokens are in the context the ``<seg>`` state attends to. With a SAM2 checkpoint the
same head would prompt SAM2's decoder; that variant is not built.

Folder: ``config.json`` (:class:`SegHeadConfig`, with the SHA-256 of the VLM weights it was trained
with: another VLM is refused), ``model.safetensors`` (head only), ``training.json``.

Training (:mod:`rau.training.recipes.seghead`): :func:`~rau.training.recipes.seghead.build_seg_cache` stores, per image of a token cache (:mod:`rau.data.caches`), the full
(256, 64, 64) LiteMedSAM embedding (fp16) and every structure's mask in the encoder's 256 x 256
frame (bit-packed). Training pairs come from the token caches as in :mod:`rau.training.recipes.refvlm`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from rau.assets import ASSETS_DIR
from rau.errors import CheckpointError, RauInputError
from rau.models.decoder import DecoderFolderModel, cache_key, config_from_dict

FORMAT = "rau-seghead-v1"
SEG_AFTER = ("mask", "box")
#: Which mask decoder the head's prompt tokens go to: its own fine-tuned copy of LiteMedSAM's
#: ("litemedsam", older heads), or the shipped memory segmenter's, the reference image and mask in
#: its memory and the reference mask moved into the VLM's answer box as its prior ("memseg", the
#: paper's RAU; the head then holds no decoder: embedding + MLP only).
DECODERS = ("litemedsam", "memseg")
FRAME = 256  # LiteMedSAM's input side: masks live in its (padded) frame
#: Where a shipped head lives (method ``rau-seg`` without ``--seg-head``).
DEFAULT_HEAD_DIR = ASSETS_DIR / "refvlm_seg"
#: The shipped ``decoder="memseg"`` head (rau-seg's default when present).
DEFAULT_MEMSEG_HEAD_DIR = ASSETS_DIR / "refvlm_seg_memseg"


@dataclass
class SegHeadConfig:
    hidden_size: int = 256
    n_queries: int = 2
    prompt_dim: int = 256
    #: Also prompt the decoder with the VLM's own answer box (LiteMedSAM's frozen box encoding) beside
    #: the <seg> tokens. Without it the query alone must say WHICH structure; measured on Wingspan it
    #: then sometimes segments a lung for the heart (docs/HISTORY.md). False for older heads.
    box_prompt: bool = False
    #: Where ``<seg>`` follows the VLM's answer: "mask" = after the box and the 16 mask codes (older
    #: heads), "box" = right after the box, so inference decodes 5 answer tokens instead of 21.
    seg_after: str = "mask"
    vlm_sha256: str = ""
    decoder: str = "litemedsam"
    #: SHA-256 of the memory segmenter's weights a ``decoder="memseg"`` head was trained with.
    memseg_sha256: str = ""
    format: str = FORMAT

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SegHeadConfig:
        config = config_from_dict(cls, values, FORMAT, "rau-seg head")
        if config.seg_after not in SEG_AFTER:
            raise CheckpointError(f"config: seg_after {config.seg_after!r} is not one of {SEG_AFTER}")
        if config.decoder not in DECODERS:
            raise CheckpointError(f"config: decoder {config.decoder!r} is not one of {DECODERS}")
        return config

    @classmethod
    def read(cls, folder: str | Path) -> SegHeadConfig:
        """The config of a head folder; CheckpointError if missing or unreadable."""
        import json

        path = Path(folder) / "config.json"
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"--seg-head: {path} is unreadable ({exc.__class__.__name__})") from None


def weights_sha256(model_dir: str | Path) -> str:
    """SHA-256 of a model folder's ``model.safetensors`` (which VLM a head belongs to)."""
    return hashlib.sha256((Path(model_dir) / "model.safetensors").read_bytes()).hexdigest()


def _build_head(config: SegHeadConfig, decoder=None):
    import copy

    import torch
    from torch import nn

    from rau.encoders.litemedsam import load

    class SegHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            c = config
            self.seg_embed = nn.Parameter(torch.randn(c.hidden_size) * 0.02)
            self.mlp = nn.Sequential(nn.Linear(c.hidden_size, c.hidden_size), nn.GELU(),
                                     nn.Linear(c.hidden_size, c.n_queries * c.prompt_dim))
            if c.decoder == "litemedsam":  # a "memseg" head prompts the memory segmenter's decoder
                base = decoder if decoder is not None else load().mask_decoder  # LiteMedSAM's pretrained one
                self.mask_decoder = copy.deepcopy(base)
                self.mask_decoder.requires_grad_(True)

        def tokens(self, hidden):
            """(N, hidden) ``<seg>`` states -> (N, n_queries, prompt_dim) mask-decoder prompt tokens."""
            return self.mlp(hidden).view(hidden.shape[0], config.n_queries, config.prompt_dim)

        def forward(self, image_embeddings, hidden, image_pe, dense, box_tokens=None):
            """(N, 256, 64, 64) target embeddings (one per query) + (N, hidden) ``<seg>`` states
            [+ (N, 2, 256) box prompt tokens] -> (N, 256, 256) mask logits in the encoder frame and
            (N,) predicted IoU (``decoder="litemedsam"`` heads)."""
            sparse = self.tokens(hidden)
            if box_tokens is not None:
                sparse = torch.cat([box_tokens.to(sparse.dtype), sparse], dim=1)
            low, iou = self.mask_decoder(image_embeddings=image_embeddings, image_pe=image_pe,
                                         sparse_prompt_embeddings=sparse.to(image_embeddings.dtype),
                                         dense_prompt_embeddings=dense, multimask_output=False)
            return low[:, 0], iou[:, 0]

    return SegHead()


def answer_box_frame(loc_values, bins: int, frame_hw: tuple[float, float] = (FRAME, FRAME)):
    """(N, 4) answer location values (ymin, xmin, ymax, xmax on ``bins`` bins of the image) ->
    (N, 4) float boxes ``box_xyxy`` in LiteMedSAM's input frame, where the image covers the top-left
    ``frame_hw`` = (h, w) x its scale pixels (the whole 256 x 256 frame for a square image). The one
    conversion of training and inference."""
    import torch

    v = loc_values.float() / (bins - 1)
    h, w = frame_hw
    return v[:, [1, 0, 3, 2]] * torch.tensor([w, h, w, h], dtype=v.dtype, device=v.device)


def box_tokens(prompt_encoder, boxes_frame):
    """(N, 4) frame boxes -> (N, 2, 256) sparse prompt tokens of LiteMedSAM's frozen prompt encoder."""
    import torch

    with torch.no_grad():
        sparse, _ = prompt_encoder(points=None, boxes=boxes_frame[:, None, :], masks=None)
    return sparse


def seg_hidden(vlm_net, seg_embed, ref_features, tgt_features, blocks, pair_index, past=None):
    """Last hidden state at the ``<seg>`` position after each block (prompt + answer ids), over the
    shared prefix (computed without gradients: it does not depend on the head). Gradients flow
    through the frozen decoder into ``seg_embed``. -> (N, hidden).

    ``past``: the KV cache the answers were decoded with (one row per block, covering the prefix
    and each block but its last id; :func:`rau.models.refvlm.modeling.generate` with ``return_cache``): then
    only the last id and ``<seg>`` are run (inference; the same states as recomputing everything)."""
    import torch

    from rau.models.refvlm.modeling import select_cache

    if past is None:
        with torch.no_grad():
            past = select_cache(vlm_net.prefix(ref_features, tgt_features), pair_index)
    else:
        blocks = blocks[:, -1:]
    lm = vlm_net.lm
    x = lm.get_input_embeddings()(blocks)
    x = torch.cat([x, seg_embed.to(x.dtype).expand(x.shape[0], 1, -1)], dim=1)
    out = lm.model(inputs_embeds=x, use_cache=True, **{cache_key(lm.model.forward): past})
    return out.last_hidden_state[:, -1]


class SegHeadModel(DecoderFolderModel):
    """The ``<seg>`` head (embedding + MLP + mask decoder); persistence as the token VLMs'."""

    FORMAT, CONFIG, LABEL, OPTION = FORMAT, SegHeadConfig, "rau-seg head", "--seg-head"

    def __init__(self, config: SegHeadConfig, net=None, *, device: str = "cpu", training: dict | None = None,
                 decoder=None):
        self.config, self.device = config, device
        self.net = (net if net is not None else _build_head(config, decoder)).to(device)
        self.training = training or {}

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.net.parameters())
        return f"SegHeadModel({n / 1e6:.2f}M parameters, {self.config.n_queries} queries)"

    def check_vlm(self, model_dir: str | Path) -> None:
        if self.config.vlm_sha256 and weights_sha256(model_dir) != self.config.vlm_sha256:
            raise RauInputError(f"--seg-head: this head was trained with another VLM than {model_dir}; "
                                "pass the matching --vlm or train a head for this one (rau train seg-head)")

    def check_memseg(self, model_dir: str | Path) -> None:
        """A ``decoder="memseg"`` head is tied to the memory segmenter it was trained with (weight hash)."""
        if self.config.memseg_sha256 and weights_sha256(model_dir) != self.config.memseg_sha256:
            raise RauInputError(f"--seg-head: this head was trained with another memory segmenter than {model_dir}; "
                                "pass the matching --memseg or train a head for this one (rau train seg-head-memseg --memseg)")

    def query_tokens(self, vlm_net, ref_features, tgt_features, blocks, past=None):
        """(N, n_queries, prompt_dim) prompt tokens of N answered blocks of ONE pair (inference;
        ``past`` as in :meth:`masks`)."""
        import torch

        with torch.inference_mode():
            zeros = torch.zeros(blocks.shape[0], dtype=torch.long, device=blocks.device)
            h = seg_hidden(vlm_net, self.net.seg_embed, ref_features, tgt_features, blocks, zeros, past=past)
            return self.net.tokens(h).float()

    def masks(self, vlm_net, ref_features, tgt_features, blocks, embedding, boxes_frame=None, past=None,
              precision: str = "fp32"):
        """Mask logits (N, 256, 256) in the encoder frame for N answered blocks of ONE pair, and
        their predicted IoU (N,). ``boxes_frame``: (N, 4) answer boxes in the encoder frame (used by
        heads trained with ``box_prompt``). ``past``: the answers' decoding cache (see
        :func:`seg_hidden`), which saves recomputing the prefix. ``precision``: "bf16" runs the mask
        decoder in bfloat16 (as the encoder, :func:`rau.encoders.litemedsam.resolve_precision`)."""
        import torch

        from rau.encoders.litemedsam import bf16_copy, load

        if self.config.decoder != "litemedsam":
            raise ValueError("masks: this head prompts the memory segmenter's decoder (query_tokens); it has no decoder")
        n = blocks.shape[0]
        lite = load()
        with torch.inference_mode():
            zeros = torch.zeros(n, dtype=torch.long, device=blocks.device)
            h = seg_hidden(vlm_net, self.net.seg_embed, ref_features, tgt_features, blocks, zeros, past=past)
            pe = lite.prompt_encoder.get_dense_pe().to(blocks.device)
            dense = lite.prompt_encoder.no_mask_embed.weight.detach().reshape(1, -1, 1, 1).expand(n, -1, *embedding.shape[-2:])
            boxes = None
            if self.config.box_prompt:
                if boxes_frame is None:
                    raise ValueError("boxes_frame: this <seg> head was trained with box prompts; pass the answer boxes")
                boxes = box_tokens(lite.prompt_encoder, boxes_frame.to(blocks.device).float())
            net, emb = self.net, embedding.expand(n, -1, -1, -1)
            if precision == "bf16":  # a bfloat16 copy of the head, as the encoder's
                net = bf16_copy(self.net)
                emb, h, pe, dense = (t.to(torch.bfloat16) for t in (emb, h, pe, dense))
                boxes = None if boxes is None else boxes.to(torch.bfloat16)
            low, iou = net(emb, h, pe, dense, boxes)
        return low.float(), iou.float()
