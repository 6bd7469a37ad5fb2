"""Typed options of the registered methods: one frozen dataclass per method family.

Each class checks its values when built (``__post_init__``) and raises a one-line
:class:`~rau.errors.RauInputError` naming the option, what it got and the fix. The checks are pure
(no file is read): whether a folder exists and loads is the loader's business, as before.

Values keep the caller's type (a folder stays the ``str`` or ``Path`` it was given), so a method
built from options is the very object the former untyped ``**options`` built. Option names are the
keywords of :func:`rau.methods.create_method`; messages name the command-line flag where there is one.

| class                 | methods                                   |
|-----------------------|-------------------------------------------|
| RegistrationOptions   | registration                              |
| BoxPromptOptions      | reg-box, reg-fuse, oracle-box             |
| RauOptions            | rau, rau-ot, rau-box, rau-tokens, rau-seg |
| Sam2MemoryOptions     | sam2-memory, oracle-memory                |
| MemSegOptions         | reg-memseg                                |
| RefineOptions         | reg-refine                                |
| RauRefineOptions      | rau-refine                                |
| UNetOptions           | unet                                      |
| ChexOptions           | chexanatomy                               |
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from rau.errors import RauInputError

#: The segmenters behind the box routes (``segmenter`` option).
SEGMENTERS = ("medsam", "sam2-memory")
#: Whose masks ``reg-refine`` delivers on the targets that get a second opinion (``angiogram_masks``).
ANGIOGRAM_MASKS = ("memory", "refiner")
#: SimpleITK takes the registration seed as a C ``unsigned int``.
MAX_SEED = 2**32 - 1
#: Options the command line exposes as ``--flag`` (the others are Python-only).
_CLI_FLAGS = frozenset({"device", "vlm", "lora", "sam2", "segmenter", "seed", "unet", "chex", "seg_head", "precision",
                        "memseg", "refiner", "follow_unknown", "segment_all", "second_opinion",
                        "angiogram_masks"})


def option_label(name: str) -> str:
    """How messages name option ``name``: its command-line flag (``seg_head`` -> ``--seg-head``), else the keyword."""
    return f"--{name.replace('_', '-')}" if name in _CLI_FLAGS else name


def _shown(value: Any) -> str:
    """A short one-line repr of ``value`` for a message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_device(value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise RauInputError(f"--device: expected a torch device name such as 'cpu' or 'cuda:0', got {_shown(value)}")


def _check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise RauInputError(f"{option_label(name)}: expected True or False, got {_shown(value)}")


def _check_folder(name: str, value: Any) -> None:
    """None (not given) or a non-empty str / os.PathLike folder path."""
    if value is None:
        return
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise RauInputError(
            f"{option_label(name)}: expected a folder path (str or Path), got {_shown(value)}; "
            "pass the folder or leave the option out"
        )


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise RauInputError(f"{option_label(name)}: unknown {_shown(value)}; choose {' or '.join(map(repr, choices))}")


def _check_precision(value: Any) -> None:
    """None (``$RAU_ENCODER_PRECISION``, else auto) or one of the encoder precisions, any case."""
    from rau.encoders.litemedsam import PRECISIONS

    if value is None:
        return
    if not isinstance(value, str) or value.strip().lower() not in PRECISIONS:
        raise RauInputError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {_shown(value)}")


def _check_seed(value: Any) -> int:
    """An integer in [0, 2**32 - 1] (bool refused) -> that int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value <= MAX_SEED:
        raise RauInputError(f"--seed: expected an integer from 0 to {MAX_SEED}, got {_shown(value)}")
    return int(value)


def _check_sam2_config(value: Any) -> None:
    """None, a dict of ``Sam2VideoConfig`` fields, or a config object (anything with ``to_dict``)."""
    if value is not None and not isinstance(value, Mapping) and not hasattr(value, "to_dict"):
        raise RauInputError(
            f"sam2_config: expected a transformers Sam2VideoConfig or a dict of its fields, got {type(value).__name__}"
        )


@dataclass(frozen=True)
class MethodOptions:
    """Base of the option classes; :meth:`keys` lists the options a class takes."""

    @classmethod
    def keys(cls) -> frozenset[str]:
        return frozenset(f.name for f in fields(cls))


@dataclass(frozen=True)
class RegistrationOptions(MethodOptions):
    """``seed``: SimpleITK's metric-sampling seed (runs on the CPU; no model weights)."""

    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "seed", _check_seed(self.seed))


