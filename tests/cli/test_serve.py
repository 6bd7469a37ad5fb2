"""`rau serve`: the viewer's request as a pure call, one request through the running app
(gradio_client on localhost), bad input -> one error line, and the command without gradio."""

import json
import socket
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from rau.cli.app import app as cli

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "chest_xray"
STRUCTURES = ["heart", "left_lung", "right_lung"]


@pytest.fixture(scope="module")
def cache():
    """One method cache for the module: registration is built once."""
    pytest.importorskip("gradio")
    from rau.serve import MethodCache

    return MethodCache()


@pytest.fixture(scope="module")
def client(cache, tmp_path_factory):
    """The app running in this process on a free localhost port, and a gradio_client on it."""
    from gradio_client import Client

    from rau.serve import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # min_confidence 0: these tests check the plumbing, so every output is kept
    app = build_app(method="registration", out_root=tmp_path_factory.mktemp("serve"), cache=cache, min_confidence=0)
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        app.close()


def _run(client, target: Path, formats=("coco",)):
    from gradio_client import handle_file

    from rau.serve import SOURCE_UPLOAD

    masks = [handle_file(str(p)) for p in sorted((SAMPLE / "reference_masks").glob("*.png"))]
    return client.predict(SOURCE_UPLOAD, handle_file(str(SAMPLE / "reference.png")), masks, handle_file(str(target)),
                          "registration", list(formats), api_name="/run")


def test_run_request_on_the_sample(cache, tmp_path):
    from rau.serve import TABLE_HEADERS, load_sample_reference, run_request

    overlay, rows, files = run_request(load_sample_reference(), SAMPLE / "target.png", "registration",
                                       formats=["nifti", "coco"], out_dir=tmp_path / "out", cache=cache, min_confidence=0)
    w, h = Image.open(SAMPLE / "target.png").size
    assert overlay.shape == (h, w, 3) and overlay.dtype == np.uint8
    assert [r[0] for r in rows] == STRUCTURES and all(len(r) == len(TABLE_HEADERS) for r in rows)
    box = TABLE_HEADERS.index("box_xyxy_px")
    assert all(r[2] is True and r[box].count(",") == 3 for r in rows)  # found, with an x0, y0, x1, y1 box
    names = {p.name for p in files}
    assert {"result.json", "masks.zip", "overlay.png", "labels.nii.gz", "coco.json"} <= names
    assert all(p.is_file() for p in files)
    assert set(json.loads((tmp_path / "out" / "result.json").read_text())["structures"]) == set(STRUCTURES)
    assert sorted(zipfile.ZipFile(tmp_path / "out" / "masks.zip").namelist()) == [f"masks/{n}.png" for n in STRUCTURES]
    # all structures shown: the very picture `rau localize` writes as overlay.png
    assert np.array_equal(overlay, np.asarray(Image.open(tmp_path / "out" / "overlay.png").convert("RGB")))


def test_toggles_redraw_without_rerunning(cache, tmp_path):
    from rau.data.io import load_annotated
    from rau.render import to_rgb
    from rau.serve import load_sample_reference, localize_request, render_overlay

    target = load_annotated(SAMPLE / "target.png")
    outcome = localize_request(load_sample_reference(), target, "registration", out_dir=tmp_path / "o", cache=cache,
                               min_confidence=0)
    assert len(cache) == 1  # built once for the whole module
    assert np.array_equal(render_overlay(outcome.result, target, []), to_rgb(target.image))
    heart_only = render_overlay(outcome.result, target, ["heart"])
    everything = render_overlay(outcome.result, target)
    assert not np.array_equal(heart_only, everything)
    x0, y0, x1, y1 = (int(v) for v in outcome.result.structures["heart"].box_xyxy_px)
    lung = outcome.result.structures["left_lung"].mask.copy()
    lung[max(0, y0 - 4): y1 + 4, max(0, x0 - 4): x1 + 4] = False  # away from the heart's box and name
    assert lung.sum() > 1000
    assert np.array_equal(heart_only[lung], to_rgb(target.image)[lung])  # hidden: the target's own pixels


def test_one_request_through_the_running_app(client):
    status, overlay, toggles, table, result_json, masks_zip, exports = _run(client, SAMPLE / "target.png")
    assert status.startswith("registration: 3/3 structures found")
    w, h = Image.open(SAMPLE / "target.png").size
    assert Image.open(overlay).size == (w, h)
    assert toggles["value"] == STRUCTURES
    assert [row[0] for row in table["data"]] == STRUCTURES
    assert set(json.loads(Path(result_json["value"]).read_text())["structures"]) == set(STRUCTURES)
    assert zipfile.is_zipfile(masks_zip["value"])
    assert sorted(Path(p).name for p in exports) == ["coco.json", "overlay.png"]


