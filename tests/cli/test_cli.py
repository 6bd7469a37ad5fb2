"""The `rau localize` / `rau eval` contract, end to end, and bad input -> one line, non-zero exit."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from rau.cli.app import app

from conftest import write_png

runner = CliRunner()


def localize_args(d, out, *extra):
    return ["localize", "--reference", str(d / "ref.png"), "--reference-masks", str(d / "ref_masks"),
            "--target", str(d / "target.png"), "--out", str(out), *extra]


def test_localize_registration_contract(pair_files):
    out = pair_files / "out"
    res = runner.invoke(app, localize_args(pair_files, out, "--method", "registration"))
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "result.json").read_text())
    assert set(doc["structures"]) == {"blob", "square"}
    tgt_size = Image.open(pair_files / "target.png").size
    for name, s in doc["structures"].items():
        assert {"label", "answer", "box_xyxy", "score", "mask"} <= set(s)
        assert s["copied"] is False  # registration draws every mask itself (the memory segmenter may copy)
        assert "vlm_p_yes" not in s  # only the RAU VLM methods say what their VLM answered
        mask = Image.open(out / s["mask"])
        assert mask.size == tgt_size  # target is 112x128, reference 96x96
    assert Image.open(out / "overlay.png").mode == "RGB"


def test_localize_default_method_with_medsam(pair_files):
    out = pair_files / "out_default"
    res = runner.invoke(app, localize_args(pair_files, out, "--structures", "blob"))
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "result.json").read_text())
    from rau.methods import DEFAULT_METHOD

    assert doc["method"] == DEFAULT_METHOD and list(doc["structures"]) == ["blob"]


@pytest.mark.parametrize("case", ["unreadable", "size_mismatch", "empty_mask", "unknown_structure", "missing_target", "bad_method",
                                  "bad_precision", "bad_calibration"])
def test_localize_bad_input(pair_files, case):
    out = pair_files / "out_bad"
    extra = ["--method", "registration"]
    if case == "unreadable":
        (pair_files / "target.png").write_bytes(b"\x89PNG garbage")
    elif case == "size_mismatch":
        write_png(pair_files / "ref_masks" / "blob.png", np.ones((50, 50), bool))
    elif case == "empty_mask":
        write_png(pair_files / "ref_masks" / "blob.png", np.zeros((96, 96), bool))
    elif case == "unknown_structure":
        extra += ["--structures", "liver"]
    elif case == "missing_target":
        (pair_files / "target.png").unlink()
    elif case == "bad_method":
        extra = ["--method", "nope"]
    elif case == "bad_precision":
        extra += ["--precision", "int4"]
    elif case == "bad_calibration":
        (pair_files / "cal.json").write_text("{}")
        extra += ["--calibration", str(pair_files / "cal.json")]
    res = runner.invoke(app, localize_args(pair_files, out, *extra))
    assert res.exit_code == 2
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert not out.exists()


def test_localize_reads_the_calibration_it_is_given(pair_files):
    """--calibration FILE replaces the method's shipped calibration; 'none' reports no confidence."""
    from rau.methods.confidence import calibration_path

    runs = {}
    for name, cal in (("shipped", None), ("file", str(calibration_path("registration"))), ("none", "none")):
        out = pair_files / f"out_cal_{name}"
        res = runner.invoke(app, localize_args(pair_files, out, "--method", "registration",
                                               *(["--calibration", cal] if cal else [])))
        assert res.exit_code == 0, res.output
        runs[name] = {k: s["confidence"] for k, s in json.loads((out / "result.json").read_text())["structures"].items()}
    assert runs["file"] == runs["shipped"] and all(v is not None for v in runs["shipped"].values())
    assert all(v is None for v in runs["none"].values())


