"""Method.predict: how a localizer's answer and box and a segmenter's mask combine (fake backends)."""

from __future__ import annotations

import numpy as np

from rau.data.annotated import AnnotatedImage
from rau.methods.interfaces import Localization, Localizer, Method, SegmentationOutput, Segmenter


def _pair():
    mask = np.zeros((32, 32), bool)
    mask[4:10, 4:12] = True
    ref = AnnotatedImage(np.random.default_rng(0).random((32, 32), dtype=np.float32), {"a": mask, "b": mask}, {"id": "r"})
    return ref, AnnotatedImage(ref.image, {}, {"id": "t"})


class CueLocalizer(Localizer):
    name = "cue"

    def localize(self, reference, target, structures):
        return {"a": Localization("yes", (0, 0, 20, 20), 0.5, cue="cue-a"),
                "b": Localization("yes", (1, 1, 9, 9), 0.25, cue="cue-b")}


class CueSegmenter(Segmenter):
    name = "cue-seg"
    reads_cues = True

    def __init__(self):
        self.seen = None

    def segment(self, target, boxes_xyxy_px, reference=None, cues=None):
        self.seen = dict(cues)
        m = np.zeros(target.shape, bool)
        m[2:6, 3:8] = True
        return {"a": SegmentationOutput(m, 1.0, m.astype(np.float32), (3, 2, 8, 6)),
                "b": SegmentationOutput(np.zeros(target.shape, bool), 0.0, None, None, "empty <seg> mask")}


def test_cues_reach_the_segmenter_and_its_box_and_reason_win():
    ref, tgt = _pair()
    seg = CueSegmenter()
    result = Method("m", CueLocalizer(), seg).predict(ref, tgt)
    assert seg.seen == {"a": "cue-a", "b": "cue-b"}
    a, b = result.structures["a"], result.structures["b"]
    assert a.answer == "yes" and a.box_xyxy_px == (3, 2, 8, 6) and a.score == 0.5 and a.mask.sum() == 20
    # an empty mask with a reason: answered "no", the localizer's box kept, score 0
    assert b.answer == "no" and b.mask is None and b.score == 0.0 and b.reason == "empty <seg> mask"
    assert b.box_xyxy_px == (1, 1, 9, 9)


class BoxSegmenter(Segmenter):
    name = "box-seg"

    def segment(self, target, boxes_xyxy_px, reference=None):  # no cues argument: never given one
        return {n: SegmentationOutput(np.zeros(target.shape, bool), 0.5) for n in boxes_xyxy_px}


def test_segmenters_without_cues_keep_the_old_contract():
    ref, tgt = _pair()
    result = Method("m", CueLocalizer(), BoxSegmenter()).predict(ref, tgt)
    a = result.structures["a"]
    assert a.answer == "yes" and a.mask is None and a.box_xyxy_px == (0, 0, 20, 20)
    assert a.reason == "the segmenter returned an empty mask"


def test_registration_is_the_same_every_run():
    """SimpleITK reads sampling seed 0 as "wall clock"; rau's seeds map to fixed ITK seeds."""
    from rau.methods.registration import itk_seed, register, warp_masks
    from tests.conftest import synthetic_pair

    assert itk_seed(0) == 1 and itk_seed(5) == 6
    ref, masks = synthetic_pair((96, 96))
    tgt, _ = synthetic_pair((104, 96), shift=(5, -3))
    warps = []
    for _ in range(2):
        transform, f, m = register(tgt, ref, seed=0)
        warps.append(warp_masks({"blob": masks["blob"]}, transform, f, m)["blob"])
    assert np.array_equal(warps[0], warps[1])


def test_one_displacement_field_warps_like_itk_resample():
    """The transform is evaluated once per target pixel and every mask resampled through that
    grid: the same masks as SimpleITK resampling each mask on its own (up to float rounding)."""
    import SimpleITK as sitk

    from rau.methods.registration import register, warp_image, warp_masks
    from tests.conftest import synthetic_pair

    ref, masks = synthetic_pair((96, 96))
    tgt, _ = synthetic_pair((104, 96), shift=(5, -3))
    transform, f, m = register(tgt, ref, seed=0, bspline_iterations=5)
    ours = warp_masks({"blob": masks["blob"]}, transform, f, m)["blob"]
    mk = sitk.GetImageFromArray(masks["blob"].astype(np.float32))
    mk.CopyInformation(m)
    itk = sitk.GetArrayFromImage(sitk.Resample(mk, f, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    assert ours.shape == tgt.shape and np.abs(ours - itk).max() < 1e-3
    image = warp_image(transform, f, m)
    itk_image = sitk.GetArrayFromImage(sitk.Resample(m, f, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    # where a target pixel maps within half a pixel of the reference's edge, zero padding blends
    # (grid_sample) where ITK returns 0: only that rim differs
    assert np.mean(np.abs(image - itk_image) > 1e-3) < 0.05
