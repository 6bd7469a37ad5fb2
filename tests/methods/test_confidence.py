"""Calibrated confidence and abstention (rau.methods.confidence, rau.eval.calibrate)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from rau.data.annotated import AnnotatedImage, StructureResult, TargetResult
from rau.errors import RauInputError
from rau.eval.calibrate import fit_calibration
from rau.eval.evaluate import calibration_summary
from rau.methods.confidence import (
    FEATURES,
    K_FEATURES,
    LOCALIZER_FEATURES,
    REASON_ABSENT,
    REASON_LOW,
    SEGMENTER_FEATURES,
    TARGET_FEATURES,
    Calibration,
    abstain,
    pair_features,
    resolve_min_confidence,
    structure_features,
    target_checks,
    target_reason,
)
from tests.conftest import SHARED, synthetic_pair

SAMPLES = __import__("pathlib").Path(__file__).resolve().parents[2] / "samples" / "chest_xray"


def _sample_target() -> np.ndarray:
    from rau.data.io import read_image

    return read_image(SAMPLES / "target.png")[0]


def test_target_checks_tell_blank_and_noise_from_a_radiograph():
    real = target_checks(_sample_target())
    assert real["smoothness"] > 0.8 and real["contrast"] > 0.05 and target_reason(real) is None
    noise = target_checks(np.random.default_rng(0).random((300, 280)).astype(np.float32))
    assert abs(noise["smoothness"]) < 0.2 and "noise" in target_reason(noise)
    blank = target_checks(np.full((64, 64), 0.5, np.float32))
    assert blank["contrast"] == 0 and "blank" in target_reason(blank)


def test_pair_features_see_a_mirrored_asymmetric_target():
    image, _ = synthetic_pair()
    same = pair_features(image, image)
    mirrored = pair_features(image, image[:, ::-1])
    assert same["fit"] == pytest.approx(1.0) and same["mirror_gain"] < 0
    assert mirrored["mirror_gain"] > 0.5


def test_mirror_fit_gain_says_which_way_round_the_sample_chest_fits():
    """The bundled target fits the bundled reference better as it is; mirrored, it fits the
    mirrored reference better, and the physical rule names it. Blank images are not registered."""
    from rau.data.io import read_image
    from rau.methods.confidence import REASON_MIRROR, mirror_reason
    from rau.methods.registration import mirror_fit_gain

    reference, target = read_image(SAMPLES / "reference.png")[0], _sample_target()
    as_is = mirror_fit_gain(target, reference)
    mirrored = mirror_fit_gain(np.ascontiguousarray(target[:, ::-1]), reference)
    assert as_is < 0 < mirrored
    assert mirror_reason({"mirror_fit_gain": as_is}) is None
    assert mirror_reason({"mirror_fit_gain": mirrored}).startswith(REASON_MIRROR)
    assert mirror_fit_gain(np.full((64, 64), 0.5, np.float32), reference) == 0.0
    assert "mirror_fit_gain" not in pair_features(reference, target, registered=False)


def test_orientation_model_learns_which_way_round_and_agreement_flips_sign(tmp_path):
    """Images with a bright blob on their left: the fitted model scores them one way and their
    mirror images the other, so a mirrored target disagrees with the reference."""
    from rau.eval.calibrate import fit_orientation
    from rau.methods.confidence import Orientation

    rng = np.random.default_rng(0)
    images = [synthetic_pair(shift=(int(rng.integers(-5, 5)), int(rng.integers(-5, 5))))[0] for _ in range(12)]
    model = fit_orientation(images)
    ref, target = images[0], synthetic_pair(shift=(2, -3))[0]
    assert model.agreement(ref, target) > 0.5
    assert model.agreement(ref, target[:, ::-1].copy()) < -0.5
    model.save(tmp_path / "o.json")
    assert Orientation.load(tmp_path / "o.json").score(ref) == pytest.approx(model.score(ref))
    (tmp_path / "bad.json").write_text('{"size": 16, "weights": [1, 2]}')
    with pytest.raises(RauInputError, match="orientation model"):
        Orientation.load(tmp_path / "bad.json")


def test_structure_features_of_found_and_missing_outputs():
    ref = np.zeros((50, 50), bool)
    ref[10:20, 10:20] = True
    same = structure_features(0.9, ref.copy(), ref)
    assert same["found"] == 1 and same["log_area_ratio"] == pytest.approx(0, abs=1e-6)
    assert same["centroid_shift"] == pytest.approx(0) and same["largest_part"] == 1
    split = ref.copy()
    split[30:40, 30:35] = True
    assert structure_features(0.9, split, ref)["largest_part"] < 1
    missing = structure_features(0.1, None, ref)
    assert missing["found"] == 0 and missing["log_area_ratio"] < -3 and set(missing) | {"fit", "mirror_gain", "orientation", "mirror_fit_gain",
                                                                                       "smoothness", "contrast", "edge",
                                                                                       "inside_contrast",
                                                                                       *K_FEATURES, *SEGMENTER_FEATURES,
                                                                                       *LOCALIZER_FEATURES,
                                                                                       *TARGET_FEATURES} == set(FEATURES)
    assert "structure_prior" not in FEATURES  # the calibration supplies it from the structure's name


def test_mask_image_features_prefer_a_mask_on_the_structure_to_one_beside_it():
    """A mask on a dark bar (a vessel) has high edge and inside contrast; the same mask moved onto
    flat background has neither; no mask gives zeros."""
    from rau.methods.confidence import image_gradient, mask_image_features

    image = np.full((128, 128), 0.8, np.float32) + np.random.default_rng(0).normal(0, 0.01, (128, 128)).astype(np.float32)
    image[60:66, 20:100] = 0.2
    on, off = np.zeros((128, 128), bool), np.zeros((128, 128), bool)
    on[60:66, 20:100] = True
    off[20:26, 20:100] = True
    a, b = mask_image_features(image, on), mask_image_features(image, off, image_gradient(image))
    assert a["edge"] > 3 * b["edge"] and a["inside_contrast"] > 1.5 > 0.5 > b["inside_contrast"]
    assert mask_image_features(image, None) == {"edge": 0.0, "inside_contrast": 0.0}
    assert mask_image_features(image, np.ones((128, 128), bool))["inside_contrast"] == 0.0


@pytest.mark.parametrize("kind", ["noise", "blank"])
def test_noise_and_blank_targets_abstain_with_the_reason(tmp_path, kind):
    """Through the CLI, as a user would: a 16-bit noise PNG or a blank one gets no mask for any
    structure, abstained true and the reason, and the method never runs on it."""
    from typer.testing import CliRunner

    from rau.cli.app import app

    shape = (256, 240)
    pixels = np.random.default_rng(1).integers(0, 65535, shape, dtype=np.uint16) if kind == "noise" \
        else np.full(shape, 1000, np.uint16)
    Image.fromarray(pixels).save(tmp_path / "target.png")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["localize", "--reference", str(SAMPLES / "reference.png"), "--reference-masks",
                                   str(SAMPLES / "reference_masks"), "--target", str(tmp_path / "target.png"),
                                   "--out", str(out), "--method", "registration"])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "result.json").read_text())
    assert doc["structures"]
    for s in doc["structures"].values():
        assert s["abstained"] is True and s["found"] is False and s["answer"] == "no" and s["box_xyxy"] is None
        assert kind in s["reason"] and "reference does not fit this image" in s["reason"]
    assert "withheld" in res.output
    assert not np.asarray(Image.open(out / "masks" / "heart.png")).any()


def test_a_mirrored_target_abstains_with_the_reason_through_the_cli(tmp_path):
    """As a user would: the bundled target mirrored left-right gets no mask, and says why; the
    target as it is keeps its masks."""
    from typer.testing import CliRunner

    from rau.cli.app import app
    from rau.data.io import read_image

    target = read_image(SAMPLES / "target.png")[0]
    Image.fromarray(np.rint(target[:, ::-1] * 255).astype(np.uint8)).save(tmp_path / "mirrored.png")
    docs = {}
    for name, path in (("mirrored", tmp_path / "mirrored.png"), ("as_is", SAMPLES / "target.png")):
        res = CliRunner().invoke(app, ["localize", "--reference", str(SAMPLES / "reference.png"), "--reference-masks",
                                       str(SAMPLES / "reference_masks"), "--target", str(path),
                                       "--out", str(tmp_path / name), "--method", "registration"])
        assert res.exit_code == 0, res.output
        docs[name] = json.loads((tmp_path / name / "result.json").read_text())
    for s in docs["mirrored"]["structures"].values():
        assert s["abstained"] is True and s["box_xyxy"] is None and "mirrored" in s["reason"]
    assert not any(s["abstained"] for s in docs["as_is"]["structures"].values())


def test_evaluate_counts_a_rule_withheld_output_as_withheld_for_an_uncalibrated_method(tmp_path):
    """The bench scores what a user gets: without a calibration the rules (here "mirrored") still
    withhold, as `rau localize` does; evaluate once scored such outputs as delivered."""
    from rau.data.dataset import load_dataset
    from rau.data.io import read_image
    from rau.eval.evaluate import evaluate
    from rau.methods import create_method
    from tests.conftest import write_png

    for folder, image_name, masks_dir, flip in (("refs", "reference.png", "reference_masks", False),
                                                ("targets", "target.png", "target_masks", True)):
        image = read_image(SAMPLES / image_name)[0]
        write_png(tmp_path / folder / "images" / "case.png", image[:, ::-1] if flip else image)
        for path in sorted((SAMPLES / masks_dir).glob("*.png")):
            mask = np.asarray(Image.open(path)) > 0
            write_png(tmp_path / folder / "masks" / path.stem / "case.png", mask[:, ::-1] if flip else mask)
    method = create_method("registration", calibration=False)
    doc = evaluate(load_dataset(tmp_path / "targets"), load_dataset(tmp_path / "refs"), method, progress=False)
    asked = [r for r in doc["targets"] if r.get("asked")]
    assert asked and all(r["abstain"] and "mirrored" in r["flag"] for r in asked)


def _rows(n=300, seed=0):
    """Synthetic calibration rows: right outputs have high score and small shifts."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        right = bool(rng.random() < 0.6)
        f = {"score": rng.normal(0.8 if right else 0.4, 0.15), "found": 1.0, "log_area_ratio": rng.normal(0, 0.3),
             "centroid_shift": abs(rng.normal(0.03 if right else 0.15, 0.05)), "largest_part": 1.0,
             "fit": rng.uniform(0.85, 0.98), "mirror_gain": rng.uniform(-0.05, -0.01), "orientation": rng.uniform(0.5, 1.0),
             "smoothness": 0.97, "contrast": 0.2}
        rows.append({"features": f, "right": right, "target": f"t{i // 3}", "split": "s"})
    return rows


