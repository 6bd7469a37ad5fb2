"""Train the memory segmenter (:mod:`rau.models.memseg`, issue 15) on the one engine.

Data, in three layers:

1. :func:`build_memseg_cache`: per image of any dataset folder :func:`rau.data.dataset.load_dataset`
   reads, the full (256, 64, 64) LiteMedSAM embedding (fp16, float32 encoder) and every
   structure's mask in the encoder's 256 x 256 frame (bit-packed), in one npz. A *frame cache*
   (``frames=True``) stores the preprocessed uint8 encoder input instead of the embedding (64 KB
   against 2 MB per image), so a GPU machine can be sent the data and encode it there:
   :func:`load_memseg_cache` encodes the frames on the device it is given;
2. :func:`pair_index` + :func:`draw_pairs`: (cache, target image, structure) triples and, per
   triple, K references drawn among the OTHER images annotated with the same structure; structures
   matching an ``exclude`` pattern are never drawn (held out to test generalisation); step ``s``
   draws from ``(seed, s)`` alone, so a resumed run is exact;
3. :func:`batch_tensors`: the drawn pairs as the network's tensors.

Loss: BCE + Dice of the frame mask (:func:`rau.training.recipes.seghead.seg_loss`) plus, as SAM
trains it, the MSE of the predicted IoU against the mask's actual IoU (``iou_weight``).

CPU-sized run (2 cores; grid 32 keeps memory attention ~16x cheaper than the full 64)::

    train_memseg(["runs/memseg/jsrt.npz"], "runs/memseg/cpu", steps=200, batch_size=2,
                 k_references=1, config=MemSegConfig(grid=32), exclude=["clavicle*"])
"""

from __future__ import annotations

import fnmatch
import io
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rau.errors import RauInputError
from rau.models.memseg.configuration import FRAME, MemSegConfig


# ----------------------------------------------------------------------------- cache
@dataclass
class MemSegCache:
    """embeddings (N, 256, S, S) fp16 (a frame cache's encoded on load); masks (N, M, 256, 32) uint8 (bit-packed 256 x 256 frame
    masks); present (N, M) bool (non-empty masks); names (M,) structure names; ids (N,) image ids."""

    embeddings: np.ndarray
    masks: np.ndarray
    present: np.ndarray
    names: list[str]
    ids: list[str]
    path: str = ""

    def frame_mask(self, image: int, structure: int) -> np.ndarray:
        """(256, 256) bool frame mask of one image's structure."""
        return np.unpackbits(self.masks[image, structure], axis=-1)[:, :FRAME].astype(bool)


def excluded(names: Sequence[str], patterns: Sequence[str]) -> np.ndarray:
    """(M,) bool: which ``names`` match one of the shell-style ``patterns`` (case-insensitive),
    e.g. ``["clavicle*", "*coronary*"]``."""
    pats = [str(p).lower() for p in patterns]
    return np.array([any(fnmatch.fnmatchcase(n.lower(), p) for p in pats) for n in names], bool)


def build_memseg_cache(dataset_root: str | Path, out_file: str | Path, *, exclude_structures: Sequence[str] = (),
                       image_range: slice | None = None, frames: bool = False, progress: bool = True) -> Path:
    """Embeddings + frame masks of every image of the dataset folder ``dataset_root`` (or of its
    id-sorted ``image_range``, e.g. a training part) -> ``out_file`` (npz, written atomically).
    Structures matching ``exclude_structures`` (shell patterns) are left out of the cache.
    ``frames``: store each image's uint8 encoder input instead of its embedding (a frame cache,
    module doc; no encoder runs here)."""
    from tqdm.auto import tqdm

    from rau.atomic import write_bytes
    from rau.data.dataset import load_dataset
    from rau.encoders.litemedsam import frame_bytes
    from rau.training.recipes.seghead import frame_masks, frame_record

    ds = load_dataset(dataset_root, arg="dataset_root").slice(image_range)
    names = [n for n, out in zip(ds.structures, excluded(ds.structures, exclude_structures)) if not out]
    if not names or not len(ds):
        raise RauInputError(f"dataset_root: {dataset_root} has no images or no structure left after exclude_structures")
    embs, masks, present, ids = [], [], [], []
    for item in tqdm(ds, total=len(ds), desc="memseg cache", unit="image", disable=not progress):
        if frames:
            emb, (packed, here) = frame_bytes(item.image), frame_masks(item, names)
        else:
            emb, packed, here = frame_record(item, names)
        embs.append(emb)
        masks.append(packed)
        present.append(here)
        ids.append(item.id)
    buf = io.BytesIO()
    save = np.savez_compressed if frames else np.savez  # frames travel; embeddings hardly compress
    save(buf, **{"frames" if frames else "embeddings": np.stack(embs)}, masks=np.stack(masks), present=np.stack(present),
         names=np.array(names), ids=np.array(ids), dataset=np.array(str(Path(dataset_root).resolve())))
    return write_bytes(Path(out_file), buf.getvalue())


