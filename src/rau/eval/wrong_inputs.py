"""Deliberately wrong inputs for the ``wrong`` and ``calib-wrong`` bench splits (issue 17).

Chest radiograph references (Wingspan) against targets on which a right method should withhold
its answer:

- ``noise``: white noise (16-bit PNG) and smoothed noise (blobs, which pass the noise rule and
  must be caught by the reference fit);
- ``blank``: constant images (black, mid grey);
- ``modality``: ARCADE coronary angiograms (no chest structure in them);
- ``mirror``: Wingspan radiographs mirrored left-right, their masks mirrored with them and kept
  under their anatomical names (the reference's left lung is now on the other side).

Structures absent from a target (ARCADE segments) are measured on the ``arcade`` split itself.
The bench's set is built from the bench's own targets (Wingspan 160..199, ARCADE val) with seeds
that differ from the calibration set's (Wingspan 120..159, ARCADE train), so the two never share
an image. Written once into ``OUT/images`` + ``OUT/masks/<structure>/`` (the folder layout) with a
``manifest.json`` naming each target's kind.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from rau.atomic import write_json
from rau.render import save_png

ROLES = {
    # role: wingspan target ids, ARCADE part, seed
    "bench": (range(160, 200), "val", 100),
    "calib": (range(120, 160), "train", 200),
}
COUNTS = {"noise": 4, "smooth_noise": 4, "blank": 2, "modality": 10, "mirror": 12}


def _u16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 65535), 0, 65535).astype(np.uint16)


def _draws(rng: np.random.Generator, size: int, n_arcade: int):
    """The seeded draws of a wrong-input set, in their order: white noise, smooth noise, the ARCADE
    entries (indices into the id-sorted part) of the "modality" targets."""
    noise = [rng.random((size, size)) for _ in range(COUNTS["noise"])]
    smooth = []
    for _ in range(COUNTS["smooth_noise"]):
        blobs = ndimage.gaussian_filter(rng.random((size, size)), sigma=rng.uniform(3, 12))
        smooth.append((blobs - blobs.min()) / max(np.ptp(blobs), 1e-9))
    return noise, smooth, sorted(rng.choice(n_arcade, COUNTS["modality"], replace=False).tolist())


def modality_ids(role: str, data: Path, size: int = 512) -> list[str]:
    """The ARCADE ids of the "modality" targets of ``role``'s wrong-input set (e.g. to keep them out
    of a model's training), without writing it."""
    from rau.data.dataset import load_dataset

    _, arcade_part, seed = ROLES[role]
    arcade = load_dataset(Path(data) / "arcade_syntax" / arcade_part)
    return [arcade.entries[j].id for j in _draws(np.random.default_rng(seed), size, len(arcade))[2]]


def build_wrong_inputs(out: Path, data: Path, role: str = "bench", size: int = 512) -> Path:
    """Write the wrong-input targets of ``role`` ("bench" or "calib") into ``out`` unless present."""
    from rau.data.dataset import load_dataset

    out = Path(out)
    if (out / "manifest.json").is_file():
        return out
    ids, arcade_part, seed = ROLES[role]
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    kinds: dict[str, str] = {}

    def put(name: str, kind: str, image: np.ndarray, masks: dict[str, np.ndarray] | None = None) -> None:
        save_png(_u16(image), out / "images" / f"{name}.png")
        for s, m in (masks or {}).items():
            save_png(m.astype(np.uint8) * 255, out / "masks" / s / f"{name}.png")
        kinds[name] = kind

    arcade = load_dataset(data / "arcade_syntax" / arcade_part)
    noise, smooth, picks = _draws(rng, size, len(arcade))
    for i, x in enumerate(noise):
        put(f"noise_{i}", "noise", x)
    for i, x in enumerate(smooth):
        put(f"smooth_noise_{i}", "noise", x)
    for i, level in enumerate((0.0, 0.5)[: COUNTS["blank"]]):
        put(f"blank_{i}", "blank", np.full((size, size), level))
    for j in picks:
        put(f"angiogram_{arcade.entries[j].id}", "modality", arcade.load(arcade.entries[j], []).image)
    ws = load_dataset(data / "wingspan_cxr").slice(slice(ids.start, ids.stop))
    for j in sorted(rng.choice(len(ws), COUNTS["mirror"], replace=False).tolist()):
        item = ws.load(ws.entries[j])
        put(f"mirror_{ws.entries[j].id}", "mirror", item.image[:, ::-1], {s: m[:, ::-1] for s, m in item.masks.items()})
    write_json(out / "manifest.json", {"role": role, "seed": seed, "kinds": kinds})
    return out


def target_kinds(folder: Path) -> dict[str, str]:
    """target id -> kind (noise, blank, modality, mirror) of a wrong-input folder."""
    return json.loads((Path(folder) / "manifest.json").read_text())["kinds"]
