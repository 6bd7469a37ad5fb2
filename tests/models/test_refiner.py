"""The registration refiner: windows, an untrained refiner returns the prior, its model folder,
the cache of registration outputs, a tiny run whose killed twin resumes to the same weights, and
reg-refine following a reference shape no training ever showed."""

from __future__ import annotations

import numpy as np
import pytest

from rau.data.annotated import AnnotatedImage
from rau.errors import CheckpointError, RauInputError
from rau.models.refiner.configuration import RefinerConfig
from rau.models.refiner.modeling import RefinerModel, cut, paste, window
from tests.conftest import disk, synthetic_pair, write_png

TINY = dict(image_size=64, crop=32, channels=(4, 4, 8, 8, 8, 4))


def test_window_cut_and_paste():
    prior = np.zeros((64, 64), np.float32)
    prior[10:20, 30:50] = 1
    y0, x0, side = window(prior)
    assert side == round(20 * 1.5 + 16) and abs((y0 + side / 2) - 15) <= 1 and abs((x0 + side / 2) - 40) <= 1
    assert window(np.zeros((8, 8), np.float32)) is None
    win = (-4, 60, 10)  # runs past the top and right edges
    part = cut(np.ones((64, 64), np.float32), win)
    assert part.shape == (10, 10) and part.sum() == 6 * 4
    full = np.zeros((64, 64), np.float32)
    paste(full, np.full((10, 10), 2.0, np.float32), win)
    assert full.sum() == 2.0 * 24 and full[0:6, 60:64].min() == 2.0


def test_untrained_refiner_returns_the_prior_and_round_trips(tmp_path, one_torch_thread):
    model = RefinerModel(RefinerConfig(**TINY))
    rng = np.random.default_rng(0)
    target = rng.random((80, 72)).astype(np.float32)
    priors = [disk((80, 72), (30, 30), 12).astype(np.float32), np.zeros((80, 72), np.float32)]
    probs = model.predict_probs(target, target[::-1].copy(), priors)
    assert probs.shape == (2, 80, 72)
    inter = ((probs[0] > 0.5) & (priors[0] > 0.5)).sum()
    assert 2 * inter / ((probs[0] > 0.5).sum() + (priors[0] > 0.5).sum()) > 0.95
    assert not (probs[1] > 0.5).any()
    folder = model.save_pretrained(tmp_path / "m")
    again = RefinerModel.from_pretrained(folder)
    assert again.config == model.config
    assert np.allclose(again.predict_probs(target, target, priors[:1]), model.predict_probs(target, target, priors[:1]))
    (folder / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="refiner weights"):
        RefinerModel.from_pretrained(folder)
    with pytest.raises(RauInputError, match="crop"):
        RefinerConfig(crop=30)


@pytest.fixture(scope="module")
def refine_cache(tmp_path_factory):
    from rau.training.recipes.refine import build_refine_cache

    root = tmp_path_factory.mktemp("ds")
    for i, shift in enumerate([(0, 0), (4, 2), (-3, 5), (2, -2), (5, 5)]):
        img, masks = synthetic_pair((96, 96), shift)
        write_png(root / "images" / f"case_{i}.png", img)
        for name, m in masks.items():
            write_png(root / "masks" / name / f"case_{i}.png", m)
    return build_refine_cache(root, root / "cache.npz", exclude=["square"], image_size=64, progress=False)


def test_refine_cache_holds_registration_outputs_without_excluded_structures(refine_cache):
    from rau.training.recipes.refine import load_refine_cache

    c = load_refine_cache(refine_cache)
    assert c.names == ["blob"] and c.exclude == ["square"] and c.targets.shape == (5, 64, 64)
    assert c.priors.shape == (5, 64, 64) and all(r != t for r, t in zip(c.references, c.ids))
    for row in range(5):  # registration of these near-copies is close: the prior overlaps the truth
        p, t = c.priors[row] >= 128, c.truths[row]
        assert 2 * (p & t).sum() / (p.sum() + t.sum()) > 0.8
    bad = refine_cache.parent / "bad.npz"
    bad.write_bytes(b"not a cache")
    with pytest.raises(RauInputError, match="refine cache"):
        load_refine_cache(bad)


def test_tiny_refiner_trains_and_a_killed_run_resumes_to_the_same_weights(refine_cache, tmp_path, one_torch_thread):
    from safetensors.torch import load_file

    from rau.training.recipes.refine import train_refiner

    kw = dict(steps=4, batch_size=2, lr=1e-2, warmup=0, save_every=2, progress=False, device="cpu",
              config=RefinerConfig(**TINY))
    whole = train_refiner([refine_cache], tmp_path / "whole", **kw)
    stopped = train_refiner([refine_cache], tmp_path / "killed", stop_after=2, **kw)
    assert stopped.name == "checkpoint-2" and not (tmp_path / "killed" / "final").exists()
    resumed = train_refiner([refine_cache], tmp_path / "killed", **kw)
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.allclose(a[k].numpy(), b[k].numpy(), atol=1e-6) for k in a)
    model = RefinerModel.from_pretrained(tmp_path / "whole")
    assert model.config.held_out == ["square"] and model.training["recipe"] == "refiner"
    with pytest.raises(RauInputError, match="256 px|64 px"):
        train_refiner([refine_cache], tmp_path / "other", steps=1, config=RefinerConfig(image_size=96, crop=32),
                      progress=False, device="cpu")


