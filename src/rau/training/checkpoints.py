"""The one checkpoint-folder format of every training run.

A run folder holds::

    config.json          the run: its key (data, hyper-parameters, model config), command, size
    loss.json, loss.png  per-step loss (and extras), rewritten atomically
    checkpoint-<step>/   model.safetensors, optimizer.pt, rng.pt, config.json, state.json
                         (written to a .tmp-* folder and renamed: a kill leaves the previous one
                         intact; the last ``keep`` are kept)
    final/               the trained model folder (``save_pretrained``) + training.json

``state.json`` records the step, the loss history, the run key and the byte size of every file,
so a truncated checkpoint is refused with a one-line error instead of half-loading.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

from rau.atomic import write_bytes, write_json
from rau.errors import CheckpointError, RauInputError

PREFIX = "checkpoint-"


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints in ``out``, oldest first."""
    found = []
    for p in Path(out).glob(f"{PREFIX}*"):
        tail = p.name[len(PREFIX):]
        if tail.isdigit() and p.is_dir():
            found.append((int(tail), p))
    return sorted(found)


def latest_checkpoint(out: Path) -> Path | None:
    found = checkpoints(out)
    return found[-1][1] if found else None


def model_folder(path: str | Path) -> Path:
    """A model folder, or a run folder whose ``final/`` is one (so ``--x runs/y`` works for both)."""
    path = Path(path)
    if (path / "final" / "config.json").is_file() and not (path / "model.safetensors").is_file():
        return path / "final"
    return path


def _rng_bytes() -> bytes:
    import torch

    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _restore_rng(path: Path) -> None:
    import torch

    if not path.is_file():  # checkpoints written before rng.pt existed
        return
    state = torch.load(path, map_location="cpu", weights_only=True)
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, model, opt, step: int, history: list[dict], run_key: dict, keep: int = 2) -> Path:
    """Write ``out/checkpoint-<step>`` atomically and drop all but the last ``keep``."""
    import torch

    out = Path(out)
    tmp = out / f".tmp-{PREFIX}{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_bytes(tmp / "model.safetensors", model.weights_bytes())
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    write_bytes(tmp / "optimizer.pt", buf.getvalue())
    write_bytes(tmp / "rng.pt", _rng_bytes())
    write_json(tmp / "config.json", model_config(model), indent=1)  # a checkpoint loads as a model folder too
    sizes = {p.name: p.stat().st_size for p in tmp.iterdir()}
    write_json(tmp / "state.json", {"step": step, "history": history, "run": run_key, "sizes": sizes}, indent=1)
    final = out / f"{PREFIX}{step}"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for _, old in checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def model_config(model) -> dict[str, Any]:
    """The model's config as a JSON object: ``model.config_dict()`` if it has one, else its dataclass."""
    if hasattr(model, "config_dict"):
        return model.config_dict()
    from dataclasses import asdict

    return asdict(model.config)


def _settled(value):
    """A run key without its None-valued entries (nested dicts too): a setting added to a recipe
    later, whose None means "off", matches a run started before the setting existed."""
    if isinstance(value, dict):
        return {k: _settled(v) for k, v in value.items() if v is not None}
    return value


def load_checkpoint(folder: Path, model, opt, run_key: dict) -> tuple[int, list[dict]]:
    """Restore weights, optimizer and RNG from ``folder`` -> (step, history).

    CheckpointError for a truncated or unreadable checkpoint; RauInputError if the folder holds a
    run with other settings (the differing keys are named)."""
    import torch

    folder = Path(folder)
    try:
        state = json.loads((folder / "state.json").read_text())
        for name, size in state["sizes"].items():
            if (folder / name).stat().st_size != size:
                raise ValueError(f"{name} is {(folder / name).stat().st_size} bytes, expected {size}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint: {folder} is incomplete or truncated ({exc}); "
                              "delete it to resume from the previous one") from None
    if _settled(state["run"]) != _settled(run_key):
        differ = sorted(k for k in set(run_key) | set(state["run"])
                        if _settled(run_key.get(k)) != _settled(state["run"].get(k)))
        raise RauInputError(f"out_dir: {folder.parent} holds a run with other settings (differs in: {', '.join(differ)}); "
                            "use a new folder")
    model.load_weights(folder / "model.safetensors", what="checkpoint")
    try:
        opt.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
        _restore_rng(folder / "rng.pt")
    except Exception as exc:  # noqa: BLE001 - a damaged file of any kind: one line
        raise CheckpointError(f"checkpoint: cannot load {folder} ({exc.__class__.__name__}); "
                              "delete it to resume from the previous one") from None
    return int(state["step"]), list(state["history"])