def save_memseg_cache(cache: MemSegCache, out_file: str | Path) -> Path:
    """Write ``cache`` in :func:`build_memseg_cache`'s format (tests and converted caches)."""
    from rau.atomic import write_bytes

    buf = io.BytesIO()
    np.savez(buf, embeddings=cache.embeddings, masks=cache.masks, present=cache.present,
             names=np.array(cache.names), ids=np.array(cache.ids), dataset=np.array(""))
    return write_bytes(Path(out_file), buf.getvalue())


def encode_frame_cache(frame_cache: str | Path, out_file: str | Path, *, precision: str = "bf16", progress: bool = True) -> Path:
    """A frame cache (:func:`build_memseg_cache` with ``frames=True``) -> a full cache at ``out_file``,
    its frames encoded here on the CPU in ``precision`` (bf16: as CPU inference encodes; the CPU
    route of ``scripts/memseg_blobs_recipe.sh``)."""
    return save_memseg_cache(load_memseg_cache(frame_cache, progress=progress, precision=precision), out_file)


def load_memseg_cache(path: str | Path, *, device: str = "cpu", progress: bool = False, precision: str = "fp32") -> MemSegCache:
    """Read a cache written by :func:`build_memseg_cache` (a frame cache's frames are encoded on
    ``device`` in ``precision``); RauInputError if unreadable or inconsistent."""
    try:
        z = np.load(path, allow_pickle=False)
        masks, present = z["masks"], z["present"]
        names, ids = [str(v) for v in z["names"]], [str(v) for v in z["ids"]]
        frames = z["frames"] if "frames" in z.files else None
        emb = z["embeddings"] if frames is None else None
    except (OSError, ValueError, KeyError) as exc:
        raise RauInputError(f"caches: cannot read {path} as a memseg cache ({exc.__class__.__name__})") from None
    if frames is not None:
        from rau.encoders.litemedsam import encode_frames

        if frames.shape[0] != len(ids):
            raise RauInputError(f"caches: {path} holds {frames.shape[0]} frames for {len(ids)} images; rebuild it")
        emb = encode_frames(frames, device=device, progress=progress, precision=precision)
    n, m = len(ids), len(names)
    if emb.ndim != 4 or emb.shape[0] != n or masks.shape != (n, m, FRAME, FRAME // 8) or present.shape != (n, m):
        raise RauInputError(f"caches: {path} is inconsistent (embeddings {emb.shape}, masks {masks.shape}, "
                            f"present {present.shape} for {n} images x {m} structures); rebuild it")
    return MemSegCache(emb, masks, present.astype(bool), names, ids, str(path))


# ----------------------------------------------------------------------------- pairs
def pair_index(caches: Sequence[MemSegCache], exclude: Sequence[str], k: int) -> np.ndarray:
    """(P, 3) int array of drawable (cache, target image, structure) triples: the structure is
    present in the target and in at least ``k`` other images of its cache, and matches no
    ``exclude`` pattern. RauInputError when nothing is drawable."""
    rows = []
    for c, cache in enumerate(caches):
        ok = cache.present & ~excluded(cache.names, exclude)[None, :]
        for s in np.flatnonzero(ok.sum(0) >= k + 1):
            rows.extend((c, int(t), int(s)) for t in np.flatnonzero(ok[:, s]))
    if not rows:
        raise RauInputError(f"caches: no structure is annotated in {k + 1}+ images once exclude={list(exclude)} is "
                            "applied; lower k_references or add images")
    return np.array(rows, dtype=np.int64)


PSEUDO_KINDS = ("union", "part", "band")


def draw_pairs(caches: Sequence[MemSegCache], index: np.ndarray, rng: np.random.Generator, n: int, k: int,
               pseudo: float = 0.0, exclude: Sequence[str] = ()):
    """``n`` pairs ``(cache, target, structure, references (k,))``: triples uniform over ``index``,
    references uniform without replacement among the other images with that structure. With
    probability ``pseudo`` the structure becomes a pseudo-structure (:func:`compose_mask`) built
    the same way in target and references, so the model meets shapes no label set has:
    ``("union", s, s2)``, ``("part", s, side)`` or ``("band", s, width)``."""
    pairs = []
    for row in rng.integers(len(index), size=n):
        c, t, s = (int(v) for v in index[row])
        cache = caches[c]
        others = np.flatnonzero(cache.present[:, s])
        others = others[others != t]
        refs = np.sort(rng.choice(others, size=k, replace=False))
        spec: int | tuple = s
        if pseudo > 0 and rng.random() < pseudo:
            kind = PSEUDO_KINDS[int(rng.integers(len(PSEUDO_KINDS)))]
            if kind == "union":
                both = cache.present[t] & cache.present[refs].all(0) & ~excluded(cache.names, exclude)
                both[s] = False
                spec = ("union", s, int(rng.choice(np.flatnonzero(both)))) if both.any() else ("part", s, 0)
            if kind == "part":
                spec = ("part", s, int(rng.integers(4)))
            elif kind == "band":
                spec = ("band", s, int(rng.choice([2, 3, 4, 6])))
        pairs.append((c, t, spec, refs))
    return pairs


def compose_mask(cache: MemSegCache, image: int, spec: int | tuple) -> np.ndarray:
    """(256, 256) bool frame mask of ``spec`` in one image: a structure index, or a
    pseudo-structure made from the image's own masks, so it corresponds across images:
    ``("union", s, s2)`` both structures; ``("part", s, side)`` the top / bottom / left / right
    half (side 0..3) of s by its own box; ``("band", s, w)`` s's inner boundary band, w frame
    pixels wide (a thin structure). A part or band that comes out empty falls back to s."""
    from scipy.ndimage import binary_erosion

    if isinstance(spec, (int, np.integer)):
        return cache.frame_mask(image, int(spec))
    kind, s, arg = spec
    m = cache.frame_mask(image, s)
    if kind == "union":
        out = m | cache.frame_mask(image, arg)
    elif kind == "part":
        ys, xs = np.nonzero(m)
        if not len(ys):
            return m
        grid_y, grid_x = np.mgrid[:m.shape[0], :m.shape[1]]
        cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
        half = (grid_y < cy, grid_y >= cy, grid_x < cx, grid_x >= cx)[arg]
        out = m & half
    elif kind == "band":
        out = m & ~binary_erosion(m, iterations=int(arg))
    else:
        raise ValueError(f"unknown pseudo-structure {kind!r}")
    return out if out.any() else m


def batch_tensors(caches: Sequence[MemSegCache], pairs, box_prompt: bool, embeddings=None):
    """Pairs -> float32 tensors: target (B, 256, S, S), references (B, K, 256, S, S), reference
    masks (B, K, 1, 256, 256), target masks (B, 256, 256) and, with ``box_prompt``, the target
    masks' tight boxes (B, 4) xyxy in frame pixels (else None). On the CPU, except the features
    when ``embeddings`` (per cache, its embeddings as one torch tensor, e.g. held on the GPU) is
    given: they are gathered there."""
    import torch

    from rau.geometry import mask_to_box

    tgt, refs, ref_masks, gts = [], [], [], []
    for c, t, s, r in pairs:
        cache = caches[c]
        if embeddings is None:
            tgt.append(cache.embeddings[t])
            refs.append(cache.embeddings[r])
        ref_masks.append(np.stack([compose_mask(cache, int(i), s) for i in r])[:, None])
        gts.append(compose_mask(cache, t, s))
    f32 = lambda a: torch.from_numpy(np.stack(a).astype(np.float32))  # noqa: E731
    if embeddings is not None:
        tgt_t = torch.stack([embeddings[c][t] for c, t, _, _ in pairs]).float()
        refs_t = torch.stack([embeddings[c][torch.as_tensor(r, device=embeddings[c].device)] for c, _, _, r in pairs]).float()
    else:
        tgt_t, refs_t = f32(tgt), f32(refs)
    boxes = torch.tensor([mask_to_box(g) for g in gts], dtype=torch.float32) if box_prompt else None
    return tgt_t, refs_t, f32(ref_masks), f32(gts), boxes


def jitter_prompts(masks, rng: np.random.Generator, shift: float, scale: float, degrees: float):
    """(B, 1, H, W) prompt masks each moved by a random similarity transform (shift up to
    ``shift`` of the side, scale within 1 +- ``scale``, rotation up to ``degrees``), so a model
    trained on them cannot just copy the prior."""
    import torch
    import torch.nn.functional as F

    b = masks.shape[0]
    ang = np.deg2rad(rng.uniform(-degrees, degrees, b))
    sc = rng.uniform(1 - scale, 1 + scale, b)
    tx, ty = rng.uniform(-shift, shift, (2, b)) * 2  # affine_grid works in [-1, 1]
    theta = np.stack([np.stack([np.cos(ang) / sc, -np.sin(ang) / sc, tx], 1),
                      np.stack([np.sin(ang) / sc, np.cos(ang) / sc, ty], 1)], 1)
    grid = F.affine_grid(torch.as_tensor(theta, dtype=masks.dtype), list(masks.shape), align_corners=False)
    return F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def deform_prompts(masks, rng: np.random.Generator, amplitude: float, shift: float):
    """(B, 1, H, W) {0, 1} masks -> registration-like priors: each moved by a smooth random
    displacement field (4 x 4 control points, bicubic; per pair a displacement scale drawn in
    [0, ``amplitude``] of the side) and a random shift (per pair up to a draw in [0, ``shift``] of
    the side), thresholded at 0.5. From almost exact to clearly off, as registration's warped
    masks are (ARCADE's thin vessels usually end beside the truth)."""
    import torch
    import torch.nn.functional as F

    b, _, h, w = masks.shape
    amp = rng.uniform(0, amplitude, b) * 2  # affine_grid coordinates span 2 per side
    ctrl = rng.normal(size=(b, 2, 4, 4)) * amp[:, None, None, None]
    move = rng.uniform(-1, 1, (b, 2)) * rng.uniform(0, shift, (b, 1)) * 2
    flow = F.interpolate(torch.as_tensor(ctrl, dtype=masks.dtype), size=(h, w), mode="bicubic", align_corners=True)
    flow = flow + torch.as_tensor(move, dtype=masks.dtype)[:, :, None, None]
    eye = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], dtype=masks.dtype).expand(b, 2, 3)
    grid = F.affine_grid(eye, list(masks.shape), align_corners=False) + flow.permute(0, 2, 3, 1)
    out = F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (out >= 0.5).to(masks.dtype)


