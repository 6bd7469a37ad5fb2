"""Robust parsing of VLM answers (pure; never raises on model output).

Accepted box answers, tried in this order:

1. JSON, also inside ```json fences, as a list of dicts (Qwen2.5-VL grounding style), with single
   quotes or trailing commas: ``{"label": "heart", "visible": "yes", "bbox_2d": [x0, y0, x1, y1]}``;
   box keys ``bbox_2d``, ``bbox``, ``box``, ``box_2d``;
2. Qwen2-VL tokens: ``<|object_ref_start|>heart<|object_ref_end|><|box_start|>(x0,y0),(x1,y1)<|box_end|>``
   (also without the special tokens, as left by ``skip_special_tokens=True``);
3. exactly four bare numbers: ``12, 30, 80, 95``.

Coordinates are in model space (``coords``): ``"qwen25_abs"`` = absolute pixels of the RESIZED
target of size ``model_hw``; ``"norm1000"`` = 0..1000 over the target. The returned box is in
ORIGINAL target pixels (pixel-edge xyxy, clipped to the image). Anything unusable (empty, NaN,
inverted, zero area, far out of range, "not visible") gives ``box_xyxy_px=None`` and a ``reason``.
"""

from __future__ import annotations

import ast
import json
import math
import numbers
import re
from dataclasses import dataclass
from typing import Any

from rau.geometry import Box, clip_box, norm_to_box, scale_box

COORDS = ("qwen25_abs", "norm1000")
BOX_KEYS = ("bbox_2d", "bbox", "box", "box_2d", "bbox_xyxy")
LABEL_KEYS = ("label", "name", "structure")
# How far (fraction of the image side) a coordinate may overshoot before the answer counts as out of
# range rather than sloppy: small overshoots are clipped, large ones mean a wrong convention.
OUT_OF_RANGE_TOL = 0.05

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf(?:inity)?)"
# A number not glued to a word ("x0", "bbox_2d", "Qwen2") so labels do not leak digits.
_BARE_NUM = re.compile(rf"(?<![\w.])(?:{_NUM})(?!\w|\.\d)", re.IGNORECASE)
_PAIR_BOX = re.compile(
    rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,?\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)", re.IGNORECASE
)
_REF = re.compile(r"<\|object_ref_start\|>(.*?)<\|object_ref_end\|>", re.DOTALL)
_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)
_SPECIAL = re.compile(r"<\|(?:im_end|im_start|endoftext|box_start|box_end|object_ref_start|object_ref_end)\|>")
_YES_NO = re.compile(r"\b(yes|no|true|false|not visible|invisible|absent|visible|present)\b", re.IGNORECASE)


@dataclass
class ParsedAnswer:
    """label: the structure name the model wrote (or None); visible: "yes"/"no"/None;
    box_xyxy_px: ORIGINAL target pixels, clipped, or None; reason: why box is None (None when a box
    was found)."""

    label: str | None = None
    visible: str | None = None
    box_xyxy_px: Box | None = None
    reason: str | None = None


def parse_yes_no(text: Any) -> str | None:
    """``"yes"``/``"no"`` from a free-text, boolean or JSON answer; None when it says neither.

    The first yes-like or no-like word wins ("No, it is not visible" -> "no").
    """
    if isinstance(text, bool):
        return "yes" if text else "no"
    if not isinstance(text, str):
        return None
    data = _load_json(text)
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = data[0]
    if isinstance(data, dict):
        for key in ("visible", "answer", "present"):
            if key in data:
                return parse_yes_no(data[key])
    match = _YES_NO.search(_SPECIAL.sub(" ", text))
    if match is None:
        return None
    word = match.group(1).lower()
    return "yes" if word in ("yes", "true", "visible", "present") else "no"


