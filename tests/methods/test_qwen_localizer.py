"""QwenLocalizer on a tiny random Qwen2.5-VL built offline (no hub, no downloads).

Random weights answer garbage, so these tests check plumbing: loading, two images of different
sizes, model-space sizes, parsing never crashing, checkpoint errors, and a LoRA training step.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from rau import AnnotatedImage, CheckpointError, RauInputError  # noqa: E402
from rau.geometry import mask_to_box, qwen_smart_resize  # noqa: E402
from rau.parsing import parse_box_answer  # noqa: E402
from rau.methods.interfaces import Localization  # noqa: E402
from rau.methods.qwen import QwenLocalizer  # noqa: E402
from rau.models.qwen.processor import encode_example  # noqa: E402
from tiny_qwen import TEST_MAX_PIXELS, TEST_MIN_PIXELS, save_tiny_checkpoint  # noqa: E402


def _image(hw: tuple[int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(hw).astype(np.float32)


def _mask(hw: tuple[int, int], r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    m = np.zeros(hw, bool)
    m[r0:r1, c0:c1] = True
    return m


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_qwen25vl"), seed=0)


@pytest.fixture(scope="module")
def localizer(checkpoint):
    return QwenLocalizer(checkpoint, max_new_tokens=24)


@pytest.fixture()
def pair():
    ref_hw, tgt_hw = (96, 128), (150, 110)  # different sizes and aspect ratios, not multiples of 28
    reference = AnnotatedImage(
        _image(ref_hw, 0),
        {"heart": _mask(ref_hw, 20, 50, 30, 70), "left lung": _mask(ref_hw, 55, 90, 10, 40)},
        {"id": "ref"},
    )
    target = AnnotatedImage(
        _image(tgt_hw, 1),
        {"heart": _mask(tgt_hw, 40, 90, 20, 80)},  # "left lung" absent: a "not visible" example
        {"id": "tgt"},
    )
    return reference, target


def test_localize_returns_one_localization_per_structure(localizer, pair):
    reference, target = pair
    t0 = time.perf_counter()
    out = localizer.localize(reference, target, ["heart", "left lung"])
    elapsed = time.perf_counter() - t0
    assert set(out) == {"heart", "left lung"}
    for name, loc in out.items():
        assert isinstance(loc, Localization)
        assert 0.0 <= loc.score <= 1.0
        assert loc.answer in (None, "yes", "no")
        if loc.box_xyxy_px is None:
            assert isinstance(loc.reason, str) and loc.reason  # garbage from random weights is explained
        else:
            x0, y0, x1, y1 = loc.box_xyxy_px
            assert 0 <= x0 < x1 <= target.shape[1] and 0 <= y0 < y1 <= target.shape[0]
        assert isinstance(localizer.raw_answers[name], str)
    assert elapsed < 30, f"two structures took {elapsed:.1f}s on CPU"


def test_model_space_size_comes_from_processor(localizer, pair):
    reference, target = pair
    msgs, images, _ = localizer.build_training_example(reference, target, "heart")
    inputs = encode_example(localizer.processor, msgs, images)
    grid = inputs["image_grid_thw"]
    assert grid.shape == (2, 3)  # reference, target
    for row, hw in zip(grid, (reference.shape, target.shape)):
        assert localizer.model_hw(row) == qwen_smart_resize(*hw, min_pixels=TEST_MIN_PIXELS, max_pixels=TEST_MAX_PIXELS)
    # One <|image_pad|> per merged 2x2 patch group of each image.
    n_pad = int((inputs["input_ids"] == localizer.model.config.image_token_id).sum())
    assert n_pad == int(grid.prod(dim=1).sum()) // 4


def test_max_pixels_caps_both_images_without_warnings(checkpoint, pair):
    import warnings

    small = QwenLocalizer(checkpoint, max_pixels=28 * 28 * 4, max_new_tokens=2)
    reference, target = pair
    msgs, images, _ = small.build_training_example(reference, target, "heart")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated call-time min/max_pixels
        grid = encode_example(small.processor, msgs, images)["image_grid_thw"]
    for row, hw in zip(grid, (reference.shape, target.shape)):
        mh, mw = small.model_hw(row)
        assert (mh, mw) == qwen_smart_resize(*hw, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 4)
        assert mh * mw <= 28 * 28 * 4
    with pytest.raises(ValueError, match="max_pixels"):
        QwenLocalizer(checkpoint, max_pixels=10)


def test_training_example_answer_round_trips(localizer, pair):
    reference, target = pair
    msgs, images, answer = localizer.build_training_example(reference, target, "heart")
    assert [c["type"] for c in msgs[0]["content"]] == ["image", "image", "text"]
    assert images[0].size == (128, 96) and images[1].size == (110, 150)  # PIL (W, H)
    model_hw = qwen_smart_resize(*target.shape, min_pixels=TEST_MIN_PIXELS, max_pixels=TEST_MAX_PIXELS)
    parsed = parse_box_answer(answer, target.shape, model_hw, localizer.coords)
    true_box = mask_to_box(target.masks["heart"])
    assert np.allclose(parsed.box_xyxy_px, true_box, atol=max(target.shape) / min(model_hw))
    _, _, absent = localizer.build_training_example(reference, target, "left lung")
    assert json.loads(absent) == {"label": "left lung", "visible": "no"}


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # raised inside peft
def test_lora_training_step_has_finite_loss_and_lora_gradients(checkpoint, pair, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    fresh = QwenLocalizer(checkpoint)  # own model: get_peft_model edits modules in place
    reference, target = pair
    msgs, images, answer = fresh.build_training_example(reference, target, "heart")
    batch = encode_example(fresh.processor, msgs, images, answer)
    labels = batch["labels"][0]
    supervised = labels[labels != -100]
    assert fresh.processor.tokenizer.decode(supervised) == answer + "<|im_end|>"

    model = get_peft_model(fresh.model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    model.train()
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    # lora_B starts at zero, so the first step's gradient lands on lora_B.
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
    frozen = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert all(not p.requires_grad for p in frozen)

    # The saved adapter loads back through QwenLocalizer(lora=...).
    model.save_pretrained(str(tmp_path / "adapter"))
    with_lora = QwenLocalizer(checkpoint, lora=tmp_path / "adapter", max_new_tokens=4)
    assert set(with_lora.localize(reference, target, ["heart"])) == {"heart"}


def test_tiny_config_rope_sections_match_head_dim():
    from tiny_qwen import tiny_qwen25_vl_config

    for hidden, heads in ((64, 4), (96, 4), (128, 2)):
        cfg = tiny_qwen25_vl_config(640, hidden_size=hidden, num_heads=heads, num_kv_heads=heads)
        sections = cfg.text_config.rope_parameters["mrope_section"]
        assert 2 * sum(sections) == hidden // heads and min(sections) >= 1
    with pytest.raises(ValueError, match="head_dim"):
        tiny_qwen25_vl_config(640, hidden_size=60, num_heads=8)
    with pytest.raises(ValueError, match="vision"):
        tiny_qwen25_vl_config(640, vision_hidden_size=36, vision_heads=6)


def test_missing_checkpoint_raises(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        QwenLocalizer(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json"):
        QwenLocalizer(tmp_path)


def test_incomplete_checkpoints_raise(checkpoint, tmp_path):
    import shutil

    no_weights = tmp_path / "no_weights"
    shutil.copytree(checkpoint, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        QwenLocalizer(no_weights)

    truncated = tmp_path / "truncated"
    shutil.copytree(checkpoint, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="cannot load"):
        QwenLocalizer(truncated)

    with pytest.raises(CheckpointError, match="adapter_config.json"):
        QwenLocalizer(checkpoint, lora=tmp_path)


def test_bad_arguments(checkpoint, localizer, pair):
    reference, target = pair
    with pytest.raises(RauInputError, match="spleen"):
        localizer.localize(reference, target, ["spleen"])
    with pytest.raises(ValueError, match="max_new_tokens"):
        QwenLocalizer(checkpoint, max_new_tokens=0)
    with pytest.raises(ValueError, match="dtype"):
        QwenLocalizer(checkpoint, dtype="float7")


def test_import_is_light():
    code = (
        "import sys, rau.methods.qwen, rau.models.qwen, rau.parsing, rau.prompts; "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