def _wrong_rows(n=30, seed=9):
    """Wrong-input rows (another kind of image the kind model does not know: no ``kind``) that fit
    their reference at 0.55-0.6: they set ``min_fit``."""
    rng = np.random.default_rng(seed)
    return [{"features": {**r["features"], "fit": float(rng.uniform(0.55, 0.6))}, "right": False,
             "target": f"w{i}", "split": "calib-wrong"} for i, r in enumerate(_rows(n, seed))]


def test_fit_calibration_separates_and_calibrates_and_round_trips(tmp_path):
    from rau.metrics import auroc

    cal = fit_calibration(_rows(), "toy")
    test = _rows(300, seed=1)
    p = cal.predict([r["features"] for r in test])
    y = np.array([r["right"] for r in test])
    assert auroc(p, y) > 0.9 and np.all((0 <= p) & (p <= 1))
    summary = calibration_summary([{"right": bool(a), "confidence": float(b)} for a, b in zip(y, p)])
    assert summary["ece"] < 0.1
    assert 0 < cal.threshold < 1 and cal.min_fit is not None
    cal.save(tmp_path / "c.json")
    again = Calibration.load(tmp_path / "c.json")
    assert np.allclose(again.predict([r["features"] for r in test]), p)


def test_a_feature_only_some_structures_have_is_fitted_and_read_as_the_mean_elsewhere():
    """``visibility`` (TARGET_FEATURES) on half the rows, telling right from wrong there: the calibration
    reads it, a row without it scores as at the feature's mean, and ``drop`` leaves it out."""
    from rau.metrics import auroc

    rows = _rows()
    for i, r in enumerate(rows):
        r["features"]["score"] = 0.6  # the score says nothing here; visibility does where it is given
        if i % 2 == 0:
            r["features"]["visibility"] = 0.9 if r["right"] else 0.1
    cal = fit_calibration(rows, "toy")
    assert "visibility" in cal.features
    given = [r for r in rows if "visibility" in r["features"]]
    assert auroc(cal.predict([r["features"] for r in given]), np.array([r["right"] for r in given])) > 0.9
    lacking = {k: v for k, v in given[0]["features"].items() if k != "visibility"}
    at_mean = {**lacking, "visibility": cal.mean[cal.features.index("visibility")]}
    assert cal.predict([lacking])[0] == pytest.approx(cal.predict([at_mean])[0])
    assert "visibility" not in fit_calibration(rows, "toy", drop=TARGET_FEATURES).features


