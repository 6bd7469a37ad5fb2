"""Batch mode: `rau localize --targets DIR|GLOB|FILE` and `rau.batch.localize_many`.

End to end on the bundled chest X-ray pair with `--method registration` (no model): one folder per
target as in single-target mode, summary.csv, a corrupt file reported and skipped, a rerun skipping
finished targets, shards from RANK/WORLD_SIZE merged with --merge-only. The plumbing (skip rules,
CSV updated as it goes, export formats) runs on a stub method, instantly.
"""

import csv
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from rau.cli.app import app
from rau.data.annotated import StructureResult, TargetResult
from rau.methods import Method

runner = CliRunner()
SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "chest_xray"
STRUCTURES = {"heart", "left_lung", "right_lung"}


@pytest.fixture
def batch_dir(tmp_path):
    """t1.png and t2.png (copies of the sample target) and bad.png (junk bytes)."""
    d = tmp_path / "targets"
    d.mkdir()
    for name in ("t1.png", "t2.png"):
        shutil.copy(SAMPLE / "target.png", d / name)
    (d / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 3)
    return d


def batch_args(out, *targets, extra=()):
    args = ["localize", "--reference", str(SAMPLE / "reference.png"), "--reference-masks", str(SAMPLE / "reference_masks"),
            "--out", str(out), "--method", "registration", "--no-progress", "--min-confidence", "0"]
    for t in targets:
        args += ["--targets", str(t)]
    return args + list(extra)


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_batch_writes_a_folder_per_target_reports_the_bad_file_and_rerun_skips(batch_dir, tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(app, batch_args(out, batch_dir))
    assert res.exit_code == 1, res.output  # documented: 1 when a target failed, the others written
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "bad.png" in errors[0]
    for name in ("t1", "t2"):
        doc = json.loads((out / name / "result.json").read_text())
        assert set(doc["structures"]) == STRUCTURES and doc["method"] == "registration"
        assert {p.name for p in (out / name / "masks").iterdir()} == {f"{s}.png" for s in STRUCTURES}
        assert (out / name / "overlay.png").is_file()
    assert not (out / "bad").exists()

    rows = read_csv(out / "summary.csv")
    assert list(rows[0]) == ["target", "structure", "answer", "found", "score", "x0", "y0", "x1", "y1", "seconds", "status", "error",
                             "confidence", "abstained", "reason", "presence", "copied"]  # 12 as before issue 17, its 4, then "copied"
    bad = [r for r in rows if r["status"] == "error"]
    assert len(bad) == 1 and bad[0]["target"].endswith("bad.png") and "bad.png" in bad[0]["error"] and bad[0]["structure"] == ""
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 6 and {r["structure"] for r in ok} == STRUCTURES
    t1 = json.loads((out / "t1" / "result.json").read_text())["structures"]["heart"]
    row = next(r for r in ok if r["target"].endswith("t1.png") and r["structure"] == "heart")
    assert [float(row[k]) for k in ("x0", "y0", "x1", "y1")] == t1["box_xyxy"] and row["found"] == "true"

    again = runner.invoke(app, batch_args(out, batch_dir))
    assert again.exit_code == 1 and "0 done, 2 skipped" in again.output
    rows2 = read_csv(out / "summary.csv")
    assert [r["status"] for r in rows2 if r["structure"]] == ["skipped"] * 6
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("status", "seconds")} for r in rs]
    assert strip(rows2) == strip(rows)  # skipped rows re-read from result.json


def test_shards_from_env_split_the_targets_and_merge(batch_dir, tmp_path, monkeypatch):
    (batch_dir / "bad.png").unlink()
    glob = str(batch_dir / "t*.png")
    out = tmp_path / "out"
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        res = runner.invoke(app, batch_args(out, glob))
        assert res.exit_code == 0, res.output
        assert f"shard {rank + 1}/2" in res.output
    assert [r["target"] for r in read_csv(out / "summary.rank0.csv")] == [str(batch_dir / "t1.png")] * 3
    assert [r["target"] for r in read_csv(out / "summary.rank1.csv")] == [str(batch_dir / "t2.png")] * 3
    assert not (out / "summary.csv").exists()
    res = runner.invoke(app, ["localize", "--out", str(out), "--merge-only"])
    assert res.exit_code == 0, res.output
    merged = read_csv(out / "summary.csv")
    assert [Path(r["target"]).name for r in merged] == ["t1.png"] * 3 + ["t2.png"] * 3


