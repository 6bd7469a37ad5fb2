"""The compact RAU VLM behind rau's :class:`~rau.methods.interfaces.Localizer` interface (method ``rau``).

For each target: the target is encoded ONCE by LiteMedSAM's encoder (:mod:`rau.encoders.litemedsam`,
its padded 256 frame; the pass is shared with the LiteMedSAM segmenter of the same method),
the reference's encoding and annotation tokens are cached per reference image, and every
structure is answered in one batch (:meth:`rau.models.refvlm.modeling.RefVlmModel.answer`).

Each structure's :class:`~rau.methods.interfaces.Localization`: answer "yes"/"no" (P(yes) >= 0.5), the box
of the 4 location tokens, the mask of the 16 codes (decoded by the shipped mask tokenizer; its soft
version is ``prob``, for fusion with the segmenter) and score = P(yes) x the box tokens' mean
probability. A "no" comes without a box (the structure is reported not visible). With a ``<seg>``
head (method ``rau-seg``) the mask comes from the head and the box is that mask's extent; the mask
codes are not decoded (a head with ``seg_after="box"``, as the shipped one, never generates them).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np

from rau.assets import ASSETS_DIR
from rau.data.annotated import AnnotatedImage
from rau.methods.interfaces import Localization, Localizer

#: The shipped default weights (safetensors, fp16) with their config and training record.
DEFAULT_DIR = ASSETS_DIR / "refvlm"


def default_available() -> bool:
    return (DEFAULT_DIR / "model.safetensors").is_file() and (DEFAULT_DIR / "config.json").is_file()


class RefVlmLocalizer(Localizer):
    name = "rau-vlm"

    def __init__(self, model_dir: str | Path | None = None, *, device: str = "cpu", shared_segmenter=None,
                 reference_cache: int = 64, assign: bool = False, seg_head: str | Path | None = None,
                 precision: str | None = None):
        from rau.tokens.masktok import load_default
        from rau.models.refvlm.modeling import RefVlmModel
        from rau.encoders.litemedsam import resolve_precision

        self.model = RefVlmModel.from_pretrained(model_dir or DEFAULT_DIR, device=device)
        self.model_dir = Path(model_dir or DEFAULT_DIR)
        self.tokenizer = load_default()
        self.shared = shared_segmenter
        self.assign = assign
        #: the LiteMedSAM encoder's precision (auto/fp32/bf16, see rau.encoders.litemedsam.resolve_precision)
        self.precision = getattr(shared_segmenter, "precision", None) or resolve_precision(precision, device)
        self.seg_head = None
        if seg_head is not None:  # rau-seg: masks from the <seg> query (its encoder pass is shared too)
            from rau.models.refvlm.seghead import SegHeadModel
            from rau.methods.medsam import MedSamSegmenter

            self.seg_head = SegHeadModel.from_pretrained(seg_head, device=device)
            self.seg_head.check_vlm(self.model_dir)
            self.shared = shared_segmenter or MedSamSegmenter(device=device, precision=self.precision)
        self._refs: OrderedDict[str, tuple] = OrderedDict()
        self._ref_cache = reference_cache

    # ---- encodings
    def features(self, image: np.ndarray):
        """(1, C, g, g) features of one image; reuses the shared segmenter's encoder pass when its
        preprocessing is the VLM's (same equalisation; both use LiteMedSAM's padded frame)."""
        import torch.nn.functional as F

        cfg = self.model.config
        seg = self.shared
        if seg is not None and getattr(seg, "equalize", None) == (cfg.preprocessing == "equalize"):
            emb, _ = seg.embed(image)
            return F.adaptive_avg_pool2d(emb, cfg.grid).float()
        return self.model.encode([image], precision=self.precision)

    def _reference(self, reference: AnnotatedImage, structures: list[str]):
        from rau.references.thumbnails import pixel_digest

        key = pixel_digest(reference.image)
        entry = self._refs.get(key)
        if entry is None:
            entry = (self.features(reference.image), {})
            self._refs[key] = entry
            while len(self._refs) > self._ref_cache:
                self._refs.popitem(last=False)
        else:
            self._refs.move_to_end(key)
        feats, tokens = entry
        for s in structures:
            if s not in tokens:
                t = self.tokenizer.encode(reference.masks[s])
                tokens[s] = (tuple(t.loc), tuple(t.codes))
        return feats, [tokens[s] for s in structures]

    def _assign(self, answers, ref_feats, tgt_feats, ref_tokens):
        """One-to-one boxes: the visible structures' predicted boxes are the candidates, each
        structure is scored on every candidate and the Hungarian assignment decides (a box moves
        with the mask codes generated for it)."""
        from dataclasses import replace

        from rau.models.refvlm.modeling import assign_boxes

        vis = [i for i, a in enumerate(answers) if a.visible]
        if len(vis) < 2:
            return answers
        cands = [answers[i].loc for i in vis]
        ll = self.model.box_loglik(ref_feats, tgt_feats, [ref_tokens[i] for i in vis], cands)
        out = list(answers)
        for row, col in zip(vis, assign_boxes(ll)):
            src = answers[vis[col]]
            out[row] = replace(answers[row], loc=src.loc, codes=src.codes)
        return out

    # ---- Localizer
    def localize(self, reference: AnnotatedImage, target: AnnotatedImage, structures: list[str]) -> dict[str, Localization]:
        from rau.tokens.loc import box_tokens_reason, loc_tokens_to_box, paste_probs
        from rau.geometry import mask_to_box

        if not structures:
            return {}
        ref_feats, ref_tokens = self._reference(reference, structures)
        tgt_feats = self.features(target.image)
        # a box-only <seg> head reads <seg> right after the box: the 16 mask codes are not decoded
        box_only = self.seg_head is not None and self.seg_head.config.seg_after == "box"
        answers, past = self.model.answer(ref_feats, tgt_feats, ref_tokens, return_cache=True, box_only=box_only)
        if self.assign:
            answers = self._assign(answers, ref_feats, tgt_feats, ref_tokens)
            past = None  # boxes moved between structures: the cache no longer matches the answers
        out = {}
        hw = target.shape
        bins = self.model.config.bins
        seg_probs = self._seg_query(target, ref_feats, tgt_feats, ref_tokens, answers, past) if self.seg_head else {}
        for k, (name, a) in enumerate(zip(structures, answers)):
            if not a.visible:
                out[name] = Localization("no", None, a.p_yes, "the model answers that the structure is not visible")
                continue
            score = a.p_yes * a.box_score
            if self.seg_head is not None:  # rau-seg: the answer's box + the <seg> mask (mask codes unused)
                reason = box_tokens_reason(a.loc, bins)
                if reason is not None:
                    out[name] = Localization("no", None, 0.0, f"model answer does not decode: {reason}")
                    continue
                prob = seg_probs[k]
                mask = prob >= 0.5
                if not mask.any():
                    out[name] = Localization("no", loc_tokens_to_box(a.loc, hw, bins), 0.0,
                                             "the <seg> query decodes to an empty mask")
                    continue
                # the <seg> mask refines the VLM's box, so its extent is the better box (Wingspan held-out
                # box IoU 0.890 vs 0.789 for the answer box; docs/HISTORY.md)
                out[name] = Localization("yes", mask_to_box(mask), score, None, mask, prob)
                continue
            decoded = self.tokenizer.decode(a.loc, a.codes, hw)
            if decoded.mask is None:
                out[name] = Localization("no", decoded.box_xyxy_px, 0.0, f"model answer does not decode: {decoded.reason}")
                continue
            box = loc_tokens_to_box(a.loc, hw, bins)
            prob = paste_probs(self.tokenizer.decode_crop(a.codes), box, hw).astype(np.float32)
            out[name] = Localization("yes", decoded.box_xyxy_px, score, None, decoded.mask, prob)
        return out

    def _seg_query(self, target: AnnotatedImage, ref_feats, tgt_feats, ref_tokens, answers, past=None) -> dict[int, np.ndarray]:
        """rau-seg: (H, W) probabilities of the visible structures from the <seg> head, decoded on the
        target's LiteMedSAM embedding (the encoder pass the VLM's features came from). ``past``: the
        answers' decoding cache (one row per structure), continued instead of recomputed."""
        import torch

        from rau.models.refvlm.modeling import select_cache
        from rau.models.refvlm.seghead import answer_box_frame
        from rau.encoders.litemedsam import frame_to_image

        vis = [k for k, a in enumerate(answers) if a.visible]
        if not vis:
            return {}
        v = self.model.vocab
        rows = [v.prompt(*ref_tokens[k]) + v.answer(answers[k].loc, answers[k].codes) for k in vis]
        dev = self.model.device
        if past is not None:
            past = select_cache(past, torch.tensor(vis, dtype=torch.long, device=dev))
        emb, scale = self.shared.embed(target.image)
        h, w = target.shape
        boxes = answer_box_frame(torch.tensor([answers[k].loc for k in vis], device=dev), self.model.config.bins,
                                 (h * scale, w * scale))
        low, _ = self.seg_head.masks(self.model.net, torch.as_tensor(ref_feats, dtype=torch.float32, device=dev),
                                     torch.as_tensor(tgt_feats, dtype=torch.float32, device=dev),
                                     torch.tensor(rows, dtype=torch.long, device=dev), emb.to(dev),
                                     boxes_frame=boxes, past=past, precision=self.precision)
        with torch.inference_mode():
            prob = torch.sigmoid(frame_to_image(low[:, None].float(), scale, target.shape))[:, 0].cpu().numpy()
        return {k: prob[i].astype(np.float32) for i, k in enumerate(vis)}
