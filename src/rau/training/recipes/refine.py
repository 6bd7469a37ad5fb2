"""Train the registration refiner (:mod:`rau.models.refiner`) on real registration outputs.

**Cache** (:func:`build_refine_cache`): for each image of a dataset part (the TARGET), a
REFERENCE is drawn among the ``top`` most similar other images of the same part (thumbnail NCC,
the rule `rau eval` uses to choose references, with some slack so that the refiner also sees
worse fits), the reference is registered onto the target exactly as the ``registration`` method
does (:func:`rau.methods.registration.register`), and the cache stores, at ``image_size``:
the target and the warped reference image (preprocessed at native size, uint8), and per
structure of the reference the warped soft mask (the prior, uint8) and the target's true mask
(empty where the target lacks the structure: the refiner learns to erase). Structures matching
``exclude`` patterns are never stored, so a refiner trained on the cache never sees them.

**Training** (:func:`train_refiner`, on :func:`rau.training.engine.run_training`): each sample
is one (pair, structure) row, cut to a square window around its prior (``window``), flipped
left-right at random (the refiner is class-agnostic, so left and right are the same task), the
prior's edge moved at random (blur + a random threshold) in some samples, then resized to
``crop`` x ``crop``. Loss: BCE + soft Dice. Step ``s`` draws from ``default_rng([seed, s])`` alone,
so a resumed run ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rau.errors import RauInputError
from rau.models.refiner.configuration import RefinerConfig
from rau.training.recipes.memseg import excluded

@dataclass
class RefineCache:
    """Registration outputs of one dataset part (module doc). Images and priors uint8 in [0, 255]."""

    targets: np.ndarray    # (N, S, S) uint8
    warped: np.ndarray     # (N, S, S) uint8
    pair: np.ndarray       # (R,) row -> target index
    name: np.ndarray       # (R,) row -> index into names
    priors: np.ndarray     # (R, S, S) uint8
    truths: np.ndarray     # (R, S, S) bool
    names: list[str]
    ids: list[str]
    references: list[str]
    preprocessing: str
    exclude: list[str]
    path: str = ""


# ----------------------------------------------------------------------------- cache


def build_refine_cache(dataset_root: str | Path, out_file: str | Path, *, exclude: Sequence[str] = (),
                       image_range: slice | None = None, image_size: int = 256, preprocessing: str = "equalize",
                       top: int = 3, limit: int | None = None, seed: int = 0, progress: bool = True) -> Path:
    """Register each target of the part onto a similar reference and store what the refiner reads
    (module doc) -> ``out_file`` (compressed npz, written atomically). ``limit``: at most that many
    targets (a seeded subset); the references are drawn from the whole part."""
    from tqdm.auto import tqdm

    from rau.atomic import write_bytes
    from rau.data.dataset import load_dataset
    from rau.methods.registration import moving_grid, register, warp_image, warp_masks
    from rau.models.refiner.modeling import image_channel
    from rau.models.unet.modeling import resize
    from rau.references.thumbnails import ThumbnailBank

    import torch

    config = RefinerConfig(image_size=image_size, preprocessing=preprocessing)
    ds = load_dataset(dataset_root, arg="dataset_root").slice(image_range)
    names = [n for n, out in zip(ds.structures, excluded(ds.structures, exclude)) if not out]
    if len(ds) < 2 or not names:
        raise RauInputError(f"dataset_root: {dataset_root} needs 2+ images and a structure left after exclude")
    images = [ds.load(e, names) for e in tqdm(ds.entries, desc="refine cache: read", disable=not progress)]
    bank = ThumbnailBank.build([im.id for im in images], [str(e.image_path) for e in ds.entries],
                               [im.image for im in images])
    order = np.arange(len(images))
    if limit is not None and limit < len(images):
        order = np.sort(np.random.default_rng(seed).permutation(len(images))[:limit])
    by_id = {im.id: i for i, im in enumerate(images)}
    size = (image_size, image_size)

    def small(a: np.ndarray) -> np.ndarray:
        t = resize(torch.from_numpy(np.ascontiguousarray(a, np.float32))[None, None], size)
        return t[0, 0].clamp_(0, 1).numpy()

    targets, warped_all, pair, name_idx, priors, truths, ids, refs = [], [], [], [], [], [], [], []
    for i in tqdm(order, desc="refine cache: register", unit="pair", disable=not progress):
        target = images[i]
        ranked = bank.rank(target.image, exclude_id=target.id)[:top]
        rng = np.random.default_rng([seed, int(i)])
        ref = images[by_id[ranked[int(rng.integers(len(ranked)))][0]]]
        have = [n for n in names if n in ref.masks and ref.masks[n].any()]
        if not have:
            continue
        transform, f_img, m_img = register(target.image, ref.image)
        grid = moving_grid(transform, f_img, m_img)
        warped_img = warp_image(transform, f_img, m_img, grid)
        probs = warp_masks({n: ref.masks[n] for n in have}, transform, f_img, m_img, grid)
        k = len(targets)
        targets.append(_u8(image_channel(target.image, config)[0, 0].numpy()))
        warped_all.append(_u8(image_channel(warped_img, config)[0, 0].numpy()))
        for n in have:
            truth = target.masks.get(n)
            pair.append(k)
            name_idx.append(names.index(n))
            priors.append(_u8(small(probs[n])))
            truths.append(small(truth) > 0.5 if truth is not None else np.zeros(size, bool))
        ids.append(target.id)
        refs.append(ref.id)
    if not targets:
        raise RauInputError(f"dataset_root: {dataset_root}: no pair with a structure to refine")
    buf = io.BytesIO()
    np.savez_compressed(buf, targets=np.stack(targets), warped=np.stack(warped_all), pair=np.array(pair, np.int32),
                        name=np.array(name_idx, np.int32), priors=np.stack(priors), truths=np.stack(truths),
                        names=np.array(names), ids=np.array(ids), references=np.array(refs),
                        preprocessing=np.array(preprocessing), exclude=np.array([str(p) for p in exclude], dtype=str),
                        dataset=np.array(str(Path(dataset_root).resolve())))
    return write_bytes(Path(out_file), buf.getvalue())


def _u8(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(a) * 255.0), 0, 255).astype(np.uint8)


def load_refine_cache(path: str | Path) -> RefineCache:
    """Read a cache of :func:`build_refine_cache`; RauInputError (one line) if unreadable or inconsistent."""
    try:
        z = np.load(path, allow_pickle=False)
        c = RefineCache(z["targets"], z["warped"], z["pair"], z["name"], z["priors"], z["truths"].astype(bool),
                        [str(v) for v in z["names"]], [str(v) for v in z["ids"]], [str(v) for v in z["references"]],
                        str(z["preprocessing"]), [str(v) for v in z["exclude"]] if "exclude" in z else [], str(path))
    except (OSError, ValueError, KeyError) as exc:
        raise RauInputError(f"caches: cannot read {path} as a refine cache ({exc.__class__.__name__})") from None
    n, r = len(c.targets), len(c.pair)
    if (c.warped.shape != c.targets.shape or c.priors.shape != (r, *c.targets.shape[1:])
            or c.truths.shape != c.priors.shape or len(c.name) != r or len(c.ids) != n
            or (r and (c.pair.max() >= n or c.name.max() >= len(c.names)))):
        raise RauInputError(f"caches: {path} is inconsistent ({n} targets, {r} rows); rebuild it")
    return c


# ----------------------------------------------------------------------------- samples


#: Training augmentation (recorded in the run).
AUGMENT = {"flip_p": 0.5, "window_shift": 0.1, "window_scale": [-0.2, 0.3], "edge_p": 0.3,
           "edge_sigma_px": [1.0, 4.0], "edge_threshold": [0.25, 0.75], "gamma": [0.8, 1.25]}


def usable_rows(cache: RefineCache, exclude: Sequence[str]) -> np.ndarray:
    """Rows whose structure is not excluded and whose prior is not empty."""
    keep = ~excluded(cache.names, exclude)[cache.name]
    keep &= cache.priors.reshape(len(cache.priors), -1).max(1) >= 128
    return np.nonzero(keep)[0]


def draw_sample(cache: RefineCache, row: int, rng: np.random.Generator, crop: int):
    """One augmented window -> ((3, crop, crop) float32 input, (crop, crop) float32 truth)."""
    import torch
    from scipy import ndimage

    from rau.models.refiner.modeling import cut, window, window_input
    from rau.models.unet.modeling import resize

    prior = cache.priors[row].astype(np.float32) / 255.0
    if rng.random() < AUGMENT["edge_p"]:  # move the prior's edge: blur, then a random level
        blurred = ndimage.gaussian_filter(prior, rng.uniform(*AUGMENT["edge_sigma_px"]))
        moved = ndimage.gaussian_filter((blurred > rng.uniform(*AUGMENT["edge_threshold"])).astype(np.float32), 0.7)
        prior = moved if moved.max() >= 0.5 else prior
    s, z = AUGMENT["window_shift"], AUGMENT["window_scale"]
    win = window(prior, jitter=np.array([rng.uniform(-s, s), rng.uniform(-s, s), rng.uniform(*z)]))
    k = cache.pair[row]
    gamma = np.exp(rng.uniform(*np.log(AUGMENT["gamma"])))
    images = np.stack([cache.targets[k], cache.warped[k]]).astype(np.float32) / 255.0
    x = window_input(images ** gamma, prior, win, crop)
    y = resize(torch.from_numpy(cut(cache.truths[row].astype(np.float32), win))[None, None], (crop, crop))[0, 0].numpy()
    if rng.random() < AUGMENT["flip_p"]:
        x, y = x[..., ::-1], y[..., ::-1]
    return np.ascontiguousarray(x), (np.ascontiguousarray(y) > 0.5).astype(np.float32)


def refine_loss(logits, truth):
    """BCE + soft Dice, per window, averaged. logits/truth: (B, 1, S, S)."""
    import torch.nn.functional as F

    bce = F.binary_cross_entropy_with_logits(logits, truth)
    p = logits.sigmoid().flatten(1)
    t = truth.flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return bce + dice.mean(), {"bce": float(bce.detach()), "dice_loss": float(dice.mean().detach())}


def train_refiner(caches: Sequence[str | Path], out_dir: str | Path, *, steps: int, batch_size: int = 16,
                  lr: float = 1e-3, warmup: int = 50, exclude: Sequence[str] = (), seed: int = 0,
                  config: RefinerConfig | None = None, save_every: int = 100, stop_after: int | None = None,
                  device: str = "auto", threads: int | None = None, command: str | None = None,
                  progress: bool = True) -> Path:
    """Train a refiner on refine caches (each draw: a cache uniformly, then one of its usable rows)
    -> the run folder's ``final/`` (or the checkpoint where ``stop_after`` ended the call)."""
    import torch

    from rau.models.refiner.modeling import RefinerModel
    from rau.training.engine import run_training

    if isinstance(exclude, str):
        raise RauInputError(f"exclude: expected a list of name patterns, got the string {exclude!r}")
    if not caches:
        raise RauInputError("caches: give at least one refine cache (rau train refine-cache)")
    if threads is not None:
        torch.set_num_threads(threads)
    loaded = [load_refine_cache(c) for c in caches]
    held = sorted({p for c in loaded for p in c.exclude} | {str(p) for p in exclude})
    config = config or RefinerConfig()
    config = RefinerConfig(**{**config.to_dict(), "held_out": held})
    for c in loaded:
        if c.preprocessing != config.preprocessing or c.targets.shape[1] != config.image_size:
            raise RauInputError(f"caches: {c.path} was built at {c.targets.shape[1]} px with {c.preprocessing!r}; "
                                f"the refiner reads {config.image_size} px with {config.preprocessing!r}")
    rows = [usable_rows(c, exclude) for c in loaded]
    if any(len(r) == 0 for r in rows):
        raise RauInputError("caches: a cache has no usable row once exclude is applied")
    model = RefinerModel(config)
    run_key = {"recipe": "refiner", "caches": [str(Path(c).resolve()) for c in caches], "steps": steps,
               "batch_size": batch_size, "lr": lr, "warmup": warmup, "exclude": [str(p) for p in exclude],
               "seed": seed, "config": config.to_dict(), "augment": AUGMENT}

    def step_loss(net, step, acc):
        rng = np.random.default_rng([seed, step])
        xs, ys = [], []
        for _ in range(batch_size):
            ci = int(rng.integers(len(loaded)))
            x, y = draw_sample(loaded[ci], int(rows[ci][rng.integers(len(rows[ci]))]), rng, config.crop)
            xs.append(x)
            ys.append(y)
        x = torch.from_numpy(np.stack(xs)).to(acc.device)
        y = torch.from_numpy(np.stack(ys))[:, None].to(acc.device)
        return refine_loss(net(x).float(), y)

    return run_training(model, out_dir, run_key, step_loss, steps=steps, lr=lr, warmup=warmup, save_every=save_every,
                        device=device, command=command, progress=progress, desc="refiner", stop_after=stop_after,
                        extra_training=lambda: {"held_out": held, "rows": [int(len(r)) for r in rows]})


def cache_dice(model, cache: RefineCache, *, names: Sequence[str] | None = None) -> dict[str, tuple[int, float, float]]:
    """Development check on a cache the refiner did not train on: per structure (rows, mean Dice of
    the warped prior, mean Dice of the refined mask) at the cache's size. Rows where the target
    lacks the structure are skipped. Not a benchmark (`rau bench` is)."""
    from rau.metrics import dice

    out: dict[str, list[tuple[float, float]]] = {}
    for k in range(len(cache.targets)):
        rows = [r for r in np.nonzero(cache.pair == k)[0] if cache.truths[r].any()
                and (names is None or cache.names[cache.name[r]] in names) and cache.priors[r].max() >= 128]
        if not rows:
            continue
        probs = model.predict_probs(cache.targets[k] / 255.0, cache.warped[k] / 255.0,
                                    [cache.priors[r] / 255.0 for r in rows])
        for r, p in zip(rows, probs):
            out.setdefault(cache.names[cache.name[r]], []).append(
                (dice(cache.priors[r] >= 128, cache.truths[r]), dice(p > model.config.threshold, cache.truths[r])))
    return {n: (len(v), float(np.mean([a for a, _ in v])), float(np.mean([b for _, b in v]))) for n, v in sorted(out.items())}
