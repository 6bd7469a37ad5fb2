"""Ground-truth boxes from the target's own masks: the upper bound of the box route (evaluation only)."""

from __future__ import annotations

from rau.data.annotated import AnnotatedImage
from rau.errors import RauInputError
from rau.geometry import mask_to_box
from rau.methods.interfaces import Localization, Localizer


class OracleLocalizer(Localizer):
    name = "oracle"
    reads_target_truth = True

    def localize(self, reference: AnnotatedImage, target: AnnotatedImage, structures: list[str]) -> dict[str, Localization]:
        if not target.masks:
            raise RauInputError(
                "method: 'oracle-box' reads the target's ground-truth masks, and the target has none; "
                "use it with `rau eval`, or choose another --method"
            )
        out = {}
        for name in structures:
            box = mask_to_box(target.masks[name]) if name in target.masks else None
            out[name] = Localization(answer="yes" if box else "no", box_xyxy_px=box, score=1.0 if box else 0.0,
                                     reason=None if box else "not in the target's ground truth")
        return out
