"""Oracles (evaluation only), each the upper bound of one route, read from the target's own masks:

- :class:`OracleLocalizer`: ground-truth boxes (``oracle-box``: how good a box-prompted segmenter
  can be when the box is perfect);
- :class:`SelfReferenceMethod`: the target's own image and masks as its reference (``oracle-memory``:
  how closely a reference-following segmenter can follow a perfect reference; what is lost there is
  the segmenter's own, not the correspondence between two images)."""

from __future__ import annotations

from rau.data.annotated import AnnotatedImage, StructureResult, TargetResult
from rau.errors import RauInputError
from rau.geometry import mask_to_box
from rau.methods.interfaces import Localization, Localizer, Method


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


class SelfReferenceMethod(Method):
    """A reference-following segmenter given the target itself as its reference (its image and
    ground-truth masks; the memory segmenter's default prior is then the truth placed exactly).
    Structures the target's truth lacks are answered "no" without running. No calibration: an
    oracle's confidence means nothing."""

    reads_target_truth = True

    def predict(self, reference: AnnotatedImage, target: AnnotatedImage, structures: list[str] | None = None) -> TargetResult:
        if not target.masks:
            raise RauInputError(f"method: {self.name!r} reads the target's ground-truth masks, and the target has none; "
                                "use it with `rau eval`, or choose another --method")
        structures = list(structures) if structures is not None else reference.structures
        present = [s for s in structures if target.annotates(s)]
        result = (super().predict(target, target, present) if present
                  else TargetResult(target.id, target.id, self.name, {}))
        result.reference_id = reference.id
        for name in structures:
            if name not in present:
                result.structures[name] = StructureResult(name, "no", None, 0.0, None, "not in the target's ground truth")
        result.structures = {s: result.structures[s] for s in structures}
        return result
