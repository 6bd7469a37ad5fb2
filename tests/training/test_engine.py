"""The one training engine: schedule, checkpoint format, resume after a kill, refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rau.errors import CheckpointError, RauInputError
from rau.training.checkpoints import checkpoints, model_folder
from rau.training.engine import run_training
from rau.training.schedule import lr_at


def test_lr_schedule_warms_up_then_decays_to_its_floor():
    assert lr_at(0, 100, 1.0, warmup=10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, warmup=10) == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, warmup=10) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, warmup=10, min_ratio=0.05) == pytest.approx(0.05)
    mid = lr_at(55, 100, 1.0, warmup=10)
    assert mid == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(80, 100, 1.0, schedule="constant") == 1.0
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, 10, 1.0, schedule="linear")


class TinyModel:
    """The engine's model protocol on a 3 -> 1 linear layer."""

    def __init__(self, seed: int = 0):
        import torch

        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
        self.device = "cpu"
        self.config = {"width": 8}

    def config_dict(self) -> dict:
        return dict(self.config)

    def weights_bytes(self) -> bytes:
        from safetensors.torch import save

        return save({k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()})

    def load_weights(self, path: Path, what: str = "checkpoint") -> None:
        from safetensors.torch import load_file

        self.net.load_state_dict(load_file(str(path)))

    def save_pretrained(self, folder: Path, training: dict | None = None) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.safetensors").write_bytes(self.weights_bytes())
        (folder / "config.json").write_text(json.dumps(self.config))
        (folder / "training.json").write_text(json.dumps(training or {}))
        return folder


def _step_loss(net, step, acc):
    import numpy as np
    import torch

    rng = np.random.default_rng([0, step])  # step s's batch from (seed, s) alone
    x = torch.as_tensor(rng.normal(size=(16, 3)), dtype=torch.float32)
    y = x.sum(1, keepdim=True)
    return torch.nn.functional.mse_loss(net(x), y)


def _train(out: Path, steps: int = 6, **kw) -> Path:
    return run_training(TinyModel(), out, {"kind": "tiny", "steps": steps}, _step_loss, steps=steps, lr=1e-2,
                        save_every=2, log_every=2, device="cpu", progress=False, command="test", **kw)


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_a_killed_run_resumes_to_the_same_weights_in_the_one_folder_format(tmp_path, one_torch_thread):
    import torch

    whole = _train(tmp_path / "whole")

    def kill(done, record):
        if done == 3:
            raise KeyboardInterrupt  # a kill after the step-2 checkpoint, mid-way to step 4

    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "killed", on_step=kill)
    assert [s for s, _ in checkpoints(tmp_path / "killed")] == [2] and not (tmp_path / "killed" / "final").exists()
    resumed = _train(tmp_path / "killed")
    a, b = _weights(whole), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # dropout RNG restored too
    run = tmp_path / "killed"
    assert [s for s, _ in checkpoints(run)] == [4, 6]  # the last two kept
    ckpt = run / "checkpoint-6"
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "optimizer.pt", "rng.pt", "config.json", "state.json"}
    history = json.loads((run / "loss.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6] and (run / "loss.png").is_file()
    assert json.loads((run / "config.json").read_text())["command"] == "test"
    assert model_folder(run) == run / "final" and model_folder(run / "final") == run / "final"


def test_stop_after_ends_a_stage_of_the_schedule_and_a_later_call_finishes_it(tmp_path, one_torch_thread):
    import torch

    whole = _train(tmp_path / "whole")
    stage = _train(tmp_path / "staged", stop_after=3)  # not a multiple of save_every: saved anyway
    assert stage == tmp_path / "staged" / "checkpoint-3" and not (tmp_path / "staged" / "final").exists()
    finished = _train(tmp_path / "staged")
    a, b = _weights(whole), _weights(finished)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_other_settings_and_truncated_checkpoints_are_refused(tmp_path, one_torch_thread):
    _train(tmp_path / "r", steps=4)
    with pytest.raises(RauInputError, match="other settings"):
        _train(tmp_path / "r", steps=6)
    opt = tmp_path / "r" / "checkpoint-4" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="truncated"):
        _train(tmp_path / "r", steps=4)


def test_bad_loop_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="steps"):
        run_training(TinyModel(), tmp_path, {}, _step_loss, steps=0, lr=1e-2, device="cpu", progress=False)
    with pytest.raises(ValueError, match="device"):
        run_training(TinyModel(), tmp_path, {}, _step_loss, steps=1, lr=1e-2, device="tpu", progress=False)


def test_a_setting_added_later_as_none_still_resumes_an_older_run(tmp_path, one_torch_thread):
    def kill(done, record):
        if done == 3:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_training(TinyModel(), out, {"kind": "tiny", "config": {"a": 1}}, _step_loss, steps=6, lr=1e-2,
                     save_every=2, device="cpu", progress=False, on_step=kill)
    later = {"kind": "tiny", "new": None, "config": {"a": 1, "b": None}}  # new settings, off
    assert (run_training(TinyModel(), out, later, _step_loss, steps=6, lr=1e-2, save_every=2, device="cpu",
                         progress=False) == out / "final")
    with pytest.raises(RauInputError, match="differs in: config"):
        run_training(TinyModel(), out, {"kind": "tiny", "config": {"a": 1, "b": 2}}, _step_loss, steps=8, lr=1e-2,
                     save_every=2, device="cpu", progress=False)