def test_bad_input_is_one_error_line(client, tmp_path, cache):
    from rau.errors import RauInputError
    from rau.serve import load_sample_reference, run_request

    corrupt = tmp_path / "target.png"
    corrupt.write_bytes(b"\x89PNG not really")
    status, overlay, toggles, table, *_ = _run(client, corrupt)
    assert status.startswith("error: target: cannot read target.png as an image") and "\n" not in status
    assert overlay is None and table["data"] == [] and toggles["choices"] == []
    status, *_ = _run(client, SAMPLE / "target.png", formats=["dicom-seg"])  # refused before the method runs
    assert status.startswith("error: export formats: dicom-seg needs a DICOM target") and "\n" not in status
    with pytest.raises(RauInputError, match="target: cannot read"):
        run_request(load_sample_reference(), corrupt, "registration", out_dir=tmp_path / "o", cache=cache)
    assert not (tmp_path / "o").exists()


def test_serve_without_gradio_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    res = CliRunner().invoke(cli, ["serve", "--port", "7999"])
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1
    assert lines[0].startswith("error: ") and "pip install 'rau[serve]'" in lines[0]


def test_the_table_notes_a_mask_copied_from_the_reference():
    from rau.data.annotated import StructureResult, TargetResult
    from rau.serve import TABLE_HEADERS, table_rows

    mask = np.ones((4, 4), bool)
    result = TargetResult("t", "r", "sam2-memory", {"clavicle": StructureResult("clavicle", "yes", (0, 0, 4, 4), 0.8, mask, copied=True),
                                                     "heart": StructureResult("heart", "yes", (0, 0, 4, 4), 0.9, mask)})
    note = TABLE_HEADERS.index("note")
    rows = {r[0]: r for r in table_rows(result)}
    assert rows["clavicle"][note].startswith("copied from the reference") and rows["heart"][note] == ""


def test_the_status_line_notes_refiner_masks_on_an_angiogram():
    """The default's result on a target read as an angiogram (its outputs carry ``second_opinion``) gets the note
    `rau localize` prints, unless its memory masks were delivered; other results get none."""
    from rau.data.annotated import StructureResult, TargetResult
    from rau.serve import Outcome, status_line

    mask = np.ones((4, 4), bool)

    def line(method, features, refiner_masks=True):
        result = TargetResult("t", "r", method, {"5": StructureResult("5", "yes", (0, 0, 4, 4), 0.8, mask, features=features)})
        return status_line(Outcome(result, None, Path(".")), refiner_masks)

    assert "reads as a coronary angiogram" in line("reg-refine", {"second_opinion": 0.4})
    assert "angiogram" not in line("reg-refine", {"second_opinion": 0.4}, refiner_masks=False)
    assert "angiogram" not in line("reg-refine", {"fit": 0.9}) and "angiogram" not in line("sam2-memory", {"second_opinion": 0.4})
    assert line("registration", None).startswith("registration: 1/1 structures found")


def test_the_reference_choice_is_checked_at_start_and_reaches_the_bank(cache, tmp_path, monkeypatch):
    import rau.pipeline
    from rau.errors import RauInputError
    from rau.serve import build_app, localize_request

    with pytest.raises(RauInputError, match="--reference-choice: expected one of similar, coverage, got 'best'"):
        build_app(method="registration", out_root=tmp_path / "a", cache=cache, reference_choice="best")
    with pytest.raises(RauInputError, match="--reference-choice: chooses among a --bank's references"):
        build_app(method="registration", out_root=tmp_path / "b", cache=cache, reference_choice="coverage")
    res = CliRunner().invoke(cli, ["serve", "--reference-choice", "coverage"])
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert res.exit_code == 2 and lines == ["error: --reference-choice: chooses among a --bank's references; "
                                            "start `rau serve --bank BANK.npz`"]
    seen = {}

    def fake_bank_run(bank, target, **kw):  # what the viewer hands localize_from_bank
        seen.update(kw)
        raise RauInputError("stop here")

    monkeypatch.setattr(rau.pipeline, "localize_from_bank", fake_bank_run)
    with pytest.raises(RauInputError, match="stop here"):
        localize_request(object(), SAMPLE / "target.png", "registration", cache=cache, out_dir=tmp_path / "o",
                         reference_choice="coverage")
    assert seen["reference_choice"] == "coverage"
