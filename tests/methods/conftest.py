"""Fixtures shared by the method tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tiny_memseg(tmp_path_factory):
    """A tiny random-weight memory segmenter folder (grid 16, one memory layer, mask prompt)."""
    from rau.models.memseg.configuration import MemSegConfig
    from rau.models.memseg.modeling import MemSegModel

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    config = MemSegConfig(grid=16, memory_layers=1, feed_forward=64, fuser_layers=1, fuser_intermediate=64, mask_prompt=True)
    return MemSegModel(config).save_pretrained(tmp_path_factory.mktemp("memseg"))
