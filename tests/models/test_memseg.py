"""The memory segmenter (issue 15) with a tiny config: shapes, gradients reach exactly the trained
parts, K references are an unordered set, the box prompt, config validation, and the model folder
round trip (truncated weights refused)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rau.errors import CheckpointError, RauInputError
from rau.models.memseg.configuration import FRAME, MemSegConfig
from rau.models.memseg.modeling import MemSegModel

TINY = dict(grid=16, memory_layers=1, feed_forward=64, fuser_layers=1, fuser_intermediate=64, dropout=0.0)


@pytest.fixture(scope="module")
def lite():
    from rau.encoders.litemedsam import load

    return load()


def _model(lite, **kw):
    torch.manual_seed(0)
    return MemSegModel(MemSegConfig(**{**TINY, **kw}), lite=lite)


def _inputs(b=2, k=2, side=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(b, 256, side, side, generator=g)
    refs = torch.randn(b, k, 256, side, side, generator=g)
    masks = (torch.rand(b, k, 1, FRAME, FRAME, generator=g) > 0.5).float()
    return target, refs, masks


def test_shapes_and_gradients_reach_exactly_the_trained_parts(lite, one_torch_thread):
    model = _model(lite)
    target, refs, masks = _inputs()
    model.net.train()
    low, iou = model.net(target, refs, masks)
    assert low.shape == (2, 1, FRAME, FRAME) and iou.shape == (2, 1)
    assert torch.isfinite(low).all() and torch.isfinite(iou).all()
    (low.mean() + iou.mean()).backward()
    trained = [n for n, p in model.net.named_parameters() if p.requires_grad]
    assert any(n.startswith("memory_encoder.") for n in trained) and any(n.startswith("memory_attention.") for n in trained)
    for name, p in model.net.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:  # the frozen prompt encoder and the unused multimask heads
            assert name.startswith(("prompt_encoder.", "mask_decoder.output_hypernetworks_mlps.")), name
            assert p.grad is None, name
    assert all(p.grad is None for p in lite.parameters())  # the copied original stays untouched


def test_full_size_embeddings_are_pooled_to_the_grid_and_checked(lite, one_torch_thread):
    model = _model(lite)
    target, refs, masks = _inputs(b=1, k=1, side=64)
    low, iou = model.predict(target, refs, masks)
    assert low.shape == (1, 1, FRAME, FRAME) and iou.shape == (1, 1)
    with pytest.raises(RauInputError, match="reference_masks"):
        model.predict(target, refs, masks[..., :128, :128])
    with pytest.raises(RauInputError, match="target"):
        model.predict(target[..., :60, :60], refs, masks)
    with pytest.raises(RauInputError, match="references"):
        model.predict(target, refs[:, :, :, :32, :32], masks)


def test_references_are_an_unordered_set_and_their_masks_matter(lite, one_torch_thread):
    model = _model(lite)
    target, refs, masks = _inputs(b=1, k=3)
    low, _ = model.predict(target, refs, masks)
    order = torch.tensor([2, 0, 1])
    swapped, _ = model.predict(target, refs[:, order], masks[:, order])
    assert torch.allclose(low, swapped, atol=1e-4)  # SAM2: every conditioning frame has one temporal code
    other, _ = model.predict(target, refs, 1 - masks)
    assert not torch.allclose(low, other, atol=1e-3)


def test_box_prompt_is_read_and_required(lite, one_torch_thread):
    model = _model(lite, box_prompt=True)
    target, refs, masks = _inputs()
    with pytest.raises(RauInputError, match="box_xyxy"):
        model.predict(target, refs, masks)
    a, _ = model.predict(target, refs, masks, torch.tensor([[10.0, 10, 100, 100]] * 2))
    b, _ = model.predict(target, refs, masks, torch.tensor([[120.0, 120, 250, 250]] * 2))
    assert not torch.allclose(a, b)
    with pytest.raises(RauInputError, match="box_xyxy"):
        _model(lite).predict(target, refs, masks, torch.zeros(2, 4))


@pytest.mark.parametrize("bad, match", [(dict(hidden_size=128), "hidden_size"), (dict(memory_dim=32), "memory_dim"),
                                        (dict(grid=8), "grid"), (dict(heads=3), "heads"), (dict(dropout=1.0), "dropout"),
                                        (dict(memory_layers=0), "memory_layers")])
def test_config_errors_name_the_field(bad, match):
    with pytest.raises(RauInputError, match=match):
        MemSegConfig(**bad)


def test_folder_round_trip_and_truncated_weights(lite, tmp_path, one_torch_thread):
    model = _model(lite)
    folder = model.save_pretrained(tmp_path / "m", training={"steps": 0})
    again = MemSegModel.from_pretrained(folder)
    assert again.config == model.config and again.training == {"steps": 0}
    target, refs, masks = _inputs(b=1, k=2, seed=3)
    a, ia = model.predict(target, refs, masks)
    b, ib = again.predict(target, refs, masks)
    assert torch.equal(a, b) and torch.equal(ia, ib)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        MemSegModel.from_pretrained(folder)
    (folder / "config.json").write_text('{"format": "rau-seghead-v1"}')
    with pytest.raises(CheckpointError, match="format"):
        MemSegModel.from_pretrained(folder)


def test_segmenter_maps_masks_back_to_target_pixels(lite, one_torch_thread):
    import numpy as np

    from conftest import synthetic_pair
    from rau.data.annotated import AnnotatedImage
    from rau.methods.memseg import MemSegSegmenter

    seg = MemSegSegmenter(model=_model(lite), precision="fp32")
    assert seg.uses_reference and not seg.needs_boxes
    ref_img, ref_masks = synthetic_pair((96, 96))
    tgt_img, _ = synthetic_pair((128, 112), shift=(6, -4))
    reference = AnnotatedImage(ref_img, ref_masks, {"id": "ref"})
    out = seg.segment(tgt_img, {"blob": None, "square": None, "absent": None}, reference)
    assert out["absent"] is None
    for name in ("blob", "square"):
        assert out[name].mask.shape == (128, 112) and out[name].prob.dtype == np.float32
        assert 0.0 <= out[name].score <= 1.0
    two = seg.segment_k(tgt_img, [reference, reference], {"blob": None})
    assert two["blob"].mask.shape == (128, 112)
    for output in (*[out[n] for n in ("blob", "square")], two["blob"]):
        assert set(output.features) == {"readout_agreement"} and 0.0 <= output.features["readout_agreement"] <= 1.0
    with pytest.raises(RauInputError, match="reference"):
        seg.segment(tgt_img, {"blob": None}, None)


def test_a_structure_it_never_trained_on_is_copied_from_the_reference(lite, one_torch_thread):
    """A name outside the model's training record is not decoded: it is the caller's prior where one
    is given, else the memory readout (here a target identical to the reference: the reference mask);
    a known name (any case or punctuation) is decoded as before; a record without names decodes all."""
    from conftest import synthetic_pair
    from rau.data.annotated import AnnotatedImage
    from rau.methods.memseg import MemSegSegmenter
    from rau.metrics import dice

    model = _model(lite)
    model.training = {"structures": ["Blob"]}
    seg = MemSegSegmenter(model=model, precision="fp32")
    assert seg.knows("blob") and seg.knows(" BLOB") and not seg.knows("square")
    img, masks = synthetic_pair((96, 96))
    reference = AnnotatedImage(img, masks, {"id": "ref"})
    out = seg.segment(img, {"blob": None, "square": None}, reference)
    decoded = MemSegSegmenter(model=model, precision="fp32", follow_unknown=False).segment(img, {"blob": None, "square": None}, reference)
    assert np.array_equal(out["blob"].mask, decoded["blob"].mask) and out["blob"].score == decoded["blob"].score
    assert dice(out["square"].mask, masks["square"]) > 0.8 and dice(decoded["square"].mask, masks["square"]) < 0.5
    assert 0.5 <= out["square"].score <= 1.0  # the readout's mean probability inside its mask
    assert out["square"].copied and not out["blob"].copied and not decoded["square"].copied  # result.json "copied"
    cue = np.zeros((96, 96), np.float32)
    cue[10:30, 10:40] = 0.9
    given = seg.segment(img, {"square": None}, reference, cues={"square": cue})
    assert np.array_equal(given["square"].mask, cue >= 0.5)
    model.training = {}
    assert MemSegSegmenter(model=model, precision="fp32").knows("square")


def test_feature_readout_carries_the_reference_mask_by_feature_similarity():
    """The training-free readout: a target whose features are the reference's, shifted by 8 cells,
    gets the reference mask shifted by 8 cells (32 frame pixels); K references are read together; a
    mismatch is refused."""
    from rau.models.memseg.readout import feature_readout

    g = torch.Generator().manual_seed(0)
    reference = torch.randn(256, 64, 64, generator=g)
    target = torch.roll(reference, shifts=8, dims=2)
    mask = torch.zeros(FRAME, FRAME)
    mask[80:160, 60:140] = 1
    read = feature_readout(target, reference[None], mask[None, None])
    assert read.shape == (1, FRAME, FRAME)
    moved = torch.roll(mask, shifts=32, dims=1)
    inter = ((read[0] > 0.5) & (moved > 0.5)).sum().item()
    assert 2 * inter / ((read[0] > 0.5).sum().item() + moved.sum().item()) > 0.9
    empty = torch.zeros_like(mask)
    both = feature_readout(target, torch.stack([reference, torch.randn(256, 64, 64, generator=g)]),
                           torch.stack([torch.stack([mask, empty]), torch.stack([empty, empty])]))
    assert both.shape == (2, FRAME, FRAME) and (both[0] > 0.5).sum() > 0 and (both[1] > 0.5).sum() == 0
    with pytest.raises(ValueError, match="do not match"):
        feature_readout(target, reference[None], torch.stack([mask, mask])[None])


# ----------------------------------------------------------------------------- follows the reference
def _disk(rng, yy, xx):
    c, r = rng.uniform(60, 196, 2), rng.uniform(25, 45)
    return (yy - c[0]) ** 2 + (xx - c[1]) ** 2 <= r * r


def _bar(rng, yy, xx):
    """A thin (18 px) oblique bar, 140 px long: a shape never trained on."""
    c, a = rng.uniform(80, 176, 2), rng.uniform(0.3, 1.2) + np.pi / 2 * rng.integers(2)
    across = -(yy - c[0]) * np.sin(a) + (xx - c[1]) * np.cos(a)
    along = (yy - c[0]) * np.cos(a) + (xx - c[1]) * np.sin(a)
    return (np.abs(across) <= 9) & (np.abs(along) <= 70)


def _two_structures(rng, shape, n):
    """n synthetic pairs at grid 16: two structures A and B of ``shape``, each with a random
    256-d signature (new per pair) added to noise in the cells it covers, at the same place in the
    reference and the target. The reference mask names A; nothing in the target tells A from B,
    so only the memory can. -> target (n, 256, 16, 16), reference (n, 1, 256, 16, 16), masks A
    and B (n, 256, 256) float."""
    yy, xx = np.mgrid[:FRAME, :FRAME]

    def features(masks, sigs):
        f = 0.5 * rng.standard_normal((256, 16, 16)).astype(np.float32)
        for m, s in zip(masks, sigs):
            f += 2 * m.reshape(16, 16, 16, 16).mean((1, 3))[None] * s[:, None, None]
        return f

    tgt, ref, ma, mb = [], [], [], []
    for _ in range(n):
        b = shape(rng, yy, xx)
        a = shape(rng, yy, xx) & ~b
        sigs = rng.standard_normal((2, 256)).astype(np.float32)
        ref.append(features([a, b], sigs)[None])
        tgt.append(features([a, b], sigs))
        ma.append(a)
        mb.append(b)
    t = lambda x: torch.from_numpy(np.stack(x).astype(np.float32))  # noqa: E731
    return t(tgt), t(ref), t(ma), t(mb)


def _iou(logits, mask):
    p = (logits[:, 0] > 0).float()
    return float(((p * mask).flatten(1).sum(1) / (p + mask).clamp(max=1).flatten(1).sum(1).clamp(min=1)).mean())


def test_follows_the_reference_on_shapes_it_never_trained_on(lite, one_torch_thread):
    """Overfit ~100 steps on disks, then on thin oblique bars: the prediction overlaps the bar
    the reference mask names (A), not the other one (B), and swapping the reference mask to B
    swaps the answer. ~30 s on the 2-core CPU: the slowest test here (memory attention learns
    from scratch: without SAM2 weights it needs ~80 steps before it starts to read the memory)."""
    from rau.training.recipes.memseg import memseg_loss

    model = _model(lite, feed_forward=128, fuser_intermediate=128)
    net = model.net.train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    rng = np.random.default_rng(0)
    for _ in range(100):
        tgt, ref, a, _ = _two_structures(rng, _disk, 4)
        low, iou = net(tgt, ref, a[:, None, None])
        loss, _ = memseg_loss(low, iou, a)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
    tgt, ref, a, b = _two_structures(np.random.default_rng(1), _bar, 12)
    on_a, _ = model.predict(tgt, ref, a[:, None, None])
    on_b, _ = model.predict(tgt, ref, b[:, None, None])
    assert _iou(on_a, a) > 0.25 and _iou(on_a, a) > 3 * _iou(on_a, b)  # B is what chance (either bar) would hit
    assert _iou(on_b, b) > 0.25 and _iou(on_b, b) > 3 * _iou(on_b, a)


def test_mask_prompt_is_read_trained_and_defaults_to_the_references_mean(lite, one_torch_thread):
    model = _model(lite, mask_prompt=True)
    target, refs, masks = _inputs()
    model.net.train()
    low, iou = model.net(target, refs, masks)
    (low.mean() + iou.mean()).backward()
    assert all(p.grad is not None for p in model.net.prompt_encoder.mask_downscaling.parameters())
    mean = masks.mean(1)
    a, _ = model.predict(target, refs, masks)
    b, _ = model.predict(target, refs, masks, prompt_masks=mean)
    c, _ = model.predict(target, refs, masks, prompt_masks=1 - mean)
    assert torch.allclose(a, b) and not torch.allclose(a, c, atol=1e-3)
    with pytest.raises(RauInputError, match="prompt_masks"):
        model.predict(target, refs, masks, prompt_masks=mean[..., :128, :128])
    with pytest.raises(RauInputError, match="prompt_masks"):
        _model(lite).predict(target, refs, masks, prompt_masks=mean)


def test_extra_prompt_tokens_are_read_and_checked(lite, one_torch_thread):
    """RAU's <seg> query reaches the decoder as extra sparse tokens (rau-seg on the memory segmenter)."""
    model = _model(lite, mask_prompt=True)
    target, refs, masks = _inputs()
    a, _ = model.predict(target, refs, masks)
    b, _ = model.predict(target, refs, masks, tokens=torch.randn(2, 2, 256, generator=torch.Generator().manual_seed(1)))
    assert not torch.allclose(a, b, atol=1e-3)
    tokens = torch.randn(2, 2, 256, requires_grad=True)
    low, _ = model.net(target, refs, masks, None, None, tokens)
    low.mean().backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    with pytest.raises(RauInputError, match="tokens"):
        model.predict(target, refs, masks, tokens=torch.zeros(2, 2, 64))