@dataclass(frozen=True)
class BoxPromptOptions(MethodOptions):
    """Boxes from registration or ground truth, prompting a segmenter.

    ``device``: torch device of the segmenter; ``precision``: LiteMedSAM encoder precision (auto,
    fp32, bf16; None: ``$RAU_ENCODER_PRECISION`` or auto); ``segmenter``: "medsam" or "sam2-memory";
    ``sam2``: local SAM2 checkpoint folder; ``sam2_config``: a Sam2VideoConfig (random weights when
    ``sam2`` is None, for tests); ``seed``: registration seed."""

    device: str = "cpu"
    precision: str | None = None
    segmenter: str = "medsam"
    sam2: str | Path | None = None
    sam2_config: Any = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check_device(self.device)
        _check_precision(self.precision)
        _check_choice("segmenter", self.segmenter, SEGMENTERS)
        _check_folder("sam2", self.sam2)
        _check_sam2_config(self.sam2_config)
        object.__setattr__(self, "seed", _check_seed(self.seed))


@dataclass(frozen=True)
class RauOptions(MethodOptions):
    """The RAU VLM methods.

    ``vlm``: a compact RAU VLM folder (``rau train refvlm``) or a Qwen2.5-VL checkpoint folder
    (None: the shipped compact VLM); ``lora``: a LoRA adapter folder for a Qwen ``vlm``;
    ``seg_head``: a ``<seg>`` head folder (``rau-seg`` only; None: the shipped head); ``memseg``: a
    memory-segmenter folder (``rau-memseg``, and ``rau-seg`` with a memseg head; None: the shipped
    one); ``follow_unknown``: as in :class:`Sam2MemoryOptions`, for the memory segmenter of ``rau-memseg``
    and of ``rau-seg`` with a memseg head (a structure it never trained on is copied by the memory readout);
    ``segment_all``: ``rau-seg`` (memseg head) and ``rau-memseg`` segment a
    structure the VLM answers "not visible" from memory alone too, and the calibrated confidence and presence
    decide what is withheld (:attr:`rau.methods.interfaces.Method.segment_all`; False: the VLM's "no" stands, the
    paper's gate); ``assign``: one-to-one assignment of boxes to structures (``rau-ot`` sets it);
    the others as in :class:`BoxPromptOptions`."""

    device: str = "cpu"
    precision: str | None = None
    vlm: str | Path | None = None
    lora: str | Path | None = None
    segmenter: str = "medsam"
    sam2: str | Path | None = None
    sam2_config: Any = None
    seg_head: str | Path | None = None
    memseg: str | Path | None = None
    follow_unknown: bool = True
    segment_all: bool = True
    assign: bool = False

    def __post_init__(self) -> None:
        _check_device(self.device)
        _check_precision(self.precision)
        for name in ("vlm", "lora", "sam2", "seg_head", "memseg"):
            _check_folder(name, getattr(self, name))
        _check_choice("segmenter", self.segmenter, SEGMENTERS)
        _check_sam2_config(self.sam2_config)
        _check_flag("follow_unknown", self.follow_unknown)
        _check_flag("segment_all", self.segment_all)
        _check_flag("assign", self.assign)
        if self.lora is not None and self.vlm is None:
            raise RauInputError(
                "--lora: a LoRA adapter applies to a Qwen2.5-VL --vlm, and --vlm is not given; "
                "pass --vlm QWEN_FOLDER or leave --lora out"
            )


@dataclass(frozen=True)
class RauRefineOptions(RauOptions):
    """``rau-refine``: the options of ``rau-seg`` (:class:`RauOptions`) and of ``reg-refine``
    (``refiner``, ``seed``)."""

    refiner: str | Path | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_folder("refiner", self.refiner)
        object.__setattr__(self, "seed", _check_seed(self.seed))


@dataclass(frozen=True)
class Sam2MemoryOptions(MethodOptions):
    """``memseg``: a memory-segmenter folder (``rau train memseg``; None: the shipped one), used
    unless a real SAM2 is asked for; ``sam2``: local SAM2 checkpoint folder (none ships with rau);
    ``sam2_config``: a Sam2VideoConfig (random weights when ``sam2`` is None, for tests);
    ``device``: torch device; ``precision``: LiteMedSAM encoder precision; ``follow_unknown``: a
    structure the memory segmenter never trained on is copied from the reference instead of decoded
    (:class:`rau.methods.memseg.MemSegSegmenter`)."""

    device: str = "cpu"
    precision: str | None = None
    memseg: str | Path | None = None
    sam2: str | Path | None = None
    sam2_config: Any = None
    follow_unknown: bool = True

    def __post_init__(self) -> None:
        _check_device(self.device)
        _check_precision(self.precision)
        _check_flag("follow_unknown", self.follow_unknown)
        _check_folder("memseg", self.memseg)
        _check_folder("sam2", self.sam2)
        _check_sam2_config(self.sam2_config)
        if self.memseg is not None and (self.sam2 is not None or self.sam2_config is not None):
            raise RauInputError("--memseg: give a memory-segmenter folder or a SAM2 checkpoint (--sam2), not both")


