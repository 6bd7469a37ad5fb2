"""The memory segmenter's recipe: cache from a dataset folder, pair drawing (same structure,
references among other images, exclusions, seeded per step), and a tiny engine run whose killed
twin resumes to the same weights."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from rau.errors import RauInputError
from rau.models.memseg.configuration import FRAME, MemSegConfig
from rau.training.recipes.memseg import (
    MemSegCache,
    batch_tensors,
    build_memseg_cache,
    compose_mask,
    deform_prompts,
    draw_pairs,
    excluded,
    jitter_prompts,
    load_memseg_cache,
    pair_index,
    save_memseg_cache,
    train_memseg,
    training_prompts,
)

TINY = dict(grid=16, memory_layers=1, feed_forward=64, fuser_layers=1, fuser_intermediate=64, dropout=0.0)


def _cache(n=5, names=("heart", "clavicle_left", "lung"), seed=0) -> MemSegCache:
    """n images, 16 x 16 random embeddings; structure j a block whose place varies per image;
    the last structure is annotated in image 0 only."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, len(names), FRAME, FRAME), bool)
    for i in range(n):
        for j in range(len(names)):
            if j == len(names) - 1 and i > 0:
                continue
            r, c = rng.integers(0, 160, 2)
            masks[i, j, r : r + 64, c : c + 64] = True
    emb = rng.normal(0, 1, (n, 256, 16, 16)).astype(np.float16)
    return MemSegCache(emb, np.packbits(masks, axis=-1), masks.any(axis=(2, 3)), list(names), [f"case_{i}" for i in range(n)])


def test_exclusion_patterns_and_pair_drawing():
    assert excluded(["Clavicle_L", "heart", "LAD_coronary"], ["clavicle*", "*coronary*"]).tolist() == [True, False, True]
    caches = [_cache()]
    index = pair_index(caches, ["clavicle*"], k=2)
    assert set(index[:, 2].tolist()) == {0}  # lung: in one image only; clavicle: excluded
    a = draw_pairs(caches, index, np.random.default_rng([0, 7]), 6, 2)
    b = draw_pairs(caches, index, np.random.default_rng([0, 7]), 6, 2)
    assert [(c, t, s, r.tolist()) for c, t, s, r in a] == [(c, t, s, r.tolist()) for c, t, s, r in b]
    for _, t, s, refs in a:
        assert len(set(refs.tolist())) == 2 and t not in refs.tolist() and caches[0].present[refs, s].all()
    tgt, ref, ref_masks, gt, boxes = batch_tensors(caches, a, box_prompt=True)
    assert tgt.shape == (6, 256, 16, 16) and ref.shape == (6, 2, 256, 16, 16)
    assert ref_masks.shape == (6, 2, 1, FRAME, FRAME) and gt.shape == (6, FRAME, FRAME) and boxes.shape == (6, 4)
    _, t, s, _ = a[0]
    assert torch.equal(gt[0].bool(), torch.from_numpy(caches[0].frame_mask(t, s)))
    with pytest.raises(RauInputError, match="k_references"):
        pair_index(caches, ["*"], k=1)


def test_pseudo_structures_are_built_alike_in_every_image_and_never_from_held_out_ones():
    cache = _cache(n=6, names=("heart", "clavicle_left", "lung", "aorta"))
    cache.present[:, 2] = True  # every image annotates every structure here
    cache.masks[:, 2] = cache.masks[:, 0]
    index = pair_index([cache], ["clavicle*"], k=1)
    pairs = draw_pairs([cache], index, np.random.default_rng(3), 200, 1, pseudo=1.0, exclude=["clavicle*"])
    kinds = {p[2][0] for p in pairs}
    assert kinds == {"union", "part", "band"}
    assert all(p[2][2] != 1 for p in pairs if p[2][0] == "union")  # the held-out clavicle is never mixed in
    m = cache.frame_mask(0, 0)
    top, right = compose_mask(cache, 0, ("part", 0, 0)), compose_mask(cache, 0, ("part", 0, 3))
    assert 0 < top.sum() < m.sum() and not (top & ~m).any() and (top.sum(1) > 0).argmax() == (m.sum(1) > 0).argmax()
    assert (right.sum(0) > 0).nonzero()[0].max() == (m.sum(0) > 0).nonzero()[0].max()
    band = compose_mask(cache, 0, ("band", 0, 2))
    assert 0 < band.sum() < m.sum() and not (band & ~m).any()
    assert compose_mask(cache, 0, ("union", 0, 3)).sum() == (m | cache.frame_mask(0, 3)).sum()
    assert np.array_equal(compose_mask(cache, 0, 0), m)
    moved = jitter_prompts(torch.from_numpy(m[None, None].astype(np.float32)), np.random.default_rng(0), 0.1, 0.1, 10)
    assert moved.shape == (1, 1, FRAME, FRAME) and not torch.equal(moved[0, 0] > 0.5, torch.from_numpy(m))
    still = jitter_prompts(torch.from_numpy(m[None, None].astype(np.float32)), np.random.default_rng(0), 0, 0, 0)
    assert torch.equal(still[0, 0] > 0.5, torch.from_numpy(m))