def test_failed_write_leaves_no_partial_output(pair_files, monkeypatch):
    import rau.pipeline as pipeline

    calls = {"n": 0}
    real = pipeline.save_png

    def flaky(arr, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(arr, path)

    monkeypatch.setattr(pipeline, "save_png", flaky)
    out = pair_files / "out_fail"
    with pytest.raises(OSError):
        runner.invoke(app, localize_args(pair_files, out, "--method", "registration"), catch_exceptions=False)
    assert not out.exists()
    assert not [p for p in pair_files.iterdir() if p.name.startswith(".out_fail")]


def test_eval_contract(folder_dataset, tmp_path):
    out = tmp_path / "res.json"
    res = runner.invoke(app, ["eval", "--targets", str(folder_dataset), "--references", str(folder_dataset),
                              "--method", "registration", "--limit", "2", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["method"] == "registration" and isinstance(doc["seconds_per_target"], float)
    for name in ("blob", "square"):
        e = doc["per_structure"][name]
        assert e["n"] == 2
        for k in ("dice", "iou", "hd95", "box_iou", "box_acc50"):
            assert isinstance(e[k], float)
    assert {"dice", "iou", "box_iou"} <= set(doc["mean"])
    assert isinstance(doc["config"], dict) and doc["config"]["precision"] in ("fp32", "bf16")
    for pair in doc["config"]["pairs"]:
        assert pair["target"] != pair["reference"]
    assert "| **mean** |" in res.output


def test_eval_oracle_and_ranges(folder_dataset, tmp_path):
    out = tmp_path / "res.json"
    res = runner.invoke(app, ["eval", "--targets", str(folder_dataset), "--references", str(folder_dataset),
                              "--target-range", "3:4", "--reference-range", "0:3", "--method", "oracle-box",
                              "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["n_targets"] == 1 and doc["mean"]["box_iou"] == pytest.approx(1.0)


def test_eval_bad_range(folder_dataset, tmp_path):
    res = runner.invoke(app, ["eval", "--targets", str(folder_dataset), "--references", str(folder_dataset),
                              "--target-range", "x", "--out", str(tmp_path / "r.json")])
    assert res.exit_code == 2 and "--target-range" in res.output


def test_bundled_angiogram_sample(tmp_path):
    from pathlib import Path

    samples = Path(__file__).resolve().parents[2] / "samples" / "angiogram"
    out = tmp_path / "angio"
    res = runner.invoke(app, ["localize", "--reference", str(samples / "reference.png"), "--reference-masks",
                              str(samples / "reference_masks"), "--target", str(samples / "target.png"),
                              "--out", str(out), "--method", "registration", "--structures", "5,6"])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "result.json").read_text())
    assert set(doc["structures"]) == {"5", "6"} and doc["image_size_wh"] == [512, 512]


def test_the_default_asks_a_second_opinion_on_an_angiogram_and_can_deliver_its_masks(tmp_path):
    """``reg-refine`` on the bundled angiogram pair: by default the refiner's masks are delivered and their
    agreement with the memory segmenter's is in result.json; ``--no-second-opinion``: the same masks, no
    agreement; ``--angiogram-masks memory``: the memory segmenter's masks (the same pixels as ``sam2-memory``'s)
    with the same agreement."""
    from pathlib import Path

    samples = Path(__file__).resolve().parents[2] / "samples" / "angiogram"
    docs = {}
    runs = {"default": [], "memory": ["--angiogram-masks", "memory"], "off": ["--no-second-opinion"],
            "sam2": ["--method", "sam2-memory"]}
    for key, flags in runs.items():
        res = runner.invoke(app, ["localize", "--reference", str(samples / "reference.png"), "--reference-masks",
                                  str(samples / "reference_masks"), "--target", str(samples / "target.png"),
                                  "--out", str(tmp_path / key), "--structures", "5,6", "--min-confidence", "0", *flags])
        assert res.exit_code == 0, res.output
        docs[key] = json.loads((tmp_path / key / "result.json").read_text())["structures"]
        # the default's refiner masks on an angiogram come with a note naming the memory route, the others without
        assert ("note: the target reads as a coronary angiogram" in res.output) == (key == "default"), res.output

    def mask(key, name):
        return np.asarray(Image.open(tmp_path / key / docs[key][name]["mask"]))

    assert not any("second_opinion" in s for s in docs["off"].values())
    for name in ("5", "6"):
        assert 0 <= docs["default"][name]["second_opinion"] == docs["memory"][name]["second_opinion"] <= 1
        assert np.array_equal(mask("memory", name), mask("sam2", name))
        assert np.array_equal(mask("default", name), mask("off", name))
        assert docs["default"][name]["box_xyxy"] == docs["off"][name]["box_xyxy"]
    res = runner.invoke(app, ["localize", "--reference", str(samples / "reference.png"), "--reference-masks",
                              str(samples / "reference_masks"), "--target", str(samples / "target.png"),
                              "--out", str(tmp_path / "bad"), "--angiogram-masks", "both"])
    assert res.exit_code != 0 and "--angiogram-masks" in res.output and not (tmp_path / "bad").exists()


def test_a_batch_with_angiograms_notes_the_memory_route_once(tmp_path):
    """``rau localize --targets`` with the default: one note after the batch line, counting the targets read as
    angiograms (the chest radiograph is not one); none with ``--angiogram-masks memory``."""
    from pathlib import Path

    samples = Path(__file__).resolve().parents[2] / "samples"
    base = ["localize", "--reference", str(samples / "angiogram" / "reference.png"), "--reference-masks",
            str(samples / "angiogram" / "reference_masks"), "--targets", str(samples / "angiogram" / "target.png"),
            "--targets", str(samples / "chest_xray" / "target.png"), "--structures", "5", "--no-progress"]
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert res.output.count("note:") == 1 and "note: 1 of them read as coronary angiograms" in res.output
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "b"), "--angiogram-masks", "memory"])
    assert res.exit_code == 0 and "note:" not in res.output, res.output