@dataclass(frozen=True)
class RefineOptions(MethodOptions):
    """Registration + the refiner. ``refiner``: its folder (None: the shipped one); ``device``: torch
    device; ``seed`` as in :class:`RegistrationOptions`; ``second_opinion``: on targets read as coronary
    angiograms the shipped memory segmenter segments the same structures, and the agreement of its masks
    with the refiner's feeds the confidence (:mod:`rau.methods.second_opinion`; about 1.2 s more per such
    target on 2 CPU cores); False: no memory pass, the refiner's masks are delivered. ``angiogram_masks``:
    with the second opinion on, whose masks are delivered there: "refiner" (the default) or "memory" (the
    better coronary masks, mean segment Dice 0.231 against 0.141 on the ARCADE bench, but judged less well by
    their own calibration, ``reg-refine_memory.json``: confidence AUROC 0.83 against 0.87; docs/RESULTS.md);
    the other's are the opinion. ``precision``: the LiteMedSAM precision of the second opinion's memory
    segmenter (its encoder, and its decoder where its masks are only compared; None: ``$RAU_ENCODER_PRECISION``, else
    auto)."""

    device: str = "cpu"
    refiner: str | Path | None = None
    seed: int = 0
    second_opinion: bool = True
    angiogram_masks: str = "refiner"
    precision: str | None = None

    def __post_init__(self) -> None:
        _check_device(self.device)
        _check_precision(self.precision)
        _check_folder("refiner", self.refiner)
        object.__setattr__(self, "seed", _check_seed(self.seed))
        _check_flag("second_opinion", self.second_opinion)
        _check_choice("angiogram_masks", self.angiogram_masks, ANGIOGRAM_MASKS)

    @property
    def delivers_memory_masks(self) -> bool:
        """True when the second opinion's (memory) masks are delivered on the targets that get one."""
        return self.second_opinion and self.angiogram_masks == "memory"


@dataclass(frozen=True)
class MemSegOptions(MethodOptions):
    """Registration's warped mask as the memory segmenter's prior. ``memseg``: its folder (None:
    the shipped one); ``device``, ``precision``, ``seed`` as in :class:`BoxPromptOptions`;
    ``follow_unknown`` as in :class:`Sam2MemoryOptions` (here a structure it never trained on is
    registration's warped mask)."""

    device: str = "cpu"
    precision: str | None = None
    memseg: str | Path | None = None
    seed: int = 0
    follow_unknown: bool = True

    def __post_init__(self) -> None:
        _check_device(self.device)
        _check_precision(self.precision)
        _check_flag("follow_unknown", self.follow_unknown)
        _check_folder("memseg", self.memseg)
        object.__setattr__(self, "seed", _check_seed(self.seed))


@dataclass(frozen=True)
class UNetOptions(MethodOptions):
    """``unet``: a trained U-Net folder (required; none ships with rau); ``device``: torch device."""

    device: str = "cpu"
    unet: str | Path | None = None

    def __post_init__(self) -> None:
        _check_device(self.device)
        _check_folder("unet", self.unet)
        if self.unet is None:
            raise RauInputError(
                "--unet: method 'unet' needs a trained U-Net folder (rau train unet ...); "
                "none ships with rau"
            )


@dataclass(frozen=True)
class ChexOptions(MethodOptions):
    """``chex``: a trained CheXanatomy model folder (None: the shipped one); ``device``: torch device."""

    device: str = "cpu"
    chex: str | Path | None = None

    def __post_init__(self) -> None:
        _check_device(self.device)
        _check_folder("chex", self.chex)


#: Every option class, in the order of the table above.
OPTION_CLASSES: tuple[type[MethodOptions], ...] = (
    RegistrationOptions, BoxPromptOptions, RauOptions, Sam2MemoryOptions, MemSegOptions, RefineOptions, RauRefineOptions, UNetOptions,
    ChexOptions,
)
#: Every option name some method takes.
OPTION_KEYS: frozenset[str] = frozenset().union(*(cls.keys() for cls in OPTION_CLASSES))


def options_for(cls: type[MethodOptions], options: Mapping[str, Any]) -> MethodOptions:
    """The ``cls`` instance of a shared dict of options.

    None values mean "not given" (the default applies); a key no method takes -> RauInputError
    naming it; a key another method takes but ``cls`` does not is ignored (the CLI passes one shared
    set of options to whichever method is chosen)."""
    unknown = sorted(set(options) - OPTION_KEYS)
    if unknown:
        key = unknown[0]
        raise RauInputError(
            f"{key}: not an option of any method (got {_shown(options[key])}); use one of {', '.join(sorted(OPTION_KEYS))}"
        )
    mine = cls.keys()
    return cls(**{k: v for k, v in options.items() if v is not None and k in mine})
