"""SFT of the localizer (`rau train vlm`) on a tiny random Qwen2.5-VL, on CPU.

Checks the training contract rather than quality: a tiny model overfits a few pairs, a run killed
and resumed equals the uninterrupted run, LoRA trains only its adapter, broken checkpoints fail in
one line, the CLI writes final/ and loss.png, and final/ loads in QwenLocalizer.
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
from rau.training.recipes.qwen_sft import TrainConfig, lr_factor, train  # noqa: E402

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
    cfg = TrainConfig(**good, warmup_steps=2, max_steps=10)
    assert lr_factor(0, cfg) == pytest.approx(1 / 3) and lr_factor(2, cfg) == 1.0
    assert lr_factor(10, cfg) == pytest.approx(0.1)


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
def test_resumed_run_equals_uninterrupted_run(checkpoint, folder_dataset, tmp_path, lora):
    from safetensors.torch import load_file

    # Batches of 2 with 2 micro-batches: exercises collate + accumulation; dropout exercises RNG state.
    kw = dict(lora=lora, lr=1e-2 if lora else 2e-3, decay_steps=8, warmup_steps=2, batch_size=2, grad_accum=2,
              augment=True, lora_dropout=0.1)
    a, b = tmp_path / "a", tmp_path / "b"
    train(config(checkpoint, [folder_dataset], a, max_steps=8, **kw), progress=False)
    first = train(config(checkpoint, [folder_dataset], b, max_steps=4, **kw), progress=False)
    assert first["resumed_from"] is None
    second = train(config(checkpoint, [folder_dataset], b, max_steps=8, **kw), progress=False)
    assert second["resumed_from"].endswith("checkpoint-4") and second["start_step"] == 4
    assert second["trained_steps"] == 4

    name = "adapter/adapter_model.safetensors" if lora else "model/model.safetensors"
    wa, wb = load_file(str(a / "checkpoint-8" / name)), load_file(str(b / "checkpoint-8" / name))
    assert set(wa) == set(wb)
    for key in wa:
        assert np.allclose(wa[key].numpy(), wb[key].numpy(), atol=1e-6), key
    ha, hb = history(a), history(b)
    assert [h["step"] for h in hb] == list(range(1, 9))
    assert np.allclose([h["loss"] for h in ha], [h["loss"] for h in hb], atol=1e-5)
    assert np.allclose([h["lr"] for h in ha], [h["lr"] for h in hb])
    samples = [json.loads(line)["step"] for line in (b / "samples.jsonl").read_text().splitlines()]
    assert samples == list(range(1, 9))
    assert sorted(p.name for p in b.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    doc = json.loads((b / "config.json").read_text())
    assert [r["start_step"] for r in doc["history"]] == [0, 4] and doc["config"]["decay_steps"] == 8

    # A crash between checkpoints (step 6 of 8), with a half-written checkpoint left behind.
    c = tmp_path / "c"

    def crash(step, model, loss):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(checkpoint, [folder_dataset], c, max_steps=8, **kw), progress=False, on_step=crash)
    (c / ".tmp-checkpoint-8").mkdir()
    assert max(json.loads(line)["step"] for line in (c / "samples.jsonl").read_text().splitlines()) == 5
    resumed = train(config(checkpoint, [folder_dataset], c, max_steps=8, **kw), progress=False)
    assert resumed["start_step"] == 4 and not (c / ".tmp-checkpoint-8").exists()
    wc = load_file(str(c / "checkpoint-8" / name))
    assert all(np.allclose(wa[k].numpy(), wc[k].numpy(), atol=1e-6) for k in wa)
    assert [json.loads(line)["step"] for line in (c / "samples.jsonl").read_text().splitlines()] == list(range(1, 9))
    assert np.allclose([h["loss"] for h in history(c)], [h["loss"] for h in ha], atol=1e-5)


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
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["step"] == 3 and len(state["log_history"]) == 3


# ------------------------------------------------------------------ (d) broken checkpoints
def test_corrupted_or_mismatched_checkpoint_raises(checkpoint, folder_dataset, tmp_path):
    out = tmp_path / "run"
    kw = dict(lr_schedule="constant", save_every=2)  # constant: max_steps may grow on resume
    train(config(checkpoint, [folder_dataset], out, max_steps=4, **kw), progress=False)
    longer = config(checkpoint, [folder_dataset], out, max_steps=6, **kw)

    with pytest.raises(CheckpointError, match="lr: 0.0001 -> 0.001") as info:
        train(config(checkpoint, [folder_dataset], out, max_steps=6, lr=1e-3, lr_schedule="constant"), progress=False)
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="decay_steps: None -> 6.*pass the old decay_steps"):
        train(config(checkpoint, [folder_dataset], out, max_steps=6), progress=False)  # cosine now
    with pytest.raises(RauInputError, match="max_steps"):
        train(config(checkpoint, [folder_dataset], out, max_steps=3, **kw), progress=False)

    optimizer = out / "checkpoint-4" / "optimizer.pt"
    data = optimizer.read_bytes()
    optimizer.write_bytes(data[: len(data) // 2])  # a kill mid-copy, a full disk...
    with pytest.raises(CheckpointError, match="checkpoint-4.*truncated") as info:
        train(longer, progress=False)
    assert "\n" not in str(info.value)
    optimizer.write_bytes(b"\0" * len(data))  # same size, garbage: caught when loading
    with pytest.raises(CheckpointError, match="cannot read .*optimizer.pt"):
        train(longer, progress=False)
    assert not (out / "checkpoint-6").exists()  # never silently restarted


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
    assert doc["config"]["max_steps"] == 2 and doc["command"][0] == "rau"  # max_steps: CLI beats --config

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
    code = f"import sys, rau.cli.app, rau.training.recipes.qwen_sft, rau.data.pairs; print([m for m in {heavy} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