def _load_json(text: str) -> Any:
    """The first JSON-ish value in ``text`` (fenced or bare), or None. Tolerates single quotes,
    Python literals and trailing commas, as small VLMs write them."""
    candidates = [m.group(1) for m in _FENCE.finditer(text)]
    spans = []
    for open_, close in (("[", "]"), ("{", "}")):
        start, end = text.find(open_), text.rfind(close)
        if 0 <= start < end:
            spans.append((start, text[start : end + 1]))
    # The outermost bracket first: '{"bbox_2d": [..]}' must not parse as just its inner list.
    candidates += [span for _, span in sorted(spans)]
    for cand in candidates:
        cand = re.sub(r",\s*([}\]])", r"\1", cand.strip())
        for loader in (json.loads, ast.literal_eval):
            try:
                return loader(cand)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):  # bool is an int: True is not a coordinate
        return None
    try:
        if isinstance(value, numbers.Real):
            return float(value)
        if isinstance(value, str):
            return float(value.strip())
    except (ValueError, OverflowError):  # "left", 10**400
        return None
    return None


def _pick_entry(data: Any, structure: str | None) -> dict[str, Any] | list[Any] | None:
    """The dict (or bare 4-list) describing the asked structure in parsed JSON."""
    if isinstance(data, dict):
        return data
    if not isinstance(data, list) or not data:
        return None
    if all(not isinstance(v, (dict, list)) for v in data):
        return data  # a bare [x0, y0, x1, y1]
    dicts = [d for d in data if isinstance(d, dict)]
    if structure is not None:
        for d in dicts:
            label = next((d[k] for k in LABEL_KEYS if k in d), None)
            if isinstance(label, str) and label.strip().lower() == structure.strip().lower():
                return d
    with_box = [d for d in dicts if any(k in d for k in BOX_KEYS)]
    if with_box:
        return with_box[0]
    if dicts:
        return dicts[0]
    return _pick_entry(data[0], structure) if isinstance(data[0], list) else None


def _from_json(data: Any, structure: str | None) -> tuple[str | None, str | None, Any, str | None]:
    """(label, visible, raw box values or None, reason) from parsed JSON."""
    entry = _pick_entry(data, structure)
    if entry is None:
        return None, None, None, "JSON answer has no object with a box"
    if isinstance(entry, list):
        return None, None, entry, None
    label = next((entry[k] for k in LABEL_KEYS if k in entry), None)
    label = str(label) if label is not None else None
    visible = parse_yes_no(entry["visible"]) if "visible" in entry else None
    raw = next((entry[k] for k in BOX_KEYS if k in entry), None)
    if raw is None:
        return label, visible, None, "JSON answer has no bbox_2d"
    return label, visible, raw, None


def _validate(raw: Any, model_hw: tuple[float, float]) -> tuple[Box | None, str | None]:
    """Four finite, ordered, in-range model-space coordinates, or (None, reason)."""
    if not isinstance(raw, (list, tuple)) or len(raw) != 4:
        return None, f"box must have 4 numbers, got {str(raw)[:80]!r}"
    vals = [_as_float(v) for v in raw]
    if any(v is None for v in vals):
        return None, f"box has a non-numeric coordinate: {str(raw)[:80]!r}"
    if not all(math.isfinite(v) for v in vals):  # type: ignore[arg-type]
        return None, f"box has a NaN or infinite coordinate: {raw!r}"
    x0, y0, x1, y1 = vals  # type: ignore[misc]
    if x1 < x0 or y1 < y0:
        return None, f"box is inverted (x1 < x0 or y1 < y0): {[x0, y0, x1, y1]}"
    if x1 == x0 or y1 == y0:
        return None, f"box has zero area: {[x0, y0, x1, y1]}"
    h, w = model_hw
    tol_x, tol_y = OUT_OF_RANGE_TOL * w, OUT_OF_RANGE_TOL * h
    if x0 < -tol_x or x1 > w + tol_x or y0 < -tol_y or y1 > h + tol_y:
        return None, (
            f"box {[x0, y0, x1, y1]} is out of range for a {w:g}x{h:g} (W x H) coordinate space; "
            "the model may be answering in another coordinate convention"
        )
    return (x0, y0, x1, y1), None


def _check_args(target_hw: Any, model_hw: Any, coords: str) -> None:
    if coords not in COORDS:
        raise ValueError(f"coords: expected one of {COORDS}, got {coords!r}")
    for name, hw in (("target_hw", target_hw), ("model_hw", model_hw)):
        if hw is None and name == "model_hw" and coords == "norm1000":
            continue
        if not (isinstance(hw, (tuple, list)) and len(hw) == 2 and all((_as_float(v) or 0) > 0 for v in hw)):
            raise ValueError(f"{name}: expected a positive (H, W) pair, got {hw!r}")


