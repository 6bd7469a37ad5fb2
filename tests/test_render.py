import numpy as np

from rau.render import contour, draw_annotation, save_png


def _masks():
    a = np.zeros((30, 40), bool)
    a[2:10, 2:10] = True
    b = np.zeros((30, 40), bool)
    b[15:25, 20:35] = True
    return a, b


def test_draw_annotation_shape_and_palette_consistency():
    a, b = _masks()
    both = draw_annotation(np.zeros((30, 40), np.float32), {"a": a, "b": b}, names=False)
    only_b = draw_annotation(np.zeros((30, 40), np.float32), {"b": b}, names=False, palette_names=["a", "b"])
    assert both.shape == (30, 40, 3) and both.dtype == np.uint8
    assert (both[20, 27] == only_b[20, 27]).all()  # same structure, same colour across pictures


def test_contour_is_inside_and_thin():
    a, _ = _masks()
    c = contour(a)
    assert c.sum() == 8 * 4 - 4 and not (c & ~a).any()


def test_save_png_atomic(tmp_path):
    p = save_png(np.zeros((4, 4), np.uint8), tmp_path / "x" / "y.png")
    assert p.exists() and not list(p.parent.glob(".*tmp"))


def test_prediction_grid_writes_png(tmp_path):
    import numpy as np
    from PIL import Image

    from rau.eval.plots import prediction_grid

    m = np.zeros((20, 20), bool)
    m[5:10, 5:10] = True
    row = {"image": np.zeros((20, 20)), "id": "a", "truth": {"x": m}, "pred": {"k": {"x": m}, "j": {"x": None}},
           "dice": {"k": 1.0, "j": 0.0}}
    path = prediction_grid([row, row], tmp_path / "g.png")
    assert Image.open(path).size[0] > Image.open(path).size[1] * 0.9 and not list(tmp_path.glob(".*"))