def test_a_finer_decoder_grid_reads_the_full_embedding_and_adds_no_weights(lite, one_torch_thread):
    coarse, fine = _model(lite, mask_prompt=True), _model(lite, mask_prompt=True, decoder_grid=32)
    assert coarse.net.state_dict().keys() == fine.net.state_dict().keys()
    fine.net.load_state_dict(coarse.net.state_dict())
    target, refs, masks = _inputs(b=1, k=1, side=32)
    a, _ = coarse.predict(target, refs, masks)
    b, _ = fine.predict(target, refs, masks)
    assert a.shape == b.shape == (1, 1, FRAME, FRAME) and not torch.allclose(a, b)
    with pytest.raises(RauInputError, match="decoder_grid"):
        MemSegConfig(**TINY, decoder_grid=8)
    with pytest.raises(RauInputError, match="multiple of 32"):
        fine.predict(*_inputs(b=1, k=1, side=16))


def test_trained_readout_starts_as_the_feature_readout_is_the_default_prior_and_learns(lite, one_torch_thread):
    """readout=True: the readout path (identity key at init) equals the training-free readout, is the
    decoder's default dense prior (an explicit prior still wins), its parameters get gradients, and
    a model folder without it cannot be mistaken for one with it."""
    from rau.models.memseg.readout import feature_readout

    model = _model(lite, mask_prompt=True, readout=True, readout_grid=16)
    target, refs, masks = _inputs()
    model.net.train()
    low, iou, read = model.net(target, refs, masks, return_readout=True)
    assert read.shape == (2, 1, FRAME, FRAME) and float(read.detach().min()) >= 0 and float(read.detach().max()) <= 1
    assert torch.allclose(read[0, 0], feature_readout(target[0], refs[0], masks[0, :, 0][None])[0], atol=1e-5)
    (low.mean() + read.mean()).backward()
    for name in ("readout_key.weight", "readout_log_tau", "readout_log_locality"):
        assert dict(model.net.named_parameters())[name].grad is not None, name
    model.net.eval()
    with torch.no_grad():
        prior = model.net.read(target, refs, masks)
    a, _ = model.predict(target, refs, masks)
    b, _ = model.predict(target, refs, masks, prompt_masks=prior)
    c, _ = model.predict(target, refs, masks, prompt_masks=masks.mean(1))
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, c, atol=1e-3)
    mixed, _ = model.predict(target, refs, masks, prompt_masks=masks.mean(1), prompt_use=torch.tensor([True, False]))
    assert torch.allclose(mixed[0], c[0], atol=1e-5) and torch.allclose(mixed[1], a[1], atol=1e-5)
    with pytest.raises(RauInputError, match="prompt_use"):
        model.predict(target, refs, masks, prompt_use=torch.tensor([True, False]))
    with pytest.raises(RauInputError, match="mask_prompt"):
        MemSegConfig(**TINY, readout=True)
    with pytest.raises(RauInputError, match="readout_grid"):
        MemSegConfig(**TINY, mask_prompt=True, readout=True, readout_grid=8)