def training_prompts(ref_masks, gt, rng: np.random.Generator, prompt_jitter, target_prior: float, prior_deform,
                     return_use: bool = False):
    """The (B, 1, H, W) priors of a ``mask_prompt`` model for one step: the references' mean mask,
    jittered (:func:`jitter_prompts`: where the structure sits in the reference, as the default
    prior at inference), or with probability ``target_prior`` per pair the target's own mask
    deformed (:func:`deform_prompts`: a registration-like prior, as ``reg-memseg`` gives).
    ``return_use``: also the (B,) bool of the pairs given the deformed target mask (a ``readout``
    model reads its readout as the prior of the others)."""
    import torch

    prompts = jitter_prompts(ref_masks.mean(1), rng, *prompt_jitter)
    use = torch.as_tensor(rng.random(gt.shape[0]) < target_prior) if target_prior > 0 else torch.zeros(gt.shape[0], dtype=torch.bool)
    if target_prior > 0:
        prompts = torch.where(use[:, None, None, None], deform_prompts(gt[:, None].to(prompts.dtype), rng, *prior_deform), prompts)
    return (prompts, use) if return_use else prompts


# ----------------------------------------------------------------------------- training
def memseg_loss(logits, iou_pred, target, iou_weight: float = 1.0):
    """BCE + Dice of (B, 1, 256, 256) logits against (B, 256, 256) {0, 1} masks, + ``iou_weight``
    x MSE of the predicted (B, 1) IoU against the thresholded mask's IoU -> (loss, dice (B,))."""
    import torch
    import torch.nn.functional as F

    from rau.training.recipes.seghead import seg_loss

    low = logits[:, 0].float()
    with torch.no_grad():
        pred = (low > 0).float()
        inter = (pred * target).flatten(1).sum(1)
        union = (pred + target).clamp(max=1).flatten(1).sum(1)
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        dice = 2 * inter / (pred.flatten(1).sum(1) + target.flatten(1).sum(1)).clamp(min=1)
    return seg_loss(low, target) + iou_weight * F.mse_loss(iou_pred[:, 0].float(), iou), dice


