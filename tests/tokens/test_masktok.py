"""CheXanatomy mask tokenizer: location tokens, crop/paste, VQ-VAE, token text, persistence, training
on the engine (resume after a kill), evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rau.tokens import loc as lt  # noqa: E402
from rau.tokens import masktok as mt  # noqa: E402
from rau.tokens.vqvae import MaskTokConfig, MaskVQVAE  # noqa: E402
from rau.training.recipes.masktok import train_masktok  # noqa: E402
from rau.eval.masktok import evaluate_crops, roundtrip_dice  # noqa: E402
from rau.errors import CheckpointError, RauInputError  # noqa: E402
from rau.metrics import dice  # noqa: E402

from conftest import disk, write_png  # noqa: E402

TINY = dict(size=32, grid=4, channels=(8, 16, 16), codebook_size=32, code_dim=8)


def rect(shape, r0, r1, c0, c1):
    m = np.zeros(shape, bool)
    m[r0:r1, c0:c1] = True
    return m


def synthetic_masks():
    """8 masks: disks and rectangles of different sizes and places (48 x 56 images)."""
    shape = (48, 56)
    return [
        disk(shape, (20, 24), 12), disk(shape, (30, 30), 8), disk(shape, (24, 28), 18), disk(shape, (15, 40), 6),
        rect(shape, 5, 30, 10, 50), rect(shape, 20, 44, 4, 20), rect(shape, 2, 12, 2, 54),
        disk(shape, (24, 20), 14) | rect(shape, 10, 20, 20, 50),
    ]


@pytest.fixture(scope="module")
def mask_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("masks") / "ds"
    masks = synthetic_masks()
    for i in range(4):
        write_png(root / "images" / f"case_{i}.png", np.full(masks[0].shape, 0.5, np.float32))
        for j, name in enumerate(("a", "b")):
            write_png(root / "masks" / name / f"case_{i}.png", masks[2 * i + j])
    return root


@pytest.fixture(scope="module")
def tiny_tok(mask_root, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("tiny_tok")
    return train_masktok([mask_root], out, steps=250, batch_size=16, lr=3e-3, seed=0, config=MaskTokConfig(**TINY),
                         jitter=0.0, flip=False, restart_until=0.5, progress=False, save_every=1000, log_every=1000), out


# ---------------------------------------------------------------- location tokens


def test_loc_tokens_order_and_ends():
    assert lt.box_to_loc_tokens((0, 0, 200, 100), (100, 200)) == (0, 0, 1023, 1023)
    # (ymin, xmin, ymax, xmax) = (10/100, 50/200, 60/100, 150/200) of 1023
    assert lt.box_to_loc_tokens((50, 10, 150, 60), (100, 200)) == (102, 256, 614, 767)
    assert lt.box_to_loc_tokens((-20, -5, 500, 300), (100, 200)) == (0, 0, 1023, 1023)  # clipped


@pytest.mark.parametrize("hw", [(64, 64), (256, 256), (512, 384), (3000, 2500)])
def test_loc_tokens_round_trip_within_one_bin(hw):
    rng = np.random.default_rng(1)
    h, w = hw
    for _ in range(200):
        x0, x1 = sorted(rng.uniform(0, w, 2))
        y0, y1 = sorted(rng.uniform(0, h, 2))
        box = (x0, y0, x1 + 1e-3, y1 + 1e-3)
        back = lt.loc_tokens_to_box(lt.box_to_loc_tokens(box, hw), hw)
        tol = np.array([w, h, w, h]) / 1023
        assert np.all(np.abs(np.subtract(back, box)) <= tol / 2 + 1e-9)


@pytest.mark.parametrize("bad", [(0, 10), (10, -1), (10,), "ab", None, (10.5, 3)])
def test_loc_tokens_bad_hw_raises(bad):
    with pytest.raises(RauInputError, match="hw"):
        lt.box_to_loc_tokens((0, 0, 1, 1), bad)


def test_loc_tokens_to_box_rejects_out_of_range():
    with pytest.raises(RauInputError, match="out of range"):
        lt.loc_tokens_to_box((0, 0, 1024, 5), (10, 10))


# ---------------------------------------------------------------- crop / paste


@pytest.mark.parametrize("shape, r", [((256, 200), (40, 170, 30, 90)), ((64, 64), (10, 30, 5, 60)), ((600, 500), (3, 9, 100, 480))])
def test_crop_paste_rectangle_exact(shape, r):
    mask = rect(shape, *r)
    loc, box = lt.mask_loc_tokens(mask)
    crop = lt.crop_to_box(mask, box)
    assert crop.shape == (64, 64) and crop.dtype == np.float32 and crop[2:-2, 2:-2].min() > 0.99  # edges: quantised box
    assert np.array_equal(lt.paste_from_box(crop, box, shape), mask)


def test_crop_coverage_and_disk_round_trip():
    mask = rect((10, 10), 0, 10, 0, 6)  # grid cells 2.5 px wide: the third covers 1 of its 2.5 columns
    crop = lt.crop_to_box(mask, (0, 0, 10, 10), size=4)
    assert np.allclose(crop[:, :2], 1) and np.allclose(crop[:, 2], 0.4) and np.allclose(crop[:, 3], 0)
    for shape, radius in (((300, 300), 100), ((80, 90), 12), ((400, 120), 50)):
        m = disk(shape, (shape[0] // 2, shape[1] // 2), radius)
        _, box = lt.mask_loc_tokens(m)
        assert dice(lt.paste_from_box(lt.crop_to_box(m, box), box, shape), m) > 0.98


def test_paste_outside_box_is_background():
    out = lt.paste_from_box(np.ones((64, 64)), (10.0, 5.0, 20.0, 40.0), (50, 30))
    assert out[5:40, 10:20].all() and out.sum() == 35 * 10


def test_empty_and_bad_masks_raise():
    with pytest.raises(RauInputError, match="empty"):
        lt.mask_loc_tokens(np.zeros((10, 10), bool))
    with pytest.raises(RauInputError, match="2D"):
        lt.crop_to_box(np.zeros((2, 10, 10), bool), (0, 0, 5, 5))
    with pytest.raises(RauInputError, match="box"):
        lt.crop_to_box(np.ones((10, 10), bool), (5, 0, 5, 5))


def test_config_validation():
    with pytest.raises(RauInputError, match="channels"):
        MaskTokConfig(size=64, grid=4, channels=(8, 8))
    with pytest.raises(RauInputError, match="codebook_size"):
        MaskTokConfig(codebook_size=1001)
    cfg = MaskTokConfig(**TINY)
    out = MaskVQVAE(cfg)(torch.rand(3, 1, 32, 32))
    assert out.logits.shape == (3, 1, 32, 32) and out.codes.shape == (3, 16)


# ---------------------------------------------------------------- tiny VQ-VAE


def test_tiny_vqvae_overfits_eight_masks(tiny_tok):
    tok, out = tiny_tok
    scores = []
    for m in synthetic_masks():
        t = tok.encode(m)
        assert len(t.loc) == 4 and len(t.codes) == 16 and all(0 <= c < 32 for c in t.codes)
        res = tok.decode(t.loc, t.codes, m.shape)
        assert res.ok and res.reason is None
        scores.append(dice(res.mask, m))
    assert np.mean(scores) > 0.9, scores
    info = json.loads((out / "final" / "training.json").read_text())
    assert info["steps"] == 250 and info["n_masks"] == 8 and "final_metrics" in info
    assert [c["step"] for c in info["loss_curve"]] == [50, 100, 150, 200, 250]


def test_string_round_trip(tiny_tok):
    tok, _ = tiny_tok
    m = synthetic_masks()[0]
    t = tok.encode(m)
    text = tok.to_string(t)
    assert text.startswith("<loc") and text.count("<loc") == 4 and text.count("<seg") == 16
    parsed = tok.from_string(f"heart: {text} ; next")
    assert parsed.ok and parsed.tokens == t
    assert tok.from_string(text.replace("><", "> <")).tokens == t
    assert np.array_equal(tok.decode_string(text, m.shape).mask, tok.decode_tokens(t, m.shape).mask)


def test_save_load_identity(tiny_tok, tmp_path):
    tok, _ = tiny_tok
    tok.save(tmp_path / "t")
    back = mt.MaskTokenizer.load(tmp_path / "t")
    for m in synthetic_masks():
        a, b = tok.encode(m), back.encode(m)
        assert a == b
        assert np.array_equal(tok.decode_tokens(a, m.shape).mask, back.decode_tokens(b, m.shape).mask)


LOC = "<loc0100><loc0200><loc0600><loc0700>"
SEG = "<seg001>" * 16


@pytest.mark.parametrize("text, why", [
    ("", "no <loc"),
    ("garbage without tokens", "no <loc"),
    (None, "expected token text"),
    (123, "expected token text"),
    (b"<loc0001>", "expected token text"),
    ("<loc0100><loc0200><loc0600>" + SEG, "4 <loc>"),
    (LOC + "<loc0001>" + SEG, "4 <loc>"),
    (SEG + LOC, "4 <loc>"),
    (LOC + "<seg001>" * 15, "16 <seg>"),
    (LOC + "<seg001>" * 17, "16 <seg>"),
    (LOC, "16 <seg>"),
    (LOC + "<seg001>" * 8 + " x " + "<seg001>" * 8, "16 <seg>"),
    (LOC + "<seg001>" * 8 + "<seg12a>" + "<seg001>" * 7, "16 <seg>"),
    ("<loc0100><loc-200><loc0600><loc0700>" + SEG, "4 <loc>"),
    ("<loc1024><loc0200><loc0600><loc0700>" + SEG, "out of range"),
    ("<loc99999999999999999999><loc0200><loc0600><loc0700>" + SEG, "out of range"),
    (LOC + "<seg032>" + "<seg001>" * 15, "out of range"),
    ("<loc0600><loc0200><loc0100><loc0700>" + SEG, "inverted or empty"),
    ("<loc0100><loc0200><loc0100><loc0700>" + SEG, "inverted or empty"),
    ("<loc0100><loc0700><loc0600><loc0700>" + SEG, "inverted or empty"),
])
def test_malformed_strings_give_none_and_reason(tiny_tok, text, why):
    tok, _ = tiny_tok
    parsed = tok.from_string(text)
    assert parsed.tokens is None and why in parsed.reason
    res = tok.decode_string(text, (48, 56))
    assert res.mask is None and why in res.reason


@pytest.mark.parametrize("loc, codes, why", [
    ((1, 2, 3), [0] * 16, "expected 4"),
    ((100, 100, 600, 600), [0] * 15, "expected 16"),
    ((100, 100, 600, 600), [0] * 17, "expected 16"),
    ((100, 100, 600, 600), [0] * 15 + [32], "out of range"),
    ((100, 100, 600, 600), [0] * 15 + [-1], "out of range"),
    ((100, 100, 600, 1024), [0] * 16, "out of range"),
    ((100, 100, 600, 600.5), [0] * 16, "integer"),
    ((100, 100, 600, True), [0] * 16, "integer"),
    ((100, 100, 600, 600), ["1"] * 16, "integer"),
    ((100, 100, 600, 600), None, "sequence"),
    ("abcd", [0] * 16, "sequence"),
    (5, [0] * 16, "sequence"),
    ((600, 100, 100, 600), [0] * 16, "inverted"),
    ((100, 100, 100, 600), [0] * 16, "inverted"),
])
def test_malformed_sequences_give_none_and_reason(tiny_tok, loc, codes, why):
    tok, _ = tiny_tok
    res = tok.decode(loc, codes, (48, 56))
    assert res.mask is None and why in res.reason


def test_mutated_strings_never_raise(tiny_tok):
    tok, _ = tiny_tok
    text = tok.to_string(tok.encode(synthetic_masks()[0]))
    rng = np.random.default_rng(0)
    alphabet = list("<>locseg0123456789 -x")
    for _ in range(300):
        chars = list(text)
        for _ in range(int(rng.integers(1, 4))):
            i = int(rng.integers(len(chars)))
            op = rng.integers(3)
            if op == 0:
                del chars[i]
            elif op == 1:
                chars.insert(i, str(rng.choice(alphabet)))
            else:
                chars[i] = str(rng.choice(alphabet))
        res = tok.decode_string("".join(chars), (48, 56))
        assert (res.mask is None) == (res.reason is not None)


def test_decode_accepts_numpy_ids_and_rejects_bad_hw(tiny_tok):
    tok, _ = tiny_tok
    t = tok.encode(synthetic_masks()[0])
    assert tok.decode(np.array(t.loc), np.array(t.codes), np.int64([48, 56])).ok
    with pytest.raises(RauInputError, match="hw"):
        tok.decode(t.loc, t.codes, (0, 56))


def test_tiny_box_decodes_to_none_not_error(tiny_tok):
    tok, _ = tiny_tok
    res = tok.decode((500, 500, 501, 501), [0] * 16, (48, 56))  # box of 0.05 px
    assert res.mask is None and "empty" in res.reason


# ---------------------------------------------------------------- persistence errors


@pytest.mark.parametrize("damage", ["truncate", "flip", "truncate_nochecksum", "config", "missing", "shape"])
def test_damaged_checkpoint_raises_one_line(tiny_tok, tmp_path, damage):
    tok, _ = tiny_tok
    d = tok.save(tmp_path / "t")
    weights, config = d / "model.safetensors", d / "config.json"
    blob = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(blob[: len(blob) // 2])
    elif damage == "flip":
        weights.write_bytes(blob[:-10] + bytes([blob[-10] ^ 0xFF]) + blob[-9:])
    elif damage == "truncate_nochecksum":
        cfg = json.loads(config.read_text())
        del cfg["weights_sha256"]
        config.write_text(json.dumps(cfg))
        weights.write_bytes(blob[:50])
    elif damage == "config":
        config.write_text("{not json")
    elif damage == "missing":
        weights.unlink()
    elif damage == "shape":
        cfg = json.loads(config.read_text())
        del cfg["weights_sha256"]
        cfg["config"]["code_dim"] = 4
        config.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        mt.MaskTokenizer.load(d)
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError):
        mt.MaskTokenizer.load(tmp_path / "nowhere")


# ---------------------------------------------------------------- training on the engine


class Killed(Exception):
    pass


def same_weights(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_killed_run_resumes_to_the_same_weights(mask_root, tmp_path):
    torch.set_num_threads(1)
    kw = dict(steps=12, batch_size=8, lr=3e-3, seed=3, config=MaskTokConfig(**TINY), progress=False, log_every=100)
    full = train_masktok([mask_root], tmp_path / "full", **kw)
    k = 4

    def kill(step, record):
        if step == k + 1:
            raise Killed

    with pytest.raises(Killed):
        train_masktok([mask_root], tmp_path / "cut", save_every=k, on_step=kill, **kw)
    assert (tmp_path / "cut" / f"checkpoint-{k}").is_dir() and not (tmp_path / "cut" / "final").exists()
    seen = []
    resumed = train_masktok([mask_root], tmp_path / "cut", save_every=k, on_step=lambda s, r: seen.append(s), **kw)
    assert seen == list(range(k + 1, 13))  # continued from the step-4 checkpoint
    assert same_weights(full, resumed)
    with pytest.raises(RauInputError, match="other settings"):
        train_masktok([mask_root], tmp_path / "cut", **(kw | {"lr": 1e-3}))


def test_run_folder_layout_and_loaders(mask_root, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    records = []
    tok = train_masktok([mask_root], out, steps=4, batch_size=4, seed=1, save_every=2, progress=False, command="rau train masktok x",
                        config=MaskTokConfig(size=32, grid=2, channels=(4, 4, 4, 4), codebook_size=8, code_dim=4),
                        on_step=lambda s, r: records.append(r))
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-2", "checkpoint-4", "final"]
    assert {"step", "loss", "lr", "dice64", "perplexity"} <= set(records[-1]) and records[-1]["step"] == 4
    info = json.loads((out / "final" / "training.json").read_text())
    assert info["command"] == "rau train masktok x" and info["steps"] == 4
    for folder in (out, out / "final", out / "checkpoint-4"):  # run folder, final/ and a checkpoint: one loader
        assert same_weights(mt.MaskTokenizer.load(folder), tok)
    with pytest.raises(RauInputError, match="save_every"):
        train_masktok([mask_root], tmp_path / "x", steps=2, save_every=0, progress=False)
    with pytest.raises(FileNotFoundError, match="--data"):
        train_masktok([tmp_path / "missing"], tmp_path / "x", steps=2, progress=False)


def test_lr_schedule_matches_the_original():
    import math

    from rau.training.schedule import lr_at

    def original(step, steps, lr):  # the mask tokenizer's own schedule before the engine
        warm = max(1, min(100, steps // 20))
        if step < warm:
            return lr * (step + 1) / warm
        t = (step - warm) / max(1, steps - warm)
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))

    for steps in (1, 7, 60, 2500):
        warm = max(1, min(100, steps // 20))
        assert all(lr_at(s, steps, 2e-3, warmup=warm, min_ratio=0.05) == original(s, steps, 2e-3) for s in range(steps))


# ---------------------------------------------------------------- evaluation


def test_evaluation_of_the_tiny_tokenizer(tiny_tok, mask_root):
    tok, _ = tiny_tok
    crops = np.stack([lt.crop_to_box(m, lt.mask_loc_tokens(m)[1], 32) for m in synthetic_masks()])
    res = evaluate_crops(tok, crops)
    assert res["dice64"] > 0.9 and 1 <= res["codes_used"] <= 32
    rt = roundtrip_dice(tok, mask_root)
    assert rt["images"] == 4 and rt["overall"]["n"] == 8 and set(rt["per_structure"]) == {"a", "b"}
    assert rt["overall"]["dice"] > 0.85 and rt["overall"]["crop_dice"] > 0.95


# ---------------------------------------------------------------- shipped weights


def test_load_default_round_trips_a_disk():
    tok = mt.load_default()
    assert tok.config.n_codes == 16 and tok.config.size == 64 and tok.config.bins == 1024
    for shape, centre, radius in (((256, 256), (120, 140), 60), ((512, 400), (300, 150), 90), ((100, 120), (40, 50), 15)):
        m = disk(shape, centre, radius)
        res = tok.decode_tokens(tok.encode(m), shape)
        assert res.ok and dice(res.mask, m) > 0.8


def test_move_into_box_scales_and_shifts_the_shape_onto_the_box():
    ref = rect((100, 80), 10, 30, 20, 60)  # rows 10..30, cols 20..60 of a 100 x 80 image
    moved = lt.move_into_box(ref, (5.0, 40.0, 45.0, 80.0), (120, 90))  # into a 40 x 40 box of a 120 x 90 image
    assert moved.shape == (120, 90) and moved.dtype == np.float32
    assert np.array_equal(moved >= 0.5, rect((120, 90), 40, 80, 5, 45))
    with pytest.raises(RauInputError, match="empty"):
        lt.move_into_box(np.zeros((10, 10), bool), (0, 0, 5, 5), (10, 10))
