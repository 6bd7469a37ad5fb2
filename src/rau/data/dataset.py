"""Dataset folders: an index of (id, image path, mask sources) loaded lazily into AnnotatedImage.

Two layouts are recognised:

- **folder**: ``ROOT/images/<id>.<ext>`` + ``ROOT/masks/<structure>/<id>.png`` (binary); a structure
  without a file for an id is absent from that image. This is what ``rau drr`` writes and what a
  user can make by hand.
- **COCO**: ``ROOT/annotations.json`` with ``images``, ``annotations`` (polygons in pixel
  coordinates) and ``categories``; image files under ``ROOT/images/`` (or next to the json).
  Category names become structure names.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from rau.data.annotated import AnnotatedImage
from rau.data.io import RASTER_SUFFIXES, read_image, read_mask
from rau.errors import RauInputError


@dataclass(frozen=True)
class Entry:
    """One image of a dataset: where its pixels and its masks come from (nothing loaded yet)."""

    id: str
    image_path: Path
    mask_paths: dict[str, Path] = field(default_factory=dict)
    polygons: dict[str, list[list[float]]] = field(default_factory=dict)

    @property
    def structures(self) -> list[str]:
        return sorted(set(self.mask_paths) | set(self.polygons))


def polygons_to_mask(polygons: list[list[float]], shape: tuple[int, int]) -> np.ndarray:
    """COCO polygons [[x0, y0, x1, y1, ...], ...] in pixel coordinates -> (H, W) bool (fill + outline)."""
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in polygons:
        if len(poly) >= 6:
            pts = [(float(poly[i]), float(poly[i + 1])) for i in range(0, len(poly) - 1, 2)]
            draw.polygon(pts, fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


class Dataset:
    """An indexed dataset folder. ``len(ds)``, ``ds[i]`` -> AnnotatedImage, ``ds.entries``."""

    def __init__(self, root: Path, entries: list[Entry], layout: str):
        self.root = root
        self.entries = entries
        self.layout = layout

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[AnnotatedImage]:
        for i in range(len(self)):
            yield self[i]

    def __getitem__(self, index: int) -> AnnotatedImage:
        return self.load(self.entries[index])

    @property
    def structures(self) -> list[str]:
        return sorted({s for e in self.entries for s in e.structures})

    def load(self, entry: Entry, structures: list[str] | None = None) -> AnnotatedImage:
        image, meta = read_image(entry.image_path, arg=f"dataset image {entry.id}")
        meta["id"] = entry.id
        masks = {}
        for name in entry.structures:
            if structures is not None and name not in structures:
                continue
            if name in entry.mask_paths:
                masks[name] = read_mask(entry.mask_paths[name], image.shape, arg=f"mask {name!r} of {entry.id}")
            else:
                masks[name] = polygons_to_mask(entry.polygons[name], image.shape)
        return AnnotatedImage(image, masks, meta)

    def subset(self, ids: list[str]) -> Dataset:
        keep = set(ids)
        return Dataset(self.root, [e for e in self.entries if e.id in keep], self.layout)

    def slice(self, sl: slice | None) -> Dataset:
        """The id-sorted entries ``sl`` (e.g. ``slice(160, 200)``, a held-out part); None keeps all."""
        return self if sl is None else Dataset(self.root, self.entries[sl], self.layout)


def _index_folder(root: Path) -> list[Entry]:
    images = sorted(p for p in (root / "images").iterdir() if p.suffix.lower() in RASTER_SUFFIXES | {".dcm"})
    masks: dict[str, dict[str, Path]] = {}
    for sdir in sorted(p for p in (root / "masks").iterdir() if p.is_dir()):
        for mp in sdir.iterdir():
            if mp.suffix.lower() in RASTER_SUFFIXES:
                masks.setdefault(mp.stem, {})[sdir.name] = mp
    return [Entry(p.stem, p, masks.get(p.stem, {})) for p in images]


def _index_coco(root: Path, ann_path: Path) -> list[Entry]:
    try:
        coco = json.loads(ann_path.read_text())
        cats = {c["id"]: str(c["name"]) for c in coco["categories"]}
        images = coco["images"]
        anns = coco["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise RauInputError(f"dataset: {ann_path} is not a COCO json with images/annotations/categories ({exc})") from None
    polys: dict[int, dict[str, list[list[float]]]] = {}
    for a in anns:
        seg = a.get("segmentation")
        if not isinstance(seg, list) or a.get("category_id") not in cats:
            continue  # RLE/crowd annotations and unknown categories are skipped
        polys.setdefault(a["image_id"], {}).setdefault(cats[a["category_id"]], []).extend(seg)
    entries = []
    for im in images:
        name = im["file_name"]
        path = next((p for p in (root / "images" / name, root / name) if p.exists()), root / "images" / name)
        if not path.exists():  # ARCADE train ships JPEGs for PNG names
            alt = sorted((root / "images").glob(Path(name).stem + ".*"))
            path = alt[0] if alt else path
        entries.append(Entry(Path(name).stem, path, {}, polys.get(im["id"], {})))
    return entries


def load_dataset(root: str | Path, *, arg: str = "dataset") -> Dataset:
    """Index a dataset folder (layout detected: ``masks/`` folder, else COCO ``annotations.json``)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{arg}: {root} is not a folder")
    if (root / "images").is_dir() and (root / "masks").is_dir():
        entries, layout = _index_folder(root), "folder"
    elif (root / "annotations.json").is_file():
        entries, layout = _index_coco(root, root / "annotations.json"), "coco"
    else:
        raise RauInputError(
            f"{arg}: {root} is neither images/ + masks/<structure>/ nor a COCO folder with annotations.json"
        )
    if not entries:
        raise RauInputError(f"{arg}: {root} holds no images")
    return Dataset(root, sorted(entries, key=lambda e: _natural_key(e.id)), layout)


def _natural_key(s: str) -> tuple:
    import re

    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s))