def test_readout_residual_corrects_the_prior_it_is_given(lite, one_torch_thread):
    """readout_residual=True: the output is the prior on the logit scale (clipped) plus the plain
    decoder's logits times the learned gain, for the readout prior and for a prior the caller gives;
    the gain gets a gradient; the option needs the readout path and a positive gain."""
    from rau.models.memseg.modeling import prior_logit

    plain = _model(lite, mask_prompt=True, readout=True, readout_grid=16)
    model = _model(lite, mask_prompt=True, readout=True, readout_grid=16, readout_residual=True, residual_gain=0.25)
    missing, unexpected = model.net.load_state_dict(plain.net.state_dict(), strict=False)
    assert missing == ["readout_log_gain"] and not unexpected
    target, refs, masks = _inputs()
    given = masks.mean(1)
    for prompt in (None, given):
        base, _ = plain.predict(target, refs, masks, prompt_masks=prompt)
        out, _ = model.predict(target, refs, masks, prompt_masks=prompt)
        with torch.no_grad():
            prior = model.net.read(target, refs, masks) if prompt is None else prompt
        assert torch.allclose(out, prior_logit(prior) + 0.25 * base, atol=1e-4)
    assert float(prior_logit(torch.ones(1)).item()) == pytest.approx(3.89, abs=0.01)
    model.net.train()
    low, _ = model.net(target, refs, masks)
    low.mean().backward()
    assert model.net.readout_log_gain.grad is not None
    with pytest.raises(RauInputError, match="readout_residual"):
        MemSegConfig(**TINY, mask_prompt=True, readout_residual=True)
    with pytest.raises(RauInputError, match="residual_gain"):
        MemSegConfig(**TINY, mask_prompt=True, readout=True, readout_residual=True, residual_gain=0)
