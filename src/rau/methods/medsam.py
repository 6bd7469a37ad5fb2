"""LiteMedSAM box-prompt segmenter behind rau's :class:`~rau.methods.interfaces.Segmenter` interface
(segmenter ``medsam``), built on the public encoder API of :mod:`rau.encoders.litemedsam`.

The target is encoded ONCE per :meth:`MedSamSegmenter.segment` call (TinyViT at 256 px, LiteMedSAM's
padded frame); every structure's box then costs only the prompt encoder + mask decoder (~40 ms),
all boxes in one batch. The last embedding is remembered, so a localizer reading the same
encoder's features (the compact RAU VLM) and this segmenter encode a target once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rau.data.annotated import AnnotatedImage
from rau.geometry import Box, clip_box
from rau.methods.interfaces import SegmentationOutput, Segmenter


class MedSamSegmenter(Segmenter):
    """Box -> mask with LiteMedSAM. ``equalize``: histogram-equalise the target first (default on).
    ``precision``: the encoder's (``auto``/``fp32``/``bf16``, see
    :func:`rau.encoders.litemedsam.resolve_precision`). ``threshold``: on the mask logits."""

    name = "medsam"
    uses_reference = False
    needs_boxes = True

    def __init__(self, checkpoint: str | Path | None = None, *, device: str = "cpu", equalize: bool = True,
                 threshold: float = 0.0, precision: str | None = None):
        from rau.encoders import litemedsam

        self.net = litemedsam.load(checkpoint, device)
        self.device = device
        self.precision = litemedsam.resolve_precision(precision, device)
        self.equalize = equalize
        self.threshold = threshold
        self._memo = None

    def embed(self, image: np.ndarray):
        """Run the image encoder once: (H, W) image in [0, 1] -> (embedding (1, 256, 64, 64) float32
        on the device, scale = frame px per image px). The last image's embedding is remembered
        (keyed by its pixels, the equalisation, the network and the precision)."""
        import torch

        from rau.encoders.litemedsam import encode, preprocess
        from rau.references.thumbnails import pixel_digest

        key = (pixel_digest(image), image.shape, self.equalize, id(self.net), self.precision)
        if self._memo is not None and self._memo[0] == key:
            return self._memo[1]
        x, scale = preprocess(image, equalize=self.equalize)
        with torch.inference_mode():
            result = encode(self.net, x.to(self.device), self.precision), scale
        self._memo = (key, result)
        return result

    def decode(self, embedding, scale: float, boxes: list[Box], hw: tuple[int, int]):
        """Boxes ``box_xyxy`` in target pixels -> (N, H, W) logits at target size and (N,) predicted IoU."""
        import torch

        from rau.encoders.litemedsam import frame_to_image

        net = self.net
        b = torch.tensor(boxes, dtype=torch.float32, device=self.device)[:, None, :] * scale
        with torch.inference_mode():
            sparse, dense = net.prompt_encoder(points=None, boxes=b, masks=None)
            low, iou_pred = net.mask_decoder(
                image_embeddings=embedding, image_pe=net.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
            )
            logits = frame_to_image(low, scale, hw)
        return logits[:, 0].cpu().numpy(), iou_pred[:, 0].cpu().numpy()

    def segment(self, target: np.ndarray, boxes_xyxy_px: dict[str, Box | None],
                reference: AnnotatedImage | None = None) -> dict[str, SegmentationOutput | None]:
        hw = target.shape
        valid = {n: clip_box(b, *hw) for n, b in boxes_xyxy_px.items() if b is not None}
        valid = {n: b for n, b in valid.items() if b is not None}
        out: dict[str, SegmentationOutput | None] = {n: None for n in boxes_xyxy_px}
        if not valid:
            return out
        embedding, scale = self.embed(target)
        names = list(valid)
        logits, ious = self.decode(embedding, scale, [valid[n] for n in names], hw)
        for i, name in enumerate(names):
            prob = (1.0 / (1.0 + np.exp(-logits[i]))).astype(np.float32)
            out[name] = SegmentationOutput(logits[i] > self.threshold, float(np.clip(ious[i], 0.0, 1.0)), prob)
        return out
