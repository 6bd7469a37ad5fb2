"""Memory-conditioned segmenter (issue 15): SAM2's memory route on LiteMedSAM features.

The reference image's features and one structure's reference mask are encoded into memory by
SAM2's memory encoder (the mask downsampled to the feature grid and fused with the features); the
target's features attend to that memory with SAM2's memory attention (self-attention, then
cross-attention to the memory, axial RoPE on both, sine position encodings added to the keys);
LiteMedSAM's mask decoder, initialised from its pretrained weights and fine-tuned, writes the
target mask from the memory-conditioned features. K references are K memory frames concatenated
along the memory sequence, as SAM2 concatenates its conditioning frames; every reference is a
conditioning frame, so all share SAM2's one learned temporal encoding for conditioning memories
(the references are unordered: the model is invariant to their order).

Trained (``net``): the memory encoder, the memory attention, the temporal encoding and the mask
decoder. Frozen inside ``net``: a copy of LiteMedSAM's prompt encoder (image position encoding,
no-mask dense embedding, box tokens) and the decoder's three multimask heads (only the single-mask
output is used). Not in ``net``: the image encoder (features come cached or from
:mod:`rau.encoders.litemedsam`).

Built from ``transformers``' SAM2 video classes (``Sam2VideoMemoryEncoder``,
``Sam2VideoMemoryAttention``, ``Sam2VideoPositionEmbeddingSine``) and a small ``Sam2VideoConfig``
(:meth:`rau.models.memseg.configuration.MemSegConfig.sam2_config`). Their layouts: the memory
encoder is batch-first NCHW; the memory attention takes SEQUENCE-first (tokens, batch, channels)
inputs and returns (1, batch, tokens, channels).

Folder: ``config.json`` (:class:`MemSegConfig`), ``model.safetensors`` (``net``), ``training.json``
(its ``structures``: the names the model was trained on, :attr:`MemSegModel.trained_structures`).
"""

from __future__ import annotations

import re
from dataclasses import asdict

from rau.errors import RauInputError
from rau.models.decoder import DecoderFolderModel
from rau.models.memseg.configuration import FORMAT, FRAME, MemSegConfig


def structure_key(name: str) -> str:
    """A structure name as the training vocabulary compares it: lower case, every run of other
    characters than letters and digits one ``_`` ("Left Lung" and "left-lung" -> "left_lung")."""
    return re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_")


def _to_batch_first(out, batch: int, tokens: int):
    """Memory attention output -> (batch, tokens, channels). transformers 5.x returns (1, batch,
    tokens, channels) although its comment says "seq first"; a sequence-first (tokens, batch,
    channels) result is accepted too, in case that is fixed."""
    if out.dim() == 4 and out.shape[0] == 1 and out.shape[1] == batch and out.shape[2] == tokens:
        return out[0]
    if out.dim() == 3 and out.shape[0] == tokens and out.shape[1] == batch:
        return out.transpose(0, 1)
    raise RuntimeError(f"SAM2 memory attention returned shape {tuple(out.shape)}; expected (1, {batch}, {tokens}, C)")


#: A {0, 1} prior is +-this on the logit scale in a ``readout_residual`` model (probabilities clipped
#: to [1 - PRIOR_CLIP, PRIOR_CLIP]): the decoder's scaled logits can overturn it where the image says so.
PRIOR_CLIP = 0.98


def prior_logit(prior):
    """(B, 1, H, W) prior probabilities -> logits, clipped to +-logit(:data:`PRIOR_CLIP`) (~3.9)."""
    import torch

    return torch.logit(prior.clamp(1 - PRIOR_CLIP, PRIOR_CLIP))


