"""The compact RAU VLM behind rau's :class:`~rau.methods.interfaces.Localizer` interface (method ``rau``).

For each target: the target is encoded ONCE by LiteMedSAM's encoder (:mod:`rau.encoders.litemedsam`,
its padded 256 frame; the pass is shared with the LiteMedSAM segmenter of the same method),
the reference's encoding and annotation tokens are cached per reference image, and every
structure is answered in one batch (:meth:`rau.models.refvlm.modeling.RefVlmModel.answer`).

Each structure's :class:`~rau.methods.interfaces.Localization`: answer "yes"/"no" (P(yes) >= 0.5), the box
of the 4 location tokens, the mask of the 16 codes (decoded by the shipped mask tokenizer; its soft
version is ``prob``, for fusion with the segmenter) and score = P(yes) x the box tokens' mean
probability. A "no" comes without a box (the structure is reported not visible). For method
``rau-seg`` (``seg_cues`` set) each visible structure instead carries a ``<seg>`` cue
(:class:`rau.methods.rau_seg.SegCue`) for the ``<seg>`` head segmenter, and the mask codes are not
decoded (a head with ``seg_after="box"``, as the shipped one, never generates them). With
``seg_cues="prior"`` (``rau-seg`` on the memory segmenter) each visible structure's cue is the
reference's mask moved into the answer box (:func:`rau.tokens.loc.move_into_box`): the VLM's
spatial cue in the form the memory segmenter reads, its prior; the mask codes are not decoded either.
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
                 reference_cache: int = 64, assign: bool = False, seg_cues: str | None = None,
                 precision: str | None = None):
        """``shared_segmenter``: a LiteMedSAM segmenter whose encoder pass the VLM reads too;
        ``seg_cues``: None, the ``seg_after`` of the ``<seg>`` head that reads this localizer's
        cues ("box": ``<seg>`` right after the answer box; "mask": after the mask codes), or
        "prior": the reference mask moved into the answer box, for a segmenter that reads priors."""
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
        if seg_cues not in (None, "box", "mask", "prior"):
            raise ValueError(f"seg_cues: expected None, 'box', 'mask' or 'prior', got {seg_cues!r}")
        if seg_cues in ("box", "mask") and shared_segmenter is None:
            raise ValueError("seg_cues: the <seg> cues need the shared LiteMedSAM segmenter (shared_segmenter)")
        self.seg_cues = seg_cues
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
        from rau.tokens.loc import box_tokens_reason, loc_tokens_to_box, move_into_box, paste_probs

        if not structures:
            return {}
        ref_feats, ref_tokens = self._reference(reference, structures)
        tgt_feats = self.features(target.image)
        # a box-only <seg> head reads <seg> right after the box: the 16 mask codes are not decoded
        answers, past = self.model.answer(ref_feats, tgt_feats, ref_tokens, return_cache=True,
                                          box_only=self.seg_cues in ("box", "prior"))
        if self.assign:
            answers = self._assign(answers, ref_feats, tgt_feats, ref_tokens)
            past = None  # boxes moved between structures: the cache no longer matches the answers
        out = {}
        hw = target.shape
        bins = self.model.config.bins
        query = self._seg_query(ref_feats, tgt_feats, ref_tokens, answers, past) if self.seg_cues in ("box", "mask") else None
        for k, (name, a) in enumerate(zip(structures, answers)):
            feats = {"p_yes": float(a.p_yes)}  # the confidence reads the VLM's answer (Method.segment_all)
            if not a.visible:
                out[name] = Localization("no", None, a.p_yes, "the model answers that the structure is not visible",
                                         features=feats)
                continue
            score = a.p_yes * a.box_score
            if self.seg_cues is not None:  # the answer's box + a cue for the segmenter (mask codes unused)
                reason = box_tokens_reason(a.loc, bins)
                if reason is not None:
                    out[name] = Localization("no", None, 0.0, f"model answer does not decode: {reason}", features=feats)
                    continue
                box = loc_tokens_to_box(a.loc, hw, bins)
                # "prior": the reference mask placed in the box; else rau-seg's <seg> query
                cue = move_into_box(reference.masks[name], box, hw) if query is None else query.cue(k)
                out[name] = Localization("yes", box, score, cue=cue, features=feats)
                continue
            decoded = self.tokenizer.decode(a.loc, a.codes, hw)
            if decoded.mask is None:
                out[name] = Localization("no", decoded.box_xyxy_px, 0.0, f"model answer does not decode: {decoded.reason}",
                                         features=feats)
                continue
            box = loc_tokens_to_box(a.loc, hw, bins)
            prob = paste_probs(self.tokenizer.decode_crop(a.codes), box, hw).astype(np.float32)
            out[name] = Localization("yes", decoded.box_xyxy_px, score, None, decoded.mask, prob, features=feats)
        return out

    def _seg_query(self, ref_feats, tgt_feats, ref_tokens, answers, past=None):
        """rau-seg: the ``<seg>`` query of every visible structure, batched as one
        :class:`rau.methods.rau_seg.SegQuery` (``past``: the answers' decoding cache, one row per
        structure, continued by the head instead of recomputed)."""
        import torch

        from rau.methods.rau_seg import SegQuery
        from rau.models.refvlm.modeling import select_cache

        vis = [k for k, a in enumerate(answers) if a.visible]
        v = self.model.vocab
        dev = self.model.device
        rows = [v.prompt(*ref_tokens[k]) + v.answer(answers[k].loc, answers[k].codes) for k in vis]
        if past is not None and vis:
            past = select_cache(past, torch.tensor(vis, dtype=torch.long, device=dev))
        return SegQuery(self.model.net, self.model.config.bins, dev, vis, rows, [answers[k].loc for k in vis],
                        ref_feats, tgt_feats, past)