def test_report_and_plot(folder_dataset, tmp_path):
    out = tmp_path / "res.json"
    runner.invoke(app, ["eval", "--targets", str(folder_dataset), "--references", str(folder_dataset),
                        "--method", "registration", "--limit", "1", "--out", str(out), "--no-progress"])
    res = runner.invoke(app, ["report", str(out), str(out), "--no-per-structure", "--plot", str(tmp_path / "bars.png")])
    assert res.exit_code == 0, res.output
    assert res.output.count("| registration |") == 2
    assert Image.open(tmp_path / "bars.png").size[0] > 100
    bad = runner.invoke(app, ["report", str(tmp_path / "missing.json")])
    assert bad.exit_code == 2 and bad.output.startswith("error: ")


@pytest.mark.parametrize("case", ["dicom_without_pixels", "nan_tiff", "dicom_target_ok", "rgb16_target_ok"])
def test_localize_medical_and_odd_targets(pair_files, case):
    from tiny_data import write_dicom

    out = pair_files / f"out_{case}"
    target = pair_files / "t.dcm"
    if case == "dicom_without_pixels":
        write_dicom(target, None)
    elif case == "dicom_target_ok":
        write_dicom(target, (np.asarray(Image.open(pair_files / "target.png"), np.float64) * 10).astype(np.int16),
                    slope=1.0, intercept=-1024.0)
    elif case == "nan_tiff":
        arr = np.ones((40, 40), np.float32)
        arr[3, 3] = np.nan
        target = pair_files / "t.tif"
        Image.fromarray(arr, mode="F").save(target)
    else:
        target = pair_files / "t16.png"
        Image.fromarray((np.asarray(Image.open(pair_files / "target.png"), np.uint16) * 200)).save(target)
    args = localize_args(pair_files, out, "--method", "registration")
    args[args.index("--target") + 1] = str(target)
    res = runner.invoke(app, args)
    if case.endswith("_ok"):
        assert res.exit_code == 0, res.output
        assert (out / "result.json").exists()
    else:
        assert res.exit_code == 2 and res.output.startswith("error: ") and len(res.output.strip().splitlines()) == 1
        assert not out.exists()


@pytest.fixture
def tiny_arcade(folder_dataset, tmp_path):
    """A data folder with the ARCADE layout (val/ and train/ copies of the tiny dataset)."""
    import shutil

    data = tmp_path / "data"
    for part in ("val", "train"):
        shutil.copytree(folder_dataset, data / "arcade_syntax" / part)
    return data