def _build_net(config: MemSegConfig, lite=None):
    import copy

    import torch
    import torch.nn.functional as F
    from torch import nn
    from transformers.models.sam2_video.modeling_sam2_video import (
        Sam2VideoMemoryAttention,
        Sam2VideoMemoryEncoder,
        Sam2VideoPositionEmbeddingSine,
    )

    from rau.encoders.litemedsam import load

    sam2 = config.sam2_config()
    grid = config.grid

    class MemSegNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            base = lite if lite is not None else load()  # LiteMedSAM's pretrained decoder and prompt encoder
            self.memory_encoder = Sam2VideoMemoryEncoder(sam2)
            self.memory_attention = Sam2VideoMemoryAttention(sam2)
            self.target_position = Sam2VideoPositionEmbeddingSine(num_position_features=config.hidden_size // 2,
                                                                  normalize=True)
            # SAM2's memory_temporal_positional_encoding entry of conditioning frames (zeros at init).
            self.memory_temporal_pe = nn.Parameter(torch.zeros(1, 1, config.memory_dim))
            self.mask_decoder = copy.deepcopy(base.mask_decoder).requires_grad_(True)
            for head in self.mask_decoder.output_hypernetworks_mlps[1:]:
                head.requires_grad_(False)  # multimask heads: their masks are never used
            self.prompt_encoder = copy.deepcopy(base.prompt_encoder).requires_grad_(False)
            self.prompt_encoder.mask_downscaling.requires_grad_(config.mask_prompt)  # SAM's mask-input path
            if config.readout:  # the trained readout path: starts as the training-free feature readout
                import math

                from rau.models.memseg import readout as ro

                self.readout_key = nn.Conv2d(config.hidden_size, config.hidden_size, 1)
                with torch.no_grad():
                    self.readout_key.weight.copy_(torch.eye(config.hidden_size)[:, :, None, None])
                    self.readout_key.bias.zero_()
                self.readout_log_tau = nn.Parameter(torch.tensor(math.log(ro.TAU)))
                self.readout_log_locality = nn.Parameter(torch.tensor(math.log(ro.LOCALITY)))
            if config.readout_residual:  # the decoder's logits, scaled, correct the prior's
                self.readout_log_gain = nn.Parameter(torch.tensor(math.log(config.residual_gain)))

        def _pool(self, x, size: int = grid):
            if x.shape[-1] == size and x.shape[-2] == size:
                return x
            return F.adaptive_avg_pool2d(x, size)

        def memory(self, references, reference_masks):
            """(B, K, 256, S, S) + (B, K, 1, 256, 256) -> memory (K*grid^2, B, 64) and its
            position encoding, sequence-first, frame-major (SAM2's layout)."""
            b, k = references.shape[:2]
            feats = self._pool(references.flatten(0, 1))
            masks = reference_masks.flatten(0, 1).to(feats.dtype) * config.mask_scale + config.mask_bias
            mem, pos = self.memory_encoder(feats, masks)  # (B*K, 64, g, g) each; pos cached by SAM2, copied by seq()

            def seq(x):  # (B*K, C, g, g) -> (K*g*g, B, C)
                return x.reshape(b, k, x.shape[1], grid * grid).permute(1, 3, 0, 2).reshape(k * grid * grid, b, x.shape[1])

            return seq(mem), seq(pos) + self.memory_temporal_pe.to(pos.dtype)

        def read(self, target, references, reference_masks):
            """The trained readout: (B, 256, S, S), (B, K, 256, S, S), (B, K, 1, 256, 256) -> (B, 1, 256,
            256) probabilities in the target frame (the reference masks' values carried by similarity
            of the learned keys)."""
            from rau.models.memseg import readout as ro

            g = config.readout_grid
            b, k = references.shape[:2]
            key_t = self.readout_key(self._pool(target, g))
            key_r = self.readout_key(self._pool(references.flatten(0, 1), g)).reshape(b, k, -1, g, g)
            grid = ro.readout(key_t, key_r, reference_masks.transpose(1, 2), tau=self.readout_log_tau.exp(),
                              locality=self.readout_log_locality.exp())
            return ro.to_frame(grid)

        def forward(self, target, references, reference_masks, box_xyxy=None, prompt_masks=None, tokens=None,
                    return_readout: bool = False, prompt_use=None):
            """target (B, 256, S, S) LiteMedSAM embedding, references (B, K, 256, S, S), reference
            masks (B, K, 1, 256, 256) in [0, 1] in the 256 frame, [box_xyxy (B, 4) frame px],
            [prompt_masks (B, 1, 256, 256) in [0, 1], the target-frame prior; default: the
            references' mean mask], [tokens (B, T, 256): extra sparse prompt tokens, e.g. RAU's
            ``<seg>`` query projected by a ``decoder="memseg"`` head] -> (mask logits (B, 1, 256,
            256) in the frame, predicted IoU (B, 1)[, the trained readout (B, 1, 256, 256) with
            ``return_readout``]). A ``readout`` model's default prior is its readout; ``prompt_use`` (B,)
            bool (training) keeps ``prompt_masks`` only where True, the readout elsewhere. A
            ``readout_residual`` model returns the prior's logits (:func:`prior_logit`) plus the decoder's
            times its learned gain."""
            b = target.shape[0]
            need = config.readout and (return_readout or prompt_masks is None or prompt_use is not None)
            read = self.read(target, references, reference_masks) if need else None
            if read is not None and prompt_masks is not None and prompt_use is not None:
                prompt_masks = torch.where(prompt_use[:, None, None, None], prompt_masks.to(read.dtype), read)
            tgt = self._pool(target)
            memory, memory_pos = self.memory(references, reference_masks)
            current = tgt.flatten(2).permute(2, 0, 1)  # (g*g, B, 256)
            # SAM2 caches this encoding (lru_cache): a copy, so a tensor first made under
            # inference_mode never enters an autograd graph.
            current_pos = self.target_position(tgt.shape, tgt.device, tgt.dtype).flatten(2).permute(2, 0, 1).clone()
            out = self.memory_attention(current_vision_features=current, memory=memory,
                                        current_vision_position_embeddings=current_pos,
                                        memory_posision_embeddings=memory_pos)
            cond = _to_batch_first(out, b, grid * grid).transpose(1, 2).reshape(b, -1, grid, grid)
            dg = config.out_grid
            if dg != grid:  # the full-resolution target embedding + memory attention's change, upsampled
                cond = self._pool(target, dg) + F.interpolate(cond - tgt, size=(dg, dg), mode="bilinear", align_corners=False)
            pe = self.prompt_encoder.pe_layer((dg, dg))[None].to(cond.dtype)
            prior = None
            if config.mask_prompt:
                prior = prompt_masks if prompt_masks is not None else read if read is not None else reference_masks.mean(1)
                dense = self._pool(self.prompt_encoder.mask_downscaling(
                    prior.to(cond.dtype) * config.mask_scale + config.mask_bias), dg)
            else:
                dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(b, -1, dg, dg).to(cond.dtype)
            if box_xyxy is not None:
                sparse, _ = self.prompt_encoder(points=None, boxes=box_xyxy.float()[:, None, :], masks=None)
            else:
                sparse = cond.new_zeros(b, 0, config.hidden_size)
            if tokens is not None:
                sparse = torch.cat([sparse.to(tokens.dtype), tokens], dim=1)
            low, iou = self.mask_decoder(image_embeddings=cond, image_pe=pe, sparse_prompt_embeddings=sparse.to(cond.dtype),
                                         dense_prompt_embeddings=dense, multimask_output=False)
            if low.shape[-1] != FRAME:  # decoder grid < 64: the decoder's 4x upscaling stops short of the frame
                low = F.interpolate(low, size=(FRAME, FRAME), mode="bilinear", align_corners=False)
            if config.readout_residual:  # the prior on the logit scale, corrected by the decoder
                low = prior_logit(prior.to(low.dtype)) + self.readout_log_gain.exp().to(low.dtype) * low
            return (low, iou, read) if return_readout else (low, iou)

    return MemSegNet()


