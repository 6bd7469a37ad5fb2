"""The <seg> query head (method rau-seg) with a tiny random-weight VLM: gradients reach exactly the
head (the VLM and the image encoder stay frozen), output shapes, the VLM pairing check, mask
frames, the cache builder, and a tiny training run that lowers its loss and resumes after a kill."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from rau.data.caches import build_cache, save_cache
from rau.errors import RauInputError
from rau.models.refvlm.modeling import build_model
from rau.models.refvlm.seghead import (
    FRAME,
    SegHeadConfig,
    SegHeadModel,
    answer_box_frame,
    box_tokens,
    seg_hidden,
    weights_sha256,
)
from rau.training.recipes.seghead import build_seg_cache, load_seg_cache, mask_to_frame, train_seghead

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64, grid=4)


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    torch.manual_seed(0)
    return build_model(seed=0, **TINY).save_pretrained(tmp_path_factory.mktemp("vlm"))


def _head(vlm_dir):
    torch.manual_seed(0)
    return SegHeadModel(SegHeadConfig(hidden_size=32, vlm_sha256=weights_sha256(vlm_dir)))


def test_gradients_reach_exactly_the_head_and_shapes(vlm_dir, one_torch_thread):
    from rau.encoders.litemedsam import load as load_litemedsam
    from rau.models.refvlm.modeling import RefVlmModel

    vlm = RefVlmModel.from_pretrained(vlm_dir)
    vlm.net.requires_grad_(False)
    head = _head(vlm_dir)
    v = vlm.vocab
    blocks = torch.tensor([v.prompt([0, 0, 500, 500], [k] * 16) + v.answer([100, 100, 600, 600], [k] * 16) for k in range(3)])
    rf, tf = torch.randn(2, 256, 4, 4), torch.randn(2, 256, 4, 4)
    h = seg_hidden(vlm.net, head.net.seg_embed, rf, tf, blocks, torch.tensor([0, 1, 1]))
    assert h.shape == (3, 32)
    lite = load_litemedsam()
    pe = lite.prompt_encoder.get_dense_pe().detach()
    dense = lite.prompt_encoder.no_mask_embed.weight.detach().reshape(1, -1, 1, 1).expand(3, -1, 64, 64)
    low, iou = head.net(torch.randn(3, 256, 64, 64), h, pe, dense)
    assert low.shape == (3, FRAME, FRAME) and iou.shape == (3,)
    low.mean().backward()
    for name, p in head.net.named_parameters():
        if name.startswith(("mask_decoder.iou_prediction_head", "mask_decoder.output_hypernetworks_mlps.")) \
                and not name.startswith("mask_decoder.output_hypernetworks_mlps.0."):
            continue  # single-mask output: the IoU head and the other 3 masks' MLPs are off the path
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert head.net.seg_embed.grad.abs().sum() > 0  # through the frozen decoder
    assert all(p.grad is None for p in vlm.net.parameters())
    assert all(p.grad is None for p in lite.parameters())


def test_box_prompt_head_reads_the_answer_box_and_needs_it(vlm_dir, one_torch_thread):
    from rau.encoders.litemedsam import load as load_litemedsam
    from rau.models.refvlm.modeling import RefVlmModel

    # (ymin, xmin, ymax, xmax) on 1024 bins of a square image -> xyxy in the 256 px frame
    got = answer_box_frame(torch.tensor([[0, 1023, 1023, 0], [1023 // 2, 0, 1023, 1023 // 4]]), 1024)
    assert torch.allclose(got, torch.tensor([[256.0, 0, 0, 256], [0, 127.87, 63.81, 256]]), atol=0.05)
    wide = answer_box_frame(torch.tensor([[1023, 1023, 1023, 1023]]), 1024, (128.0, 256.0))  # a 2:1 image
    assert torch.allclose(wide, torch.tensor([[256.0, 128, 256, 128]]))
    vlm = RefVlmModel.from_pretrained(vlm_dir)
    torch.manual_seed(0)
    head = SegHeadModel(SegHeadConfig(hidden_size=32, box_prompt=True, vlm_sha256=weights_sha256(vlm_dir)))
    v = vlm.vocab
    blocks = torch.tensor([v.prompt([0, 0, 500, 500], [1] * 16) + v.answer([100, 100, 600, 600], [1] * 16)] * 2)
    rf, tf, emb = torch.randn(1, 256, 4, 4), torch.randn(1, 256, 4, 4), torch.randn(1, 256, 64, 64)
    with pytest.raises(ValueError, match="boxes_frame"):
        head.masks(vlm.net, rf, tf, blocks, emb)
    low, _ = head.masks(vlm.net, rf, tf, blocks, emb, boxes_frame=torch.tensor([[10.0, 10, 100, 100], [150, 150, 250, 250]]))
    assert low.shape == (2, FRAME, FRAME) and not torch.equal(low[0], low[1])  # same query, other box
    sparse = box_tokens(load_litemedsam().prompt_encoder, torch.tensor([[10.0, 10, 100, 100]]))
    assert sparse.shape == (1, 2, 256) and not sparse.requires_grad


def test_head_refuses_another_vlm_and_roundtrips(vlm_dir, tmp_path, one_torch_thread):
    head = _head(vlm_dir)
    folder = head.save_pretrained(tmp_path / "h")
    again = SegHeadModel.from_pretrained(folder)
    a, b = head.net.state_dict(), again.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    again.check_vlm(vlm_dir)
    other = build_model(seed=1, **TINY).save_pretrained(tmp_path / "other")
    with pytest.raises(RauInputError, match="another VLM"):
        again.check_vlm(other)


def test_mask_to_frame_scales_the_longest_side_and_pads():
    m = np.zeros((512, 256), bool)
    m[:256, :128] = True
    f = mask_to_frame(m)
    assert f.shape == (FRAME, FRAME) and f[:128, :64].all() and not f[128:].any() and not f[:, 64:].any()


def test_seg_cache_from_a_dataset_and_id_check(folder_dataset, tmp_path, one_torch_thread):
    (folder_dataset / "images" / "case_2.png").unlink()  # the one non-square image
    for name in ("blob", "square"):
        (folder_dataset / "masks" / name / "case_2.png").unlink()
    tokens = build_cache(folder_dataset, tmp_path / "t.npz", progress=False)
    out = build_seg_cache(tmp_path / "t.npz", tmp_path / "s.npz", progress=False)
    emb, masks = load_seg_cache(out, tokens.ids)
    assert emb.shape == (3, 256, 64, 64) and emb.dtype == np.float16
    assert masks.shape == (3, len(tokens.names), FRAME, FRAME // 8)
    assert np.unpackbits(masks, axis=-1).any()
    with pytest.raises(RauInputError, match="ids differ"):
        load_seg_cache(out, list(reversed(tokens.ids)))


def _caches(tmp_path, n=6, seed=0):
    """A token cache whose structure j is a bright block in channel j of the pooled features, and
    its seg cache: embeddings with the same block (at 64 x 64) and the masks in the 256 frame."""
    from rau.data.caches import TokenCache

    rng = np.random.default_rng(seed)
    feats = rng.normal(0, 0.1, (n, 256, 4, 4)).astype(np.float16)
    emb = rng.normal(0, 0.1, (n, 256, 64, 64)).astype(np.float16)
    loc = np.full((n, 2, 4), -1, np.int64)
    codes = np.full((n, 2, 16), -1, np.int64)
    masks = np.zeros((n, 2, FRAME, FRAME), bool)
    for i in range(n):
        for j in range(2):
            r, c = rng.integers(0, 3, 2)
            feats[i, j, r : r + 2, c : c + 2] += 2.0
            emb[i, j, r * 16 : (r + 2) * 16, c * 16 : (c + 2) * 16] += 2.0
            loc[i, j] = [r * 256, c * 256, (r + 2) * 256 - 1, (c + 2) * 256 - 1]
            codes[i, j] = (np.arange(16) + j) % 512
            masks[i, j, r * 64 : (r + 2) * 64, c * 64 : (c + 2) * 64] = True
    ids = [f"img{i}" for i in range(n)]
    save_cache(TokenCache(feats, loc, codes, ids, ["a", "b"], {}), tmp_path / "t.npz")
    np.savez(tmp_path / "s.npz", embeddings=emb, masks=np.packbits(masks, axis=-1), ids=np.array(ids))
    return tmp_path / "t.npz", tmp_path / "s.npz"


def _train(vlm_dir, t, s, out, steps, **kw):
    return train_seghead(vlm_dir, [t], [s], out, steps=steps, pairs_per_step=2, structures_per_pair=2, lr=1e-3,
                         warmup=1, progress=False, device="cpu", **kw)


def test_tiny_head_learns_and_a_killed_run_resumes_identically(vlm_dir, tmp_path, one_torch_thread):
    from safetensors.torch import load_file

    t, s = _caches(tmp_path)
    final = _train(vlm_dir, t, s, tmp_path / "a", 16, save_every=8)
    hist = json.loads((tmp_path / "a" / "loss.json").read_text())["history"]
    assert np.mean([h["loss"] for h in hist[-4:]]) < np.mean([h["loss"] for h in hist[:4]])
    assert all("dice" in h for h in hist)
    ref = _train(vlm_dir, t, s, tmp_path / "b", 4, save_every=2)
    _train(vlm_dir, t, s, tmp_path / "k", 4, save_every=2)
    shutil.rmtree(tmp_path / "k" / "checkpoint-4")
    shutil.rmtree(tmp_path / "k" / "final")
    resumed = _train(vlm_dir, t, s, tmp_path / "k", 4, save_every=2)
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    head = SegHeadModel.from_pretrained(final)
    head.check_vlm(vlm_dir)
    with pytest.raises(RauInputError, match="one per --cache"):
        train_seghead(vlm_dir, [t, t], [s], tmp_path / "z", steps=1, progress=False)


def _tiny_pair(vlm_dir, seed):
    """The tiny VLM, a head for it, one pair's random (1, 256, 4, 4) features and 3 reference structures."""
    from rau.models.refvlm.modeling import RefVlmModel

    vlm = RefVlmModel.from_pretrained(vlm_dir)
    torch.manual_seed(seed)
    rf, tf = torch.randn(1, 256, 4, 4), torch.randn(1, 256, 4, 4)
    ref_tokens = [([0, 0, 500, 500], [k] * 16) for k in range(3)]
    return vlm, _head(vlm_dir), rf, tf, ref_tokens


