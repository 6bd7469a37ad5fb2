"""DRR geometry and rendering: projections, view poses, the diffdrr ray tracer, 8-bit mapping.

Conventions (world frame, pose parameters, intensity mapping, mask rule) are documented in
:mod:`rau.data.drr`, whose :func:`~rau.data.drr.render_drr_dataset` drives this module. Pure
functions apart from :class:`DrrRenderer`, which loads the CT once and renders one pose per call.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rau.errors import RauInputError

PROJECTIONS = ("PA", "AP", "LAT")
#: Extra turn about the patient's superior axis (rz, degrees) per projection. "LAT" is a left lateral
#: view: the PA geometry turned by 90 degrees, so the beam enters the patient's right side and the
#: detector lies against the left side.
PROJECTION_TURN_DEG = {"PA": 0.0, "AP": 0.0, "LAT": 90.0}


def parse_projections(projection: str) -> list[str]:
    """"PA", "AP", "LAT" or a comma-separated mix such as "PA,LAT" -> list (view i uses item i % n).

    Raises RauInputError for anything else (AP cannot be mixed with PA/LAT: the volume is read
    once in one orientation)."""
    items = [p.strip().upper() for p in str(projection).split(",") if p.strip()] if isinstance(projection, str) else []
    if not items or any(p not in PROJECTIONS for p in items):
        raise RauInputError(f"projection: expected PA, AP, LAT or a comma-separated mix such as PA,LAT; got {projection!r}")
    if "AP" in items and len(set(items)) > 1:
        raise RauInputError(f"projection: AP cannot be mixed with other views in one run, got {projection!r}")
    return items


def view_pose(seed: int, index: int, rotation_deg: Sequence[float], translation_mm: Sequence[float]) -> dict[str, list[float]]:
    """Pose of view ``index``: depends only on (seed, index). Degrees (rz, rx, ry) and mm (tx, ty, tz)."""
    rng = np.random.default_rng([int(seed), int(index)])
    rot = rng.uniform(-1.0, 1.0, 3) * np.asarray(rotation_deg, float)
    trans = rng.uniform(-1.0, 1.0, 3) * np.asarray(translation_mm, float)
    return {"rotation_deg": [float(v) for v in rot], "translation_mm": [float(v) for v in trans]}


def turned_pose(pose: dict[str, list[float]], view: str) -> dict[str, list[float]]:
    """``pose`` with ``rz`` turned by the projection's extra angle (:data:`PROJECTION_TURN_DEG`)."""
    return dict(pose, rotation_deg=[pose["rotation_deg"][0] + PROJECTION_TURN_DEG[view], *pose["rotation_deg"][1:]])


def source_base(projections: list[str], sid: float) -> tuple[float, float, float]:
    """Source position (mm, world) before the pose: ``sid`` in front of the patient for AP, behind otherwise."""
    return (0.0, sid if projections == ["AP"] else -sid, 0.0)


def auto_delx(ct: Path, height: int, sdd: float, sid: float) -> float:
    """Detector pixel size (mm) fitting the CT's larger lateral / cranio-caudal extent, magnified
    by ``sdd / sid``, plus 5%, into ``height`` pixels."""
    import nibabel as nib

    img = nib.load(str(ct))
    corners = np.array([[i, j, k, 1.0] for i in (0, img.shape[0]) for j in (0, img.shape[1]) for k in (0, img.shape[2])])
    world = corners @ img.affine.T
    extent = np.ptp(world[:, :3], axis=0)
    return float(max(extent[0], extent[2]) * sdd / sid * 1.05 / height)


class DrrRenderer:
    """One diffdrr DRR (detector + volume) plus the compacted label volume; renders one pose.

    ``settings`` is the run's settings dict (see :func:`rau.data.drr.render_drr_dataset`): ``ct``,
    ``labelmap``, ``structures`` (name -> label values), ``projection``, ``sdd``, ``height``,
    ``delx``, ``resample_mm``, ``bone_attenuation``. ``channel`` maps a label value to its row in
    the path-length array returned by :meth:`render`."""

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


