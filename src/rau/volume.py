"""Volumes and sequences: segment a 3D NIfTI, a DICOM series or a multi-frame DICOM (cine) slice by
slice, propagating the result from slice to slice as SAM2 propagates through a video.

Example::

    import rau
    from rau.volume import propagate

    ref = rau.load_annotated("ref.png", "ref_masks/")                 # one annotated slice
    vol = propagate(ref, "ct.nii.gz", method="registration", out_dir="out/ct")
    vol.labels.shape, vol.start, vol.found                            # (Z, H, W) uint16, ...

How it runs (:func:`propagate`):

1. The start slice (``start``, else the slice whose 32x32 thumbnail correlates best with the
   reference image, :func:`best_matching_slice`) is segmented with the user's reference.
2. Then both ways, start -> last slice and start -> first slice (:func:`propagation_order`), each
   slice is segmented with the previous slice and its predicted masks as the reference. A structure
   whose mask vanishes stops propagating in that direction; a direction with no structure left stops.
   The method is built once and only its ``Method.predict`` is called.

Volumes are read by :func:`rau.data.volume_io.read_volume` (slices shown exactly as the
single-image readers show them; see :mod:`rau.data.volume_io`).

Outputs in ``out_dir`` (written into a temporary sibling folder, renamed at the end):

- ``labels.nii.gz``: uint16 label map in the volume's geometry (:class:`~rau.data.volume_io.Volume`:
  the NIfTI source's voxel order, shape and affine; a DICOM series' ITK patient geometry; frames of a
  multi-frame DICOM along the 3rd axis; see :mod:`rau.data.volume_io`).
- ``labels_labels.txt`` (ITK-SNAP label description) and ``labels_labels.json``: values from
  :func:`rau.data.export.label_table` (every structure 1..N in order, found or not), colours, voxel
  counts. Overlaps within a slice: :data:`rau.data.export.OVERLAP_RULE`.
- ``slices.json``: per slice its index, the reference it used (``"user"``, ``"slice k"`` or null
  when propagation never reached it) and per structure found/score/box.
- ``result.json``, ``masks/<structure>.png`` and ``overlay.png`` of the start slice, as single-image
  mode writes them (:func:`rau.pipeline.write_result`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rau.atomic import write_bytes, write_json, write_text
from rau.data.annotated import AnnotatedImage, StructureResult, TargetResult
from rau.data.volume_io import Volume, read_volume, volume_kind  # noqa: F401 - volume_kind: part of the rau.volume API
from rau.errors import RauInputError

# ----------------------------------------------------------------------------- propagation (pure)


def propagation_order(n_slices: int, start: int) -> list[tuple[int, int | None]]:
    """The order slices are segmented in: ``[(slice, the slice whose result is its reference)]``.

    The start slice comes first with reference None (the user's reference), then start+1 .. n-1,
    each from the one before, then start-1 .. 0, each from the one after. Every slice appears once.

    >>> propagation_order(5, 2)
    [(2, None), (3, 2), (4, 3), (1, 2), (0, 1)]
    """
    if n_slices < 1:
        raise ValueError(f"n_slices: expected at least 1 slice, got {n_slices}")
    if not 0 <= start < n_slices:
        raise ValueError(f"start: {start} is outside 0..{n_slices - 1}")
    forward = [(k, k - 1) for k in range(start + 1, n_slices)]
    backward = [(k, k + 1) for k in range(start - 1, -1, -1)]
    return [(start, None), *forward, *backward]


def best_matching_slice(reference_image: np.ndarray, frames: np.ndarray) -> tuple[int, float]:
    """(index, NCC) of the slice of ``frames`` (Z, H, W) most similar to ``reference_image`` (H', W'),
    by normalised cross-correlation of 32x32 thumbnails (:func:`rau.references.thumbnails.thumbnail`);
    ties go to the lowest index."""
    from rau.references.thumbnails import thumbnail

    query = thumbnail(reference_image)
    scores = np.array([float(thumbnail(f) @ query) for f in frames])
    k = int(np.argmax(scores))
    return k, float(scores[k])


def check_start(start: Any, n_slices: int, source: Path | str) -> int:
    """A user's start slice, checked against the volume -> int."""
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or not 0 <= int(start) < n_slices:
        raise RauInputError(f"--start-slice: {start!r} is outside the valid range 0..{n_slices - 1} of {source} "
                            f"({n_slices} slices)")
    return int(start)


# ----------------------------------------------------------------------------- results


@dataclass
class SliceResult:
    """One slice: ``reference`` None = the user's reference, k = slice k's result; ``result`` None when
    propagation never reached the slice (every structure had vanished on the way)."""

    index: int
    reference: int | None
    result: TargetResult | None

    @property
    def reference_label(self) -> str | None:
        if self.result is None:
            return None
        return "user" if self.reference is None else f"slice {self.reference}"


@dataclass
class VolumeResult:
    """What :func:`propagate` returns.

    labels: (Z, H, W) uint16 label map in display orientation (slice k = ``volume.frames[k]``),
        values from :func:`rau.data.export.label_table` of ``structures`` (0 background).
    structures: the structure names, in label order.
    slices: one :class:`SliceResult` per slice, in index order.
    affine: 4x4 RAS affine of ``file_labels`` (what ``labels.nii.gz`` holds).
    """

    labels: np.ndarray
    structures: list[str]
    slices: list[SliceResult]
    affine: np.ndarray
    start: int
    start_rule: str
    method: str
    reference_id: str
    seconds: float
    volume: Volume

    def mask(self, name: str) -> np.ndarray:
        """(Z, H, W) bool mask of one structure (masks of overlapping structures are kept whole)."""
        if name not in self.structures:
            raise KeyError(f"{name!r} is not one of {self.structures}")
        out = np.zeros(self.labels.shape, bool)
        for s in self.slices:
            r = s.result.structures[name] if s.result is not None else None
            if r is not None and r.found:
                out[s.index] = r.mask
        return out

    @property
    def masks(self) -> dict[str, np.ndarray]:
        return {name: self.mask(name) for name in self.structures}

    @property
    def file_labels(self) -> np.ndarray:
        """``labels`` in the voxel order of ``labels.nii.gz`` (:meth:`Volume.to_file_grid`)."""
        return self.volume.to_file_grid(self.labels)

    @property
    def slices_done(self) -> int:
        return sum(s.result is not None for s in self.slices)

    @property
    def found(self) -> list[str]:
        """Structures found on at least one slice."""
        return [n for n in self.structures
                if any(s.result is not None and s.result.structures[n].found for s in self.slices)]


def _complete(result: TargetResult, structures: list[str], why: dict[str, str]) -> TargetResult:
    """The method's result with every structure, in order; those not asked are "no" with ``why``."""
    full = {name: result.structures.get(name) or StructureResult(name, "no", None, 0.0, None, why.get(name))
            for name in structures}
    return TargetResult(result.target_id, result.reference_id, result.method, full, result.seconds)


def _slice_reference(volume: Volume, k: int, result: TargetResult, names: list[str]) -> AnnotatedImage:
    masks = {n: result.structures[n].mask for n in names}
    meta = {**volume.meta, "id": f"{volume.id} slice {k}", "source": str(volume.source), "slice_index": k}
    return AnnotatedImage(volume.frames[k], masks, meta)


def _run(method, reference: AnnotatedImage, volume: Volume, structures: list[str], start: int,
         progress: bool) -> dict[int, SliceResult]:
    """Segment the slices in :func:`propagation_order` -> {slice: SliceResult} of the slices reached."""
    from tqdm.auto import tqdm

    done: dict[int, SliceResult] = {}
    order = propagation_order(volume.n_slices, start)
    for k, src in tqdm(order, desc="slices", unit="slice", disable=not progress):
        if src is None:
            ref, names, why = reference, structures, {}
        else:
            prev = done.get(src)
            if prev is None:
                continue  # this direction has stopped
            names = [n for n in structures if prev.result.structures[n].found]
            if not names:
                continue
            ref = _slice_reference(volume, src, prev.result, names)
            why = {n: f"stopped: its mask vanished before slice {src}" for n in structures if n not in names}
        result = method.predict(ref, volume.slice_image(k), names)
        done[k] = SliceResult(k, src, _complete(result, structures, why))
    return done


def _label_stack(volume: Volume, slices: list[SliceResult]) -> np.ndarray:
    from rau.data.export.common import label_map

    labels = np.zeros(volume.frames.shape, np.uint16)
    for s in slices:
        if s.result is not None:
            labels[s.index] = label_map(s.result, volume.slice_image(s.index))
    return labels


def propagate(
    reference: AnnotatedImage,
    volume_path: str | Path | Volume,
    *,
    method=None,
    structures: list[str] | None = None,
    start: int | None = None,
    axis: int | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    **method_options: Any,
) -> VolumeResult:
    """Segment the reference's structures in every slice (frame) of a volume by propagation.

    Args:
        reference: the annotated reference (one 2D image; any size).
        volume_path: a 3D NIfTI, a folder holding one DICOM series, a multi-frame DICOM, or a
            :class:`Volume` already read (:func:`read_volume`).
        method: a registry name (default ``reg-refine``) or a :class:`rau.methods.Method`; built once.
        structures: subset of the reference's structures (default: all).
        start: the slice segmented with the user's reference (default: the best match,
            :func:`best_matching_slice`).
        axis: NIfTI only: 2 axial (default), 1 coronal, 0 sagittal.
        out_dir: if given, write the outputs listed in the module docstring there.
        progress: show a progress bar over the slices.
        method_options: as :func:`rau.methods.create_method` takes them (``device``, ``seed``...),
            when ``method`` is a name.
    Raises:
        RauInputError: bad volume (see :func:`read_volume`), ``start`` out of range, unknown
            structure; all checked before the method is built and before anything is written.
    """
    from rau.methods import Method, create_method
    from rau.pipeline import check_reference

    began = time.perf_counter()
    volume = volume_path if isinstance(volume_path, Volume) else read_volume(volume_path, axis=axis)
    check_reference(reference, structures)
    names = list(structures) if structures is not None else reference.structures
    if start is None:
        start, ncc = best_matching_slice(reference.image, volume.frames)
        rule = f"best match with the reference (thumbnail NCC {ncc:.3f})"
    else:
        start, rule = check_start(start, volume.n_slices, volume.source), "given"
    m = method if isinstance(method, Method) else create_method(method, **method_options)
    done = _run(m, reference, volume, names, start, progress)
    slices = [done.get(k, SliceResult(k, None, None)) for k in range(volume.n_slices)]
    labels = _label_stack(volume, slices)
    result = VolumeResult(labels, names, slices, volume.affine, start, rule, m.name, reference.id,
                          time.perf_counter() - began, volume)
    if out_dir is not None:
        write_volume_result(result, out_dir)
    return result


# ----------------------------------------------------------------------------- writing


def label_rows(result: VolumeResult) -> list[dict[str, Any]]:
    """Label table rows ``{"value", "name", "color_rgb", "found", "voxels"}`` of a volume result."""
    from rau.data.export.common import label_rows as rows

    return rows(result.structures, result.found, result.labels, "voxels")


def slices_document(result: VolumeResult) -> dict[str, Any]:
    """The ``slices.json`` document."""
    rows = []
    for s in result.slices:
        structures = {}
        for name in result.structures:
            r = s.result.structures[name] if s.result is not None else None
            structures[name] = {
                "found": bool(r is not None and r.found),
                "score": round(float(r.score), 4) if r is not None else None,
                "box_xyxy": [round(float(v), 2) for v in r.box_xyxy_px] if r is not None and r.box_xyxy_px is not None else None,
                "reason": r.reason if r is not None else "not reached: every structure had vanished on the way",
            }
        rows.append({"index": s.index, "reference": s.reference_label, "reference_slice": s.reference,
                     "seconds": round(s.result.seconds, 3) if s.result is not None else None, "structures": structures})
    v = result.volume
    return {
        "source": str(v.source), "kind": v.kind, "axis": v.axis, "n_slices": v.n_slices,
        "slice_shape_hw": list(v.frames.shape[1:]), "method": result.method, "reference": result.reference_id,
        "start": result.start, "start_rule": result.start_rule, "structures": result.structures,
        "slices_done": result.slices_done, "found": result.found, "seconds": round(result.seconds, 3),
        "box_convention": "pixel-edge xyxy in slice pixels (x1, y1 exclusive), slices as rau shows them",
        "slices": rows,
    }


def write_volume_result(result: VolumeResult, out_dir: str | Path) -> Path:
    """Write every output of :func:`propagate` into ``out_dir`` (see the module docstring).

    Everything goes into a temporary sibling folder first, renamed at the end: a failure leaves no
    partial ``out_dir``; an existing ``out_dir`` is replaced."""
    from rau.data.export.common import OVERLAP_RULE, itksnap_label_text
    from rau.data.export.nifti import nifti_bytes
    from rau.pipeline import staged_folder, write_result

    out_dir = Path(out_dir)
    with staged_folder(out_dir) as stage:
        first = result.slices[result.start]
        write_result(first.result, result.volume.slice_image(result.start), stage)
        description = f"rau {result.method} labels"
        write_bytes(stage / "labels.nii.gz", nifti_bytes(result.file_labels, result.affine, result.volume.xform_code, description))
        rows = label_rows(result)
        write_text(stage / "labels_labels.txt", itksnap_label_text(rows))
        write_json(stage / "labels_labels.json", {
            "labels_file": "labels.nii.gz", "background": 0, "overlap_rule": OVERLAP_RULE, "method": result.method,
            "target": str(result.volume.source), "reference": result.reference_id, "labels": rows,
        })
        write_json(stage / "slices.json", slices_document(result))
    return out_dir