@pytest.mark.parametrize("case", ["both", "neither", "no_match", "empty_folder", "bad_rank"])
def test_batch_usage_errors_are_one_line(batch_dir, tmp_path, monkeypatch, case):
    out = tmp_path / "out"
    args = batch_args(out, batch_dir)
    if case == "both":
        args += ["--target", str(SAMPLE / "target.png")]
    elif case == "neither":
        args = batch_args(out)
    elif case == "no_match":
        args = batch_args(out, tmp_path / "nothing*.png")
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        args = batch_args(out, tmp_path / "empty")
    else:
        monkeypatch.setenv("RANK", "2")
        monkeypatch.setenv("WORLD_SIZE", "2")
    res = runner.invoke(app, args)
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert not out.exists()


def test_expand_targets_and_output_names(tmp_path):
    from rau.batch import expand_targets, output_names

    a, b = tmp_path / "a", tmp_path / "b"
    for f in ("x.png", "y.nii.gz", "notes.txt", ".hidden.png", "sub/z.png"):
        (a / f).parent.mkdir(parents=True, exist_ok=True)
        (a / f).write_bytes(b"")
    (b / "x.png").parent.mkdir()
    (b / "x.png").write_bytes(b"")
    dicom = a / "IM0001"  # a DICOM file without a suffix: recognised by its preamble
    dicom.write_bytes(b"\0" * 128 + b"DICM")
    got = expand_targets([a, str(b / "*.png"), a / "x.png"])
    assert got == [a / "IM0001", a / "x.png", a / "y.nii.gz", b / "x.png"]  # a/x.png only once
    assert output_names(got) == ["IM0001", "x", "y", "x_2"]
    assert output_names([Path("p/x.png"), Path("q/X.dcm"), Path("r/x_2.png")]) == ["x", "X_2", "x_2_2"]


def test_shard_from_env():
    from rau.batch import shard_from_env
    from rau.errors import RauInputError

    assert shard_from_env({}) == (0, 1)
    assert shard_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4)
    assert shard_from_env({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}) == (1, 2)
    with pytest.raises(RauInputError, match="RANK"):
        shard_from_env({"RANK": "x", "WORLD_SIZE": "2"})


# ---------------------------------------------------------------- the Python API on a stub method


class StubMethod(Method):
    """A 4x4 box at the top-left corner for every structure, instantly; counts its calls."""

    def __init__(self, name="stub"):
        self.name, self.calls = name, 0

    def predict(self, reference, target, structures=None):
        self.calls += 1
        mask = np.zeros(target.shape, bool)
        mask[:4, :4] = True
        names = structures or reference.structures
        return TargetResult(target.id, reference.id, self.name,
                            {s: StructureResult(s, "yes", (0.0, 0.0, 4.0, 4.0), 0.5, mask) for s in names}, 0.01)


@pytest.fixture
def reference():
    from rau.data.io import load_annotated

    return load_annotated(SAMPLE / "reference.png", SAMPLE / "reference_masks")


def test_localize_many_updates_the_summary_as_it_goes_and_skips_finished_targets(batch_dir, tmp_path, reference, monkeypatch):
    from rau import batch

    monkeypatch.setattr(batch, "SUMMARY_EVERY_S", 0.0)
    out, stub = tmp_path / "out", StubMethod()
    items = batch.localize_many(reference, [batch_dir], method=stub, out_dir=out, structures=["heart"])
    first = next(items)  # bad.png sorts first
    assert first.status == "error" and isinstance(first.outcome, ValueError) and read_csv(out / "summary.csv")[0]["status"] == "error"
    second = next(items)
    assert second.status == "ok" and second.folder == out / "t1"
    assert [r["target"] for r in read_csv(out / "summary.csv")] == [str(batch_dir / "bad.png"), str(batch_dir / "t1.png")]
    assert [i.status for i in items] == ["ok"] and stub.calls == 2

    rerun = list(batch.localize_many(reference, [batch_dir], method=stub, out_dir=out, structures=["heart"]))
    assert [i.status for i in rerun] == ["error", "skipped", "skipped"] and stub.calls == 2
    back = rerun[1].outcome
    assert back.structures["heart"].box_xyxy_px == (0.0, 0.0, 4.0, 4.0) and back.structures["heart"].mask.sum() == 16

    other = list(batch.localize_many(reference, [batch_dir], method=StubMethod("other"), out_dir=out, structures=["heart"]))
    assert [i.status for i in other][1:] == ["ok", "ok"]  # another method's result is not this one's
    forced = list(batch.localize_many(reference, [batch_dir], method=stub, out_dir=out, structures=["heart"], overwrite=True))
    assert [i.status for i in forced][1:] == ["ok", "ok"] and stub.calls == 4


