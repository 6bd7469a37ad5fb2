"""SAM2 memory segmenter on a tiny random-weight model: shapes, prompt order, bad input, save/load."""

import numpy as np
import pytest

pytest.importorskip("transformers")

from rau.data.annotated import AnnotatedImage  # noqa: E402
from rau.errors import CheckpointError, RauInputError  # noqa: E402
from rau.methods.sam2_memory import REFERENCE_FRAME, TARGET_FRAME, Sam2MemorySegmenter  # noqa: E402

REF_HW = (96, 112)
TARGET_HW = (64, 80)


def disk(hw, cy, cx, r):
    yy, xx = np.mgrid[: hw[0], : hw[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def smooth_image(hw, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: hw[0], : hw[1]]
    img = 0.5 + 0.3 * np.sin(xx / 7.0) * np.cos(yy / 9.0) + 0.05 * rng.standard_normal(hw)
    return np.clip(img, 0, 1).astype(np.float32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models on one thread


@pytest.fixture(scope="module")
def seg(one_torch_thread):
    return Sam2MemorySegmenter.tiny(seed=0)


@pytest.fixture(scope="module")
def reference():
    masks = {"lung": disk(REF_HW, 40, 50, 18), "heart": disk(REF_HW, 75, 30, 9)}
    return AnnotatedImage(smooth_image(REF_HW, 0), masks, {"id": "ref"})


@pytest.fixture(scope="module")
def target():
    return smooth_image(TARGET_HW, 1)


def check_outputs(out, names):
    assert list(out) == names
    for o in out.values():
        assert o.mask.shape == TARGET_HW and o.mask.dtype == bool
        assert isinstance(o.score, float) and 0.0 <= o.score <= 1.0


def test_interface_flags(seg):
    assert (seg.name, seg.uses_reference, seg.needs_boxes) == ("sam2-memory", True, False)


def test_memory_only_route_at_target_size(seg, reference, target):
    check_outputs(seg.segment(target, {"lung": None, "heart": None}, reference), ["lung", "heart"])


def test_box_route_and_prompt_order(seg, reference, target, monkeypatch):
    calls = []
    add, forward = seg.processor.add_inputs_to_inference_session, seg.model.forward

    def spy_add(session, frame_idx, obj_ids, **kw):
        calls.append(("add", frame_idx, "mask" if kw.get("input_masks") is not None else "box", list(obj_ids)))
        return add(session, frame_idx, obj_ids, **kw)

    def spy_forward(session, frame_idx=None, **kw):
        calls.append(("run", frame_idx))
        return forward(session, frame_idx=frame_idx, **kw)

    encodes = []
    hook = seg.model.vision_encoder.register_forward_hook(lambda *a: encodes.append(1))
    monkeypatch.setattr(seg.processor, "add_inputs_to_inference_session", spy_add)
    monkeypatch.setattr(seg.model, "forward", spy_forward)
    try:
        out = seg.segment(target, {"lung": (20.0, 10.0, 60.0, 50.0), "heart": None}, reference)
    finally:
        hook.remove()
    check_outputs(out, ["lung", "heart"])
    # mask on frame 0 -> run 0 -> run 1 from memory -> box on the tracked frame 1 -> run 1 again
    assert calls == [("add", REFERENCE_FRAME, "mask", [1, 2]), ("run", REFERENCE_FRAME), ("run", TARGET_FRAME),
                     ("add", TARGET_FRAME, "box", [1]), ("run", TARGET_FRAME)]
    assert len(encodes) == 2  # each frame encoded once, shared by both structures and both frame-1 runs


def test_unboxed_structure_unaffected_by_other_box(seg, reference, target):
    plain = seg.segment(target, {"lung": None, "heart": None}, reference)
    boxed = seg.segment(target, {"lung": (20.0, 10.0, 60.0, 50.0), "heart": None}, reference)
    assert np.array_equal(plain["heart"].mask, boxed["heart"].mask)
    assert plain["heart"].score == pytest.approx(boxed["heart"].score)


def test_box_outside_image_falls_back_to_memory(seg, reference, target):
    plain = seg.segment(target, {"lung": None}, reference)
    outside = seg.segment(target, {"lung": (500.0, 500.0, 600.0, 600.0)}, reference)
    assert np.array_equal(plain["lung"].mask, outside["lung"].mask)


def test_no_structures(seg, reference, target):
    assert seg.segment(target, {}, reference) == {}


def test_missing_reference(seg, target):
    with pytest.raises(RauInputError, match="reference"):
        seg.segment(target, {"lung": None}, None)


def test_reference_lacks_structure_or_is_empty(seg, reference, target):
    with pytest.raises(RauInputError, match="'liver'"):
        seg.segment(target, {"liver": None}, reference)
    empty = AnnotatedImage(reference.image, {"lung": np.zeros(REF_HW, bool)})
    with pytest.raises(RauInputError, match="'lung'"):
        seg.segment(target, {"lung": None}, empty)


def test_bad_target_shape(seg, reference):
    with pytest.raises(RauInputError, match="target"):
        seg.segment(np.zeros((4, 5, 3), np.float32), {"lung": None}, reference)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint: .*not a folder"):
        Sam2MemorySegmenter(checkpoint=tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no SAM2 weights are bundled"):
        Sam2MemorySegmenter()
    with pytest.raises(CheckpointError, match="cannot load"):
        Sam2MemorySegmenter(checkpoint=tmp_path)  # an empty folder


def test_save_load_identity(seg, reference, target, tmp_path):
    seg.model.save_pretrained(tmp_path)
    loaded = Sam2MemorySegmenter(checkpoint=tmp_path)
    boxes = {"lung": (20.0, 10.0, 60.0, 50.0), "heart": None}
    a, b = seg.segment(target, boxes, reference), loaded.segment(target, boxes, reference)
    for name in boxes:
        assert np.array_equal(a[name].mask, b[name].mask)
        assert a[name].score == pytest.approx(b[name].score)


def test_score_fallback_without_object_logits(seg):
    logits = np.full((2, 4, 5), -3.0, np.float32)
    logits[0, :2] = 2.0
    scores = seg.scores(logits, None)
    assert scores[0] == pytest.approx(1 / (1 + np.exp(-2.0))) and scores[1] == 0.0