def _find_raw_box(text: str, structure: str | None) -> tuple[str | None, str | None, Any, str | None]:
    """(label, visible, raw box or None, reason) from any accepted answer form."""
    data = _load_json(text)
    if data is not None and not isinstance(data, (int, float, str)):
        label, visible, raw, reason = _from_json(data, structure)
        if raw is not None or visible == "no":
            return label, visible, raw, reason
    else:
        label, visible, reason = None, None, None
        if re.sub(r"```(?:json|JSON)?", "", _SPECIAL.sub("", text)).lstrip()[:1] in ("{", "["):
            # Broken JSON (often cut by max_new_tokens): its numbers are not a trustworthy box.
            return None, parse_yes_no(text), None, "malformed JSON answer (cut by max_new_tokens?)"
    ref = _REF.search(text)
    label = label or (ref.group(1).strip() if ref else None)
    pair = _PAIR_BOX.search(text)
    if pair:
        return label, visible, list(pair.groups()), None
    nums = _BARE_NUM.findall(_SPECIAL.sub(" ", text))
    if len(nums) == 4:
        return label, visible, nums, None
    visible = visible or parse_yes_no(text)
    if reason is None:
        reason = (
            f"found {len(nums)} bare numbers, expected exactly 4" if nums else "no box found in the answer"
        )
    return label, visible, None, reason


def parse_box_answer(
    text: Any,
    target_hw: tuple[int, int],
    model_hw: tuple[int, int] | None = None,
    coords: str = "qwen25_abs",
    structure: str | None = None,
) -> ParsedAnswer:
    """Parse a generated localization answer into a box in ORIGINAL target pixels.

    Args:
        text: the generated text (new tokens only).
        target_hw: (H, W) of the original target image.
        model_hw: (H, W) of the resized target the model saw; required for ``"qwen25_abs"``.
        coords: ``"qwen25_abs"`` (Qwen2.5-VL absolute pixels) or ``"norm1000"`` (Qwen2-VL/Qwen3-VL).
        structure: the asked structure, to pick the right entry from a list of several.
    Returns:
        :class:`ParsedAnswer`; ``box_xyxy_px`` None with a ``reason`` for any unusable answer.
    Raises:
        ValueError: only for bad ``target_hw``/``model_hw``/``coords`` arguments, never for ``text``.
    """
    _check_args(target_hw, model_hw, coords)
    if not isinstance(text, str) or not _SPECIAL.sub("", text).strip():
        return ParsedAnswer(reason="empty answer")
    try:
        return _parse(text, (int(target_hw[0]), int(target_hw[1])), model_hw, coords, structure)
    except Exception as exc:  # noqa: BLE001 - odd model text must never take the pipeline down
        return ParsedAnswer(reason=f"unparseable answer ({exc.__class__.__name__})")


def _parse(
    text: str, target_hw: tuple[int, int], model_hw: tuple[int, int] | None, coords: str, structure: str | None
) -> ParsedAnswer:
    label, visible, raw, reason = _find_raw_box(text, structure)
    if visible == "no":
        return ParsedAnswer(label, visible, None, "the model answered that the structure is not visible")
    if raw is None:
        return ParsedAnswer(label, visible, None, reason or "no box found in the answer")
    space = (1000.0, 1000.0) if coords == "norm1000" else (float(model_hw[0]), float(model_hw[1]))  # type: ignore
    box, reason = _validate(raw, space)
    if box is None:
        return ParsedAnswer(label, visible, None, reason)
    th, tw = target_hw
    if coords == "norm1000":
        orig = norm_to_box(box, (th, tw), bins=1000)
    else:
        orig = scale_box(box, (model_hw[0], model_hw[1]), (th, tw))  # type: ignore[index]
    clipped = clip_box(orig, th, tw)
    if clipped is None:
        return ParsedAnswer(label, visible, None, f"box {list(box)} has no area inside the target image")
    return ParsedAnswer(label, visible or "yes", clipped, None)
