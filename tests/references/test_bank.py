"""Reference bank: retrieval never returns the query itself, save/load, k-reference fusion, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from rau.references.bank import ReferenceBank, build_bank, fuse_results
from rau.cli.app import app
from rau.data.annotated import StructureResult, TargetResult
from rau.data.dataset import load_dataset
from rau.errors import CheckpointError, RauInputError

runner = CliRunner()


def test_search_never_returns_the_query_and_ranks_by_cosine(folder_dataset, tmp_path):
    bank = build_bank(folder_dataset, encoder="thumbnail", progress=False)
    assert len(bank) == 4 and np.allclose(np.linalg.norm(bank.vectors, axis=1), 1, atol=1e-5)
    ds = load_dataset(folder_dataset)
    for item in ds:
        hits = bank.search(item.image, k=3)
        assert item.id not in [h[0] for h in hits] and len(hits) == 3
        assert [s for _, s in hits] == sorted([s for _, s in hits], reverse=True)
    # the same pixels in another file are still excluded
    assert ds[0].id not in [h[0] for h in bank.search(ds[0].image.copy(), k=4 - 1)]
    with pytest.raises(RauInputError, match="k-references"):
        bank.search(ds[0].image, k=0)
    path = bank.save(tmp_path / "bank.npz")
    back = ReferenceBank.load(path)
    assert back.ids == bank.ids and back.encoder == "thumbnail" and np.array_equal(back.vectors, bank.vectors)
    assert back.dataset().entries[0].id == bank.ids[0]
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="rebuild"):
        ReferenceBank.load(tmp_path / "bad.npz")
    with pytest.raises(RauInputError, match="encoder"):
        build_bank(folder_dataset, encoder="nope", progress=False)


def test_fusion_is_a_majority_vote():
    a, b, c = (np.zeros((8, 8), bool) for _ in range(3))
    a[0:4, 0:4] = True
    b[0:4, 0:6] = True
    c[6:8, 6:8] = True
    results = [TargetResult("t", f"r{i}", "m", {"x": StructureResult("x", "yes", None, s, m)}, 1.0)
               for i, (m, s) in enumerate([(a, 0.9), (b, 0.6), (c, 0.3)])]
    fused = fuse_results(results)
    x = fused.structures["x"]
    assert np.array_equal(x.mask, a) and x.box_xyxy_px == (0, 0, 4, 4) and x.answer == "yes"
    assert abs(x.score - 0.6) < 1e-9 and fused.seconds == 3.0 and fused.reference_id == "r0+r1+r2"
    lonely = [TargetResult("t", "r", "m", {"x": StructureResult("x", "yes", None, 1.0, c)}),
              TargetResult("t", "q", "m", {"x": StructureResult("x")}),
              TargetResult("t", "p", "m", {})]
    assert fuse_results(lonely).structures["x"].mask is None
    assert fuse_results(results[:1]) is results[0]


def test_cli_index_eval_and_localize_with_bank(folder_dataset, tmp_path):
    bank = tmp_path / "bank.npz"
    res = runner.invoke(app, ["index", "--dataset", str(folder_dataset), "--out", str(bank), "--encoder", "thumbnail",
                              "--no-progress"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["eval", "--targets", str(folder_dataset), "--references", str(folder_dataset), "--out", str(out),
                              "--method", "registration", "--bank", str(bank), "--k-references", "2", "--limit", "2",
                              "--no-progress"])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["config"]["k_references"] == 2
    for pair in report["config"]["pairs"]:
        assert len(pair["reference"]) == 2 and pair["target"] not in pair["reference"]
    image = next((folder_dataset / "images").iterdir())
    res = runner.invoke(app, ["localize", "--target", str(image), "--bank", str(bank), "--out", str(tmp_path / "loc"),
                              "--method", "registration"])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "loc" / "result.json").read_text())
    assert image.stem not in doc["reference"]
    res = runner.invoke(app, ["localize", "--target", str(image), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--bank" in res.output and not (tmp_path / "x").exists()


def test_fit_threshold_and_abstention(folder_dataset, tmp_path):
    bank = build_bank(folder_dataset, encoder="thumbnail", progress=False)
    ds = load_dataset(folder_dataset)
    img = ds[0].image
    assert bank.fit(img, img) > 0.99
    t = bank.fit_threshold()
    assert -1.0 <= t <= 1.0
    path = bank.save(tmp_path / "bank.npz")
    target = tmp_path / "noise.png"
    from conftest import write_png

    write_png(target, np.random.default_rng(0).random((96, 96)).astype(np.float32))
    res = runner.invoke(app, ["localize", "--target", str(target), "--bank", str(path), "--out", str(tmp_path / "a"),
                              "--method", "registration", "--min-fit", "0.99"])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "a" / "result.json").read_text())
    assert all(s["answer"] == "no" and "fits" in s["reason"] for s in doc["structures"].values())
    res = runner.invoke(app, ["localize", "--target", str(target), "--bank", str(path), "--out", str(tmp_path / "b"),
                              "--min-fit", "lots"])
    assert res.exit_code == 2 and "--min-fit" in res.output
