"""LoRA on Qwen-VL: merge a saved PEFT adapter for inference, or add a fresh one for training.

peft is imported inside the functions.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rau.errors import CheckpointError, RauInputError, one_line

# Parameter / module names of the vision tower (Qwen2/2.5/3-VL: model.visual.*, incl. the merger).
VISION_RE = re.compile(r"(^|\.)visual\.")


def merge_lora(model, lora: str | Path):
    """``model`` with the PEFT LoRA adapter folder ``lora`` merged in (no adapter cost at inference).

    CheckpointError (one line) if the folder is not an adapter or does not fit the model."""
    path = Path(lora).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise CheckpointError(
            f"lora: {path} has no adapter_config.json; pass a folder written by PeftModel.save_pretrained"
        )
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
        return model.merge_and_unload().eval()
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"lora: cannot apply adapter {path} ({one_line(exc)})") from None


def add_lora(model, *, r: int, alpha: int, dropout: float, targets: Sequence[str], freeze_vision: bool,
             source: str = "the model"):
    """A trainable PeftModel around ``model`` (which peft edits in place): LoRA of rank ``r`` on
    every module whose last name component is in ``targets``, none in the vision tower when
    ``freeze_vision``. The adapter init draws from the torch RNG: seed before calling.

    RauInputError (naming ``lora_targets``) when no module matches."""
    from peft import LoraConfig, get_peft_model

    alternatives = "|".join(targets)
    # A regex is matched against full module names: it is how peft lets us skip the vision tower.
    prefix = r"^(?!(?:.*\.)?visual\.)" if freeze_vision else "^"
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                        target_modules=rf"{prefix}.*\.(?:{alternatives})$")
    try:
        return get_peft_model(model, config)
    except ValueError:
        where = "outside the vision tower (freeze_vision)" if freeze_vision else "in the model"
        raise RauInputError(
            f"lora_targets: {list(targets)} match no module {where} of {source}; "
            "use last name components such as q_proj,v_proj"
        ) from None


def set_trainable(model, *, freeze_vision: bool) -> None:
    """Full fine-tuning: every parameter trains, except the vision tower's when ``freeze_vision``."""
    for name, p in model.named_parameters():
        p.requires_grad_(not (freeze_vision and VISION_RE.search(name)))


def trainable_parameters(model) -> dict[str, Any]:
    """{name: parameter} of the parameters that require gradients, in module order."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