def check_inputs(config: MemSegConfig, target, references, reference_masks, box_xyxy=None, prompt_masks=None,
                 tokens=None) -> None:
    """RauInputError unless the shapes fit :meth:`MemSegModel.predict` (named, with what was got)."""
    side = max(config.grid, config.out_grid)
    if target.dim() != 4 or target.shape[1] != config.hidden_size or target.shape[-1] != target.shape[-2] \
            or target.shape[-1] % side:
        raise RauInputError(f"target: expected (B, {config.hidden_size}, S, S) with S a multiple of {side} (grid, decoder "
                            f"grid), got {tuple(target.shape)}")
    b, s = target.shape[0], target.shape[-1]
    if references.dim() != 5 or references.shape[0] != b or references.shape[1] < 1 or references.shape[2:] != target.shape[1:]:
        raise RauInputError(f"references: expected (B={b}, K, {config.hidden_size}, {s}, {s}), got {tuple(references.shape)}")
    want = (b, references.shape[1], 1, FRAME, FRAME)
    if tuple(reference_masks.shape) != want:
        raise RauInputError(f"reference_masks: expected {want} (frame masks), got {tuple(reference_masks.shape)}")
    if config.box_prompt and box_xyxy is None:
        raise RauInputError("box_xyxy: this model reads a target box (box_prompt=True); pass (B, 4) frame-pixel boxes")
    if not config.box_prompt and box_xyxy is not None:
        raise RauInputError("box_xyxy: this model was built without box_prompt; pass None")
    if prompt_masks is not None and not config.mask_prompt:
        raise RauInputError("prompt_masks: this model was built without mask_prompt; pass None")
    if prompt_masks is not None and tuple(prompt_masks.shape) != (b, 1, FRAME, FRAME):
        raise RauInputError(f"prompt_masks: expected ({b}, 1, {FRAME}, {FRAME}) target-frame masks, got {tuple(prompt_masks.shape)}")
    if box_xyxy is not None and tuple(box_xyxy.shape) != (b, 4):
        raise RauInputError(f"box_xyxy: expected ({b}, 4) xyxy boxes in frame pixels, got {tuple(box_xyxy.shape)}")
    if tokens is not None and (tokens.dim() != 3 or tokens.shape[0] != b or tokens.shape[2] != config.hidden_size):
        raise RauInputError(f"tokens: expected ({b}, T, {config.hidden_size}) prompt tokens, got {tuple(tokens.shape)}")


