"""Question and answer templates for the VLM localizer (pure functions, no heavy imports).

One chat turn holds two images and one question: image 1 is the REFERENCE with the asked structure
drawn on it (contour + name, see :func:`rau.render.draw_annotation`), image 2 is the TARGET.

Tasks (keys of :data:`TEMPLATES`):

- ``"localize"``: find a structure in the target and give its box. Answer (one line of JSON)::

      {"label": "<name>", "visible": "yes", "bbox_2d": [x0, y0, x1, y1]}

  or ``{"label": "<name>", "visible": "no"}`` when the structure is not in the target.
  ``bbox_2d`` follows the model's grounding convention (``coords``):

  - ``"qwen25_abs"`` (Qwen2.5-VL): integer ABSOLUTE pixels of the RESIZED target the model sees
    (the processor's ``smart_resize`` output, not the original image);
  - ``"norm1000"`` (Qwen2-VL, Qwen3-VL): integers on 0..1000 over the target.

- ``"identify"``: which structure is marked in the target (a box drawn on the target, optionally a
  list of named options). Answer: the structure name.
- ``"visible"``: is a structure visible in the target. Answer: ``"yes"`` or ``"no"``.

Every task has a list of paraphrases; index 0 is the default. Passing a seeded
``np.random.Generator`` picks one at random (training-time augmentation). Add paraphrases by
appending to the lists; keep ``{structure}`` / ``{options}`` placeholders as in the first entry.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from rau.geometry import Box, box_to_norm, scale_box

COORDS = ("qwen25_abs", "norm1000")
TASKS = ("localize", "identify", "visible")

TEMPLATES: dict[str, list[str]] = {
    "localize": [
        "The first image is the reference with {structure} outlined and labelled. "
        "Find {structure} in the second image and give its bounding box.",
        "In the first image (the reference), {structure} is outlined and labelled. "
        "Locate the same structure, {structure}, in the second image and output its bounding box.",
    ],
    "identify": [
        "The first image is the reference with its structures outlined and labelled. "
        "Which structure is marked in the second image?",
    ],
    "visible": [
        "The first image is the reference with {structure} outlined and labelled. "
        "Is {structure} visible in the second image?",
    ],
}

# Appended after the question: how to answer. Kept apart from TEMPLATES so paraphrases of the
# question never change the answer format the parser expects.
FORMAT_HINTS: dict[str, str] = {
    "localize": (
        'Answer with JSON only: {{"label": "{structure}", "visible": "yes" or "no", '
        '"bbox_2d": [x0, y0, x1, y1]}}{coords_hint}.'
    ),
    "identify": "Answer with the structure name only.",
    "identify_options": "Options: {options}. Answer with one option only.",
    "visible": "Answer yes or no.",
}

COORDS_HINTS: dict[str, str] = {
    "qwen25_abs": " in pixels of the second image",
    "norm1000": " with coordinates scaled to 0-1000",
}


def _check_coords(coords: str) -> None:
    if coords not in COORDS:
        raise ValueError(f"coords: expected one of {COORDS}, got {coords!r}")


def _check_task(task: str) -> None:
    if task not in TEMPLATES:
        raise ValueError(f"task: expected one of {tuple(TEMPLATES)}, got {task!r}")


def pick_template(task: str, rng: np.random.Generator | None = None) -> str:
    """The question template for ``task``: the first paraphrase, or a random one when ``rng`` is given."""
    _check_task(task)
    options = TEMPLATES[task]
    if rng is None or len(options) == 1:
        return options[0]
    return options[int(rng.integers(len(options)))]


def build_question(
    task: str,
    structure: str | None = None,
    *,
    options: Sequence[str] | None = None,
    coords: str = "qwen25_abs",
    rng: np.random.Generator | None = None,
) -> str:
    """The user text of one turn: question + answer-format hint.

    ``structure`` is required for ``localize`` and ``visible``; ``options`` (structure names) is
    optional for ``identify``.
    """
    _check_coords(coords)
    template = pick_template(task, rng)
    if task in ("localize", "visible") and not structure:
        raise ValueError(f"structure: task {task!r} needs a structure name, got {structure!r}")
    question = template.format(structure=structure)
    if task == "localize":
        hint = FORMAT_HINTS["localize"].format(structure=structure, coords_hint=COORDS_HINTS[coords])
    elif task == "identify" and options:
        hint = FORMAT_HINTS["identify_options"].format(options=", ".join(options))
    else:
        hint = FORMAT_HINTS[task]
    return f"{question} {hint}"


def build_messages(
    task: str,
    structure: str | None = None,
    *,
    options: Sequence[str] | None = None,
    coords: str = "qwen25_abs",
    rng: np.random.Generator | None = None,
    answer: str | None = None,
) -> list[dict[str, Any]]:
    """transformers chat ``messages`` for one question about (reference, target).

    Returns ``[{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text",
    "text": question}]}]``; the two images are passed to the processor in the same order
    (reference, target). With ``answer`` an assistant turn holding it is appended (training).
    """
    question = build_question(task, structure, options=options, coords=coords, rng=rng)
    messages: list[dict[str, Any]] = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": question}],
        }
    ]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def box_to_model(
    box_xyxy_px: Box,
    target_hw: tuple[int, int],
    model_hw: tuple[int, int] | None,
    coords: str = "qwen25_abs",
) -> list[int]:
    """Original-pixel box -> integer ``bbox_2d`` in the model's convention (see module doc).

    ``model_hw``: (H, W) of the resized target the model sees; required for ``qwen25_abs``.
    """
    _check_coords(coords)
    if coords == "norm1000":
        return list(box_to_norm(box_xyxy_px, target_hw, bins=1000))
    if model_hw is None:
        raise ValueError("model_hw: coords 'qwen25_abs' needs the (H, W) of the resized target image")
    mh, mw = model_hw
    x0, y0, x1, y1 = scale_box(box_xyxy_px, target_hw, model_hw)
    # Round to the nearest model pixel and keep inside the resized image.
    return [
        int(min(mw, max(0, round(x0)))),
        int(min(mh, max(0, round(y0)))),
        int(min(mw, max(0, round(x1)))),
        int(min(mh, max(0, round(y1)))),
    ]


def target_text(
    task: str,
    structure: str,
    *,
    box_xyxy_px: Box | None = None,
    target_hw: tuple[int, int] | None = None,
    model_hw: tuple[int, int] | None = None,
    coords: str = "qwen25_abs",
) -> str:
    """The training answer for one question.

    - ``localize``: JSON with ``bbox_2d`` converted from ``box_xyxy_px`` (original target pixels)
      into model space (needs ``target_hw``, and ``model_hw`` for ``qwen25_abs``);
      ``box_xyxy_px=None`` means "not visible" and gives ``{"label": ..., "visible": "no"}``.
    - ``identify``: the structure name.
    - ``visible``: ``"yes"`` if ``box_xyxy_px`` is given, else ``"no"``.
    """
    _check_task(task)
    if task == "identify":
        return structure
    if task == "visible":
        return "yes" if box_xyxy_px is not None else "no"
    if box_xyxy_px is None:
        return json.dumps({"label": structure, "visible": "no"})
    if target_hw is None:
        raise ValueError("target_hw: localize answers need the (H, W) of the original target image")
    bbox = box_to_model(box_xyxy_px, target_hw, model_hw, coords)
    return json.dumps({"label": structure, "visible": "yes", "bbox_2d": bbox})


def corpus() -> list[str]:
    """Every fixed string of this module (templates, hints): the text a test tokenizer must cover."""
    texts = [t for paraphrases in TEMPLATES.values() for t in paraphrases]
    texts += list(FORMAT_HINTS.values()) + list(COORDS_HINTS.values())
    return texts