def test_bench_quick_on_a_tiny_arcade_layout(tiny_arcade, tmp_path):
    data = tiny_arcade
    out = tmp_path / "bench"
    res = runner.invoke(app, ["bench", "--out", str(out), "--data", str(data), "--splits", "arcade",
                              "--methods", "registration", "--quick", "--no-progress"])
    assert res.exit_code == 0, res.output
    md = (out / "BENCH.md").read_text()
    assert "| registration |" in md and "Commit:" in md and "Machine:" in md
    assert (out / "arcade_registration.json").exists() and (out / "dice_arcade.png").exists()
    assert (out / "overlay_arcade_registration_worst.png").exists()
    config = json.loads((out / "arcade_registration.json").read_text())["config"]
    assert config["vlm"] is None and config["precision"] in ("fp32", "bf16")  # the run's models, for its labels
    bad = runner.invoke(app, ["bench", "--out", str(out), "--splits", "nope"])
    assert bad.exit_code == 2 and "--splits" in bad.output
    # the default's options reach the bench too, checked before any run
    bad = runner.invoke(app, ["bench", "--out", str(tmp_path / "b2"), "--data", str(data), "--splits", "arcade",
                              "--methods", "reg-refine", "--angiogram-masks", "both", "--quick", "--no-progress"])
    assert bad.exit_code != 0 and "--angiogram-masks" in bad.output and not (tmp_path / "b2" / "BENCH.md").exists()


