"""Typed method options (rau.methods.options) and the registry's option rules: a bad value -> a
one-line RauInputError naming the option; None = not given; other methods' options are ignored."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from rau.errors import RauInputError
from rau.methods import METHODS, create_method, describe_methods, method_options
from rau.methods.options import (
    OPTION_CLASSES,
    BoxPromptOptions,
    ChexOptions,
    MemSegOptions,
    RauOptions,
    RauRefineOptions,
    RefineOptions,
    RegistrationOptions,
    Sam2MemoryOptions,
    UNetOptions,
)

BAD = [
    (RegistrationOptions, {"seed": -1}, "--seed"),
    (RegistrationOptions, {"seed": 1.5}, "--seed"),
    (RegistrationOptions, {"seed": True}, "--seed"),
    (BoxPromptOptions, {"device": ""}, "--device"),
    (BoxPromptOptions, {"precision": "fp16"}, "--precision"),
    (BoxPromptOptions, {"segmenter": "sam"}, "--segmenter"),
    (BoxPromptOptions, {"sam2": 3}, "--sam2"),
    (BoxPromptOptions, {"sam2_config": 3}, "sam2_config"),
    (RauOptions, {"vlm": ""}, "--vlm"),
    (RauOptions, {"seg_head": 1}, "--seg-head"),
    (RauOptions, {"assign": "yes"}, "assign"),
    (RauOptions, {"lora": "adapter"}, "--lora"),  # a LoRA adapter needs a Qwen --vlm
    (RauOptions, {"device": None}, "--device"),
    (Sam2MemoryOptions, {"sam2": ""}, "--sam2"),
    (Sam2MemoryOptions, {"memseg": 3}, "--memseg"),
    (MemSegOptions, {"memseg": ""}, "--memseg"),
    (MemSegOptions, {"seed": -2}, "--seed"),
    (MemSegOptions, {"follow_unknown": "no"}, "--follow-unknown"),
    (Sam2MemoryOptions, {"follow_unknown": 1}, "--follow-unknown"),
    (RauOptions, {"segment_all": "yes"}, "--segment-all"),
    (RefineOptions, {"refiner": 3}, "--refiner"),
    (RauRefineOptions, {"refiner": ""}, "--refiner"),
    (RauRefineOptions, {"vlm": 2}, "--vlm"),
    (RefineOptions, {"seed": -1}, "--seed"),
    (RefineOptions, {"angiogram_masks": "both"}, "--angiogram-masks"),
    (UNetOptions, {}, "--unet"),
    (UNetOptions, {"unet": ["a"]}, "--unet"),
    (ChexOptions, {"chex": 5}, "--chex"),
    (ChexOptions, {"chex": "runs/chex", "device": 0}, "--device"),
]


@pytest.mark.parametrize(("cls", "kwargs", "option"), BAD, ids=[f"{c.__name__}-{k}" for c, k, _ in BAD])
def test_each_options_class_refuses_a_bad_value_in_one_line(cls, kwargs, option):
    with pytest.raises(RauInputError) as info:
        cls(**kwargs)
    message = str(info.value)
    assert message.startswith(f"{option}:") and "\n" not in message


def test_every_options_class_is_covered_and_frozen():
    assert {cls for cls, _, _ in BAD} == set(OPTION_CLASSES)
    assert {spec.options for spec in METHODS.values()} == set(OPTION_CLASSES)
    with pytest.raises(dataclasses.FrozenInstanceError):
        RegistrationOptions().seed = 1


def test_good_values_are_kept_as_given():
    folder = Path("runs/vlm")
    o = RauOptions(vlm=folder, lora="adapter", precision="BF16", device="cuda:0", segmenter="sam2-memory")
    assert o.vlm is folder and o.precision == "BF16" and o.segmenter == "sam2-memory"
    assert RegistrationOptions(seed=np.int64(7)).seed == 7 and type(RegistrationOptions(seed=np.int64(7)).seed) is int


def test_create_method_refuses_an_unknown_option():
    with pytest.raises(RauInputError, match=r"^vlmm: not an option of any method") as info:
        create_method("registration", vlmm="x")
    assert "\n" not in str(info.value)


def test_create_method_refuses_an_unknown_method():
    with pytest.raises(RauInputError, match=r"^--method: unknown 'nope'"):
        create_method("nope")


def test_shared_options_of_other_methods_are_ignored():
    method = create_method("registration", vlm=None, device="cpu")
    assert method.name == "registration" and method.segmenter is None and method.localizer.seed == 0
    shared = dict(device="cpu", vlm="runs/vlm", lora="adapter", sam2=None, segmenter="sam2-memory", seed=3,
                  unet="runs/unet", chex=None, seg_head="runs/head", precision="bf16")
    assert create_method("registration", **shared).localizer.seed == 3


def test_none_means_not_given():
    assert create_method("registration", seed=None).localizer.seed == 0
    o = method_options("rau-seg", device=None, segmenter=None, precision=None, assign=None)
    assert o == RauOptions()


def test_method_options_checks_without_loading_a_model():
    assert method_options("reg-fuse", seed=2, vlm="ignored") == BoxPromptOptions(seed=2)
    assert isinstance(method_options(), RefineOptions)  # the default method, reg-refine
    with pytest.raises(RauInputError, match=r"^--unet: method 'unet' needs a trained U-Net folder"):
        method_options("unet", device="cpu")


def test_describe_methods_gives_one_line_per_method():
    rows = describe_methods()
    assert [name for name, _, _ in rows] == list(METHODS)
    for _, summary, weights in rows:
        assert summary and weights and "\n" not in summary + weights


def test_a_run_that_decodes_unknown_structures_says_so_in_its_config():
    from rau.eval.evaluate import model_config

    assert model_config({"follow_unknown": False})["follow_unknown"] is False
    assert "follow_unknown" not in model_config({"follow_unknown": True})  # the default leaves the record as it was
    assert model_config({"second_opinion": False})["second_opinion"] is False
    assert "second_opinion" not in model_config({"second_opinion": True})
    assert model_config({"angiogram_masks": "memory"})["angiogram_masks"] == "memory"
    assert "angiogram_masks" not in model_config({"angiogram_masks": "refiner"})