def test_seg_query_continuing_the_answer_cache_equals_recomputing(vlm_dir, one_torch_thread):
    from rau.models.refvlm.modeling import select_cache

    vlm, head, rf, tf, ref_tokens = _tiny_pair(vlm_dir, 1)
    v = vlm.vocab
    answers, past = vlm.answer(rf, tf, ref_tokens, return_cache=True)
    assert [a.loc for a in answers] == [a.loc for a in vlm.answer(rf, tf, ref_tokens)]  # same answers
    keep = [0, 2]
    blocks = torch.tensor([v.prompt(*ref_tokens[k]) + v.answer(answers[k].loc, answers[k].codes) for k in keep])
    zeros = torch.zeros(len(keep), dtype=torch.long)
    with torch.inference_mode():
        full = seg_hidden(vlm.net, head.net.seg_embed, rf, tf, blocks, zeros)
        cont = seg_hidden(vlm.net, head.net.seg_embed, rf, tf, blocks, zeros, past=select_cache(past, torch.tensor(keep)))
    assert cont.shape == full.shape == (2, 32)
    assert torch.allclose(cont, full, atol=1e-4), (cont - full).abs().max()


def test_box_only_answers_are_the_full_answers_box_and_continue_their_cache(vlm_dir, one_torch_thread):
    """seg_after="box": 5 decoding steps give the same <yes>/box as the full answer, no codes, and the
    <seg> query continuing that shorter cache equals recomputing prompt + box."""
    from rau.models.refvlm.modeling import BOX_TOKENS, generate

    vlm, head, rf, tf, ref_tokens = _tiny_pair(vlm_dir, 2)
    v = vlm.vocab
    full = vlm.answer(rf, tf, ref_tokens)
    short, past = vlm.answer(rf, tf, ref_tokens, return_cache=True, box_only=True)
    assert [a.loc for a in short] == [a.loc for a in full] and all(a.codes == () for a in short)
    assert [a.p_yes for a in short] == pytest.approx([a.p_yes for a in full])
    blocks = torch.tensor([v.prompt(*ref_tokens[k]) + v.answer(short[k].loc, short[k].codes) for k in range(3)])
    assert blocks.shape[1] == v.prompt_length + BOX_TOKENS
    zeros = torch.zeros(3, dtype=torch.long)
    with torch.inference_mode():
        again = seg_hidden(vlm.net, head.net.seg_embed, rf, tf, blocks, zeros)
        cont = seg_hidden(vlm.net, head.net.seg_embed, rf, tf, blocks, zeros, past=past)
    assert torch.allclose(cont, again, atol=1e-4)
    with pytest.raises(ValueError, match="n_tokens"):
        generate(vlm.net, v, rf, tf, blocks[:, : v.prompt_length], zeros, n_tokens=0)


