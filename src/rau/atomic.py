"""Atomic file writes: write a temporary sibling, flush it to disk, then rename over the target,
so a killed process never leaves a half-written file under the real name."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    return str(o)


def write_json(path: str | Path, obj: Any, indent: int = 2) -> Path:
    """JSON (numpy scalars as numbers, other unknown objects as strings), atomically."""
    return write_bytes(path, (json.dumps(obj, indent=indent, default=_json_default) + "\n").encode())


def write_text(path: str | Path, text: str) -> Path:
    """UTF-8 text, atomically."""
    return write_bytes(path, text.encode())


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """A matplotlib figure as PNG, atomically (rendered to memory, then written and renamed)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return write_bytes(path, buf.getvalue())
