"""Writing a rau result in the formats other tools open: NIfTI label map, COCO JSON, DICOM SEG.

=============  ====================  ======================================================
``--formats``  file (in ``out_dir``)  opened by
=============  ====================  ======================================================
``nifti``      ``labels.nii.gz``     3D Slicer, ITK-SNAP, napari (+ ``labels_labels.txt``,
                                     an ITK-SNAP label description, and ``labels_labels.json``)
``coco``       ``coco.json``         CVAT, pycocotools, FiftyOne, Label Studio
``dicom-seg``  ``seg.dcm``           3D Slicer, OHIF, highdicom (DICOM targets only)
=============  ====================  ======================================================

One module per format (:mod:`~rau.data.export.nifti`, :mod:`~rau.data.export.coco`,
:mod:`~rau.data.export.dicom_seg`) and what they share (:mod:`~rau.data.export.common`); this
module is the entry point (:func:`write_formats`) and re-exports their public names.

Rules shared by the three writers:

- Label values come from :func:`label_table`: every structure of the result, found or not, gets
  1..N in the result's order (0 is background), so a fixed structure list gives the same values
  on every target. COCO category ids are the same values.
- Only *found* structures (:attr:`StructureResult.found`) get pixels, an annotation or a segment.
- Overlaps (NIfTI label map only; COCO and DICOM SEG keep each mask whole): **the smaller structure
  wins** a pixel claimed by several, so a small structure inside a large one stays visible; equal
  areas go to the structure listed first.

The source file named in ``target.meta["source"]`` is re-read (header only for NIfTI) for its
geometry (:func:`nifti_affine`) and, for DICOM SEG, for the identifiers it must reference.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from rau.data.annotated import AnnotatedImage, TargetResult
from rau.data.export.coco import coco_document, write_coco
from rau.data.export.common import OVERLAP_RULE, itksnap_label_text, label_map, label_table
from rau.data.export.dicom_seg import check_dicom_seg, write_dicom_seg
from rau.data.export.nifti import nifti_affine, write_nifti_labels
from rau.errors import RauInputError

__all__ = [
    "FILENAMES", "FORMATS", "OVERLAP_RULE", "coco_document", "itksnap_label_text", "label_map", "label_table",
    "nifti_affine", "parse_formats", "write_coco", "write_dicom_seg", "write_formats", "write_nifti_labels",
]

FORMATS = ("nifti", "coco", "dicom-seg")
"""Format names accepted by :func:`write_formats` (the CLI's ``--formats``)."""

FILENAMES = {"nifti": "labels.nii.gz", "coco": "coco.json", "dicom-seg": "seg.dcm"}


def parse_formats(formats: str | Iterable[str] | None) -> list[str]:
    """``"nifti,coco"`` or ``["nifti", "coco"]`` -> checked, de-duplicated list in the order given."""
    if formats is None:
        return []
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    out: list[str] = []
    for item in (str(i).strip().lower() for i in items):
        if not item:
            continue
        if item not in FORMATS:
            raise RauInputError(f"--formats: unknown format {item!r}; choose from {', '.join(FORMATS)}")
        if item not in out:
            out.append(item)
    return out


def write_formats(
    result: TargetResult, target: AnnotatedImage, out_dir: str | Path, formats: str | Iterable[str] | None
) -> list[Path]:
    """Write ``result`` in each of ``formats`` into ``out_dir`` (``labels.nii.gz``, ``coco.json``,
    ``seg.dcm``; see :data:`FILENAMES`), each file atomically.

    Names are checked first and the DICOM SEG (the one a source file can refuse) is written first,
    so a bad name or a SEG that cannot be built leaves ``out_dir`` untouched. Returns the main file
    of each format, in the order asked (the NIfTI label tables sit next to ``labels.nii.gz``)."""
    chosen = parse_formats(formats)
    if "dicom-seg" in chosen:
        check_dicom_seg(result, target)
    writers = {"nifti": write_nifti_labels, "coco": write_coco, "dicom-seg": write_dicom_seg}
    out_dir = Path(out_dir)
    written = {name: writers[name](result, target, out_dir / FILENAMES[name])
               for name in sorted(chosen, key=lambda name: name != "dicom-seg")}
    return [written[name] for name in chosen]