def test_tiny_box_only_head_learns_and_records_where_seg_sits(vlm_dir, tmp_path, one_torch_thread):
    from rau.errors import CheckpointError

    t, s = _caches(tmp_path)
    final = _train(vlm_dir, t, s, tmp_path / "a", 12, save_every=6, seg_after="box")
    hist = json.loads((tmp_path / "a" / "loss.json").read_text())["history"]
    assert np.mean([h["loss"] for h in hist[-3:]]) < np.mean([h["loss"] for h in hist[:3]])
    assert SegHeadModel.from_pretrained(final).config.seg_after == "box"
    state = json.loads((tmp_path / "a" / "checkpoint-12" / "state.json").read_text())
    assert state["run"]["config"]["seg_after"] == "box"
    _train(vlm_dir, t, s, tmp_path / "m", 1, save_every=1, seg_after="mask")
    state = json.loads((tmp_path / "m" / "checkpoint-1" / "state.json").read_text())
    assert "seg_after" not in state["run"]["config"]  # the key of runs from before the option: they resume
    with pytest.raises(RauInputError, match="--seg-after"):
        _train(vlm_dir, t, s, tmp_path / "z", 1, seg_after="codes")
    with pytest.raises(CheckpointError, match="seg_after"):
        SegHeadConfig.from_dict({**SegHeadConfig().__dict__, "seg_after": "middle"})


