"""Pure tests: prompt templates, answer targets and robust parsing of generated text."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rau.geometry import qwen_smart_resize
from rau.parsing import ParsedAnswer, parse_box_answer, parse_yes_no
from rau.prompts import TEMPLATES, box_to_model, build_messages, build_question, target_text

TARGET_HW = (300, 400)
MODEL_HW = qwen_smart_resize(*TARGET_HW)  # (308, 392): both sides changed, non-uniform scale


# ----------------------------------------------------------------------------- prompts
def test_build_messages_two_images_then_text():
    msgs = build_messages("localize", "heart")
    assert len(msgs) == 1 and msgs[0]["role"] == "user"
    content = msgs[0]["content"]
    assert [c["type"] for c in content] == ["image", "image", "text"]
    text = content[2]["text"]
    assert text.startswith(
        "The first image is the reference with heart outlined and labelled. "
        "Find heart in the second image and give its bounding box."
    )
    assert '"bbox_2d"' in text


def test_build_messages_with_answer_appends_assistant_turn():
    msgs = build_messages("visible", "left lung", answer="yes")
    assert msgs[-1] == {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}
    assert "Is left lung visible in the second image?" in msgs[0]["content"][2]["text"]


def test_identify_with_options():
    q = build_question("identify", options=["heart", "aorta"])
    assert "Which structure is marked in the second image?" in q and "heart, aorta" in q


def test_paraphrase_default_is_first_and_rng_is_seeded():
    assert build_question("localize", "liver").startswith(TEMPLATES["localize"][0].format(structure="liver"))
    picks = [build_question("localize", "liver", rng=np.random.default_rng(s)) for s in range(20)]
    again = [build_question("localize", "liver", rng=np.random.default_rng(s)) for s in range(20)]
    assert picks == again
    assert len(set(picks)) == len(TEMPLATES["localize"])


def test_norm1000_prompt_mentions_scale():
    assert "0-1000" in build_question("localize", "heart", coords="norm1000")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"task": "segment", "structure": "heart"},
        {"task": "localize", "structure": ""},
        {"task": "localize", "structure": "heart", "coords": "xyxy"},
    ],
)
def test_bad_prompt_arguments_raise_value_error(kwargs):
    task = kwargs.pop("task")
    with pytest.raises(ValueError):
        build_messages(task, **kwargs)


def test_target_text_forms():
    text = target_text("localize", "heart", box_xyxy_px=(40, 30, 200, 150), target_hw=TARGET_HW, model_hw=MODEL_HW)
    ans = json.loads(text)
    assert ans["label"] == "heart" and ans["visible"] == "yes" and len(ans["bbox_2d"]) == 4
    assert all(isinstance(v, int) for v in ans["bbox_2d"])
    assert json.loads(target_text("localize", "heart")) == {"label": "heart", "visible": "no"}
    assert target_text("visible", "heart", box_xyxy_px=(0, 0, 5, 5)) == "yes"
    assert target_text("visible", "heart") == "no"
    assert target_text("identify", "heart") == "heart"
    with pytest.raises(ValueError, match="model_hw"):
        target_text("localize", "heart", box_xyxy_px=(0, 0, 5, 5), target_hw=TARGET_HW)


# ------------------------------------------------------------- coordinate round trips
@pytest.mark.parametrize("hw", [(300, 400), (517, 233), (97, 1003), (1000, 1000), (33, 47), (2048, 1536)])
@pytest.mark.parametrize("coords", ["qwen25_abs", "norm1000"])
def test_box_round_trip_original_model_original(hw, coords):
    model_hw = qwen_smart_resize(*hw)
    assert model_hw[0] % 28 == 0 and model_hw[1] % 28 == 0
    rng = np.random.default_rng(hw[0] * 7 + hw[1])
    for _ in range(20):
        xs = np.sort(rng.uniform(0, hw[1], 2))
        ys = np.sort(rng.uniform(0, hw[0], 2))
        box = (float(np.floor(xs[0])), float(np.floor(ys[0])), float(np.ceil(xs[1]) + 1), float(np.ceil(ys[1]) + 1))
        box = (box[0], box[1], min(box[2], hw[1]), min(box[3], hw[0]))
        text = target_text("localize", "heart", box_xyxy_px=box, target_hw=hw, model_hw=model_hw, coords=coords)
        parsed = parse_box_answer(text, hw, model_hw, coords=coords)
        assert parsed.reason is None and parsed.box_xyxy_px is not None, parsed
        # Integer model coordinates: at most half a model step of error per side.
        step_x = hw[1] / (1000 if coords == "norm1000" else model_hw[1])
        step_y = hw[0] / (1000 if coords == "norm1000" else model_hw[0])
        tol = np.array([step_x, step_y, step_x, step_y]) * 0.5 + 1e-6
        assert np.all(np.abs(np.array(parsed.box_xyxy_px) - np.array(box)) <= tol), (box, parsed.box_xyxy_px)


def test_qwen25_abs_scales_per_axis():
    # 300x400 -> 308x392: y grows, x shrinks; a model box of the whole resized image is the whole target.
    parsed = parse_box_answer(json.dumps({"bbox_2d": [0, 0, MODEL_HW[1], MODEL_HW[0]]}), TARGET_HW, MODEL_HW)
    assert parsed.box_xyxy_px == pytest.approx((0, 0, 400, 300))
    parsed = parse_box_answer(json.dumps({"bbox_2d": [98, 77, 196, 154]}), TARGET_HW, MODEL_HW)
    assert parsed.box_xyxy_px == pytest.approx((100, 75, 200, 150))


def test_norm1000():
    parsed = parse_box_answer('{"bbox_2d": [250, 100, 500, 1000]}', TARGET_HW, None, coords="norm1000")
    assert parsed.box_xyxy_px == pytest.approx((100, 30, 200, 300))
    assert box_to_model((100, 30, 200, 300), TARGET_HW, None, "norm1000") == [250, 100, 500, 1000]


# ----------------------------------------------------------------- accepted answers
EXPECTED = pytest.approx((100, 75, 200, 150))
GOOD = {
    "json": '{"label": "heart", "visible": "yes", "bbox_2d": [98, 77, 196, 154]}',
    "fenced_list": '```json\n[\n\t{"bbox_2d": [98, 77, 196, 154], "label": "heart"}\n]\n```',
    "single_quotes_trailing_comma": "{'label': 'heart', 'bbox_2d': [98, 77, 196, 154],}",
    "prose_around_json": 'Sure! Here it is: {"bbox_2d": [98, 77, 196, 154], "label": "heart"} Hope this helps.',
    "string_numbers": '{"bbox_2d": ["98", "77", "196", "154"]}',
    "floats": '{"bbox_2d": [98.0, 77.0, 196.0, 154.0]}',
    "other_key": '{"bbox": [98, 77, 196, 154]}',
    "bare_list": "[98, 77, 196, 154]",
    "qwen_tokens": "<|object_ref_start|>heart<|object_ref_end|><|box_start|>(98,77),(196,154)<|box_end|><|im_end|>",
    "qwen_tokens_skipped": "heart(98, 77), (196, 154)",
    "bare_numbers": "98, 77, 196, 154.",
    "named_numbers": "x0=98 y0=77 x1=196 y1=154",
}


@pytest.mark.parametrize("name", list(GOOD))
def test_accepted_answer_forms(name):
    parsed = parse_box_answer(GOOD[name], TARGET_HW, MODEL_HW, structure="heart")
    assert parsed.reason is None, parsed
    assert parsed.box_xyxy_px == EXPECTED
    assert parsed.visible == "yes"


def test_list_picks_asked_structure():
    text = json.dumps([{"label": "aorta", "bbox_2d": [1, 2, 3, 4]}, {"label": "heart", "bbox_2d": [98, 77, 196, 154]}])
    assert parse_box_answer(text, TARGET_HW, MODEL_HW, structure="Heart").box_xyxy_px == EXPECTED
    first = parse_box_answer(text, TARGET_HW, MODEL_HW).box_xyxy_px  # no structure: first entry with a box
    assert first == pytest.approx((1.0204, 1.948, 3.061, 3.896), abs=1e-3)


def test_labels_are_returned():
    assert parse_box_answer(GOOD["json"], TARGET_HW, MODEL_HW).label == "heart"
    assert parse_box_answer(GOOD["qwen_tokens"], TARGET_HW, MODEL_HW).label == "heart"


def test_small_overshoot_is_clipped():
    parsed = parse_box_answer('{"bbox_2d": [-3, -2, 400, 310]}', TARGET_HW, MODEL_HW)
    assert parsed.reason is None
    x0, y0, x1, y1 = parsed.box_xyxy_px
    assert (x0, y0) == (0.0, 0.0) and x1 == 400 and y1 == 300


# ---------------------------------------------------------------- rejected answers
BAD = {
    "empty": "",
    "whitespace": "   \n ",
    "none": None,
    "not_a_string": 12345,
    "only_eos": "<|im_end|>",
    "prose": "The heart is in the middle of the chest.",
    "truncated_json": '{"label": "heart", "visible": "yes", "bbox_2d": [98, 77, 19',
    "truncated_fence": '```json\n{"bbox_2d": [98, 77',
    "three_numbers": '{"bbox_2d": [98, 77, 196]}',
    "five_numbers": "98 77 196 154 12",
    "nan": '{"bbox_2d": [NaN, 77, 196, 154]}',
    "nan_string": '{"bbox_2d": ["nan", 77, 196, 154]}',
    "inf": '{"bbox_2d": [98, 77, 1e400, 154]}',
    "inverted_x": '{"bbox_2d": [196, 77, 98, 154]}',
    "inverted_y": '{"bbox_2d": [98, 154, 196, 77]}',
    "zero_area": '{"bbox_2d": [98, 77, 98, 154]}',
    "far_out_of_range": '{"bbox_2d": [98, 77, 5000, 154]}',
    "negative_out_of_range": '{"bbox_2d": [-500, 77, 196, 154]}',
    "outside_image": '{"bbox_2d": [395, 77, 410, 154]}',
    "non_numeric": '{"bbox_2d": ["left", 77, 196, 154]}',
    "booleans": '{"bbox_2d": [true, 77, 196, 154]}',
    "nested_garbage": '{"bbox_2d": [[98, 77], [196, 154]]}',
    "null_box": '{"label": "heart", "bbox_2d": null}',
    "dict_without_box": '{"label": "heart"}',
    "not_visible": '{"label": "heart", "visible": "no"}',
    "not_visible_with_box": '{"label": "heart", "visible": "no", "bbox_2d": [98, 77, 196, 154]}',
    "plain_no": "No.",
    "deep_nesting": "[" * 5000 + "]" * 5000,
    "unbalanced": "{" * 3000,
    "binary_junk": "\x00\x12\udcff{\"\\),{\"\x12",
    "huge_number": '{"bbox_2d": [98, 77, 196, ' + "9" * 400 + "]}",
}


@pytest.mark.parametrize("name", list(BAD))
def test_malformed_answers_give_none_and_reason(name):
    parsed = parse_box_answer(BAD[name], TARGET_HW, MODEL_HW)
    assert isinstance(parsed, ParsedAnswer)
    assert parsed.box_xyxy_px is None
    assert isinstance(parsed.reason, str) and parsed.reason


def test_not_visible_reason_and_flag():
    parsed = parse_box_answer(BAD["not_visible"], TARGET_HW, MODEL_HW)
    assert parsed.visible == "no" and "not visible" in parsed.reason


def test_out_of_range_reason_mentions_convention():
    # A norm1000 answer read as Qwen2.5-VL absolute pixels of a small image.
    parsed = parse_box_answer('{"bbox_2d": [100, 200, 900, 950]}', (112, 112), (112, 112))
    assert parsed.box_xyxy_px is None and "convention" in parsed.reason


def test_random_garbage_never_raises():
    rng = np.random.default_rng(0)
    alphabet = list('{}[]()"\',:;.-+eE0123456789 nainfbox_2dlabelvisibleyes<|>`\n\t') + ["<|box_start|>", "NaN"]
    for _ in range(500):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(0, 60))))
        parsed = parse_box_answer(text, TARGET_HW, MODEL_HW)
        if parsed.box_xyxy_px is None:
            assert parsed.reason
        else:
            x0, y0, x1, y1 = parsed.box_xyxy_px
            assert all(math.isfinite(v) for v in parsed.box_xyxy_px)
            assert 0 <= x0 < x1 <= TARGET_HW[1] and 0 <= y0 < y1 <= TARGET_HW[0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_hw": (0, 10), "model_hw": (28, 28)},
        {"target_hw": (10,), "model_hw": (28, 28)},
        {"target_hw": (10, 10), "model_hw": None},
        {"target_hw": (10, 10), "model_hw": (28, 28), "coords": "pixels"},
    ],
)
def test_bad_parser_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        parse_box_answer("[1, 2, 3, 4]", **kwargs)


# ---------------------------------------------------------------------- yes / no
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("yes", "yes"),
        ("Yes.", "yes"),
        ("No, it is not visible.", "no"),
        ("NO", "no"),
        ("It is not visible", "no"),
        ('{"visible": "yes"}', "yes"),
        ('{"visible": false}', "no"),
        ("true", "yes"),
        ("<|im_end|>", None),
        ("maybe", None),
        ("", None),
        (None, None),
        ("nothing here", None),
    ],
)
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) == expected
