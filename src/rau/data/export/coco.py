"""COCO JSON export (``coco.json``), opened by CVAT, pycocotools, FiftyOne and Label Studio.

One image, every structure of the result as a category (ids: the label values of
:func:`rau.data.export.common.label_table`), one annotation per found structure, each mask whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rau.atomic import write_json
from rau.data.annotated import AnnotatedImage, StructureResult, TargetResult
from rau.data.export.common import found_masks, label_table


def coco_document(result: TargetResult, target: AnnotatedImage) -> dict[str, Any]:
    """The COCO dict: one image, every structure as a category (ids from :func:`label_table`),
    one annotation per found structure.

    Annotation fields: ``segmentation`` compressed RLE (``counts`` a str), ``bbox`` [x, y, w, h]
    in pixel-edge coordinates (the method's ``box_xyxy_px``, else the mask's tight box), ``area``
    (mask pixels), ``iscrowd`` 0, ``score``, and ``attributes`` {``answer``, ``reason``} (the CVAT
    place for extra values)."""
    from pycocotools import mask as mask_utils

    from rau.geometry import mask_to_box

    h, w = target.shape
    source = target.meta.get("source")
    image = {"id": 1, "file_name": Path(source).name if source else f"{target.id}.png", "width": w, "height": h}
    categories = [{"id": v, "name": n, "supercategory": "anatomy"} for v, n in label_table(result.structures)]
    ids = {c["name"]: c["id"] for c in categories}
    annotations = []
    for name, mask in found_masks(result, target).items():
        r: StructureResult = result.structures[name]
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        x0, y0, x1, y1 = r.box_xyxy_px if r.box_xyxy_px is not None else mask_to_box(mask)
        annotations.append({
            "id": len(annotations) + 1, "image_id": 1, "category_id": ids[name],
            "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
            "area": float(mask.sum()), "iscrowd": 0, "score": float(r.score),
            "attributes": {"answer": r.answer, "reason": r.reason},
        })
    from rau import __version__

    info = {"description": f"rau {result.method}: {result.target_id} localized from {result.reference_id}",
            "version": __version__, "method": result.method, "reference": result.reference_id}
    return {"info": info, "images": [image], "categories": categories, "annotations": annotations}


def write_coco(result: TargetResult, target: AnnotatedImage, path: str | Path) -> Path:
    """Write :func:`coco_document` as JSON to ``path`` (atomically); returns ``path``."""
    return write_json(path, coco_document(result, target))