def test_cache_from_a_dataset_folder(folder_dataset, tmp_path, one_torch_thread):
    out = build_memseg_cache(folder_dataset, tmp_path / "c.npz", exclude_structures=["square"], progress=False)
    cache = load_memseg_cache(out)
    assert cache.names == ["blob"] and len(cache.ids) == 4
    assert cache.embeddings.shape == (4, 256, 64, 64) and cache.embeddings.dtype == np.float16
    assert cache.present.all() and cache.frame_mask(0, 0).any()
    (tmp_path / "bad.npz").write_bytes(b"not a cache")
    with pytest.raises(RauInputError, match="memseg cache"):
        load_memseg_cache(tmp_path / "bad.npz")


def test_frame_cache_encodes_on_load_to_the_embeddings_of_a_full_cache(folder_dataset, tmp_path, one_torch_thread):
    full = load_memseg_cache(build_memseg_cache(folder_dataset, tmp_path / "full.npz", progress=False))
    path = build_memseg_cache(folder_dataset, tmp_path / "frames.npz", frames=True, progress=False)
    with np.load(path) as z:
        assert "embeddings" not in z.files and z["frames"].shape == (4, FRAME, FRAME) and z["frames"].dtype == np.uint8
    framed = load_memseg_cache(path)
    assert framed.embeddings.shape == full.embeddings.shape and framed.embeddings.dtype == np.float16
    assert np.array_equal(framed.masks, full.masks) and framed.names == full.names
    a, b = framed.embeddings.astype(np.float32), full.embeddings.astype(np.float32)
    assert np.abs(a - b).max() < 0.05 * np.abs(b).max()  # uint8 rounding of the input, nothing else


def test_features_gathered_from_held_tensors_equal_the_numpy_batch():
    caches = [_cache(), _cache(seed=1)]
    index = pair_index(caches, ["clavicle*"], k=2)
    pairs = draw_pairs(caches, index, np.random.default_rng(5), 4, 2)
    held = [torch.from_numpy(c.embeddings) for c in caches]
    for x, y in zip(batch_tensors(caches, pairs, True), batch_tensors(caches, pairs, True, held)):
        assert torch.equal(x, y)


def _train(caches, out, **kw):
    from rau.encoders.litemedsam import load

    return train_memseg(caches, out, steps=4, batch_size=2, lr=1e-3, seed=0, k_references=2, exclude=["clavicle*"],
                        save_every=2, log_every=1, warmup=0, config=MemSegConfig(**TINY, mask_prompt=True), device="cpu",
                        pseudo=0.5, progress=False, lite=load(), **kw)


def test_tiny_run_resumes_after_a_kill_to_the_same_weights(tmp_path, one_torch_thread):
    from safetensors.torch import load_file

    path = save_memseg_cache(_cache(), tmp_path / "c.npz")
    whole = _train([path], tmp_path / "whole")

    def kill(done, record):
        if done == 3:
            raise KeyboardInterrupt  # after the step-2 checkpoint, before the end

    with pytest.raises(KeyboardInterrupt):
        _train([path], tmp_path / "killed", on_step=kill)
    assert not (tmp_path / "killed" / "final").exists()
    resumed = _train([path], tmp_path / "killed")
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    varied = _train([path], tmp_path / "varied", vary_k=True)  # 1 or 2 memory frames per step
    assert json.loads((varied / "training.json").read_text())["vary_k"] is True
    # the names it trained on: the drawable ones (clavicle excluded, lung in one image only)
    assert json.loads((whole / "training.json").read_text())["structures"] == ["heart"]
    start = load_file(str(tmp_path / "killed" / "checkpoint-2" / "model.safetensors"))
    assert not all(torch.equal(a[k], start[k]) for k in a)  # it did train
    with pytest.raises(RauInputError, match="other settings"):
        train_memseg([path], tmp_path / "killed", steps=4, batch_size=2, lr=1e-3, seed=1, k_references=2,
                     exclude=["clavicle*"], config=MemSegConfig(**TINY), device="cpu", progress=False)


