"""The second opinion (rau.methods.second_opinion): another segmenter's agreement with the delivered mask
as the confidence feature ``second_opinion``, on the target kinds that get one."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from rau.data.annotated import AnnotatedImage
from rau.errors import RauInputError
from rau.methods.interfaces import SegmentationOutput
from rau.methods.second_opinion import SecondOpinion, agreement
from tests.conftest import synthetic_pair


class _Shifted:
    """A second segmenter that draws the reference's mask moved ``shift`` pixels to the right; the
    structures in ``copies`` it says it copied (a name it never trained on)."""

    uses_reference, needs_boxes, reads_cues = True, False, False

    def __init__(self, shift: int, copies: tuple[str, ...] = ()):
        self.shift, self.calls, self.copies = shift, 0, copies

    def segment(self, target, boxes, reference=None, cues=None):
        self.calls += 1
        return {s: SegmentationOutput(np.roll(reference.masks[s], self.shift, axis=1), 0.9, copied=s in self.copies)
                for s in boxes}


class _Kind:
    """An image-kind model that reads every image as ``kind`` (so a pair is always of the same kind)."""

    config = SimpleNamespace(kinds=["chest radiograph", "coronary angiogram", "other"])

    def __init__(self, kind: str):
        self.kind = kind

    def probs(self, image):
        return np.array([float(k == self.kind) for k in self.config.kinds])


def test_agreement_is_the_dice_of_two_masks_and_zero_where_one_is_missing():
    a = np.zeros((8, 8), bool)
    a[2:6, 2:6] = True
    b = np.roll(a, 2, axis=1)
    assert agreement(a, a) == 1.0
    assert agreement(a, b) == pytest.approx(0.5)
    assert agreement(a, None) == agreement(None, a) == agreement(a, np.zeros_like(a)) == 0.0


@pytest.mark.parametrize("kind, asked", [("coronary angiogram", True), ("chest radiograph", False)])
def test_a_method_with_a_second_opinion_feeds_its_agreement_to_the_confidence(monkeypatch, kind, asked):
    """On a target of a kind that gets one, every structure's features carry the agreement of the delivered
    mask with the second segmenter's (built once, on first use); on other targets the feature is missing
    (the calibration reads its mean there) and the second segmenter is never built. Masks are unchanged."""
    import rau.methods.confidence as confidence
    from rau.methods.registry import create_method

    monkeypatch.setattr(confidence, "default_imagekind", lambda: _Kind(kind))
    image, masks = synthetic_pair()
    reference = AnnotatedImage(image, masks, {"id": "ref"})
    target = AnnotatedImage(synthetic_pair(shift=(3, 2))[0], {}, {"id": "t"})
    made = []
    second = _Shifted(4)
    method = create_method("registration", calibration=False)
    alone = method.predict(reference, target)
    method.second_opinion = SecondOpinion(lambda: made.append(1) or second)
    for _ in range(2):
        result = method.predict(reference, target)
        for name, r in result.structures.items():
            assert np.array_equal(r.mask, alone.structures[name].mask)
            if asked:
                want = agreement(r.mask, np.roll(masks[name], 4, axis=1))
                assert r.features["second_opinion"] == pytest.approx(want) and 0 < want < 1
            else:
                assert "second_opinion" not in r.features
    assert (len(made), second.calls) == ((1, 2) if asked else (0, 0))
    # a checkout without the second segmenter's model: no feature, no error
    method.second_opinion = SecondOpinion(lambda: None)
    assert all("second_opinion" not in r.features for r in method.predict(reference, target).structures.values())


@pytest.mark.parametrize("kind, swaps", [("coronary angiogram", True), ("chest radiograph", False)])
def test_a_second_opinion_that_delivers_hands_over_its_masks_on_its_kinds(monkeypatch, kind, swaps):
    """``delivers``: on a target of its kind the second segmenter's masks are delivered (box and score from
    them) and the method's own become the opinion, the same agreement either way round; a structure it only
    copied keeps the method's mask; on other targets nothing changes."""
    import rau.methods.confidence as confidence
    from rau.geometry import mask_to_box
    from rau.methods.registry import create_method

    monkeypatch.setattr(confidence, "default_imagekind", lambda: _Kind(kind))
    image, masks = synthetic_pair()
    reference = AnnotatedImage(image, masks, {"id": "ref"})
    target = AnnotatedImage(synthetic_pair(shift=(3, 2))[0], {}, {"id": "t"})
    copied = sorted(masks)[0]
    method = create_method("registration", calibration=False)
    alone = method.predict(reference, target)
    method.second_opinion = SecondOpinion(lambda: _Shifted(4), delivers=False)
    kept = method.predict(reference, target)
    method.second_opinion = SecondOpinion(lambda: _Shifted(4, copies=(copied,)), delivers=True)
    swapped = method.predict(reference, target)
    for name, r in swapped.structures.items():
        theirs = np.roll(masks[name], 4, axis=1)
        if swaps and name != copied:
            assert np.array_equal(r.mask, theirs) and r.box_xyxy_px == mask_to_box(theirs) and r.answer == "yes"
            assert r.features["second_opinion"] == pytest.approx(kept.structures[name].features["second_opinion"])
        else:
            assert np.array_equal(r.mask, alone.structures[name].mask)
        assert ("second_opinion" in r.features) == swaps


