"""Choosing a reference by what the target shows (rau.references.coverage, ``--reference-choice coverage``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rau.references.coverage import CANDIDATES, UNKNOWN, choose_by_coverage, coverage_order, expected_coverage, pool_size

SEGMENTS = {"a": ["1", "2"], "b": ["1", "2", "3", "5"], "c": ["1", "6", "7"], "d": ["1", "2"]}


def test_expected_coverage_sums_what_the_target_shows_over_a_references_structures():
    shows = {"1": 0.9, "2": 0.8, "3": 0.1}
    assert expected_coverage(["1", "2"], shows) == pytest.approx(1.7)
    assert expected_coverage(["1", "1", "3"], shows) == pytest.approx(1.0)  # a name counts once
    assert expected_coverage(["lung"], shows) == UNKNOWN  # a name the visibility model never learnt: no evidence


def test_coverage_retrieves_its_candidates_the_other_choices_k():
    assert pool_size("coverage", 1) == CANDIDATES and pool_size("coverage", CANDIDATES + 2) == CANDIDATES + 2
    assert pool_size("similar", 3) == 3 and pool_size("random", 1) == 1


def test_the_reference_covering_most_of_what_the_target_shows_comes_first_ties_keep_similarity():
    # the target shows 1, 2 and 3 surely, 5 barely, not 6 or 7
    shows = {"1": 0.95, "2": 0.9, "3": 0.9, "5": 0.05, "6": 0.02, "7": 0.02}
    assert coverage_order(["a", "b", "c", "d"], SEGMENTS.__getitem__, shows) == ["b", "a", "d", "c"]
    # a reference with more segments the target does not show does not win for the number alone
    assert coverage_order(["c", "a"], SEGMENTS.__getitem__, shows) == ["a", "c"]
    # nothing known (a chest radiograph's lungs and heart): every candidate ties, similarity order stays
    chest = {r: ["heart", "left_lung", "right_lung"] for r in "xyz"}
    assert coverage_order(["z", "x", "y"], chest.__getitem__, {}) == ["z", "x", "y"]


def test_choose_by_coverage_reads_the_target_and_looks_only_at_the_most_similar(monkeypatch):
    import rau.methods.confidence as confidence

    seen = {}

    def fake_visibility(image, names):
        seen["names"] = names
        return {"1": 0.9, "2": 0.9, "3": 0.9, "5": 0.9, "6": 0.1, "7": 0.1}

    monkeypatch.setattr(confidence, "target_visibility", fake_visibility)
    image = np.zeros((8, 8), np.float32)
    ranked = ["a", "c", "d", "b"]
    assert choose_by_coverage(image, ranked, SEGMENTS.__getitem__) == ["b"]
    assert seen["names"] == ["1", "2", "3", "5", "6", "7"]
    assert choose_by_coverage(image, ranked, SEGMENTS.__getitem__, candidates=3) == ["a"]  # b is not among the 3
    assert choose_by_coverage(image, ranked, SEGMENTS.__getitem__, k=2, candidates=3) == ["a", "d"]


def test_eval_with_coverage_references_keeps_the_contract(folder_dataset, tmp_path):
    """On a dataset whose structures the visibility model never learnt, ``coverage`` picks the most similar
    reference, the same pairs as ``similar``; the report records the choice."""
    from typer.testing import CliRunner

    from rau.cli.app import app

    runner = CliRunner()
    docs = {}
    for choice in ("similar", "coverage"):
        out = tmp_path / f"{choice}.json"
        res = runner.invoke(app, ["eval", "--targets", str(folder_dataset), "--references", str(folder_dataset),
                                  "--method", "registration", "--limit", "2", "--reference-choice", choice,
                                  "--out", str(out), "--no-progress"])
        assert res.exit_code == 0, res.output
        docs[choice] = json.loads(out.read_text())
    assert docs["coverage"]["config"]["reference_choice"] == "coverage"
    assert docs["coverage"]["config"]["pairs"] == docs["similar"]["config"]["pairs"]
    res = runner.invoke(app, ["eval", "--targets", str(folder_dataset), "--references", str(folder_dataset),
                              "--method", "registration", "--reference-choice", "best", "--out", str(tmp_path / "x.json")])
    assert res.exit_code != 0 and "--reference-choice" in res.output and "coverage" in res.output


def test_localize_from_a_bank_by_coverage_takes_the_reference_covering_what_the_target_shows(folder_dataset, tmp_path,
                                                                                             monkeypatch):
    """The most similar bank entry lacks a structure the target shows and the others annotate: ``coverage``
    takes one of those, ``similar`` the most similar; a bad choice is one line and writes nothing."""
    from typer.testing import CliRunner

    import rau.methods.confidence as confidence
    from rau.cli.app import app
    from rau.data.dataset import load_dataset
    from rau.pipeline import localize_from_bank
    from rau.references.bank import build_bank

    ds = load_dataset(folder_dataset)
    bank = build_bank(ds, encoder="thumbnail", progress=False)
    target = ds.load(ds.entries[0])
    nearest = bank.search(target.image, 1)[0][0]
    (folder_dataset / "masks" / "square" / f"{nearest}.png").unlink()  # the most similar lacks "square"
    ds = load_dataset(folder_dataset)
    has_square = {e.id for e in ds.entries if "square" in e.structures} - {target.id}
    assert len(has_square) == 2 and nearest not in has_square
    monkeypatch.setattr(confidence, "target_visibility", lambda image, names: {n: 0.9 if n == "square" else 0.5 for n in names})
    similar = localize_from_bank(bank, target, method="registration", calibration="none")
    covered = localize_from_bank(bank, target, method="registration", calibration="none", reference_choice="coverage")
    assert similar.reference_id not in has_square and covered.reference_id in has_square
    assert "square" in covered.structures and "square" not in similar.structures
    with pytest.raises(Exception, match="--reference-choice"):
        localize_from_bank(bank, target, method="registration", reference_choice="best")
    from rau.batch import localize_many

    reference = ds.load(ds.entries[1])  # a given reference is not chosen: the same line as the CLI's, before any run
    with pytest.raises(Exception, match="--reference-choice: chooses among a --bank's references; with --reference"):
        localize_many(reference, [str(folder_dataset / "images")], method="registration", out_dir=tmp_path / "z",
                      reference_choice="coverage")
    assert not (tmp_path / "z").exists()
    path = tmp_path / "bank.npz"
    bank.save(path)
    image = folder_dataset / "images" / "case_0.png"
    res = CliRunner().invoke(app, ["localize", "--target", str(image), "--reference", str(image), "--reference-masks",
                                   str(folder_dataset / "masks"), "--reference-choice", "coverage", "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "--reference-choice" in res.output and not (tmp_path / "x").exists()
    res = CliRunner().invoke(app, ["localize", "--targets", str(folder_dataset / "images"), "--bank", str(path),
                                   "--reference-choice", "best", "--out", str(tmp_path / "y")])
    assert res.exit_code != 0 and "--reference-choice" in res.output