def test_registration_like_priors_range_from_exact_to_off_and_replace_the_reference_prior_by_share():
    masks = torch.zeros(6, 1, FRAME, FRAME)
    masks[:, :, 80:180, 60:140] = 1
    same = deform_prompts(masks, np.random.default_rng(0), 0.0, 0.0)
    assert torch.equal(same, masks)  # no displacement: the mask itself
    moved = deform_prompts(masks, np.random.default_rng(0), 0.05, 0.05)
    assert moved.shape == masks.shape and set(moved.unique().tolist()) <= {0.0, 1.0}
    dice = 2 * (moved * masks).sum((1, 2, 3)) / (moved.sum((1, 2, 3)) + masks.sum((1, 2, 3)))
    assert dice.min() > 0.3 and dice.max() < 1.0  # moved, still near
    ref = torch.zeros(6, 2, 1, FRAME, FRAME)  # references whose structure sits elsewhere
    ref[..., 0:40, 0:40] = 1
    gt = masks[:, 0]
    rng = np.random.default_rng(1)
    never = training_prompts(ref, gt, np.random.default_rng(1), (0.0, 0.0, 0.0), 0.0, (0.0, 0.0))
    assert torch.allclose(never, ref.mean(1), atol=1e-4)  # the reference prior (identity jitter)
    always = training_prompts(ref, gt, rng, (0.0, 0.0, 0.0), 1.0, (0.0, 0.0))
    assert torch.equal(always, masks)
    with pytest.raises(RauInputError, match="target_prior"):
        train_memseg([_cache()], "unused", steps=1, target_prior=0.5, config=MemSegConfig(**TINY))


def test_readout_path_trains_alone_or_with_the_decoder_and_starts_from_a_model_without_it(tmp_path, one_torch_thread):
    from safetensors.torch import load_file

    from rau.encoders.litemedsam import load

    path = save_memseg_cache(_cache(), tmp_path / "c.npz")
    plain = _train([path], tmp_path / "plain")
    record = json.loads((plain / "training.json").read_text())
    (plain / "training.json").write_text(json.dumps({**record, "structures": ["heart", "aorta"]}))  # as if it knew more
    config = MemSegConfig(**TINY, mask_prompt=True, readout=True, readout_grid=16)
    common = dict(steps=2, batch_size=2, lr=1e-2, seed=0, k_references=2, exclude=["clavicle*"], save_every=2,
                  warmup=0, config=config, device="cpu", progress=False, lite=load(), init_from=plain)
    alone = train_memseg([path], tmp_path / "alone", readout_only=True, **common)
    a, start = load_file(str(alone / "model.safetensors")), load_file(str(plain / "model.safetensors"))
    assert all(torch.equal(a[k], start[k]) for k in start)  # the decoder and memory did not move
    assert not torch.equal(a["readout_key.weight"], torch.eye(256)[:, :, None, None])  # the readout did
    joint = train_memseg([path], tmp_path / "joint", readout_weight=1.0, **common)
    record = json.loads((joint / "training.json").read_text())
    assert record["readout_weight"] == 1.0 and record["config"]["readout"] is True
    assert record["structures"] == ["aorta", "heart"]  # what its start knew stays known
    # the decoder as a correction of the readout: starts from a readout model, its gain among the trained weights
    residual = train_memseg([path], tmp_path / "residual", readout_weight=1.0,
                            **{**common, "init_from": joint, "config": dataclasses.replace(config, readout_residual=True)})
    assert json.loads((residual / "training.json").read_text())["config"]["readout_residual"] is True
    assert "readout_log_gain" in load_file(str(residual / "model.safetensors"))
    with pytest.raises(RauInputError, match="readout"):
        train_memseg([path], tmp_path / "bad", steps=2, readout_only=True, config=MemSegConfig(**TINY, mask_prompt=True),
                     device="cpu", progress=False)
