"""The registration refiner behind rau's :class:`~rau.methods.interfaces.Segmenter` interface
(method ``reg-refine``): registration aligns the reference image and masks with the target
(:class:`rau.methods.registration.RegistrationLocalizer` with ``warped_cues``), and the refiner
(:mod:`rau.models.refiner`) corrects each warped mask from the target and the warped reference.
Every structure is refined in one batch. A structure whose warped mask left the image gets None.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rau.assets import ASSETS_DIR
from rau.geometry import Box, mask_to_box
from rau.methods.interfaces import SegmentationOutput, Segmenter

#: The shipped refiner (scripts/refine_recipe.sh reproduces it).
DEFAULT_REFINER_DIR = ASSETS_DIR / "refiner"


class RefineSegmenter(Segmenter):
    """Warped reference mask + warped reference image + target -> target mask (reads the
    localizer's :class:`rau.methods.registration.WarpedReference` cues; boxes unused). The box
    reported is the refined mask's extent."""

    name = "refiner"
    uses_reference = False
    needs_boxes = False
    reads_cues = True

    def __init__(self, model_dir: str | Path | None = None, *, model=None, device: str = "cpu"):
        from rau.errors import RauInputError
        from rau.models.refiner.modeling import RefinerModel

        if (model_dir is None) == (model is None):
            raise RauInputError("model_dir: pass a refiner model folder or a loaded model (exactly one)")
        self.model = model if model is not None else RefinerModel.from_pretrained(model_dir, device=device,
                                                                                 what="--refiner")
        self.model.net.to(device).eval()
        self.model.device = device

    def segment(self, target: np.ndarray, boxes_xyxy_px: dict[str, Box | None], reference=None,
                cues: dict | None = None) -> dict[str, SegmentationOutput | None]:
        from rau.methods.registration import WarpedReference

        out: dict[str, SegmentationOutput | None] = {n: None for n in boxes_xyxy_px}
        have = [n for n in boxes_xyxy_px if isinstance((cues or {}).get(n), WarpedReference)
                and cues[n].prob.shape == target.shape and (cues[n].prob >= 0.5).any()]
        if not have:
            return out
        probs = self.model.predict_probs(target, cues[have[0]].image, [cues[n].prob for n in have])
        for name, p in zip(have, probs):
            mask = p > self.model.config.threshold
            out[name] = SegmentationOutput(mask, float(p[mask].mean()) if mask.any() else 0.0, p, mask_to_box(mask),
                                           reason=None if mask.any() else "the refiner erased the warped mask")
        return out