def readout_loss(probabilities, target):
    """BCE + Dice of (B, 1, 256, 256) readout probabilities against (B, 256, 256) {0, 1} masks ->
    (loss, dice at 0.5 (B,))."""
    import torch

    from rau.training.recipes.seghead import seg_loss

    p = probabilities[:, 0].float().clamp(1e-4, 1 - 1e-4)
    with torch.no_grad():
        pred = (p > 0.5).float()
        dice = 2 * (pred * target).flatten(1).sum(1) / (pred.flatten(1).sum(1) + target.flatten(1).sum(1)).clamp(min=1)
    return seg_loss(torch.logit(p), target), dice


def train_memseg(caches: Sequence[str | Path | MemSegCache], out_dir: str | Path, *, steps: int, batch_size: int = 2,
                 lr: float = 1e-4, seed: int = 0, k_references: int = 1, vary_k: bool = False, exclude: Sequence[str] = (),
                 pseudo: float = 0.0, stop_after: int | None = None, init_from: str | Path | None = None, prompt_jitter: tuple[float, float, float] = (0.05, 0.1, 8.0),
                 target_prior: float = 0.0, prior_deform: tuple[float, float] = (0.03, 0.04),
                 save_every: int = 50, log_every: int = 5, warmup: int = 20, iou_weight: float = 1.0,
                 readout_weight: float = 0.0, readout_only: bool = False, config: MemSegConfig | None = None, device: str = "auto", threads: int | None = None,
                 command: str | None = None, progress: bool = True, lite=None,
                 on_step: Callable[[int, dict], None] | None = None) -> Path:
    """Train a memory segmenter on memseg caches (paths, or caches already loaded) -> ``out_dir/final``.
    Resumable (rerun the same call); ``vary_k``: each step draws its number of reference frames
    uniformly in 1..``k_references`` (one model for one and for several references); on a GPU the
    embeddings are held there and each step's features gathered on it; ``exclude``: structure-name patterns never drawn; ``lite``: the LiteMedSAM network whose
    decoder initialises the model (default: the shipped one); ``on_step`` as in
    :func:`rau.training.engine.run_training`. ``pseudo``: share of pairs whose structure is a
    pseudo-structure (:func:`draw_pairs`); ``prompt_jitter``: (shift, scale, degrees) of the
    random move of a ``mask_prompt`` model's prior (:func:`jitter_prompts`); ``target_prior``: share
    of pairs whose prior is instead the target's mask deformed by ``prior_deform`` = (amplitude,
    shift) (:func:`deform_prompts`), so the model learns to read a registration prior; ``init_from``: a
    memseg model or checkpoint folder whose weights start the run (its config may differ only in
    ``decoder_grid``, which adds no weights, and in ``readout``: a readout path it lacks starts as the
    training-free readout); ``stop_after``: as in :func:`rau.training.engine.run_training` (a stage of a
    longer schedule). With ``config.readout``: ``readout_weight`` x the readout map's own BCE + Dice is
    added to the loss; ``readout_only`` trains the readout path alone (no decoder pass). The model's
    training record lists the structure names it was trained on (``structures``: every name drawn,
    plus those of ``init_from``'s record), :attr:`MemSegModel.trained_structures`."""
    import torch

    from rau.models.memseg.modeling import MemSegModel
    from rau.training.engine import run_training

    if not 0 <= target_prior <= 1 or (target_prior > 0 and not (config or MemSegConfig()).mask_prompt):
        raise RauInputError(f"target_prior: expected a share in [0, 1] for a mask_prompt model, got {target_prior}")
    if steps < 1 or batch_size < 1 or k_references < 1 or not lr > 0 or iou_weight < 0 or not 0 <= pseudo <= 1:
        raise RauInputError(f"steps, batch_size and k_references must be >= 1, lr > 0, iou_weight >= 0 and pseudo in "
                            f"[0, 1]; got {steps}, {batch_size}, {k_references}, {lr}, {iou_weight}, {pseudo}")
    if (readout_weight > 0 or readout_only) and not (config or MemSegConfig()).readout:
        raise RauInputError("readout_weight / readout_only: need a model built with readout=True (--readout)")
    if readout_weight < 0:
        raise RauInputError(f"readout_weight: expected >= 0, got {readout_weight}")
    if isinstance(exclude, str):
        raise RauInputError(f"exclude: expected a list of name patterns, got the string {exclude!r}")
    if not caches:
        raise RauInputError("caches: give at least one memseg cache (build_memseg_cache)")
    config = config or MemSegConfig()
    from rau.training.engine import resolve_device

    on_gpu = resolve_device(device)
    loaded = [c if isinstance(c, MemSegCache) else load_memseg_cache(c, device="cuda" if on_gpu else "cpu", progress=progress)
              for c in caches]
    for cache in loaded:
        side = cache.embeddings.shape[-1]
        if side % max(config.grid, config.out_grid):
            raise RauInputError(f"caches: {cache.path} holds {side} x {side} embeddings, not a multiple of the grids of {config}")
    index = pair_index(loaded, exclude, k_references)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = MemSegModel(config, lite=lite)
    if init_from is not None:
        from rau.training.checkpoints import model_folder

        start = MemSegModel.from_pretrained(model_folder(init_from))
        missing, unexpected = model.net.load_state_dict(start.net.state_dict(), strict=False)
        if unexpected or any(not k.startswith("readout_") for k in missing):
            raise RauInputError(f"init_from: {init_from} does not fit this config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    # the names it learns (and those its start learnt): a segmenter told a name outside them follows the reference
    structures = sorted({str(loaded[c].names[st]) for c, _, st in index}
                        | set((start.training.get("structures") or []) if init_from is not None else []))
    run_key = {"kind": "memseg", "caches": [Path(c.path).name for c in loaded], "pairs": len(index),
               "steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup, "seed": seed,
               "k_references": k_references, "vary_k": vary_k, "exclude": [str(p) for p in exclude], "iou_weight": iou_weight,
               "pseudo": pseudo, "init_from": None if init_from is None else str(Path(init_from).resolve()), "prompt_jitter": list(prompt_jitter), "config": asdict(config)}
    if target_prior > 0:  # only then: runs without it keep their key (and resume)
        run_key.update(target_prior=target_prior, prior_deform=list(prior_deform))
    if config.readout:
        run_key.update(readout_weight=readout_weight, readout_only=readout_only)

    held: dict = {}

    def step_loss(net, step, acc):
        if "embeddings" not in held:  # on a GPU the features stay there (fp16); gathered per step
            held["embeddings"] = ([torch.from_numpy(c.embeddings).to(acc.device) for c in loaded]
                                  if acc.device.type == "cuda" else None)
        rng = np.random.default_rng([seed, step, acc.process_index, acc.num_processes])
        k = int(rng.integers(1, k_references + 1)) if vary_k else k_references
        pairs = draw_pairs(loaded, index, rng, batch_size, k, pseudo, exclude)
        tgt, refs, ref_masks, gt, boxes = batch_tensors(loaded, pairs, config.box_prompt, held["embeddings"])
        if readout_only:  # no decoder pass, so no priors to draw
            tgt, refs, ref_masks, gt = (x.to(acc.device) for x in (tgt, refs, ref_masks, gt))
            with acc.autocast():
                read = acc.unwrap_model(net).read(tgt, refs, ref_masks)
            loss, dice = readout_loss(read, gt)
            return loss, {"dice": float(dice.mean())}
        prompts, use = (training_prompts(ref_masks, gt, rng, prompt_jitter, target_prior, prior_deform, return_use=True)
                        if config.mask_prompt else (None, None))
        if not config.readout:
            use = None  # the jittered reference prior stays where no deformed target mask is given
        tgt, refs, ref_masks, gt, boxes, prompts, use = (None if x is None else x.to(acc.device)
                                                         for x in (tgt, refs, ref_masks, gt, boxes, prompts, use))
        with acc.autocast():
            out = net(tgt, refs, ref_masks, boxes, prompts, return_readout=config.readout, prompt_use=use)
        loss, dice = memseg_loss(out[0], out[1], gt, iou_weight)
        logs = {"dice": float(dice.mean())}
        if config.readout and readout_weight > 0:
            extra, read_dice = readout_loss(out[2], gt)
            loss = loss + readout_weight * extra
            logs["readout_dice"] = float(read_dice.mean())
        return loss, logs

    return run_training(model, out_dir, run_key, step_loss, steps=steps, lr=lr, warmup=warmup, save_every=save_every,
                        log_every=log_every, device=device, command=command, progress=progress,
                        desc="train memseg", loss_label="loss (mask BCE + Dice + IoU MSE)", on_step=on_step,
                        stop_after=stop_after, extra_training=lambda: {"structures": structures})
