"""Shared fixtures: tiny synthetic annotated images written to tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models are latency-bound: two intra-op threads on a busy 2-core machine make each call
    5-50x slower (oversubscription). Restored afterwards, so other modules keep their setting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_memseg(tmp_path_factory):
    """A tiny random-weight memory segmenter folder (grid 16, one memory layer, mask prompt)."""
    from rau.models.memseg.configuration import MemSegConfig
    from rau.models.memseg.modeling import MemSegModel

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    config = MemSegConfig(grid=16, memory_layers=1, feed_forward=64, fuser_layers=1, fuser_intermediate=64, mask_prompt=True)
    return MemSegModel(config).save_pretrained(tmp_path_factory.mktemp("memseg"))


def disk(shape, center, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


def synthetic_pair(shape=(96, 96), shift=(0, 0)):
    """Image with a bright disk ('blob') and a dark square ('box'), masks for both."""
    h, w = shape
    blob = disk(shape, (h * 0.35 + shift[0], w * 0.35 + shift[1]), min(h, w) * 0.15)
    square = np.zeros(shape, bool)
    square[int(h * 0.6) + shift[0]: int(h * 0.85) + shift[0], int(w * 0.55) + shift[1]: int(w * 0.8) + shift[1]] = True
    rng = np.random.default_rng(0)
    image = 0.4 + 0.05 * rng.standard_normal(shape)
    image[blob] = 0.9
    image[square] = 0.1
    return np.clip(image, 0, 1).astype(np.float32), {"blob": blob, "square": square}


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8 and array.dtype != np.uint16:
        array = np.clip(np.rint(array * 255), 0, 255).astype(np.uint8)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def pair_files(tmp_path):
    """ref.png + ref_masks/{blob,square}.png (96x96) and target.png (128x112, shifted): different sizes."""
    ref_img, ref_masks = synthetic_pair((96, 96))
    tgt_img, tgt_masks = synthetic_pair((128, 112), shift=(6, -4))
    write_png(tmp_path / "ref.png", ref_img)
    for name, m in ref_masks.items():
        write_png(tmp_path / "ref_masks" / f"{name}.png", m)
    write_png(tmp_path / "target.png", tgt_img)
    for name, m in tgt_masks.items():
        write_png(tmp_path / "target_masks" / f"{name}.png", m)
    return tmp_path


@pytest.fixture
def folder_dataset(tmp_path):
    """A dataset folder in the project layout with 4 images of varying sizes."""
    root = tmp_path / "ds"
    for i, (shape, shift) in enumerate([((96, 96), (0, 0)), ((96, 96), (4, 2)), ((100, 90), (-3, 5)), ((96, 96), (2, -2))]):
        img, masks = synthetic_pair(shape, shift)
        write_png(root / "images" / f"case_{i}.png", img)
        for name, m in masks.items():
            write_png(root / "masks" / name / f"case_{i}.png", m)
    return root


def assert_killed_run_resumes(train, sources, tmp_path: Path, **kw) -> Path:
    """A thumbnail-CNN recipe ``train(sources, out_dir, **kw)`` run whole into ``tmp_path/whole``, and
    killed after 10 steps then resumed in ``tmp_path/killed``: the kill leaves ``checkpoint-10`` and no
    ``final/``, and the resumed run ends with the whole run's weights. Returns the whole run's folder."""
    from safetensors.torch import load_file

    whole = train(sources, tmp_path / "whole", **kw)
    stopped = train(sources, tmp_path / "killed", stop_after=10, **kw)
    assert stopped.name == "checkpoint-10" and not (tmp_path / "killed" / "final").exists()
    resumed = train(sources, tmp_path / "killed", **kw)
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.allclose(a[k].numpy(), b[k].numpy(), atol=1e-6) for k in a)
    return whole