def test_bf16_mask_decoder_returns_float32_logits_close_to_fp32(vlm_dir, one_torch_thread):
    from rau.models.refvlm.modeling import RefVlmModel

    vlm = RefVlmModel.from_pretrained(vlm_dir)
    head = _head(vlm_dir)
    v = vlm.vocab
    torch.manual_seed(3)
    rf, tf, emb = torch.randn(1, 256, 4, 4), torch.randn(1, 256, 4, 4), torch.randn(1, 256, 64, 64)
    blocks = torch.tensor([v.prompt([0, 0, 500, 500], [k] * 16) + v.answer([100, 100, 600, 600], [k] * 16) for k in range(2)])
    a, _ = head.masks(vlm.net, rf, tf, blocks, emb)
    b, iou = head.masks(vlm.net, rf, tf, blocks, emb, precision="bf16")
    assert b.dtype == iou.dtype == torch.float32 and b.shape == a.shape == (2, FRAME, FRAME)
    assert ((a > 0) == (b > 0)).float().mean() > 0.95


def _memseg_dir(tmp_path, seed=0):
    from rau.models.memseg.configuration import MemSegConfig
    from rau.models.memseg.modeling import MemSegModel

    torch.manual_seed(seed)
    config = MemSegConfig(grid=16, memory_layers=1, feed_forward=64, fuser_layers=1, fuser_intermediate=64, dropout=0.0,
                          mask_prompt=True)
    return MemSegModel(config).save_pretrained(tmp_path / f"memseg{seed}")


def _memseg_cache(tmp_path):
    """5 images, 16 x 16 random embeddings, two structures as blocks placed per image."""
    from rau.training.recipes.memseg import MemSegCache, save_memseg_cache

    rng = np.random.default_rng(0)
    masks = np.zeros((5, 2, 256, 256), bool)
    for i in range(5):
        for j in range(2):
            r, c = rng.integers(0, 160, 2)
            masks[i, j, r : r + 64, c : c + 48] = True
    emb = rng.normal(0, 1, (5, 256, 16, 16)).astype(np.float16)
    cache = MemSegCache(emb, np.packbits(masks, axis=-1), masks.any(axis=(2, 3)), ["heart", "clavicle_left"],
                        [f"case_{i}" for i in range(5)])
    return save_memseg_cache(cache, tmp_path / "memseg_cache.npz")


def test_memseg_head_trains_only_its_own_weights_starts_at_zero_tokens_and_resumes(vlm_dir, tmp_path, one_torch_thread):
    from safetensors.torch import load_file

    from rau.training.recipes.seghead import train_seghead_memseg

    memseg, cache = _memseg_dir(tmp_path), _memseg_cache(tmp_path)
    before = load_file(str(memseg / "model.safetensors"))

    def run(out, steps=4, **kw):
        return train_seghead_memseg(vlm_dir, memseg, [cache], out, steps=steps, batch_size=2, lr=1e-2, warmup=0,
                                    exclude=["clavicle*"], save_every=2, log_every=1, device="cpu", progress=False, **kw)

    whole = run(tmp_path / "whole")
    head = SegHeadModel.from_pretrained(whole)
    assert head.config.decoder == "memseg" and head.config.memseg_sha256 == weights_sha256(memseg)
    assert set(load_file(str(whole / "model.safetensors"))) == {"seg_embed", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"}
    after = load_file(str(memseg / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)  # the memory segmenter stays frozen
    head.check_vlm(vlm_dir)
    head.check_memseg(memseg)
    with pytest.raises(RauInputError, match="another memory segmenter"):
        head.check_memseg(_memseg_dir(tmp_path, seed=1))
    start = SegHeadModel.from_pretrained(tmp_path / "whole" / "checkpoint-2")
    assert not torch.equal(start.net.mlp[2].weight, head.net.mlp[2].weight)  # it trains
    run(tmp_path / "k")
    shutil.rmtree(tmp_path / "k" / "checkpoint-4")
    shutil.rmtree(tmp_path / "k" / "final")
    resumed = run(tmp_path / "k")
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    zero = run(tmp_path / "zero", steps=1, seed=3)  # after one step from zero the tokens are still tiny
    assert json.loads((zero / "training.json").read_text())["config"]["decoder"] == "memseg"
    with pytest.raises(RauInputError, match="a list of name patterns"):
        train_seghead_memseg(vlm_dir, memseg, [cache], tmp_path / "z", steps=1, exclude="clavicle*", progress=False)