def test_bench_overlays_for_chosen_methods_and_the_drr_unseen_split(tiny_arcade, tmp_path):
    from rau.eval.bench import HELD_OUT, resolve_splits

    out = tmp_path / "bench"
    res = runner.invoke(app, ["bench", "--out", str(out), "--data", str(tiny_arcade), "--splits", "arcade",
                              "--methods", "registration,oracle-box", "--overlays", "registration,oracle-box",
                              "--quick", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert (out / "overlay_arcade_oracle-box_best.png").exists() and (out / "overlay_arcade_registration_best.png").exists()
    (split,) = resolve_splits(["drr-unseen"], tiny_arcade, tmp_path / "drr", quick=False, limit=None)
    assert split.structures == HELD_OUT and split.targets == tmp_path / "drr" / "test"
    assert {"left_clavicle", "right_clavicle", "left_scapula", "right_scapula"} == set(HELD_OUT)


def test_calib_arcade_val_never_holds_the_arcade_splits_targets(tmp_path):
    from rau.data.dataset import Dataset, Entry
    from rau.eval.bench import resolve_splits, without_pick
    from rau.eval.evaluate import select_targets

    (split,) = resolve_splits(["calib-arcade-val"], tmp_path, tmp_path / "drr", quick=False, limit=None)
    assert split.targets == tmp_path / "arcade_syntax" / "val" and split.without_pick == 50 and split.limit == 120
    ds = Dataset(tmp_path, [Entry(f"case_{i:03d}", tmp_path / f"{i}.png") for i in range(80)], "folder")
    rest = without_pick(ds, 50, 0)
    bench = {e.id for e in select_targets(ds, 50, 0).entries}
    assert len(rest) == 30 and not bench & {e.id for e in rest.entries}


def test_a_random_reference_twin_is_its_calibration_split_with_random_references(tmp_path):
    from rau.errors import RauInputError
    from rau.eval.bench import needs_calib_drr, resolve_splits

    assert needs_calib_drr(["calib-drr-random"]) and needs_calib_drr(["calib-drr"]) and not needs_calib_drr(["drr"])
    twin, base = resolve_splits(["calib-arcade-val-random", "calib-arcade-val"], tmp_path, tmp_path / "drr", quick=False,
                                limit=None)
    assert (twin.name, twin.reference_choice, base.reference_choice) == ("calib-arcade-val-random", "random", "similar")
    assert (twin.targets, twin.references, twin.limit, twin.without_pick) == (base.targets, base.references, 120, 50)
    with pytest.raises(RauInputError, match="unknown 'wingspan-random'"):
        resolve_splits(["wingspan-random"], tmp_path, tmp_path / "drr", quick=False, limit=None)


def test_a_coverage_twin_is_its_calibration_split_with_the_coverage_rules_references(tmp_path):
    from rau.errors import RauInputError
    from rau.eval.bench import resolve_splits

    twin, base = resolve_splits(["calib-arcade-val-coverage", "calib-arcade-val"], tmp_path, tmp_path / "drr",
                                quick=False, limit=None)
    assert (twin.name, twin.reference_choice) == ("calib-arcade-val-coverage", "coverage")
    assert (twin.targets, twin.references, twin.limit, twin.without_pick) == (base.targets, base.references, 120, 50)
    with pytest.raises(RauInputError, match="unknown 'arcade-coverage'"):
        resolve_splits(["arcade-coverage"], tmp_path, tmp_path / "drr", quick=False, limit=None)


def test_bench_with_k_references_uses_a_bank_and_fuses(tiny_arcade, tmp_path):
    data = tiny_arcade
    out = tmp_path / "bench"
    res = runner.invoke(app, ["bench", "--out", str(out), "--data", str(data), "--splits", "arcade",
                              "--methods", "registration", "--quick", "--k-references", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "arcade_registration_k2.json").read_text())
    assert doc["config"]["k_references"] == 2 and (out / "bank_arcade.npz").exists()
    assert all(len(p["reference"]) == 2 and p["target"] not in p["reference"] for p in doc["config"]["pairs"])
    assert "registration (bank bank_arcade, k=2)" in (out / "BENCH_k2.md").read_text()
    assert (out / "overlay_arcade_registration_k2_worst.png").exists()


def test_bench_skips_truth_reading_methods_where_targets_carry_no_truth(tiny_arcade, tmp_path):
    """The wrong-input split has targets without ground truth: oracle-box has nothing to read and is
    skipped there (it used to stop the whole run), the other methods still run."""
    from rau.eval.bench import Split, run_bench

    part = tiny_arcade / "arcade_syntax"
    split = Split("wrong", part / "val", part / "train", limit=2, truth=False)
    reports = run_bench(tmp_path / "bench", methods=["registration", "oracle-box"], splits=[split],
                        method_options={}, progress=False)
    assert [d["method"] for d in reports["wrong"]] == ["registration"]
    assert not (tmp_path / "bench" / "wrong_oracle-box.json").exists()


def test_rau_s_own_warnings_are_one_line_on_the_command_line(monkeypatch, capsys):
    """`rau` (its console entry) shows rau's warnings as one `warning:` line; other packages' keep Python's form."""
    import warnings

    from rau.cli.common import one_line_warnings
    from rau.methods import registry

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored after the test
    one_line_warnings()
    warnings.showwarning(UserWarning("m: its confidence may be off"), UserWarning, registry.__file__, 1)
    warnings.showwarning(UserWarning("elsewhere"), UserWarning, "/somewhere/else.py", 3)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "warning: m: its confidence may be off"
    assert "warning: elsewhere" not in err  # handed on to the showwarning it replaced (pytest's, here)


def test_calibrate_memory_route_needs_a_method_that_delivers_a_second_opinion(tmp_path):
    """``rau calibrate --memory-route`` fits the masks reg-refine's memory segmenter delivers: a method or options
    that deliver none is a one-line error before any run, and nothing is written."""
    for flags in (["--method", "registration"], ["--method", "reg-refine"], ["--method", "reg-refine", "--angiogram-masks",
                                                                           "memory", "--k-references", "3"]):
        res = runner.invoke(app, ["calibrate", *flags, "--memory-route", "--work", str(tmp_path / "w"),
                                  "--out", str(tmp_path / "c.json"), "--no-progress"])
        assert res.exit_code != 0 and "--memory-route" in res.output, res.output
    assert not (tmp_path / "w").exists() and not (tmp_path / "c.json").exists()