class MemSegModel(DecoderFolderModel):
    """The memory segmenter (``net`` + its config); the training-engine protocol and the model
    folder of :class:`rau.models.decoder.DecoderFolderModel`. ``lite``: a LiteMedSAM network whose
    mask decoder and prompt encoder are copied (default: the shipped one, :func:`rau.encoders.litemedsam.load`)."""

    FORMAT, CONFIG, LABEL, OPTION = FORMAT, MemSegConfig, "memory segmenter", "--memseg"

    def __init__(self, config: MemSegConfig, net=None, *, device: str = "cpu", training: dict | None = None, lite=None):
        if not isinstance(config, MemSegConfig):
            raise TypeError(f"config: expected a MemSegConfig, got {type(config).__name__}")
        self.config, self.device = config, device
        self.net = (net if net is not None else _build_net(config, lite)).to(device)
        self.training = training or {}

    def __repr__(self) -> str:
        trained = sum(p.numel() for p in self.net.parameters() if p.requires_grad)
        return f"MemSegModel({trained / 1e6:.2f}M trained parameters, grid {self.config.grid})"

    def config_dict(self) -> dict:
        return asdict(self.config)

    @property
    def trained_structures(self) -> frozenset[str] | None:
        """The structure names this model was trained on (:func:`structure_key` form), from its
        training record's ``structures``; None when the record has none (e.g. a checkpoint folder)."""
        names = self.training.get("structures") if isinstance(self.training, dict) else None
        if not isinstance(names, list):
            return None
        return frozenset(structure_key(n) for n in names)

    def predict(self, target, references, reference_masks, box_xyxy=None, prompt_masks=None, tokens=None, prompt_use=None):
        """Inference (eval mode, no gradients) with the shapes checked: target (B, 256, S, S),
        references (B, K, 256, S, S), reference_masks (B, K, 1, 256, 256) {0, 1} in the 256 frame,
        box_xyxy (B, 4) frame pixels iff ``config.box_prompt``, prompt_masks (B, 1, 256, 256) (only
        with ``config.mask_prompt``; default the references' mean mask), tokens (B, T, 256) extra
        prompt tokens, prompt_use (B,) bool (a ``readout`` model: ``prompt_masks`` only where True, its readout
        elsewhere) -> (logits (B, 1, 256, 256) in the frame, IoU (B, 1)), float32 on the model's device."""
        import torch

        check_inputs(self.config, target, references, reference_masks, box_xyxy, prompt_masks, tokens)
        if prompt_use is not None and (prompt_masks is None or not self.config.readout
                                       or tuple(prompt_use.shape) != (target.shape[0],)):
            raise RauInputError("prompt_use: a (B,) bool for a readout model given prompt_masks")
        dev = self.device
        self.net.eval()
        with torch.inference_mode():
            low, iou = self.net(target.to(dev).float(), references.to(dev).float(), reference_masks.to(dev).float(),
                                None if box_xyxy is None else box_xyxy.to(dev).float(),
                                None if prompt_masks is None else prompt_masks.to(dev).float(),
                                None if tokens is None else tokens.to(dev).float(),
                                prompt_use=None if prompt_use is None else prompt_use.to(dev).bool())
        return low.float(), iou.float()
