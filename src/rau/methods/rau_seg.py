"""RAU's ``<SEG>`` route as a :class:`~rau.methods.interfaces.Segmenter` (method ``rau-seg``).

The RAU VLM (:class:`rau.methods.rau_vlm.RefVlmLocalizer` with ``seg_cues``) answers each structure
and hands the segmenter a :class:`SegCue`: its ``<seg>`` query. This segmenter runs the ``<seg>``
head (:class:`rau.models.refvlm.seghead.SegHeadModel`): the ``<seg>`` position's hidden state,
projected into prompt tokens of a fine-tuned LiteMedSAM mask decoder (beside the VLM's answer box
for heads trained with box prompts), decodes the mask from the target's LiteMedSAM embedding, the
encoder pass the VLM's features came from (one pass per target, shared through the LiteMedSAM
segmenter's memo). The mask's extent becomes the box: it refines the VLM's answer box (Wingspan
held-out box IoU 0.890 vs 0.789; docs/HISTORY.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from rau.data.annotated import AnnotatedImage
from rau.geometry import Box, mask_to_box
from rau.methods.interfaces import SegmentationOutput, Segmenter


@dataclass(eq=False)
class SegQuery:
    """The ``<seg>`` queries of one target's visible structures, batched (one head call per target).

    vlm_net: the VLM network; bins: its location bins; device: its device; visible: indices of the
    visible structures (in answer order); rows: per visible structure its prompt + answer token ids;
    locs: its 4 location tokens; ref_features / tgt_features: (1, C, g, g) VLM features; past: the
    answers' decoding cache restricted to the visible rows, or None (recomputed).
    """

    vlm_net: Any
    bins: int
    device: str
    visible: list[int]
    rows: list[list[int]]
    locs: list[tuple[int, ...]]
    ref_features: Any
    tgt_features: Any
    past: Any = None

    def cue(self, structure_index: int) -> SegCue:
        return SegCue(self, self.visible.index(structure_index))


@dataclass(frozen=True, eq=False)
class SegCue:
    """One structure's ``<seg>`` cue: its row in a :class:`SegQuery`."""

    query: SegQuery
    row: int


class SegHeadSegmenter(Segmenter):
    """``<seg>`` cues -> masks with a trained ``<seg>`` head.

    ``head_dir``: a ``rau train seg-head`` folder (tied to its VLM by weight hash:
    ``head.check_vlm(vlm_dir)``); ``shared``: the LiteMedSAM segmenter whose (memoised) encoder pass
    the VLM reads.
    """

    name = "seg-head"
    uses_reference = False
    needs_boxes = True
    reads_cues = True

    def __init__(self, head_dir: str | Path, *, shared, device: str = "cpu"):
        from rau.models.refvlm.seghead import SegHeadModel

        self.head = SegHeadModel.from_pretrained(head_dir, device=device)
        self.shared = shared
        self.precision = shared.precision

    def probabilities(self, target: np.ndarray, query: SegQuery) -> np.ndarray:
        """(V, H, W) float32 foreground probabilities of the query's visible structures."""
        import torch

        from rau.encoders.litemedsam import frame_to_image
        from rau.models.refvlm.seghead import answer_box_frame

        dev = query.device
        emb, scale = self.shared.embed(target)
        h, w = target.shape
        boxes = answer_box_frame(torch.tensor(query.locs, device=dev), query.bins, (h * scale, w * scale))
        low, _ = self.head.masks(query.vlm_net, torch.as_tensor(query.ref_features, dtype=torch.float32, device=dev),
                                 torch.as_tensor(query.tgt_features, dtype=torch.float32, device=dev),
                                 torch.tensor(query.rows, dtype=torch.long, device=dev), emb.to(dev),
                                 boxes_frame=boxes, past=query.past, precision=self.precision)
        with torch.inference_mode():
            prob = torch.sigmoid(frame_to_image(low[:, None].float(), scale, target.shape))[:, 0].cpu().numpy()
        return prob.astype(np.float32)

    def segment(self, target: np.ndarray, boxes_xyxy_px: dict[str, Box | None],
                reference: AnnotatedImage | None = None, cues: dict[str, SegCue] | None = None,
                ) -> dict[str, SegmentationOutput | None]:
        """Structures with a cue get the head's mask (score 1: the VLM's score carries the
        confidence), its extent as box, or an empty mask with the reason; others get None."""
        out: dict[str, SegmentationOutput | None] = {n: None for n in boxes_xyxy_px}
        probs: dict[int, np.ndarray] = {}
        for name, cue in (cues or {}).items():
            key = id(cue.query)
            if key not in probs:
                probs[key] = self.probabilities(target, cue.query)
            prob = probs[key][cue.row]
            mask = prob >= 0.5
            if mask.any():
                out[name] = SegmentationOutput(mask, 1.0, prob, mask_to_box(mask))
            else:
                out[name] = SegmentationOutput(mask, 0.0, prob, None, "the <seg> query decodes to an empty mask")
        return out