def test_reg_refine_follows_a_reference_shape_it_never_saw(tmp_path, one_torch_thread):
    """A crescent (never in any training set) moved and stretched between reference and target:
    reg-refine's mask follows the reference's shape onto the target."""
    from rau.methods import create_method
    from rau.metrics import dice

    def crescent(shape, c, r):
        return disk(shape, c, r) & ~disk(shape, (c[0] - r * 0.4, c[1] + r * 0.3), r * 0.8)

    rng = np.random.default_rng(1)
    ref_mask = crescent((96, 96), (48, 44), 24)
    tgt_mask = crescent((104, 96), (54, 50), 26)
    ref = (0.3 + 0.03 * rng.standard_normal((96, 96))).astype(np.float32)
    tgt = (0.3 + 0.03 * rng.standard_normal((104, 96))).astype(np.float32)
    ref[ref_mask], tgt[tgt_mask] = 0.85, 0.85
    folder = RefinerModel(RefinerConfig(**TINY)).save_pretrained(tmp_path / "refiner")
    method = create_method("reg-refine", refiner=folder, calibration=False)
    out = method.predict(AnnotatedImage(ref, {"crescent": ref_mask}, {"id": "r"}),
                         AnnotatedImage(np.clip(tgt, 0, 1), {}, {"id": "t"}))
    assert dice(out.structures["crescent"].mask, tgt_mask) > 0.85
    with pytest.raises(CheckpointError, match="^--refiner: "):
        create_method("reg-refine", refiner=tmp_path / "missing")


def test_reg_refine_with_k_references_fuses_warped_masks_before_the_refiner(tmp_path, one_torch_thread):
    """k references: a structure one reference lacks still comes from the two that have it; one
    that only one of three references has is called absent."""
    from rau.metrics import dice
    from rau.methods import create_method
    from rau.references.bank import predict_with_references

    ref_img, masks = synthetic_pair((96, 96))
    tgt_img, tgt_masks = synthetic_pair((104, 96), shift=(4, -3))
    only_one = np.zeros((96, 96), bool)
    only_one[5:15, 5:15] = True
    refs = [AnnotatedImage(ref_img, {"blob": masks["blob"]}, {"id": "a"}),
            AnnotatedImage(ref_img, dict(masks), {"id": "b"}),
            AnnotatedImage(ref_img, {**masks, "corner": only_one}, {"id": "c"})]
    folder = RefinerModel(RefinerConfig(**TINY)).save_pretrained(tmp_path / "refiner")
    method = create_method("reg-refine", refiner=folder, calibration=False)
    assert method.fuses_in_memory
    result, asked = predict_with_references(method, refs, AnnotatedImage(tgt_img, {}, {"id": "t"}))
    assert sorted(asked) == ["blob", "corner", "square"] and result.reference_id == "a+b+c"
    assert dice(result.structures["blob"].mask, tgt_masks["blob"]) > 0.85
    assert dice(result.structures["square"].mask, tgt_masks["square"]) > 0.8
    corner = result.structures["corner"]
    assert corner.answer == "no" and corner.mask is None and "1 of the 3 references" in corner.reason
    with pytest.raises(RauInputError, match="annotated in none"):
        method.predict_k(refs, AnnotatedImage(tgt_img, {}, {"id": "t"}), ["nope"])


def test_reg_refine_k_references_vote_when_the_refined_masks_agree(tmp_path, one_torch_thread):
    """k references whose refined masks agree are pixel-voted (soft_vote of each reference's own
    result); a structure whose masks disagree keeps the most similar (first) reference's mask."""
    from scipy import ndimage

    from rau.methods import create_method
    from rau.methods.agreement import soft_vote
    from rau.methods.refine import SOFT_VOTE_SIGMA
    from rau.metrics import dice

    ref_img, masks = synthetic_pair((96, 96))
    tgt_img, _ = synthetic_pair((104, 96), shift=(4, -3))
    far = np.zeros((96, 96), bool)
    far[70:90, 5:25] = True
    refs = [AnnotatedImage(ref_img, {"blob": masks["blob"], "square": masks["square"]}, {"id": "a"}),
            AnnotatedImage(ref_img, {"blob": ndimage.binary_dilation(masks["blob"], iterations=2),
                                     "square": far}, {"id": "b"}),
            AnnotatedImage(ref_img, {"blob": ndimage.binary_erosion(masks["blob"], iterations=1),
                                     "square": far}, {"id": "c"})]
    folder = RefinerModel(RefinerConfig(**TINY)).save_pretrained(tmp_path / "refiner")
    method = create_method("reg-refine", refiner=folder, calibration=False)
    target = AnnotatedImage(tgt_img, {}, {"id": "t"})
    one = [method.predict(r, target).structures for r in refs]
    fused = method.predict_k(refs, target)
    blobs = [o["blob"].mask for o in one]
    assert min(dice(blobs[i], blobs[j]) for i in range(3) for j in range(i + 1, 3)) >= 0.5
    assert np.array_equal(fused.structures["blob"].mask, soft_vote(blobs, SOFT_VOTE_SIGMA * 104))
    assert dice(one[0]["square"].mask, one[1]["square"].mask) < 0.5
    assert np.array_equal(fused.structures["square"].mask, one[0]["square"].mask)
    # the k-reference confidence features: how the three outputs agree, how many references annotate it
    agree = np.mean([dice(blobs[i], blobs[j]) for i in range(3) for j in range(i + 1, 3)])
    assert fused.structures["blob"].features["agreement"] == pytest.approx(agree)
    assert fused.structures["square"].features["agreement"] < 0.5 <= agree
    assert fused.structures["blob"].features["support"] == 1.0
    from rau.methods.confidence import best_fit

    assert fused.structures["blob"].features["fit"] == pytest.approx(best_fit([r.image for r in refs], tgt_img))
    # results of k references are assessed with the k-reference calibration when there is one
    one_ref, k_ref = object(), object()
    method.calibration, method.calibration_k = one_ref, None
    assert method.calibration_for(3) is one_ref
    method.calibration_k = k_ref
    assert method.calibration_for(1) is one_ref and method.calibration_for(3) is k_ref