def test_derived_score_logit_is_filled_in_for_old_reports_and_old_calibrations_still_predict():
    from rau.methods.confidence import score_logit, with_derived

    old = {k: v for k, v in _rows(1)[0]["features"].items() if k != "score_logit"}
    assert with_derived(old)["score_logit"] == pytest.approx(score_logit(old["score"]))
    assert score_logit(1.0) == pytest.approx(np.log(9999.0)) and score_logit(0.5) == 0.0
    cal = fit_calibration(_rows(), "toy")
    assert cal.features[-2:] == ["score_logit", "structure_prior"]
    doc = cal.to_json()
    for key in ("structure_rates", "prior_rate"):  # a file written before these existed
        doc.pop(key)
    legacy = Calibration(**{**doc, "features": cal.features[:-2], "mean": cal.mean[:-2], "std": cal.std[:-2],
                            "coef": cal.coef[:-2]})
    assert 0 <= float(legacy.predict(old)[0]) <= 1 and 0 <= float(cal.predict(old)[0]) <= 1


def test_structure_prior_gives_each_structure_its_own_share_right(tmp_path):
    """Outputs alike in every measured feature, but one structure is usually right and another
    usually wrong: the confidence follows the structure's share on the calibration split, a name it
    never saw gets the pooled share, and the rates survive a save/load."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(400):
        name = ("easy", "hard")[i % 2]
        right = bool(rng.random() < (0.9 if name == "easy" else 0.2))
        f = {"score": rng.uniform(0.3, 0.9), "found": 1.0, "log_area_ratio": rng.normal(0, 0.3),
             "centroid_shift": abs(rng.normal(0.05, 0.05)), "largest_part": 1.0, "fit": rng.uniform(0.85, 0.98),
             "mirror_gain": -0.03, "orientation": 0.9, "smoothness": 0.97, "contrast": 0.2}
        rows.append({"features": f, "right": right, "target": f"t{i // 4}", "split": "s", "structure": name})
    cal = fit_calibration(rows, "toy")
    assert cal.structure_rates["easy"] > 0.8 and cal.structure_rates["hard"] < 0.3
    feats = [r["features"] for r in rows[:2]]
    easy, hard = cal.predict([feats[0], feats[0]], ["easy", "hard"])
    unseen = float(cal.predict(feats[0], ["a structure never calibrated"])[0])
    assert easy > 0.7 and hard < 0.35 and hard < unseen < easy
    cal.save(tmp_path / "c.json")
    again = Calibration.load(tmp_path / "c.json")
    assert np.allclose(again.predict(feats, ["easy", "hard"]), cal.predict(feats, ["easy", "hard"]))
    flat = fit_calibration(rows, "toy", use_prior=False)
    assert "structure_prior" not in flat.features and not flat.structure_rates


def test_an_image_unlike_the_reference_is_called_unfit_not_mirrored(monkeypatch):
    """An angiogram against a chest reference may fit the mirrored chest better; the reason must
    name the cause that matters (does not fit), and the mirrored rule applies to look-alikes."""
    import rau.methods.confidence as confidence

    cal = fit_calibration(_rows() + _wrong_rows(), "toy")
    image, masks = synthetic_pair()
    reference = AnnotatedImage(image, masks)
    for fit, gain, mirrored in ((cal.min_fit - 0.2, 0.5, False), (cal.min_fit + 0.05, 0.05, True)):
        pair = {"fit": fit, "mirror_gain": 0.0, "orientation": 1.0, "mirror_fit_gain": gain}
        monkeypatch.setattr(confidence, "pair_features", lambda r, t, registered=True, mirror_fit=True, p=pair: p)
        result = TargetResult("t", "r", "m", {"blob": StructureResult("blob", "yes", (0, 0, 9, 9), 0.9, masks["blob"])})
        confidence.assess(result, reference, image, cal)
        flag = result.structures["blob"].flag
        assert flag.startswith(confidence.REASON_FIT) and ("mirrored" in flag) is mirrored


def test_bad_calibration_files_are_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"method": "x", "mean": [1')
    with pytest.raises(RauInputError, match="not a rau calibration file"):
        Calibration.load(bad)
    doc = fit_calibration(_rows(), "toy").to_json()
    doc["coef"] = doc["coef"][:2]
    bad.write_text(json.dumps(doc))
    with pytest.raises(RauInputError, match="not a rau calibration file"):
        Calibration.load(bad)
    with pytest.raises(RauInputError, match="need at least"):
        fit_calibration(_rows(5), "toy")


def test_abstain_withholds_low_confidence_and_absent_structures_with_reasons():
    mask = np.zeros((20, 20), bool)
    mask[5:10, 5:10] = True
    res = TargetResult("t", "r", "m", {
        "a": StructureResult("a", "yes", (5, 5, 10, 10), 0.9, mask.copy(), confidence=0.9, features={"log_area_ratio": 0.0}),
        "b": StructureResult("b", "yes", (5, 5, 10, 10), 0.9, mask.copy(), confidence=0.2, features={"log_area_ratio": 0.0}),
        "c": StructureResult("c", "no", None, 0.1, None, confidence=0.1, features={"log_area_ratio": -5.0}),
    })
    abstain(res, 0.5)
    a, b, c = (res.structures[k] for k in "abc")
    assert not a.abstained and a.found
    assert b.abstained and b.mask is None and b.box_xyxy_px is None and b.answer == "no" and b.reason.startswith(REASON_LOW)
    assert c.abstained and c.reason.startswith(REASON_ABSENT)
    with pytest.raises(RauInputError, match="min-confidence"):
        resolve_min_confidence(1.5, None)
    assert 0 < resolve_min_confidence(None, None) < 1e-3
    flagged = TargetResult("t", "r", "m", {"a": StructureResult("a", "no", None, 0.0, None, "x", confidence=0.0, flag="x")})
    assert not abstain(flagged, 0.0).structures["a"].abstained  # 0 keeps every output
    assert abstain(flagged, resolve_min_confidence(None, None)).structures["a"].abstained


def test_keep_threshold_bound_withholds_fewer_right_masks_than_the_quantile():
    from rau.eval.calibrate import keep_threshold

    for n, most in ((40, 0), (120, 1), (1000, 38)):
        conf = np.random.default_rng(n).random(n)
        bound, quantile = keep_threshold(conf), keep_threshold(conf, bound=False)
        assert (conf < bound).sum() == most and (conf < quantile).sum() == int(0.05 * (n - 1)) and bound <= quantile


def test_never_run_targets_get_their_own_rate_and_the_orientation_rule_is_off_by_default(tmp_path):
    """Blank/noise calibration rows (never run, no features) only set ``target_rate``, the
    confidence of a never-run target's "not there"; the orientation agreement is a feature, not a
    rule, unless asked for."""
    rows = _rows()
    rows += [{"features": None, "right": True, "target": f"noise{i}", "split": "w", "structure": "a", "never_run": True}
             for i in range(8)]
    cal = fit_calibration(rows, "toy")
    assert cal.target_rate == pytest.approx(9 / 10) and cal.never_run_confidence() == pytest.approx(0.9)
    assert cal.min_orientation is None and "orientation" in cal.features and cal.record["n_never_run"] == 8
    assert cal.orientation_reason({"orientation": -1.0}) is None
    assert fit_calibration(rows, "toy", orientation_rule=True).min_orientation is not None
    legacy = Calibration(**{k: v for k, v in cal.to_json().items() if k != "target_rate"})
    assert legacy.never_run_confidence() == legacy.gated_rate
    # through a method: a noise target's structures carry target_rate as confidence
    import rau

    cal.save(tmp_path / "cal.json")
    image, masks = synthetic_pair()
    noise = AnnotatedImage(np.random.default_rng(0).random(image.shape).astype(np.float32), {}, {})
    result = rau.localize(AnnotatedImage(image, masks, {}), noise, method="registration",
                          calibration=str(tmp_path / "cal.json"))
    assert all(s.abstained and s.confidence == pytest.approx(0.9) for s in result.structures.values())


def test_calibration_summary_counts_withheld_outputs():
    rows = [{"right": True, "confidence": 0.9, "abstain": False, "found": True},
            {"right": True, "confidence": 0.8, "abstain": True, "found": True},
            {"right": False, "confidence": 0.1, "abstain": True, "found": True},
            {"right": False, "confidence": 0.2, "abstain": True, "found": True},
            {"right": True, "confidence": 0.95, "abstain": False, "found": False}]  # a right "not there"
    s = calibration_summary(rows)
    assert s["auroc"] == 1.0 and s["abstain_wrong"] == 1.0 and s["abstain_right"] == 0.5 and s["no_mask_all"] == 0.8
    assert s["ece"] == pytest.approx((0.1 + 0.2 + 0.2 + 0.1 + 0.05) / 5)


def test_method_with_a_calibration_reports_confidence_in_result_json(tmp_path):
    """A calibration given to create_method is used: result.json carries a confidence in [0, 1]."""
    import rau
    from rau.pipeline import result_to_json

    cal = fit_calibration(_rows(), "registration")
    cal.save(tmp_path / "cal.json")
    image, masks = synthetic_pair()
    ref = AnnotatedImage(image, masks, {})
    target = AnnotatedImage(synthetic_pair(shift=(3, 2))[0], {}, {})
    result = rau.localize(ref, target, method="registration", calibration=str(tmp_path / "cal.json"), min_confidence=0)
    doc = result_to_json(result, target)
    for s in doc["structures"].values():
        assert 0 <= s["confidence"] <= 1 and s["abstained"] in (True, False)


def test_a_result_is_withheld_at_the_threshold_of_the_calibration_that_assessed_it():
    """A method may assess some targets with another calibration (reg-refine's memory masks): the default
    ``min_confidence`` of a result is the threshold of the one that assessed it; a given value wins."""
    import rau
    from rau.methods.confidence import result_threshold
    from rau.methods.registry import create_method

    own, other = fit_calibration(_rows(), "registration"), fit_calibration(_rows(seed=3), "registration")
    own.threshold, other.threshold = 0.2, 0.9
    image, masks = synthetic_pair()
    ref = AnnotatedImage(image, masks, {})
    target = AnnotatedImage(synthetic_pair(shift=(3, 2))[0], {}, {})
    method = create_method("registration", calibration=False)
    method.calibration = own
    result = method.predict(ref, target)
    assert result.threshold == 0.2
    assert result_threshold(result, None, other) == 0.2 and result_threshold(result, 0.5, other) == 0.5
    result.threshold = None
    assert result_threshold(result, None, other) == 0.9
    delivered = rau.localize(ref, target, method=method)
    assert delivered.threshold == 0.2
    assert all(r.abstained == (r.confidence < 0.2 or r.flag is not None or r.absent is not None)
               for r in delivered.structures.values())


@pytest.mark.skipif(not (SHARED / "wingspan_cxr").is_dir() or not (SHARED / "arcade_syntax").is_dir(),
                    reason="needs ../shared/datasets")
def test_wrong_input_split_is_built_with_mirrored_masks(tmp_path):
    from rau.data.dataset import load_dataset
    from rau.eval.wrong_inputs import COUNTS, build_wrong_inputs, target_kinds

    folder = build_wrong_inputs(tmp_path / "wrong", SHARED, "calib")
    kinds = target_kinds(folder)
    assert len(kinds) == sum(COUNTS.values())
    assert {"noise", "blank", "modality", "mirror"} == set(kinds.values())
    ds = load_dataset(folder)
    mirror = next(e for e in ds.entries if e.id.startswith("mirror_"))
    item = ds.load(mirror)
    src = load_dataset(SHARED / "wingspan_cxr")
    orig = src.load(next(e for e in src.entries if e.id == mirror.id[len("mirror_"):]))
    assert np.array_equal(item.masks["left_lung"], orig.masks["left_lung"][:, ::-1])
    assert not ds.load(next(e for e in ds.entries if e.id.startswith("angiogram_"))).masks


def test_rule_withheld_outputs_get_their_rule_and_structure_share(tmp_path):
    """Outputs a pair rule withholds get the calibration's share right for that rule and structure
    name: on mirrored calibration targets the heart was right and the lungs wrong, so a mirrored
    heart reads high and its lungs low; a reference that does not fit is pooled (the names do not
    differ there); a legacy file without these rates gives every withheld output ``gated_rate``."""
    from rau.eval.calibrate import choose_strength
    from rau.methods.confidence import REASON_MIRROR

    rows = _rows()
    for i in range(12):  # mirrored targets: the physical rule catches them (mirror_fit_gain > 0)
        for name, right in (("heart", i != 0), ("left_lung", False), ("right_lung", False)):
            f = {**rows[0]["features"], "mirror_fit_gain": 0.05}
            rows.append({"features": f, "right": right, "target": f"m{i}", "split": "wrong", "structure": name})
    for i in range(12):  # unfit references (an angiogram against a chest): as often right whatever the name
        for k, name in enumerate(("heart", "left_lung", "right_lung")):
            f = {**rows[0]["features"], "fit": 0.1}
            rows.append({"features": f, "right": i == 3 + k, "target": f"a{i}", "split": "wrong", "structure": name})
    cal = fit_calibration(rows, "toy")
    assert cal.record["rule_strength"]["mirrored"] <= 1 and cal.record["rule_strength"]["fit"] >= 5
    mirrored = {**rows[0]["features"], "mirror_fit_gain": 0.05}
    assert cal.pair_rule(mirrored)[0] == "mirrored" and cal.pair_reason(mirrored).startswith(REASON_MIRROR)
    assert cal.pair_rule(rows[0]["features"]) is None
    assert cal.rule_confidence("mirrored", "heart") > 0.8 > 0.1 > cal.rule_confidence("mirrored", "left_lung")
    assert cal.rule_confidence("mirrored", "aorta") == pytest.approx(cal.rule_pooled["mirrored"])
    assert abs(cal.rule_confidence("fit", "heart") - cal.rule_confidence("fit", "left_lung")) < 0.05
    assert cal.rule_confidence("orientation", "heart") == cal.gated_rate  # a rule the calibration never saw
    cal.save(tmp_path / "c.json")
    assert Calibration.load(tmp_path / "c.json").rule_confidence("mirrored", "heart") == cal.rule_confidence("mirrored", "heart")
    legacy = Calibration(**{k: v for k, v in cal.to_json().items() if k not in ("rule_rates", "rule_pooled")})
    assert legacy.rule_confidence("mirrored", "heart") == legacy.gated_rate
    assert not fit_calibration(rows, "toy", rule_rates=False).rule_pooled
    # the strength: structures that differ want little shrinkage, alike ones pool
    names = np.array(["a", "b"] * 20, object)
    assert choose_strength(names, names == "a", np.arange(40) // 2) < 1
    assert choose_strength(names, np.arange(40) % 5 == 0, np.arange(40) // 2) >= 5


def test_rule_withheld_no_mask_answers_keep_their_own_rate():
    """A reference that does not fit (an angiogram against a chest): a mask there is never right,
    a "not there" answer always is, so the two get their own shares (``rule_key``) and a rule-withheld
    mask reads low however often the method says "not there" elsewhere; a calibration without
    "no mask" rows gives them the rule's share with a mask."""
    from rau.methods.confidence import rule_key

    rows = _rows()
    for i in range(20):
        for name in ("heart", "left_lung", "right_lung"):
            none = i < 4  # the method answered "not there" on 4 of the 20 angiograms
            f = {**rows[0]["features"], "fit": 0.1, "found": 0.0 if none else 1.0}
            rows.append({"features": f, "right": none, "target": f"a{i}", "split": "wrong", "structure": name})
    cal = fit_calibration(rows, "toy")
    assert set(cal.rule_pooled) == {"fit", rule_key("fit", False)}
    assert cal.rule_confidence("fit", "heart") < 0.05 < 0.8 < cal.rule_confidence("fit", "heart", found=False)
    only_masks = fit_calibration([r for r in rows if r["features"]["found"] > 0], "toy")
    assert only_masks.rule_confidence("fit", "heart", found=False) == only_masks.rule_confidence("fit", "heart")


def test_k_reference_features_and_a_calibration_that_reads_them():
    """Agreement = mean Dice over every two references' outputs (a missing one agrees with nothing),
    support = share of references annotating the structure; a calibration fitted on rows that carry
    them reads them, one fitted without them ignores them."""
    from scipy import ndimage

    from rau.methods.confidence import best_fit, k_reference_features

    a = np.zeros((20, 20), bool)
    a[5:15, 5:15] = True
    b = np.zeros((20, 20), bool)
    b[5:15, 10:20] = True
    f = k_reference_features([a, a.copy(), b], 3)
    assert f["agreement"] == pytest.approx((1.0 + 0.5 + 0.5) / 3) and f["support"] == 1.0
    rng0 = np.random.default_rng(0)
    target = ndimage.gaussian_filter(rng0.random((64, 64)), 3)
    assert best_fit([rng0.random((64, 64)), target[::-1], target.copy()], target) == pytest.approx(1.0)
    g = k_reference_features([a, None, None], 1)
    assert g["agreement"] == 0.0 and g["support"] == pytest.approx(1 / 3)
    rng = np.random.default_rng(3)
    rows = _rows()
    for r in rows:  # agreement is what separates here
        r["features"]["agreement"] = float(np.clip(rng.normal(0.7 if r["right"] else 0.2, 0.1), 0, 1))
        r["features"]["support"] = 1.0
        r["features"]["score"] = 0.6
    cal = fit_calibration(rows, "toy")
    assert {"agreement", "support"} <= set(cal.features)
    hi, lo = ({**rows[0]["features"], "agreement": v} for v in (0.9, 0.1))
    assert cal.predict(hi)[0] > cal.predict(lo)[0] + 0.3
    assert not set(K_FEATURES) & set(fit_calibration(_rows(), "toy").features)


def _presence_rows(n_targets=120, seed=0):
    """Calibration rows of two splits: "chest" (structures always present, masks right) and
    "vessels", where segment "rare" is in few targets, "main" in most; an absent segment's output
    (a mask on some other vessel) has a low score and is wrong."""
    rng = np.random.default_rng(seed)
    rows = []
    for t in range(n_targets):
        for name in ("lung", "heart"):
            f = {"score": rng.normal(0.9, 0.05), "found": 1.0, "log_area_ratio": rng.normal(0, 0.1),
                 "centroid_shift": 0.02, "largest_part": 1.0, "fit": rng.uniform(0.9, 0.98), "mirror_gain": -0.03,
                 "orientation": 0.9, "smoothness": 0.97, "contrast": 0.2}
            rows.append({"features": f, "right": True, "target": f"chest/{t}", "split": "chest", "structure": name,
                         "in_truth": True})
        for name, rate in (("main", 0.9), ("rare", 0.2)):
            present = bool(rng.random() < rate)
            right = present and bool(rng.random() < 0.7)
            f = {"score": rng.normal(0.6 if present else 0.3, 0.12), "found": 1.0, "log_area_ratio": rng.normal(0, 0.4),
                 "centroid_shift": abs(rng.normal(0.05, 0.05)), "largest_part": rng.uniform(0.6, 1.0),
                 "fit": rng.uniform(0.85, 0.98), "mirror_gain": -0.03, "orientation": 0.0, "smoothness": 0.95,
                 "contrast": 0.15}
            rows.append({"features": f, "right": right, "target": f"vessels/{t}", "split": "vessels", "structure": name,
                         "in_truth": present})
    return rows


def test_presence_model_calls_absent_structures_absent_and_keeps_right_masks(tmp_path):
    """Where the calibration split has absent structures a presence model is fitted: it separates
    present from absent on new rows, says "absent" mostly for the rare segment, never for the chest,
    keeps >= 95% of right masks, survives a save/load, and abstain() withholds with the reason;
    ``--min-confidence 0`` keeps everything."""
    from rau.metrics import auroc
    from rau.methods.confidence import Presence, assess

    cal = fit_calibration(_presence_rows(300), "toy")
    pres = cal.presence_model()
    assert isinstance(pres, Presence) and 0 < pres.threshold <= 0.5
    assert pres.structure_rates["rare"] < 0.4 < 0.8 < pres.structure_rates["main"]
    test = _presence_rows(120, seed=1)
    p = pres.predict([r["features"] for r in test], [r["structure"] for r in test])
    inside = np.array([r["in_truth"] for r in test])
    assert auroc(p, inside) > 0.85
    called = p < pres.threshold
    chest = np.array([r["split"] == "chest" for r in test])
    assert not called[chest].any() and called[~inside].mean() > 0.4
    right_mask = np.array([r["right"] for r in test])
    assert called[right_mask].mean() <= 0.07
    cal.save(tmp_path / "c.json")
    again = Calibration.load(tmp_path / "c.json")
    assert np.allclose(again.presence_model().predict([r["features"] for r in test], [r["structure"] for r in test]), p)
    # a user's structure name the calibration never saw gets the pooled share of present
    assert 0 < float(pres.predict([test[2]["features"]], ["my own vessel"])[0]) <= 1

    # through assess and abstain: an output judged absent is withheld, with the reason
    image, masks = synthetic_pair()
    reference = AnnotatedImage(image, masks)
    result = TargetResult("t", "r", "m", {"blob": StructureResult("blob", "yes", (0, 0, 9, 9), 0.9, masks["blob"])})
    assess(result, reference, image, cal)
    r = result.structures["blob"]
    assert r.presence is not None and 0 <= r.presence <= 1
    r.presence, r.absent = 0.01, pres.reason(0.01)
    assert not abstain(result, 0.0).structures["blob"].abstained  # 0 keeps every output
    abstain(result, 1e-6)
    assert r.abstained and r.mask is None and r.answer == "no" and r.reason.startswith(REASON_ABSENT) and "presence" in r.reason


def test_no_presence_model_without_absent_structures_and_a_malformed_one_is_refused(tmp_path):
    rows = [r for r in _presence_rows() if r["split"] == "chest"]
    for r in rows[::3]:  # some wrong masks, so that there is something to calibrate
        r["right"] = False
    assert fit_calibration(rows, "toy").presence is None
    assert fit_calibration(_presence_rows(), "toy", presence=False).presence is None
    doc = fit_calibration(_presence_rows(), "toy").to_json()
    doc["presence"]["coef"] = doc["presence"]["coef"][:1]
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(RauInputError, match="not a rau calibration file"):
        Calibration.load(tmp_path / "bad.json")


def test_the_fit_rule_is_set_on_right_masks_of_splits_with_enough_of_them():
    """A random-reference twin (right masks at lower fits) lowers ``min_fit`` so that its right masks are not
    withheld as "reference does not fit"; right "not there" answers, which lose nothing when withheld, and a
    split with fewer than 20 right masks do not set it."""
    from rau.eval.calibrate import rule_anchor

    rows = _rows() + _wrong_rows()
    rng = np.random.default_rng(4)
    twins = [{**r, "split": "s-random", "features": {**r["features"], "fit": float(rng.uniform(0.4, 0.98))}} for r in rows]
    few = [{**r, "split": "few", "right": i < 10, "features": {**r["features"], "fit": 0.05}} for i, r in enumerate(rows[:60])]
    absent = [{**r, "split": "s-absent", "right": True, "features": {**r["features"], "found": 0.0, "fit": -0.5}}
              for r in rows[:30]]
    both = rows + twins + few + absent
    right_masks = np.array([r["right"] and r["features"]["found"] > 0 for r in both])
    anchor = rule_anchor(both, right_masks)
    assert {r["split"] for r, a in zip(both, anchor) if a} == {"s", "s-random"}
    alone, with_twins = fit_calibration(rows, "toy"), fit_calibration(both, "toy")
    assert with_twins.min_fit < alone.min_fit and 0.35 < with_twins.min_fit < 0.45


def test_a_feature_only_some_segmenters_measure_reads_as_the_calibration_mean_when_missing():
    """rau-seg with the former <seg> head has no memory readout: its outputs lack ``readout_agreement``, which
    the method's calibration (fitted on the memory segmenter's outputs) reads. It reads as the calibration
    split's mean; a missing feature every output has is still an error."""
    rows = _rows()
    rng = np.random.default_rng(5)
    for r in rows:
        r["features"].update(readout_agreement=float(rng.uniform(0.5, 1.0)), p_yes=float(rng.uniform(0.0, 1.0)))
    cal = fit_calibration(rows, "toy")
    assert {"readout_agreement", "p_yes"} <= set(cal.features)
    f = dict(rows[0]["features"])
    at_mean = {**f, **{k: m for k, m in zip(cal.features, cal.mean) if k in ("readout_agreement", "p_yes")}}
    lacking = {k: v for k, v in f.items() if k not in ("readout_agreement", "p_yes")}
    assert cal.predict(lacking)[0] == pytest.approx(cal.predict(at_mean)[0])
    with pytest.raises(KeyError):
        cal.predict({k: v for k, v in f.items() if k != "fit"})


def test_random_reference_twins_set_the_pair_rules_only():
    """The twins' rows anchor the pair rules and are scored as held-out data; the model, its threshold and
    the rules' shares come from the other splits alone (with ``twins_rules_only=False`` they pull them)."""
    rows = _rows()
    twins = [{**r, "split": "s-random", "right": False, "features": {**r["features"], "fit": 0.99}} for r in rows]
    alone = fit_calibration(rows, "toy")
    only = fit_calibration(rows + twins, "toy")
    mixed = fit_calibration(rows + twins, "toy", twins_rules_only=False)
    assert only.min_fit == alone.min_fit and only.threshold == alone.threshold
    assert np.allclose(only.coef, alone.coef) and np.allclose(only.iso_y, alone.iso_y)
    assert not np.allclose(mixed.coef, alone.coef)
    assert only.record["twins_rules_only"] and "s-random" in only.record["out_of_fold"]


def test_a_method_without_calibration_uses_the_kind_rule_and_the_default_fit_rule(monkeypatch):
    """An angiogram read against a chest with an uncalibrated method is "does not fit" by the image-kind rule
    whatever its thumbnail fit, and a look-alike of the same kind by the default method's ``min_fit`` where it
    has one (the thumbnail fit is the same for every method); a look-alike pair of the same kind fits."""
    import rau.methods.confidence as confidence
    from rau.methods.registry import DEFAULT_METHOD

    min_fit = confidence.default_calibration(DEFAULT_METHOD).min_fit
    image, masks = synthetic_pair()
    reference = AnnotatedImage(image, masks)
    cases = [(0.99, 0.02, True), (0.99, 0.99, False)]
    if min_fit is not None:
        cases += [(min_fit - 0.1, 0.99, True), (min_fit + 0.1, 0.99, False)]
    for fit, kind, unfit in cases:
        pair = {"fit": fit, "mirror_gain": 0.0, "orientation": 1.0, "mirror_fit_gain": -0.1, "laterality": 1.0,
                "kind": kind}
        monkeypatch.setattr(confidence, "pair_features", lambda r, t, registered=True, mirror_fit=True, p=pair: p)
        result = TargetResult("t", "r", "m", {"blob": StructureResult("blob", "yes", (0, 0, 9, 9), 0.9, masks["blob"])})
        confidence.assess(result, reference, image, None)
        flag = result.structures["blob"].flag
        assert (flag is not None and flag.startswith(confidence.REASON_FIT)) is unfit
        assert result.structures["blob"].confidence == (0.0 if unfit else None)


def test_other_kinds_of_image_do_not_fit_whatever_their_fit_and_leave_min_fit_to_the_rest():
    """The image-kind rule withholds a pair of different kinds (an angiogram against a chest) before the
    thumbnail fit is read; the wrong inputs it catches do not pull ``min_fit`` up, and its rows are the fit
    rule's (one rule key, "fit")."""
    from rau.methods.confidence import MIN_KIND, REASON_FIT, kind_reason

    assert kind_reason({"kind": MIN_KIND - 0.01}).startswith(REASON_FIT) and kind_reason({"kind": 0.9}) is None
    assert kind_reason({}) is None  # no model, no rule
    rows = _rows()
    wrong = [{"features": {**r["features"], "fit": 0.7, "kind": 0.02}, "right": False, "target": f"w{i}",
              "split": "calib-wrong"} for i, r in enumerate(rows[:40])]
    blind = [{**w, "features": {k: v for k, v in w["features"].items() if k != "kind"}} for w in wrong]
    blob = [{**w, "features": {**w["features"], "fit": 0.5, "kind": 0.9}, "target": f"b{i}"} for i, w in enumerate(wrong)]
    seen, unseen, rest = (fit_calibration(rows + w, "toy") for w in (wrong, blind, blob + wrong))
    assert 0.77 < unseen.min_fit < 0.79  # without the kind, midway between the angiograms and the right masks
    # the kind rule caught every wrong input: the rule sits at the right masks' 1% quantile (0.85-0.98 uniform)
    assert 0.85 < seen.min_fit < 0.86
    assert 0.67 < rest.min_fit < 0.69  # set on what the kind rule leaves (fit 0.5), not on what it caught
    pair = {**wrong[0]["features"]}
    assert seen.pair_rule(pair)[0] == "fit" and "different kinds of image" in seen.pair_reason(pair)
    assert seen.pair_rule({**pair, "kind": 0.95, "fit": 0.95}) is None
    assert "fit" in seen.rule_pooled and seen.rule_pooled["fit"] < 0.1


def test_mirror_fit_gain_is_measured_only_where_something_reads_it(monkeypatch):
    """Its affine registrations run when the calibration (or its presence model) reads the feature, when there is
    no calibration (what `rau calibrate` runs) or no laterality model (the "mirrored" rule's fallback); a
    calibration that does not read it skips them and assesses the same way."""
    import dataclasses

    import rau.methods.confidence as confidence
    import rau.methods.registration as registration

    calls = []
    monkeypatch.setattr(registration, "mirror_fit_gain", lambda t, r: calls.append(1) or -0.2)

    class Facing:  # a laterality model that reads every pair as facing the same way
        def agreement(self, reference, target):
            return 1.0

    monkeypatch.setattr(confidence, "default_laterality", lambda: Facing())
    cal = fit_calibration(_rows(), "toy", presence=False)
    assert "mirror_fit_gain" not in cal.features
    reads = dataclasses.replace(cal, features=[*cal.features[:-1], "mirror_fit_gain", cal.features[-1]],
                                mean=[*cal.mean[:-1], -0.2, cal.mean[-1]], std=[*cal.std[:-1], 1.0, cal.std[-1]],
                                coef=[*cal.coef[:-1], 0.0, cal.coef[-1]])
    by_presence = dataclasses.replace(cal, presence={"features": ["score", "mirror_fit_gain"]})
    assert not confidence.reads_mirror_fit(cal)
    assert confidence.reads_mirror_fit(None) and confidence.reads_mirror_fit(reads)
    assert confidence.reads_mirror_fit(by_presence)
    image, masks = synthetic_pair()
    reference = AnnotatedImage(image, masks)
    seen = {}
    for label, c in (("skips", cal), ("reads", reads), ("none", None)):
        calls.clear()
        result = TargetResult("t", "r", "m", {"blob": StructureResult("blob", "yes", (0, 0, 9, 9), 0.9, masks["blob"])})
        confidence.assess(result, reference, image, c)
        seen[label] = (len(calls), "mirror_fit_gain" in result.structures["blob"].features,
                       result.structures["blob"].confidence)
    assert seen["skips"][:2] == (0, False) and seen["reads"][:2] == (1, True) and seen["none"][:2] == (1, True)
    assert seen["skips"][2] == pytest.approx(seen["reads"][2])  # a zero coefficient: the same confidence
    monkeypatch.setattr(confidence, "default_laterality", lambda: None)
    assert confidence.reads_mirror_fit(cal)
