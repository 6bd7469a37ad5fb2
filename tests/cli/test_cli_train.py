"""`rau` as one typer tool: the command list, every training under `rau train`, the shared error
contract (bad input -> one `error:` line, exit code 2, nothing written), the shared parsers, the
token-level evaluations end to end with tiny models, and no command module importing another."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from rau.cli.app import app
from rau.cli.common import parse_range, split_names, split_numbers, user_errors

runner = CliRunner()
TRAININGS = ("vlm", "chex-cache", "chex", "refvlm", "grpo", "seg-cache", "seg-head", "masktok", "unet",
             "memseg-cache", "memseg", "refine-cache", "refine", "laterality", "image-kind", "visibility")
CLI_DIR = Path(__file__).resolve().parents[2] / "src" / "rau" / "cli"


def one_error_line(res) -> str:
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def test_root_help_lists_every_command_group():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0, res.output
    for name in ("localize", "index", "methods", "eval", "report", "bench", "eval-tokens", "eval-chex-tokens",
                 "eval-unet", "eval-masktok", "drr", "train"):
        assert f" {name} " in res.output, name


def test_train_help_lists_every_training():
    res = runner.invoke(app, ["train", "--help"])
    assert res.exit_code == 0, res.output
    listed = {ln.strip("│ ").split(" ")[0] for ln in res.output.splitlines()}
    assert set(TRAININGS) <= listed


@pytest.mark.parametrize("args, arg", [
    (["--channels", "4,x"], "--channels"),
    (["--threads", "0"], "--threads"),
])
def test_train_masktok_bad_value_is_one_error_line(folder_dataset, tmp_path, args, arg):
    out = tmp_path / "tok"
    res = runner.invoke(app, ["train", "masktok", "--data", str(folder_dataset), "--out", str(out), "--no-progress", *args])
    assert one_error_line(res).startswith(f"error: {arg}")
    assert not out.exists()


@pytest.mark.parametrize("args, arg", [
    (["--structures", "blob", "--channels", "16,x"], "--channels"),
    ([], "--structures"),  # from scratch without --structures
    (["--structures", "blob", "--id-range", "x"], "--id-range"),
])
def test_train_unet_bad_value_is_one_error_line(folder_dataset, tmp_path, args, arg):
    out = tmp_path / "unet"
    res = runner.invoke(app, ["train", "unet", "--data", str(folder_dataset), "--out", str(out), "--no-progress", *args])
    assert one_error_line(res).startswith(f"error: {arg}")
    assert not out.exists()


def test_eval_masktok_bad_range_is_one_error_line(folder_dataset):
    res = runner.invoke(app, ["eval-masktok", "--data", str(folder_dataset), "--id-range", "1-2"])
    assert one_error_line(res).startswith("error: --id-range")


def test_shared_parsers():
    assert split_names(None) is None and split_names(" heart, left_lung ,") == ["heart", "left_lung"]
    assert parse_range("160:200", "--r") == slice(160, 200) and parse_range(":5", "--r") == slice(None, 5)
    assert split_numbers("0.6,0.4", "--w") == [0.6, 0.4] and split_numbers("16,32", "--c", int) == [16, 32]
    for call, arg in ((lambda: split_names(" , "), "--structures"), (lambda: parse_range("x", "--id-range"), "--id-range"),
                      (lambda: split_numbers("1,a", "--cache-weights"), "--cache-weights")):
        with pytest.raises(ValueError, match=arg):
            call()


@pytest.mark.parametrize("exc", [ValueError("bad\nsecond line"), FloatingPointError("loss is NaN"), FileNotFoundError("x")])
def test_user_errors_give_one_line_and_exit_2(exc, capsys):
    from rau.errors import CheckpointError

    with pytest.raises(typer.Exit) as info, user_errors():
        raise exc
    assert info.value.exit_code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "second line" not in err
    with pytest.raises(typer.Exit), user_errors():
        raise CheckpointError("resume: truncated")
    with pytest.raises(KeyError), user_errors():  # a bug is not a user error: it propagates
        raise KeyError("x")


def test_command_modules_import_only_common():
    """No import cycles: command modules share rau.cli.common and never import each other."""
    for path in CLI_DIR.glob("*.py"):
        if path.name in ("__init__.py", "app.py", "common.py"):
            continue
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names)
        assert {m for m in imported if m.startswith("rau.cli")} <= {"rau.cli.common"}, path.name


def _refvlm_cache(n: int, seed: int, names: list[str]):
    from rau.data.caches import TokenCache

    rng = np.random.default_rng(seed)
    feats = rng.normal(0, 0.1, (n, 8, 4, 4)).astype(np.float16)
    loc = np.full((n, len(names), 4), -1, np.int64)
    codes = np.full((n, len(names), 16), -1, np.int64)
    for i in range(n):
        for j in range(len(names)):
            r, c = rng.integers(0, 3, 2)
            loc[i, j] = [r * 256, c * 256, (r + 2) * 256 - 1, (c + 2) * 256 - 1]
            codes[i, j] = (np.arange(16) + j) % 512
    return TokenCache(feats, loc, codes, [f"img{i}" for i in range(n)], names, {})


TINY = dict(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=64, feature_dim=8, grid=4)


def test_eval_tokens_end_to_end(tmp_path, one_torch_thread):
    from rau.data.caches import save_cache
    from rau.models.refvlm.modeling import build_model

    model = build_model(seed=0, **TINY).save_pretrained(tmp_path / "m")
    save_cache(_refvlm_cache(4, 0, ["a", "b"]), tmp_path / "r.npz")
    save_cache(_refvlm_cache(2, 1, ["a", "b"]), tmp_path / "t.npz")
    out = tmp_path / "tok.json"
    res = runner.invoke(app, ["eval-tokens", "--model", str(model), "--references", str(tmp_path / "r.npz"),
                              "--targets", str(tmp_path / "t.npz"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["n_targets"] == 2 and "id acc" in res.output
    bad = runner.invoke(app, ["eval-tokens", "--model", str(tmp_path / "missing"), "--references", str(tmp_path / "r.npz"),
                              "--targets", str(tmp_path / "t.npz")])
    one_error_line(bad)


def test_eval_chex_tokens_end_to_end(tmp_path, one_torch_thread):
    from rau.data.caches import save_cache
    from rau.models.chex.modeling import build_model

    model = build_model(["left_lung", "heart"], seed=0, **TINY).save_pretrained(tmp_path / "m")
    save_cache(_refvlm_cache(2, 0, ["left_lung", "heart"]), tmp_path / "c.npz")
    out = tmp_path / "naming.json"
    res = runner.invoke(app, ["eval-chex-tokens", "--model", str(model), "--cache", str(tmp_path / "c.npz"),
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["images"] == 2 and doc["command"].startswith("rau ") and set(doc["per_structure"]) == {"left_lung", "heart"}


def test_train_masktok_then_eval_masktok(folder_dataset, tmp_path, one_torch_thread, monkeypatch):
    out = tmp_path / "tok"
    args = ["train", "masktok", "--data", str(folder_dataset), "--out", str(out), "--steps", "2", "--batch-size", "4",
            "--channels", "4,4,4,4", "--codebook-size", "8", "--code-dim", "4", "--no-progress"]
    monkeypatch.setattr("sys.argv", ["rau", *args])
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    info = json.loads((out / "final" / "training.json").read_text())
    assert info["command"] == "rau " + " ".join(args)  # the run records the command that made it
    scores = tmp_path / "roundtrip.json"
    res = runner.invoke(app, ["eval-masktok", "--tokenizer", str(out), "--data", str(folder_dataset), "--id-range", "0:2",
                              "--out", str(scores), "--no-progress"])
    assert res.exit_code == 0, res.output
    doc = json.loads(scores.read_text())
    assert doc["images"] == 2 and set(doc["per_structure"]) == {"blob", "square"}


def test_train_unet_then_eval_unet(folder_dataset, tmp_path, one_torch_thread):
    out = tmp_path / "unet"
    res = runner.invoke(app, ["train", "unet", "--data", str(folder_dataset), "--out", str(out), "--structures", "blob,square",
                              "--steps", "2", "--batch-size", "2", "--image-size", "32", "--channels", "4,4,4,4,4,4",
                              "--id-range", "0:3", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert (out / "final" / "config.json").is_file()
    scores = tmp_path / "eval.json"
    res = runner.invoke(app, ["eval-unet", "--checkpoint", str(out), "--data", str(folder_dataset), "--id-range", "3:4",
                              "--out", str(scores), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "mean_dice" in res.output and json.loads(scores.read_text())["per_structure"]


def test_memseg_cache_then_one_training_step_end_to_end(folder_dataset, tmp_path, one_torch_thread):
    """rau train memseg-cache (a held-out structure left out) -> rau train memseg (grid 16, 1 step)."""
    cache = tmp_path / "m.npz"
    res = runner.invoke(app, ["train", "memseg-cache", "--data", str(folder_dataset), "--out", str(cache),
                              "--exclude", "square", "--no-progress"])
    assert res.exit_code == 0, res.output
    from rau.training.recipes.memseg import load_memseg_cache

    assert "square" not in load_memseg_cache(cache).names
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", "memseg", "--cache", str(cache), "--output-dir", str(run), "--steps", "1",
                              "--batch-size", "1", "--grid", "16", "--memory-layers", "1", "--save-every", "1",
                              "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert (run / "final" / "model.safetensors").is_file() and (run / "checkpoint-1" / "state.json").is_file()


def test_memseg_bad_grid_is_one_error_line(tmp_path):
    res = runner.invoke(app, ["train", "memseg", "--cache", str(tmp_path / "none.npz"), "--output-dir",
                              str(tmp_path / "r"), "--grid", "48", "--no-progress"])
    assert one_error_line(res).startswith("error: grid")


@pytest.mark.parametrize("training", ["laterality", "image-kind", "visibility"])
def test_train_checks_bad_value_is_one_error_line(tmp_path, training):
    res = runner.invoke(app, ["train", training, "--output-dir", str(tmp_path / "run"), "--drr-dir",
                              str(tmp_path / "drr"), "--steps", "0"])
    assert "--steps" in one_error_line(res)
    assert not (tmp_path / "run").exists() and not (tmp_path / "drr").exists()
