"""Classical baseline: register the reference image onto the target, warp its masks.

SimpleITK, affine (centred by moments) then B-spline (8x8 mesh), correlation metric, multi-
resolution on a working grid whose longest side is ``work_size`` px. Both images are given the
same physical extent (the working grid), so a reference and a target of different pixel sizes
(different patients) register without resampling by hand; the final transform warps the
full-resolution reference masks straight onto the full-resolution target grid (the transform is
evaluated once per target pixel, then the image and all masks are resampled together).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rau.data.annotated import AnnotatedImage
from rau.geometry import mask_to_box
from rau.methods.interfaces import Localization, Localizer


@dataclass(frozen=True)
class WarpedReference:
    """One structure's registration output in target pixels: ``prob`` the warped soft mask, ``image``
    the whole reference image warped the same way (shared by all structures of a pair)."""

    prob: np.ndarray
    image: np.ndarray


def _sitk_image(array: np.ndarray, extent: float):
    """(H, W) array -> sitk image whose width/height span `extent` physical units along the longest side."""
    import SimpleITK as sitk

    h, w = array.shape
    img = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    s = extent / max(h, w)
    img.SetSpacing((s, s))
    return img


def _shrink(img, size: int):
    import SimpleITK as sitk

    w, h = img.GetSize()
    f = max(w, h) / size
    if f <= 1:
        return img
    new_size = [max(8, round(w / f)), max(8, round(h / f))]
    spacing = [img.GetSpacing()[0] * w / new_size[0], img.GetSpacing()[1] * h / new_size[1]]
    smoothed = sitk.SmoothingRecursiveGaussian(img, sigma=0.5 * spacing[0])
    return sitk.Resample(smoothed, new_size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), spacing,
                         img.GetDirection(), 0.0, sitk.sitkFloat32)


def itk_seed(seed: int) -> int:
    """rau's registration seed -> SimpleITK's metric-sampling seed. SimpleITK reads seed 0 as
    ``sitkWallClock`` (a new random seed on every call), which made every run differ; rau's seeds
    0..2**32-2 map to 1..2**32-1, so each seed, 0 included, gives the same registration every run."""
    return int(seed) % (2**32 - 1) + 1


def _affine_stage(f, m, sampling: float, sampling_seed: int, centre: str = "moments"):
    """Affine registration of working-grid images (started with their centres of mass, or with
    ``centre="geometry"`` their image centres, aligned; correlation, 3 pyramid levels) ->
    (transform, final correlation in [-1, 1]). ``sampling`` < 1 samples that share of the pixels
    at random (seeded); 1 uses every pixel."""
    import SimpleITK as sitk

    how = {"moments": sitk.CenteredTransformInitializerFilter.MOMENTS,
           "geometry": sitk.CenteredTransformInitializerFilter.GEOMETRY}[centre]
    init = sitk.CenteredTransformInitializer(f, m, sitk.AffineTransform(2), how)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsCorrelation()
    if sampling < 1:
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(sampling, sampling_seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=100)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SetInitialTransform(init, inPlace=False)
    affine = reg.Execute(f, m)
    return affine, -float(reg.GetMetricValue())  # ITK minimises the negative correlation


def mirror_fit_gain(fixed: np.ndarray, moving: np.ndarray, *, work_size: int = 128) -> float:
    """How much better ``fixed`` fits ``moving`` mirrored left-right than ``moving`` as it is: the
    difference of their correlations after affine registration on the ``work_size`` working grid
    (every pixel sampled, so deterministic); > 0 when one of the two is mirrored. 0 when either
    image is constant (nothing to register). A failed fit of the images as they are would read as
    "mirrored", so that fit starts twice (centres of mass, image centres) and keeps the better:
    from one start a correct DRR pair fell into a local optimum (0.64 against 0.96). The second
    start runs only when the first gives a gain > 0 (it can only lower the gain; below 0 the value is
    that upper bound). Two affine registrations, ~0.2 s; three on a mirrored-looking pair."""
    import SimpleITK as sitk

    if float(np.std(fixed)) == 0.0 or float(np.std(moving)) == 0.0:
        return 0.0
    f = _shrink(_sitk_image(fixed, work_size), work_size)
    m = _shrink(_sitk_image(moving, work_size), work_size)
    mirrored = sitk.GetImageFromArray(np.ascontiguousarray(sitk.GetArrayFromImage(m)[:, ::-1]))
    mirrored.CopyInformation(m)
    fit_mirrored = _affine_stage(f, mirrored, 1.0, 1)[1]
    gain = fit_mirrored - _affine_stage(f, m, 1.0, 1)[1]
    if gain > 0:  # the second start can only lower the gain, so it runs only when the first says "mirrored"
        gain = min(gain, fit_mirrored - _affine_stage(f, m, 1.0, 1, "geometry")[1])
    return gain


def register(fixed: np.ndarray, moving: np.ndarray, *, work_size: int = 128, mesh: int = 8,
             bspline_iterations: int = 40, seed: int = 0, sampling: float = 0.25,
             bspline_shrink: tuple[int, ...] = (2, 1)):
    """Transform mapping target (fixed) physical points into the reference (moving) image.

    Args:
        fixed, moving: (H, W) float32 in [0, 1]; sizes may differ.
    Returns:
        (transform, fixed_sitk, moving_sitk) with both images spanning ``work_size`` physical units.
    """
    import SimpleITK as sitk

    sampling_seed = itk_seed(seed)
    f_full, m_full = _sitk_image(fixed, work_size), _sitk_image(moving, work_size)
    f, m = _shrink(f_full, work_size), _shrink(m_full, work_size)

    affine, _ = _affine_stage(f, m, sampling, sampling_seed)

    bspline = sitk.BSplineTransformInitializer(f, [mesh, mesh], order=3)
    reg2 = sitk.ImageRegistrationMethod()
    reg2.SetMetricAsCorrelation()
    reg2.SetMetricSamplingStrategy(reg2.RANDOM)
    reg2.SetMetricSamplingPercentage(sampling, sampling_seed)
    reg2.SetInterpolator(sitk.sitkLinear)
    reg2.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=bspline_iterations)
    reg2.SetShrinkFactorsPerLevel(list(bspline_shrink))
    reg2.SetSmoothingSigmasPerLevel([max(0, f - 1) for f in bspline_shrink])
    reg2.SetMovingInitialTransform(affine)
    reg2.SetInitialTransform(bspline, inPlace=True)
    reg2.Execute(f, m)

    composite = sitk.CompositeTransform(2)
    composite.AddTransform(affine)
    composite.AddTransform(bspline)
    return composite, f_full, m_full


def moving_grid(transform, fixed_sitk, moving_sitk):
    """Where each target (fixed) pixel lands in the reference (moving) image: a (1, H_t, W_t, 2)
    float32 torch grid in ``grid_sample``'s normalised coordinates (align_corners=True). The
    transform (affine + B-spline) is evaluated once per pixel, whatever the number of masks."""
    import SimpleITK as sitk
    import torch

    f = fixed_sitk
    field = sitk.GetArrayFromImage(sitk.TransformToDisplacementField(
        transform, sitk.sitkVectorFloat64, f.GetSize(), f.GetOrigin(), f.GetSpacing(), f.GetDirection()))
    h, w = field.shape[:2]
    (fx, fy), (sx, sy) = f.GetOrigin(), f.GetSpacing()
    (mx0, my0), (msx, msy) = moving_sitk.GetOrigin(), moving_sitk.GetSpacing()
    mw, mh = moving_sitk.GetSize()
    ix = (fx + np.arange(w)[None, :] * sx + field[..., 0] - mx0) / msx  # continuous reference column
    iy = (fy + np.arange(h)[:, None] * sy + field[..., 1] - my0) / msy  # continuous reference row
    grid = np.stack([2.0 * ix / max(mw - 1, 1) - 1.0, 2.0 * iy / max(mh - 1, 1) - 1.0], -1)
    return torch.from_numpy(grid.astype(np.float32))[None]


def warp_arrays(arrays: list[np.ndarray], grid) -> list[np.ndarray]:
    """(H_ref, W_ref) arrays -> (H_t, W_t) float32 through :func:`moving_grid`'s ``grid``, all in one
    bilinear resampling (0 outside the reference)."""
    import torch
    import torch.nn.functional as F

    if not arrays:
        return []
    stack = torch.from_numpy(np.stack([np.asarray(a, dtype=np.float32) for a in arrays]))[None]
    with torch.no_grad():
        out = F.grid_sample(stack, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    return list(out.numpy())


def warp_masks(masks: dict[str, np.ndarray], transform, fixed_sitk, moving_sitk, grid=None) -> dict[str, np.ndarray]:
    """Warp (H_ref, W_ref) bool masks onto the target grid -> (H_t, W_t) float32 in [0, 1]
    (linear interpolation; threshold at 0.5 for a binary mask). ``grid``: a precomputed
    :func:`moving_grid` of the same transform."""
    grid = moving_grid(transform, fixed_sitk, moving_sitk) if grid is None else grid
    names = list(masks)
    warped = warp_arrays([masks[n] for n in names], grid)
    return {n: np.clip(w, 0.0, 1.0) for n, w in zip(names, warped)}


class RegistrationLocalizer(Localizer):
    """Label propagation by registration; each Localization carries the warped mask and its box.

    ``answer`` is "yes" when the warped mask is not empty (registration cannot say "absent"),
    ``score`` is the correlation of the registered images mapped to [0, 1]; ``cue`` is the warped
    soft mask again, the prior a cue-reading segmenter (the memory segmenter) takes, or with
    ``warped_cues`` a :class:`WarpedReference` (soft mask + the warped reference image: the
    refiner's input)."""

    name = "registration"

    def __init__(self, *, work_size: int = 128, mesh: int = 8, seed: int = 0, warped_cues: bool = False,
                 bspline_iterations: int = 40):
        self.work_size, self.mesh, self.seed = work_size, mesh, seed
        self.warped_cues, self.bspline_iterations = warped_cues, bspline_iterations

    def localize(self, reference: AnnotatedImage, target: AnnotatedImage, structures: list[str]) -> dict[str, Localization]:
        transform, f_img, m_img = register(target.image, reference.image, work_size=self.work_size,
                                           mesh=self.mesh, seed=self.seed, bspline_iterations=self.bspline_iterations)
        grid = moving_grid(transform, f_img, m_img)
        warped = warp_masks({s: reference.masks[s] for s in structures}, transform, f_img, m_img, grid)
        warped_image = warp_image(transform, f_img, m_img, grid)
        score = _similarity(target.image, warped_image)
        out = {}
        for name, prob in warped.items():
            mask = prob > 0.5
            box = mask_to_box(mask)
            out[name] = Localization(
                answer="yes" if box is not None else "no", box_xyxy_px=box, score=score if box else 0.0,
                reason=None if box else "the warped reference mask left the target image", mask=mask, prob=prob,
                cue=WarpedReference(prob, warped_image) if self.warped_cues else prob,
            )
        return out


def warp_image(transform, fixed_sitk, moving_sitk, grid=None) -> np.ndarray:
    """The reference (moving) image resampled onto the target grid -> (H_t, W_t) float32 (0 outside)."""
    import SimpleITK as sitk

    grid = moving_grid(transform, fixed_sitk, moving_sitk) if grid is None else grid
    return warp_arrays([sitk.GetArrayFromImage(moving_sitk)], grid)[0]


def _similarity(fixed: np.ndarray, warped: np.ndarray) -> float:
    """Normalised cross-correlation of target and warped reference, mapped from [-1, 1] to [0, 1]."""
    a = fixed - fixed.mean()
    b = warped - warped.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    ncc = float((a * b).sum() / denom) if denom > 0 else 0.0
    return (ncc + 1.0) / 2.0
