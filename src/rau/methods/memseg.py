"""Memory segmenter behind rau's :class:`~rau.methods.interfaces.Segmenter` interface (issue 15):
the segmenter of ``sam2-memory`` (memory alone) and ``reg-memseg`` (registration's warped mask as
its prior).

Per :meth:`MemSegSegmenter.segment` call: the target and the reference are each encoded once by
LiteMedSAM (:mod:`rau.encoders.litemedsam`; the last few images' embeddings are remembered, so a
reference reused for many targets is encoded once); every structure's reference mask goes to the
256 frame (:func:`rau.training.recipes.seghead.mask_to_frame`) and into memory; all structures are
decoded in one batch (:class:`rau.models.memseg.modeling.MemSegModel`) and mapped back to target
pixels (:func:`rau.encoders.litemedsam.frame_to_image`). :meth:`segment_k` fuses K references (K
memory frames). No box is needed unless the model was trained with ``box_prompt``.

A ``mask_prompt`` model also reads a prior in the target frame: by default the references' mean
mask placed as is; a localizer's soft mask (:attr:`Localization.prob`, e.g. registration's warped
reference mask) when the method hands it over as a cue (``prior="localizer"``: the ``reg-memseg``
method).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np

from rau.assets import ASSETS_DIR
from rau.data.annotated import AnnotatedImage
from rau.errors import RauInputError
from rau.geometry import Box
from rau.methods.interfaces import SegmentationOutput, Segmenter
from rau.metrics import dice

MEMO_IMAGES = 12  # embeddings remembered (target + k references; 4 MB each)
#: What :class:`MemSegSegmenter` copies for a structure it never trained on (its ``copy_from``).
COPY_FROM = ("prior", "readout")
#: The shipped memory segmenter (scripts/memseg_recipe.sh reproduces it).
DEFAULT_MEMSEG_DIR = ASSETS_DIR / "memseg"


class MemSegSegmenter(Segmenter):
    """Reference mask in memory -> target mask. ``model_dir``: a memseg model folder (or a run
    folder with ``final/``), or pass a loaded ``model``. ``equalize``, ``precision``: the
    encoder's, as :class:`rau.methods.medsam.MedSamSegmenter`; ``threshold`` on the logits.

    ``follow_unknown``: a structure whose name the model never trained on (:meth:`knows`) is not drawn
    by the decoder, which redraws the shapes it learnt (the clavicles it never saw slide onto rib
    edges), but copied from the reference; its score is the copied probability's mean inside the mask.
    ``copy_from`` says what is copied: "prior", the caller's prior where one is given (``reg-memseg``:
    registration's warped mask), else the memory readout; "readout", always the memory readout
    (:func:`rau.models.memseg.readout.feature_readout` with :data:`~rau.models.memseg.readout.FOLLOW`: the
    reference masks' values carried to the target by feature similarity; ``rau-seg`` and ``rau-memseg``,
    whose prior is the reference mask moved into a box, unbent). A model whose record lists no names
    decodes every structure. Figures: docs/RESULTS.md."""

    name = "memseg"
    uses_reference = True
    needs_boxes = False
    reads_cues = True

    def __init__(self, model_dir: str | Path | None = None, *, model=None, device: str = "cpu", equalize: bool = True,
                 threshold: float = 0.0, precision: str | None = None, follow_unknown: bool = True,
                 copy_from: str = "prior"):
        from rau.encoders import litemedsam
        from rau.models.memseg.modeling import MemSegModel
        from rau.training.checkpoints import model_folder

        if (model_dir is None) == (model is None):
            raise RauInputError("model_dir: pass a memseg model folder or a loaded model (exactly one)")
        if copy_from not in COPY_FROM:
            raise RauInputError(f"copy_from: expected one of {', '.join(COPY_FROM)}, got {copy_from!r}")
        self.model = model if model is not None else MemSegModel.from_pretrained(model_folder(model_dir), device=device)
        self.model.net.to(device).eval()
        self.model.device = device
        self.net = litemedsam.load(None, device)
        self.device, self.equalize, self.threshold = device, equalize, threshold
        self.follow_unknown, self.copy_from = bool(follow_unknown), copy_from
        self.precision = litemedsam.resolve_precision(precision, device)
        # A box-prompt model cannot decode without a box (the attribute tells Method callers).
        self.needs_boxes = bool(self.model.config.box_prompt)
        self._memo: OrderedDict = OrderedDict()
        #: measure the ``readout_agreement`` feature of each output (off for a second opinion: about a tenth of a pass)
        self.measure_readout = True
        #: ``fp32`` or ``bf16``: the memory attention and mask decoder under bfloat16 autocast (the default's second
        #: opinion, whose masks are never delivered: masks Dice 0.997 with float32's, 0.35 s less per angiogram; HISTORY s26)
        self.decode_precision = "fp32"

    def knows(self, name: str) -> bool:
        """True when the model trained on structure ``name`` (:func:`rau.models.memseg.modeling.structure_key`
        form) or its record lists no names; with ``follow_unknown`` an unknown one follows the reference."""
        from rau.models.memseg.modeling import structure_key

        names = self.model.trained_structures
        return names is None or structure_key(name) in names

    def embed(self, image: np.ndarray):
        """(H, W) image in [0, 1] -> ((1, 256, 64, 64) float32 embedding on the device, scale =
        frame px per image px); the last MEMO_IMAGES images are remembered by their pixels."""
        import torch

        from rau.encoders.litemedsam import encode, preprocess
        from rau.references.thumbnails import pixel_digest

        key = (pixel_digest(image), image.shape, self.equalize, self.precision)
        if key in self._memo:
            self._memo.move_to_end(key)
            return self._memo[key]
        x, scale = preprocess(image, equalize=self.equalize)
        with torch.inference_mode():
            result = encode(self.net, x.to(self.device), self.precision).float(), scale
        self._memo[key] = result
        while len(self._memo) > MEMO_IMAGES:
            self._memo.popitem(last=False)
        return result

    def segment(self, target: np.ndarray, boxes_xyxy_px: dict[str, Box | None],
                reference: AnnotatedImage | None = None, cues: dict | None = None) -> dict[str, SegmentationOutput | None]:
        """``cues``: structure -> (H, W) soft mask in target pixels, the prior of a ``mask_prompt``
        model (other cue types are ignored)."""
        if reference is None:
            raise RauInputError("reference: the memseg segmenter reads the reference's masks; pass the annotated reference")
        return self.segment_k(target, [reference], boxes_xyxy_px, cues)

    def segment_k(self, target: np.ndarray, references: list[AnnotatedImage],
                  boxes_xyxy_px: dict[str, Box | None], cues: dict | None = None) -> dict[str, SegmentationOutput | None]:
        """As :meth:`segment` with K references fused in memory (K memory frames). Each structure
        is read from the references that annotate it non-empty (structures with the same set share
        one batch), so one missing from a reference comes from the others; a structure no reference
        annotates (or, for a box-prompt model, without a box) gets None."""
        if not references:
            raise RauInputError("references: pass at least one annotated reference")
        out: dict[str, SegmentationOutput | None] = {n: None for n in boxes_xyxy_px}
        groups: dict[tuple[int, ...], list[str]] = {}
        for name, box in boxes_xyxy_px.items():
            have = tuple(i for i, r in enumerate(references) if r.annotates(name))
            if have and (box is not None or not self.model.config.box_prompt):
                groups.setdefault(have, []).append(name)
        for have, names in groups.items():
            out.update(self.decode(target, [references[i] for i in have], names, boxes_xyxy_px, cues))
        return out

    def _decode_autocast(self):
        """bfloat16 autocast around the memory attention and decoder, enabled when :attr:`decode_precision` is ``bf16``."""
        import torch

        return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.decode_precision == "bf16")

    def decode(self, target, references, names, boxes_xyxy_px, cues, tokens=None) -> dict[str, SegmentationOutput]:
        """``names`` (all annotated by every one of ``references``) in one batch; ``cues`` as in
        :meth:`segment`; ``tokens``: (len(names), T, 256) extra decoder prompt tokens (RAU's
        ``<seg>`` query, :class:`rau.methods.rau_seg.MemSegQuerySegmenter`) or None. With
        ``follow_unknown`` the decoder runs only on the names it knows; the others are copied."""
        import torch

        from rau.encoders.litemedsam import frame_to_image
        from rau.models.memseg.readout import FOLLOW, feature_readout
        from rau.training.recipes.seghead import mask_to_frame

        hw = target.shape
        emb, scale = self.embed(target)
        refs = torch.cat([self.embed(r.image)[0] for r in references])  # (K, 256, 64, 64)
        masks = torch.from_numpy(np.stack([[mask_to_frame(r.masks[n]) for r in references] for n in names]))
        n = len(names)
        boxes = None
        if self.model.config.box_prompt:
            boxes = torch.tensor([boxes_xyxy_px[name] for name in names], dtype=torch.float32) * scale
        prompts = use = None
        if self.model.config.mask_prompt and cues:
            priors, given = [], []
            for i, name in enumerate(names):
                cue = cues.get(name)
                given.append(isinstance(cue, np.ndarray) and cue.shape == hw)
                # without a cue: the model's default prior (its trained readout, or the references' mean mask)
                priors.append(torch.from_numpy(mask_to_frame(cue >= 0.5)).float() if given[-1] else masks[i].float().mean(0))
            prompts = torch.stack(priors)[:, None]
            if self.model.config.readout and not all(given):
                use = torch.tensor(given)
        follow = [i for i, name in enumerate(names) if self.follow_unknown and not self.knows(name)]
        drawn = [i for i in range(n) if i not in follow]  # the decoder draws only the structures it knows
        logits, ious = {}, {}
        if drawn:
            pick = torch.tensor(drawn)

            def sub(x):  # the drawn structures' rows of a per-structure batch
                return x if x is None or len(drawn) == n else x[pick]

            m = len(drawn)
            with self._decode_autocast():
                low, iou = self.model.predict(emb.expand(m, -1, -1, -1), refs[None].expand(m, -1, -1, -1, -1),
                                              sub(masks)[:, :, None].float(), sub(boxes), sub(prompts), sub(tokens),
                                              prompt_use=sub(use))
            logits = dict(zip(drawn, frame_to_image(low, scale, hw)[:, 0].cpu().numpy()))
            ious = dict(zip(drawn, iou[:, 0].cpu().numpy()))
        # what the encoder's own features say the references show, untrained (the confidence's readout_agreement;
        # a segmenter asked for a second opinion only, whose own confidence is never read, skips it)
        read = None if not self.measure_readout else \
            frame_to_image(feature_readout(emb[0], refs, masks)[:, None], scale, hw)[:, 0].cpu().numpy() > 0.5
        copied = {}  # a structure it never trained on: the reference copied (the caller's prior, else the readout)
        for i in follow if self.copy_from == "prior" else ():
            cue = (cues or {}).get(names[i])
            if isinstance(cue, np.ndarray) and cue.shape == hw:
                copied[i] = np.clip(cue, 0.0, 1.0).astype(np.float32)
        if rest := [i for i in follow if i not in copied]:
            frame = feature_readout(emb[0], refs, masks[rest], **FOLLOW)
            copied.update(zip(rest, frame_to_image(frame[:, None], scale, hw)[:, 0].cpu().numpy().astype(np.float32)))
        out = {}
        for i, name in enumerate(names):
            if i in copied:
                prob = copied[i]
                mask = prob >= 0.5
                score = float(prob[mask].mean()) if mask.any() else 0.0  # how surely the copied values say "inside"
            else:
                prob = (1.0 / (1.0 + np.exp(-logits[i]))).astype(np.float32)
                mask = logits[i] > self.threshold
                score = float(np.clip(ious[i], 0.0, 1.0))
            out[name] = SegmentationOutput(mask, score, prob, copied=i in copied,
                                           features=None if read is None else {"readout_agreement": dice(mask, read[i])})
        return out