def test_reg_refine_asks_for_a_second_opinion_unless_told_not_to():
    """On by default (built lazily: creating the method loads no memory segmenter), off with
    ``second_opinion=False``; a non-boolean is a one-line error naming the flag."""
    from rau.methods.registry import create_method
    from rau.methods.second_opinion import SECOND_OPINION_KINDS

    on = create_method("reg-refine", calibration=False)
    assert isinstance(on.second_opinion, SecondOpinion) and not on.second_opinion._made and not on.second_opinion.delivers
    assert create_method("reg-refine", calibration=False, angiogram_masks="memory").second_opinion.delivers
    assert create_method("rau-refine", calibration=False).reference_route.second_opinion is None
    assert create_method("reg-refine", calibration=False, second_opinion=False).second_opinion is None
    with pytest.raises(RauInputError, match="--second-opinion"):
        create_method("reg-refine", second_opinion="yes")
    assert SECOND_OPINION_KINDS == ("coronary angiogram",)


def test_the_masks_a_second_opinion_delivers_are_assessed_by_their_own_calibration(monkeypatch):
    """``calibration_memory`` assesses a result whose masks the second opinion delivered; the method's own
    calibration every other result. The shipped default loads one for ``--angiogram-masks memory`` only."""
    import rau.methods.confidence as confidence
    from rau.methods.registry import create_method

    used = []

    class _Cal:
        def __init__(self, name):
            self.name = name

        def __getattr__(self, attr):
            raise AttributeError(attr)

    def fake_assess(result, reference, image, calibration, checks, **kw):
        used.append(calibration.name if calibration is not None else None)

    import rau.methods.interfaces as interfaces

    monkeypatch.setattr(interfaces, "assess", fake_assess)
    image, masks = synthetic_pair()
    reference = AnnotatedImage(image, masks, {"id": "ref"})
    target = AnnotatedImage(synthetic_pair(shift=(3, 2))[0], {}, {"id": "t"})
    method = create_method("registration", calibration=False)
    method.calibration, method.calibration_memory = _Cal("own"), _Cal("memory")
    for kind, delivers in (("coronary angiogram", True), ("chest radiograph", True), ("coronary angiogram", False)):
        monkeypatch.setattr(confidence, "default_imagekind", lambda k=kind: _Kind(k))
        method.second_opinion = SecondOpinion(lambda: _Shifted(4), delivers=delivers)
        method.predict(reference, target)
    assert used == ["memory", "own", "own"]
    assert create_method("reg-refine").calibration_memory is None
    shipped = create_method("reg-refine", angiogram_masks="memory").calibration_memory
    assert shipped is not None and shipped.record.get("memory_route") is True


def test_memory_masks_with_k_references_say_that_they_apply_to_one_reference():
    """``--angiogram-masks memory`` with k references: the refiner's masks are voted as before, and a warning
    (once) says so and names the method that holds k references in one memory."""
    import warnings

    from rau.methods.registry import create_method

    image, masks = synthetic_pair()
    refs = [AnnotatedImage(image, masks, {"id": "a"}), AnnotatedImage(synthetic_pair(shift=(1, 1))[0], masks, {"id": "b"})]
    target = AnnotatedImage(synthetic_pair(shift=(3, 2))[0], {}, {"id": "t"})
    method = create_method("reg-refine", calibration=False, angiogram_masks="memory")
    with pytest.warns(UserWarning, match="sam2-memory"):
        method.predict_k(refs, target)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method.predict_k(refs, target)


def test_the_default_second_opinion_decodes_in_the_encoders_precision(tiny_memseg, monkeypatch):
    """Only compared, never delivered: the default's second opinion runs the memory attention and decoder in the
    encoder's precision (bf16 autocast on a CPU with native bf16 units), ``--angiogram-masks memory`` (whose
    masks are delivered) and ``sam2-memory`` in float32. bf16 decoding gives masks of the same shape and nearly
    the same probabilities."""
    import rau.methods.registry as registry
    from rau.methods.memseg import MemSegSegmenter

    monkeypatch.setattr(registry, "_memseg", lambda model, device, precision: MemSegSegmenter(tiny_memseg, precision=precision))
    opinion = registry._shipped_memseg("cpu", opinion_only=True)
    assert opinion.decode_precision == opinion.precision and registry._shipped_memseg("cpu").decode_precision == "fp32"
    made = registry.create_method("reg-refine", calibration=False).second_opinion.segmenter
    assert made.decode_precision == made.precision
    assert registry.create_method("reg-refine", calibration=False, angiogram_masks="memory").second_opinion.segmenter \
        .decode_precision == "fp32"
    # --precision reaches it: float32 throughout when asked
    asked = registry.create_method("reg-refine", calibration=False, precision="fp32").second_opinion.segmenter
    assert asked.precision == asked.decode_precision == "fp32"
    image, masks = synthetic_pair((96, 96))
    ref = AnnotatedImage(image, masks, {"id": "r"})
    target = synthetic_pair((96, 96), shift=(3, 2))[0]
    seg = MemSegSegmenter(tiny_memseg)
    full = seg.segment(target, {s: None for s in masks}, ref)
    seg.decode_precision = "bf16"
    half = seg.segment(target, {s: None for s in masks}, ref)
    for s in masks:
        assert half[s].mask.shape == full[s].mask.shape and half[s].mask.dtype == bool
        assert np.abs(half[s].prob - full[s].prob).max() < 0.1
