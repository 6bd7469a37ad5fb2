"""DICOM Segmentation export (``seg.dcm``), opened by 3D Slicer, OHIF and highdicom; DICOM targets only.

A SEG references its source instance: the file named in ``target.meta["source"]`` is re-read
(header only) for the identifiers it must reference. One segment per found structure, each mask whole.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from rau.atomic import write_bytes
from rau.data.annotated import AnnotatedImage, TargetResult
from rau.data.export.common import found_masks, source_file
from rau.errors import RauInputError, one_line

# DICOM Type 2 attributes highdicom copies from the source: they may be empty but must exist, and
# anonymised files often drop them.
_DICOM_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber")
_DICOM_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def check_dicom_seg(result: TargetResult, target: AnnotatedImage) -> Path:
    """The target's source DICOM, after checking that a SEG can be written for this result.

    Raises:
        RauInputError: the target was not read from a DICOM file, or nothing was found.
    """
    path, kind = source_file(target)
    if kind != "dicom":
        got = f"{path.name}" if path else "an image with no source file"
        raise RauInputError(
            f"--formats: dicom-seg needs a DICOM target (a SEG references its source instance), got {got}; "
            f"use nifti or coco"
        )
    if not found_masks(result, target):
        raise RauInputError(
            f"--formats: dicom-seg: no structure was found in {target.id!r} and a SEG needs at least one "
            "segment; use nifti or coco"
        )
    return path


def _read_dicom_for_seg(path: Path, target: AnnotatedImage) -> Any:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    missing = [k for k in _DICOM_UIDS if not ds.get(k)]
    if missing:
        raise RauInputError(
            f"--formats: dicom-seg: {path.name} lacks {', '.join(missing)}, which a SEG must reference; "
            "use nifti or coco"
        )
    if (int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) != target.shape:
        raise RauInputError(
            f"--formats: dicom-seg: {path.name} is {ds.get('Columns')}x{ds.get('Rows')} (WxH) but the target "
            f"is {target.shape[1]}x{target.shape[0]}; the file changed since it was read"
        )
    for key in _DICOM_TYPE2:
        if key not in ds:
            setattr(ds, key, "")  # Type 2: empty is a valid value
    return ds


def _segment_descriptions(names: list[str], all_names: list[str], method: str) -> list[Any]:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from rau import __version__
    from rau.render import structure_color

    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"rau {method}"[:64], family=codes.cid7162.ArtificialIntelligence, version=__version__
    )
    return [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name[:64],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.AnatomicalStructure,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*structure_color(name, all_names)),
        )
        for number, name in enumerate(names, start=1)
    ]


def write_dicom_seg(result: TargetResult, target: AnnotatedImage, path: str | Path) -> Path:
    """Write a binary DICOM Segmentation referencing the target's source DICOM instance.

    One segment per found structure, numbered 1..K in the result's order (not the label-table
    values: DICOM requires consecutive numbers), labelled with the structure name; the algorithm
    identification is ``rau <method>``. Patient/study identifiers are copied from the source, as a
    SEG must belong to its study.

    Raises:
        RauInputError: the target was not read from a DICOM file, the file lacks the UIDs a SEG
            references, nothing was found, or highdicom rejects the source.
    """
    import highdicom as hd
    from pydicom.uid import generate_uid

    from rau import __version__

    source = check_dicom_seg(result, target)
    masks = found_masks(result, target)
    ds = _read_dicom_for_seg(source, target)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    pixels = np.zeros((frames, *target.shape, len(masks)), bool)  # rau reads frame 0 of a multi-frame
    pixels[0] = np.stack(list(masks.values()), axis=-1)
    try:
        seg = hd.seg.Segmentation(
            source_images=[ds], pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=_segment_descriptions(list(masks), list(result.structures), result.method),
            series_instance_uid=generate_uid(), series_number=900, sop_instance_uid=generate_uid(),
            instance_number=1, manufacturer="rau", manufacturer_model_name=f"rau {result.method}"[:64],
            software_versions=__version__, device_serial_number="none", content_label="RAU",
            content_description=f"rau {result.method} from {result.reference_id}"[:64],
            series_description=f"rau {result.method} segmentation"[:64],
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise RauInputError(
            f"--formats: dicom-seg: highdicom cannot build a SEG for {source.name} ({one_line(exc)})"
        ) from None
    buf = io.BytesIO()
    seg.save_as(buf, enforce_file_format=True)
    return write_bytes(path, buf.getvalue())
