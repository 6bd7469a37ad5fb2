"""SFT of the localizer (`rau train vlm`) on a tiny random Qwen2.5-VL, on CPU.

Checks the training contract rather than quality: a tiny model overfits a few pairs, a run killed
and resumed on the engine ends with exactly the weights of the uninterrupted run, LoRA trains only
its adapter, broken or mismatched checkpoints fail in one line, the CLI writes final/ and loss.png,
and final/ loads in QwenLocalizer.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from conftest import synthetic_pair, write_png  # noqa: E402
from rau import AnnotatedImage, CheckpointError, RauInputError  # noqa: E402
from rau.data.dataset import load_dataset  # noqa: E402
from rau.geometry import mask_to_box  # noqa: E402
from rau.data.pairs import AugmentConfig, PairSampler, transform_box  # noqa: E402
from rau.training.recipes.qwen_sft import TrainConfig, train  # noqa: E402
from rau.training.schedule import lr_at  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),  # inside peft
    pytest.mark.usefixtures("one_torch_thread"),  # conftest: each step is ~50x slower on two busy threads
]

SMALL = 56 * 56  # 4 image tokens per image: steps take ~0.1 s on one core


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tiny_qwen import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_sft"), seed=0)


def write_dataset(root, specs):
    """specs: (shape, shift, structures kept) per image -> folder dataset at root."""
    for i, (shape, shift, keep) in enumerate(specs):
        img, masks = synthetic_pair(shape, shift)
        write_png(root / "images" / f"case_{i}.png", img)
        for name in keep:
            write_png(root / "masks" / name / f"case_{i}.png", masks[name])
    return root


@pytest.fixture(scope="module")
def two_images(tmp_path_factory):
    both = ("blob", "square")
    return write_dataset(tmp_path_factory.mktemp("two") / "ds", [((96, 96), (0, 0), both), ((100, 90), (-3, 5), both)])


def config(checkpoint, datasets, out, **kw) -> TrainConfig:
    base = dict(model=str(checkpoint), datasets=[str(d) for d in datasets], output_dir=str(out), max_pixels=SMALL,
                device="cpu", save_every=4, log_every=2)
    return TrainConfig(**{**base, **kw})


def history(out) -> list[dict]:
    return json.loads((out / "loss.json").read_text())["history"]


# ------------------------------------------------------------------ pairs (no torch)
def test_pair_sampler_is_deterministic_and_pairs_within_a_dataset(folder_dataset, tmp_path):
    other = write_dataset(tmp_path / "other", [((96, 96), (0, 0), ("blob", "square")), ((96, 96), (3, 3), ("blob",))])
    datasets = [load_dataset(folder_dataset), load_dataset(other)]
    sampler = PairSampler(datasets, seed=5)
    records = [sampler.sample(i).record for i in range(60)]
    assert records == [PairSampler(datasets, seed=5).sample(i).record for i in range(60)]
    assert records != [PairSampler(datasets, seed=6).sample(i).record for i in range(60)]
    for r in records:
        assert r["reference_id"] != r["target_id"]
        ids = {e.id for e in datasets[r["dataset"]].entries}
        assert {r["reference_id"], r["target_id"]} <= ids
    assert {r["dataset"] for r in records} == {0, 1}
    # other/case_1 lacks "square": drawn as a target with that structure, the answer is "not visible".
    absent = [r for r in records if r["dataset"] == 1 and r["structure"] == "square"]
    assert absent and all(not r["visible"] for r in absent)
    with pytest.raises(RauInputError, match="datasets"):
        PairSampler([datasets[0].subset(["case_0"])])


def test_augmentation_moves_masks_with_pixels(folder_dataset):
    sampler = PairSampler([load_dataset(folder_dataset)], seed=1, augment=AugmentConfig())
    plain = PairSampler([load_dataset(folder_dataset)], seed=1)
    for i in range(6):
        pair, orig = sampler.sample(i), plain.sample(i)
        a = pair.record["augment"]
        assert pair.record["target_id"] == orig.record["target_id"] and pair.target.shape == orig.target.shape
        moved = transform_box(mask_to_box(orig.target.masks[pair.structure]), orig.target.shape, a["scale"], a["shift_px"])
        assert np.allclose(mask_to_box(pair.target.masks[pair.structure]), moved, atol=1.5)
        assert pair.target.meta["augment"] == a and 0.0 <= pair.target.image.min() <= pair.target.image.max() <= 1.0


def test_config_errors_name_the_field(tmp_path):
    good = dict(model="m", datasets=["d"], output_dir="o")
    for field, value in [("lr", 0), ("max_steps", 0), ("batch_size", 1.5), ("lora", "yes"), ("lora_targets", "q proj"),
                         ("device", "cuda:1"), ("max_pixels", 10), ("lr_schedule", "linear"), ("lora_dropout", 1.0)]:
        with pytest.raises(RauInputError, match=f"^{field}:"):
            TrainConfig(**good, **{field: value})
    with pytest.raises(RauInputError, match="unknown fields"):
        TrainConfig.from_dict({**good, "learning_rate": 1e-4})
    with pytest.raises(RauInputError, match="--dataset"):
        TrainConfig.from_dict({"model": "m", "output_dir": "o"})
    with pytest.raises(RauInputError, match="^decay_steps: the cosine ends at max_steps"):
        TrainConfig(**good, max_steps=10, decay_steps=20)
    assert TrainConfig(**good, max_steps=10, decay_steps=20, lr_schedule="constant").decay_steps == 20
    # The engine's schedule: warm-up (s + 1) / warmup, cosine to 10 % at max_steps.
    assert lr_at(0, 10, 1.0, warmup=2) == 0.5 and lr_at(2, 10, 1.0, warmup=2) == 1.0
    assert lr_at(10, 10, 1.0, warmup=2) == pytest.approx(0.1)
    # The resume key: max_steps may grow under the constant schedule only.
    cosine, constant = TrainConfig(**good), TrainConfig(**good, lr_schedule="constant")
    assert cosine.run_key({})["max_steps"] == 1000 and constant.run_key({})["max_steps"] is None
    assert "output_dir" not in cosine.run_key({}) and cosine.run_key({})["lr"] == 1e-4


# ------------------------------------------------------------------ (a) overfit
def test_tiny_model_overfits_a_few_pairs(checkpoint, two_images, tmp_path):
    out = tmp_path / "overfit"
    summary = train(config(checkpoint, [two_images], out, max_steps=30, lora=False, lr=3e-3, lr_schedule="constant",
                           save_every=100, log_every=10), progress=False)
    losses = [h["loss"] for h in history(out)]
    assert len(losses) == 30 and summary["trained_steps"] == 30
    assert np.mean(losses[-5:]) < 0.5 * losses[0], losses  # 2 images x 2 structures = 4 pairs
    assert (out / "loss.png").stat().st_size > 0
    assert not (out / "final" / "adapter").exists()  # full fine-tuning: final/ is the model itself


# ------------------------------------------------------------------ (b) kill / resume
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_killed_run_resumes_to_the_same_weights(checkpoint, folder_dataset, tmp_path, lora):
    from safetensors.torch import load_file

    # Batches of 2 with 2 micro-batches: exercises collate + the engine's accumulate; dropout and
    # augmentation exercise the RNG state and the (seed, index) sampler; cosine with warm-up.
    kw = dict(lora=lora, lr=1e-2 if lora else 2e-3, warmup_steps=1, batch_size=2, grad_accum=2, augment=True,
              lora_dropout=0.1, max_steps=4, save_every=2, log_every=1)
    a, b = tmp_path / "a", tmp_path / "b"
    first = train(config(checkpoint, [folder_dataset], a, **kw), progress=False)
    assert first["resumed_from"] is None and first["trained_steps"] == 4

    def kill(step, net, loss):  # after step 3: checkpoint-2 is the latest
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(checkpoint, [folder_dataset], b, **kw), progress=False, on_step=kill)
    assert sorted(p.name for p in b.glob("checkpoint-*")) == ["checkpoint-2"] and not (b / "final").exists()
    (b / ".tmp-checkpoint-4").mkdir()  # a checkpoint half-written by the kill
    resumed = train(config(checkpoint, [folder_dataset], b, **kw), progress=False)
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["start_step"] == 2
    assert resumed["trained_steps"] == 2 and not (b / ".tmp-checkpoint-4").exists()

    wa, wb = load_file(str(a / "checkpoint-4" / "model.safetensors")), load_file(str(b / "checkpoint-4" / "model.safetensors"))
    assert set(wa) == set(wb) and all(("lora_" in k) == lora for k in wa)
    assert all(wa[k].equal(wb[k]) for k in wa), [k for k in wa if not wa[k].equal(wb[k])]
    ha, hb = history(a), history(b)
    assert [h["step"] for h in hb] == [1, 2, 3, 4]
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb] and [h["lr"] for h in ha] == [h["lr"] for h in hb]
    assert sorted(p.name for p in b.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (b / "final" / "adapter").is_dir() == lora


# ------------------------------------------------------------------ (c) LoRA
@pytest.fixture(scope="module")
def lora_run(checkpoint, two_images, tmp_path_factory):
    """3 LoRA steps, watching the model after each update: (out dir, watch dict)."""
    out = tmp_path_factory.mktemp("lora") / "run"
    watch: dict = {"grad": {}, "base": []}

    def on_step(step, model, loss):
        for name, p in model.named_parameters():
            if p.requires_grad:
                hit = p.grad is not None and bool(p.grad.abs().sum() > 0)
                watch["grad"][name] = watch["grad"].get(name, False) or hit
        watch["base"].append({n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad})

    train(config(checkpoint, [two_images], out, max_steps=3, lr=1e-2, weight_decay=0.0), progress=False,
          on_step=on_step)
    return out, watch


def test_lora_trains_only_the_adapter(lora_run, checkpoint):
    from rau.methods.qwen import QwenLocalizer

    out, watch = lora_run
    trainable = watch["grad"]
    assert trainable and all("lora_" in n and "visual" not in n for n in trainable)
    assert all(trainable.values()), [n for n, hit in trainable.items() if not hit]  # gradients reach all
    first, last = watch["base"][0], watch["base"][-1]
    assert all(first[n].equal(last[n]) for n in first)
    # ... and equal to the checkpoint it started from (peft names: base_model.model.X.base_layer.W).
    original = dict(QwenLocalizer(checkpoint).model.named_parameters())
    for name, value in last.items():
        plain = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        assert value.equal(original[plain]), name
    state = json.loads((out / "checkpoint-3" / "state.json").read_text())
    assert state["step"] == 3 and len(state["history"]) == 3


# ------------------------------------------------------------------ (d) broken checkpoints
def test_corrupted_or_mismatched_checkpoint_raises(checkpoint, folder_dataset, tmp_path):
    out = tmp_path / "run"
    kw = dict(lr_schedule="constant", save_every=2)  # constant: max_steps may grow on resume
    train(config(checkpoint, [folder_dataset], out, max_steps=4, **kw), progress=False)
    longer = config(checkpoint, [folder_dataset], out, max_steps=6, **kw)

    with pytest.raises(RauInputError, match=r"differs in: lr\)") as info:
        train(config(checkpoint, [folder_dataset], out, max_steps=6, lr=1e-3, lr_schedule="constant"), progress=False)
    assert "\n" not in str(info.value)
    with pytest.raises(RauInputError, match="differs in: lr_schedule, max_steps"):
        train(config(checkpoint, [folder_dataset], out, max_steps=6), progress=False)  # cosine now
    with pytest.raises(RauInputError, match="max_steps"):
        train(config(checkpoint, [folder_dataset], out, max_steps=3, **kw), progress=False)

    optimizer = out / "checkpoint-4" / "optimizer.pt"
    data = optimizer.read_bytes()
    optimizer.write_bytes(data[: len(data) // 2])  # a kill mid-copy, a full disk...
    with pytest.raises(CheckpointError, match="checkpoint-4 is incomplete or truncated") as info:
        train(longer, progress=False)
    assert "\n" not in str(info.value)
    optimizer.write_bytes(b"\0" * len(data))  # same size, garbage: caught when loading
    with pytest.raises(CheckpointError, match="cannot load .*checkpoint-4"):
        train(longer, progress=False)
    assert not (out / "checkpoint-6").exists()  # never silently restarted
    optimizer.write_bytes(data)  # repaired: the constant-schedule run extends to 6 steps
    assert train(longer, progress=False)["start_step"] == 4 and (out / "checkpoint-6").is_dir()


# ------------------------------------------------------------------ (e) CLI, (f) final/ loads
def test_cli_train_vlm_end_to_end(checkpoint, folder_dataset, tmp_path):
    from rau.cli.app import app

    out = tmp_path / "cli_run"
    options = tmp_path / "options.json"
    options.write_text(json.dumps({"model": str(checkpoint), "datasets": [str(folder_dataset)], "max_pixels": SMALL,
                                   "max_steps": 50}))
    runner = CliRunner()
    res = runner.invoke(app, ["train", "vlm", "--config", str(options), "--output-dir", str(out), "--max-steps", "2",
                              "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert (out / "final" / "model.safetensors").is_file() and (out / "loss.png").stat().st_size > 0
    assert (out / "final" / "adapter" / "adapter_config.json").is_file()
    doc = json.loads((out / "config.json").read_text())
    assert doc["kind"] == "qwen-sft" and doc["command"].startswith("rau ")
    assert doc["max_steps"] == 2 and len(history(out)) == 2  # max_steps: CLI beats --config
    again = TrainConfig.from_dict({**doc, "output_dir": str(out)})  # a run's config.json as --config
    assert again.max_steps == 2 and again.model == str(checkpoint.resolve()) and again.max_pixels == SMALL

    bad = runner.invoke(app, ["train", "vlm", "--config", str(options), "--output-dir", str(tmp_path / "x"),
                              "--lr", "-1"])
    assert bad.exit_code == 2 and bad.output.strip().splitlines() == ["error: lr: expected a number > 0.0, got -1.0"]
    missing = runner.invoke(app, ["train", "vlm", "--model", str(checkpoint), "--output-dir", str(tmp_path / "y")])
    assert missing.exit_code == 2 and "--dataset" in missing.output


def test_final_folder_loads_and_localizes(lora_run, checkpoint):
    from rau.methods.qwen import QwenLocalizer

    out, _ = lora_run
    final = out / "final"
    training = json.loads((final / "training.json").read_text())
    assert training["lora_merged"] is True and training["step"] == 3
    img, masks = synthetic_pair((96, 96))
    reference = AnnotatedImage(img, masks, {"id": "ref"})
    target = AnnotatedImage(*synthetic_pair((100, 90), (-3, 5)), {"id": "tgt"})
    merged = QwenLocalizer(final, max_new_tokens=8)
    assert set(merged.localize(reference, target, ["blob", "square"])) == {"blob", "square"}
    # The same weights as base + unmerged adapter (merged in fp32 here, so equal up to rounding).
    import torch

    with_adapter = QwenLocalizer(checkpoint, lora=final / "adapter")
    a, b = dict(merged.model.named_parameters()), dict(with_adapter.model.named_parameters())
    assert set(a) == set(b) and all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)


def test_import_is_light():
    import subprocess
    import sys

    heavy = "('torch', 'transformers', 'peft', 'accelerate', 'matplotlib')"
    code = f"import sys, rau.cli.app, rau.training.recipes.qwen_sft, rau.models.qwen, rau.data.pairs; print([m for m in {heavy} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------ the engine's accumulate option
class _Linear:
    """The engine's model protocol around a tiny torch.nn.Linear (no Qwen involved)."""

    def __init__(self):
        import torch

        torch.manual_seed(0)
        self.net, self.device = torch.nn.Linear(3, 1), "cpu"

    def config_dict(self):
        return {"in": 3}

    def weights_bytes(self):
        from safetensors.torch import save

        return save({k: v.detach().contiguous() for k, v in self.net.state_dict().items()})

    def load_weights(self, path, what="checkpoint"):
        from safetensors.torch import load_file

        self.net.load_state_dict(load_file(str(path)))

    def save_pretrained(self, folder, training=None):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.safetensors").write_bytes(self.weights_bytes())


def test_engine_accumulate_equals_one_big_batch(tmp_path):
    import torch

    from rau.training.engine import run_training

    x = torch.arange(24, dtype=torch.float32).reshape(8, 3) / 10
    y = x.sum(1, keepdim=True)
    calls = []

    def whole(net, step, acc):
        return ((net(x) - y) ** 2).mean()

    def halves(net, step, acc, micro):
        calls.append((step, micro))
        part = slice(4 * micro, 4 * micro + 4)
        return ((net(x[part]) - y[part]) ** 2).mean()

    kw = dict(steps=3, lr=0.1, device="cpu", progress=False, command="test")
    one, two = _Linear(), _Linear()
    run_training(one, tmp_path / "one", {"k": 1}, whole, **kw)
    run_training(two, tmp_path / "two", {"k": 1}, halves, accumulate=2, **kw)
    assert calls == [(s, m) for s in range(3) for m in range(2)]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(one.net.parameters(), two.net.parameters()))
    assert np.allclose([h["loss"] for h in history(tmp_path / "one")], [h["loss"] for h in history(tmp_path / "two")])