@pytest.fixture
def fake_exporter(monkeypatch):
    """A stand-in rau.data.export: one small file per format; 'dicom-seg' refuses every target."""
    import rau.data
    from rau.errors import RauInputError

    fake = types.ModuleType("rau.data.export")
    fake.FILENAMES = {"nifti": "labels.nii.gz", "coco": "coco.json", "dicom-seg": "seg.dcm"}

    def parse_formats(formats):
        unknown = [f for f in formats if f not in fake.FILENAMES]
        if unknown:
            raise RauInputError(f"--formats: unknown format {unknown[0]!r}")
        return list(formats)

    def write_formats(result, target, out_dir, formats):
        if "dicom-seg" in formats:
            raise RauInputError("--formats: dicom-seg needs a DICOM target")
        for f in formats:
            (Path(out_dir) / fake.FILENAMES[f]).write_text(result.method)

    fake.parse_formats, fake.write_formats = parse_formats, write_formats
    monkeypatch.setitem(sys.modules, "rau.data.export", fake)
    monkeypatch.setattr(rau.data, "export", fake, raising=False)
    return fake


def test_formats_are_written_with_the_result_in_both_modes(batch_dir, tmp_path, reference, fake_exporter):
    from rau import batch, pipeline
    from rau.errors import RauInputError

    pipeline.localize(reference, batch_dir / "t1.png", method=StubMethod(), out_dir=tmp_path / "one", formats=["coco"])
    assert (tmp_path / "one" / "coco.json").is_file() and (tmp_path / "one" / "result.json").is_file()
    many, stub = tmp_path / "many", StubMethod()
    run = lambda formats: [i.status for i in batch.localize_many(
        reference, [batch_dir / "t2.png"], method=stub, out_dir=many, formats=formats)]
    assert run(["nifti"]) == ["ok"] and (many / "t2" / "labels.nii.gz").is_file()
    assert run(["nifti"]) == ["skipped"]
    assert run(["nifti", "coco"]) == ["ok"] and (many / "t2" / "coco.json").is_file()  # a file asked for now is missing
    refused = list(batch.localize_many(reference, [batch_dir / "t1.png"], method=stub, out_dir=tmp_path / "seg",
                                          formats=["dicom-seg"]))
    assert refused[0].status == "error" and not (tmp_path / "seg" / "t1").exists()  # all or nothing, as single mode
    with pytest.raises(RauInputError, match="--formats"):
        batch.localize_many(reference, [batch_dir], method=StubMethod(), out_dir=tmp_path / "x", formats=["stl"])
    res = runner.invoke(app, batch_args(tmp_path / "cli", batch_dir, extra=["--formats", "stl"]))
    assert res.exit_code == 2 and res.output.startswith("error: --formats") and not (tmp_path / "cli").exists()


def test_formats_with_the_real_exporter(tmp_path):
    pytest.importorskip("rau.data.export")
    out = tmp_path / "out"
    res = runner.invoke(app, ["localize", "--reference", str(SAMPLE / "reference.png"), "--reference-masks",
                              str(SAMPLE / "reference_masks"), "--target", str(SAMPLE / "target.png"), "--out", str(out),
                              "--method", "registration", "--formats", "nifti,coco"])
    assert res.exit_code == 0, res.output
    extra = {p.name for p in out.iterdir()} - {"result.json", "masks", "overlay.png"}
    assert extra  # the exporters' files sit next to the usual outputs


def test_batch_with_a_reference_bank(folder_dataset, tmp_path):
    from rau.references.bank import build_bank

    bank = build_bank(folder_dataset, encoder="thumbnail", progress=False).save(tmp_path / "bank.npz")
    out = tmp_path / "out"
    res = runner.invoke(app, ["localize", "--bank", str(bank), "--targets", str(folder_dataset / "images" / "case_[01].png"),
                              "--out", str(out), "--method", "registration", "--no-progress", "--min-confidence", "0"])
    assert res.exit_code == 0, res.output
    for name in ("case_0", "case_1"):
        doc = json.loads((out / name / "result.json").read_text())
        assert doc["reference"] != name and set(doc["structures"]) == {"blob", "square"}
    assert len(read_csv(out / "summary.csv")) == 4