class MemSegQuerySegmenter(Segmenter):
    """``<seg>`` cues -> masks through the memory segmenter (the paper's RAU, issue 15 item 3).

    Per structure the memory segmenter (:class:`rau.methods.memseg.MemSegSegmenter`) holds the
    reference image and the structure's reference mask in its memory, reads the reference mask
    moved into the VLM's answer box as its prior (the spatial cue: where) and the ``<seg>`` query,
    projected by a ``decoder="memseg"`` head into prompt tokens of its mask decoder (what). The
    target is encoded once (the memory segmenter's memo serves the VLM's features too). The mask's
    extent becomes the box, as with :class:`SegHeadSegmenter`.

    ``segment_all``: a structure without a cue (the VLM answers "not visible", or its box does not
    decode) is segmented from memory alone, as ``sam2-memory`` does (:attr:`Method.segment_all`
    keeps it); else it gets None.
    """

    name = "seg-head+memseg"
    uses_reference = True
    needs_boxes = True
    reads_cues = True

    def __init__(self, head_dir: str | Path, *, memseg, device: str = "cpu", segment_all: bool = False):
        from rau.errors import RauInputError
        from rau.models.refvlm.seghead import SegHeadModel

        self.head = SegHeadModel.from_pretrained(head_dir, device=device)
        if self.head.config.decoder != "memseg":
            raise RauInputError(f"--seg-head: {head_dir} prompts LiteMedSAM's decoder, not the memory segmenter's")
        self.memseg = memseg
        self.segment_all = bool(segment_all)
        self.needs_boxes = not self.segment_all

    def segment(self, target: np.ndarray, boxes_xyxy_px: dict[str, Box | None],
                reference: AnnotatedImage | None = None, cues: dict[str, SegCue] | None = None,
                ) -> dict[str, SegmentationOutput | None]:
        """Structures with a cue and a box get the memory segmenter's mask; the others get None, or
        with ``segment_all`` the memory segmenter's mask from memory alone."""
        import torch

        from rau.errors import RauInputError
        from rau.tokens.loc import move_into_box

        if reference is None:
            raise RauInputError("reference: rau-seg's memory segmenter reads the reference's masks; pass the reference")
        out: dict[str, SegmentationOutput | None] = {n: None for n in boxes_xyxy_px}
        names = [n for n, c in (cues or {}).items() if isinstance(c, SegCue) and boxes_xyxy_px.get(n) is not None]
        if self.segment_all and (alone := [n for n in boxes_xyxy_px if n not in names]):
            out.update(self.memseg.segment(target, {n: None for n in alone}, reference))
        if not names:
            return out
        tokens: dict[int, Any] = {}
        for name in names:
            q = cues[name].query
            if id(q) not in tokens:
                dev = q.device
                tokens[id(q)] = self.head.query_tokens(
                    q.vlm_net, torch.as_tensor(q.ref_features, dtype=torch.float32, device=dev),
                    torch.as_tensor(q.tgt_features, dtype=torch.float32, device=dev),
                    torch.tensor(q.rows, dtype=torch.long, device=dev), past=q.past).cpu()
        hw = target.shape
        priors = {n: move_into_box(reference.masks[n], boxes_xyxy_px[n], hw) for n in names}
        toks = torch.stack([tokens[id(cues[n].query)][cues[n].row] for n in names])
        segs = self.memseg.decode(target, [reference], names, boxes_xyxy_px, priors, toks)
        for name, seg in segs.items():
            if seg.mask.any():
                out[name] = replace(seg, box_xyxy_px=mask_to_box(seg.mask))
            else:
                out[name] = replace(seg, score=0.0, box_xyxy_px=None, reason="the <seg> query decodes to an empty mask")
        return out
