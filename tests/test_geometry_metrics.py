import numpy as np
import pytest

from rau.geometry import box_iou, box_to_norm, clip_box, mask_to_box, norm_to_box, qwen_smart_resize, scale_box
from rau.metrics import dice, hd95, iou


def test_mask_to_box_is_pixel_edge_exclusive():
    m = np.zeros((10, 12), bool)
    m[2:5, 3:7] = True
    assert mask_to_box(m) == (3.0, 2.0, 7.0, 5.0)
    assert mask_to_box(np.zeros((4, 4), bool)) is None


def test_box_iou_rules():
    a = (0.0, 0.0, 10.0, 10.0)
    assert box_iou(a, a) == 1.0
    assert box_iou(a, (20.0, 20.0, 30.0, 30.0)) == 0.0
    assert box_iou(a, (5.0, 0.0, 15.0, 10.0)) == pytest.approx(1 / 3)
    assert box_iou(None, None) == 1.0 and box_iou(a, None) == 0.0


def test_clip_box():
    assert clip_box((-5, -5, 5, 5), 10, 10) == (0.0, 0.0, 5.0, 5.0)
    assert clip_box((20, 20, 30, 30), 10, 10) is None


@pytest.mark.parametrize("hw", [(512, 512), (333, 517), (1024, 768), (60, 900)])
def test_qwen_resize_roundtrip(hw):
    mh, mw = qwen_smart_resize(*hw)
    assert mh % 28 == 0 and mw % 28 == 0
    box = (10.5, 20.0, hw[1] * 0.6, hw[0] * 0.7)
    back = scale_box(scale_box(box, hw, (mh, mw)), (mh, mw), hw)
    assert np.allclose(back, box)


def test_norm1000_roundtrip():
    box = (100.0, 50.0, 300.0, 250.0)
    coords = box_to_norm(box, (500, 400))
    assert coords == (250, 100, 750, 500)
    assert np.allclose(norm_to_box(coords, (500, 400)), box)


def test_metrics_on_hand_drawn_masks():
    a = np.zeros((20, 20), bool)
    a[5:10, 5:10] = True
    b = np.zeros((20, 20), bool)
    b[12:15, 12:15] = True
    empty = np.zeros((20, 20), bool)
    assert dice(a, a) == 1.0 and iou(a, a) == 1.0 and hd95(a, a) == 0.0
    assert dice(a, b) == 0.0 and iou(a, b) == 0.0
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0 and hd95(empty, empty) == 0.0
    assert dice(a, empty) == 0.0
    assert hd95(a, empty) == pytest.approx(np.hypot(20, 20))
    shifted = np.roll(a, 3, axis=1)
    assert hd95(a, shifted) == pytest.approx(3.0)
    assert dice(a, shifted) == pytest.approx(2 * 10 / 50)


def test_auroc_rank_rule():
    from rau.metrics import auroc

    assert auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0
    assert auroc([0.5, 0.5], [True, False]) == 0.5
    assert np.isnan(auroc([0.5, 0.4], [True, True]))
