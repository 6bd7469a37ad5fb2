"""Train the ``<seg>`` head (:mod:`rau.models.refvlm.seghead`, method ``rau-seg``) on the one
engine: a cache of full LiteMedSAM embeddings + frame masks per token-cache image
(:func:`build_seg_cache`), reference/target pairs drawn as for the RAU VLM, mask BCE + Dice."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from rau.errors import RauInputError
from rau.models.refvlm.seghead import (
    FRAME,
    SEG_AFTER,
    SegHeadConfig,
    SegHeadModel,
    answer_box_frame,
    box_tokens,
    seg_hidden,
    weights_sha256,
)


# ----------------------------------------------------------------------------- data
def mask_to_frame(mask: np.ndarray, frame: int = FRAME) -> np.ndarray:
    """(H, W) bool -> (frame, frame) bool in LiteMedSAM's input frame (longest side scaled to
    ``frame``, padded bottom/right), by area resampling at 0.5."""
    import torch
    import torch.nn.functional as F

    h, w = mask.shape
    scale = frame / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    r = F.interpolate(t, size=(nh, nw), mode="area")[0, 0].numpy() >= 0.5
    out = np.zeros((frame, frame), bool)
    out[:nh, :nw] = r
    return out


def frame_record(item, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One annotated image as the full-embedding caches store it: its (256, 64, 64) fp16 LiteMedSAM
    embedding (computed in float32, as all training data), the (S, 256, 32) bit-packed masks of
    ``names`` in the encoder frame (empty where missing) and the (S,) bool presence."""
    from rau.encoders.litemedsam import encode_images

    emb = encode_images([item.image], precision="fp32")[0].numpy().astype(np.float16)
    return (emb, *frame_masks(item, names))


def frame_masks(item, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """One annotated image's masks of ``names`` in the encoder frame: (S, 256, 32) bit-packed
    (empty where missing) and the (S,) bool presence."""
    row = np.zeros((len(names), FRAME, FRAME), bool)
    for j, name in enumerate(names):
        m = item.masks.get(name)
        if m is not None and m.any():
            row[j] = mask_to_frame(m)
    return np.packbits(row, axis=-1), row.any(axis=(1, 2))


def build_seg_cache(token_cache: str | Path, out_file: str | Path, *, dataset_root: str | Path | None = None,
                    progress: bool = True) -> Path:
    """Full LiteMedSAM embeddings + frame masks of every image of ``token_cache`` (its dataset
    folder is read from the cache unless given) -> ``out_file`` (npz, written atomically)."""
    import io

    from tqdm.auto import tqdm

    from rau.atomic import write_bytes
    from rau.data.caches import load_cache
    from rau.data.dataset import load_dataset

    cache = load_cache(token_cache)
    root = dataset_root or cache.meta.get("dataset")
    if not root:
        raise RauInputError(f"{token_cache}: the cache does not name its dataset; pass dataset_root")
    ds = load_dataset(root)
    embs, masks = [], []
    items = {item.id: item for item in ds.subset(list(cache.ids))}
    for image_id in tqdm(cache.ids, desc="seg cache", unit="image", disable=not progress):
        item = items.get(image_id)
        if item is None:
            raise RauInputError(f"{root}: image {image_id!r} of {token_cache} is missing")
        if item.image.shape[0] != item.image.shape[1]:
            raise RauInputError(f"{image_id}: rau-seg training needs square images (its answer boxes fill the whole 256 x 256 frame)")
        emb, packed, _ = frame_record(item, cache.names)
        embs.append(emb)
        masks.append(packed)
    buf = io.BytesIO()
    np.savez(buf, embeddings=np.stack(embs), masks=np.stack(masks), ids=np.array(cache.ids))
    write_bytes(Path(out_file), buf.getvalue())
    return Path(out_file)


def load_seg_cache(path: str | Path, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings (N, 256, 64, 64) fp16, packed masks (N, S, 256, 32) uint8), checked against ``ids``."""
    try:
        z = np.load(path, allow_pickle=False)
        emb, masks, got = z["embeddings"], z["masks"], [str(v) for v in z["ids"]]
    except (OSError, ValueError, KeyError) as exc:
        raise RauInputError(f"seg cache: cannot read {path} ({exc.__class__.__name__})") from None
    if got != [str(v) for v in ids]:
        raise RauInputError(f"seg cache: {path} does not hold the images of its token cache (ids differ)")
    return emb, masks


# ----------------------------------------------------------------------------- training
def _key_config(config: SegHeadConfig) -> dict:
    """The head config as a run's resume key: ``seg_after="mask"`` is left out, so runs started
    before the field existed (all of them "mask") still resume."""
    key = asdict(config)
    if key["seg_after"] == "mask":
        del key["seg_after"]
    return key


def seg_loss(logits, target):
    """BCE + soft Dice of (N, H, W) logits against (N, H, W) {0, 1} masks."""
    import torch.nn.functional as F

    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = logits.sigmoid()
    inter = (p * target).flatten(1).sum(1)
    dice = 1 - (2 * inter + 1) / (p.flatten(1).sum(1) + target.flatten(1).sum(1) + 1)
    return bce + dice.mean()


def train_seghead(vlm_dir: str | Path, caches: Sequence[str | Path], seg_caches: Sequence[str | Path], out_dir: str | Path,
                  *, steps: int, pairs_per_step: int = 4, structures_per_pair: int = 4, lr: float = 1e-4,
                  warmup: int = 20, seed: int = 0, p_similar: float = 0.5, n_neighbours: int = 10,
                  n_queries: int = 2, box_prompt: bool = True, seg_after: str = "box", cache_weights: Sequence[float] | None = None, save_every: int = 50,
                  log_every: int = 5, threads: int | None = None, device: str = "auto", command: str | None = None,
                  progress: bool = True, decoder=None) -> Path:
    """Train the ``<seg>`` head for the VLM ``vlm_dir`` -> ``out_dir/final``. Resumable."""
    import torch

    from rau.encoders.litemedsam import load
    from rau.models.refvlm.modeling import BOX_TOKENS, RefVlmModel, generate
    from rau.training.engine import run_training
    from rau.training.recipes.refvlm import load_pair_caches, pick_reference

    if steps < 1 or pairs_per_step < 1 or structures_per_pair < 1 or not lr > 0 or not 0 <= p_similar <= 1:
        raise RauInputError("steps, pairs_per_step and structures_per_pair must be >= 1, lr > 0 and p_similar in [0, 1]")
    if seg_after not in SEG_AFTER:
        raise RauInputError(f"--seg-after: {seg_after!r} is not one of {', '.join(SEG_AFTER)}")
    if len(caches) != len(seg_caches):
        raise RauInputError("--seg-cache: give one per --cache, in the same order")
    if threads:
        torch.set_num_threads(threads)
    vlm = RefVlmModel.from_pretrained(vlm_dir)
    vlm.net.requires_grad_(False).eval()
    loaded, nears, weights = load_pair_caches(caches, n_neighbours, cache_weights)
    segs = [load_seg_cache(s, c.ids) for s, c in zip(seg_caches, loaded)]
    config = SegHeadConfig(hidden_size=vlm.config.hidden_size, n_queries=n_queries, box_prompt=box_prompt,
                           seg_after=seg_after, vlm_sha256=weights_sha256(vlm_dir))
    torch.manual_seed(seed)
    head = SegHeadModel(config, decoder=decoder)
    lite = load()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_key = {"kind": "refvlm-seghead", "vlm": str(Path(vlm_dir).resolve()), "vlm_sha256": config.vlm_sha256,
               "caches": [str(Path(c).resolve()) for c in caches], "seg_caches": [str(Path(c).resolve()) for c in seg_caches],
               "steps": steps, "pairs_per_step": pairs_per_step, "structures_per_pair": structures_per_pair, "lr": lr,
               "warmup": warmup, "seed": seed, "p_similar": p_similar, "n_neighbours": n_neighbours,
               "config": _key_config(config), "cache_weights": [float(v) for v in weights]}
    v = vlm.vocab

    def batch(step, rank, n_proc):
        rng = np.random.default_rng([seed, step, rank, n_proc])
        rf, tf, emb, prompts, pair, gt = [], [], [], [], [], []
        while len(rf) < pairs_per_step:
            c = int(rng.choice(len(loaded), p=weights))
            cache, (embs, masks), near = loaded[c], segs[c], nears[c]
            t = int(rng.integers(len(cache)))
            r = pick_reference(rng, near, t, len(cache), p_similar)
            present = cache.present()
            both = np.flatnonzero(present[r] & present[t])
            if both.size == 0:
                continue
            for j in rng.permutation(both)[:structures_per_pair]:
                prompts.append(v.prompt(cache.loc[r, j], cache.codes[r, j]))
                pair.append(len(rf))
                emb.append(embs[t])
                gt.append(np.unpackbits(masks[t, j], axis=-1)[:, :FRAME])
            rf.append(cache.features[r])
            tf.append(cache.features[t])
        f32 = lambda a: torch.from_numpy(np.stack(a).astype(np.float32))  # noqa: E731
        return f32(rf), f32(tf), f32(emb), torch.tensor(prompts), torch.tensor(pair), f32(gt)

    def step_loss(net, step, acc):
        rf, tf, emb, prompts, pair, gt = (x.to(acc.device) for x in batch(step, acc.process_index, acc.num_processes))
        vlm.net.to(acc.device)
        toks, _, _ = generate(vlm.net, v, rf, tf, prompts, pair, n_tokens=BOX_TOKENS if seg_after == "box" else None)
        toks = toks.clone()
        toks[:, 0] = v.id["<yes>"]  # the structure is in the target: its own box (and mask) answer
        blocks = torch.cat([prompts, toks], dim=1)
        with acc.autocast():
            h = seg_hidden(vlm.net, acc.unwrap_model(net).seg_embed, rf, tf, blocks, pair)
            pe = lite.prompt_encoder.get_dense_pe().detach().to(acc.device)
            dense = lite.prompt_encoder.no_mask_embed.weight.detach().to(acc.device).reshape(1, -1, 1, 1).expand(len(h), -1, *emb.shape[-2:])
            boxes = None
            if box_prompt:  # the VLM's own answer box, as at inference
                frame_boxes = answer_box_frame(toks[:, 1:5] - v.loc_offset, vlm.config.bins)
                boxes = box_tokens(lite.prompt_encoder.to(acc.device), frame_boxes)
            low, _ = net(emb, h, pe, dense, boxes)
            loss = seg_loss(low.float(), gt)
        with torch.no_grad():
            d = ((low > 0).float() * gt).flatten(1).sum(1) * 2 / ((low > 0).float().flatten(1).sum(1) + gt.flatten(1).sum(1)).clamp(min=1)
        return loss, {"dice": float(d.mean())}

    return run_training(head, out, run_key, step_loss, steps=steps, lr=lr, warmup=warmup, save_every=save_every,
                        log_every=log_every, device=device, command=command, progress=progress, desc="train rau-seg head",
                        loss_label="loss (mask BCE + Dice)")


def train_seghead_memseg(vlm_dir: str | Path, memseg_dir: str | Path, caches: Sequence[str | Path], out_dir: str | Path, *,
                         steps: int, batch_size: int = 8, lr: float = 3e-4, warmup: int = 20, seed: int = 0,
                         n_queries: int = 2, exclude: Sequence[str] = (), iou_weight: float = 1.0, save_every: int = 50,
                         log_every: int = 5, threads: int | None = None, device: str = "auto", command: str | None = None,
                         progress: bool = True) -> Path:
    """Train a ``decoder="memseg"`` ``<seg>`` head (the paper's RAU: the VLM's query prompts the
    memory segmenter's decoder) -> ``out_dir/final``. Resumable.

    Frozen: the VLM ``vlm_dir`` and the memory segmenter ``memseg_dir``; trained: the ``<seg>``
    embedding and the MLP (the last layer starts at zero, so step 0 is the memory segmenter with
    the VLM's box prior alone). Pairs come from memseg caches (:mod:`rau.training.recipes.memseg`,
    one reference, structures matching ``exclude`` never drawn): the VLM reads the pair's
    embeddings pooled to its grid and the reference mask's tokens, answers the box greedily (the
    structure is in the target: ``<yes>`` forced), the reference mask moved into that box is the
    memory segmenter's prior, as at inference (:class:`rau.methods.rau_seg.MemSegQuerySegmenter`).
    Square images only (the frame is the image: every shipped cache is)."""
    import torch
    import torch.nn.functional as F

    from rau.models.memseg.modeling import MemSegModel
    from rau.models.refvlm.modeling import BOX_TOKENS, RefVlmModel, generate
    from rau.tokens.loc import box_tokens_reason, move_into_box
    from rau.tokens.masktok import load_default
    from rau.training.checkpoints import model_folder
    from rau.training.engine import run_training
    from rau.training.recipes.memseg import batch_tensors, draw_pairs, load_memseg_cache, memseg_loss, pair_index

    if steps < 1 or batch_size < 1 or not lr > 0:
        raise RauInputError(f"steps and batch_size must be >= 1 and lr > 0; got {steps}, {batch_size}, {lr}")
    if isinstance(exclude, str):
        raise RauInputError(f"exclude: expected a list of name patterns, got the string {exclude!r}")
    if not caches:
        raise RauInputError("caches: give at least one memseg cache (rau train memseg-cache)")
    if threads:
        torch.set_num_threads(threads)
    vlm = RefVlmModel.from_pretrained(vlm_dir)
    vlm.net.requires_grad_(False).eval()
    memseg_folder = model_folder(memseg_dir)
    memseg = MemSegModel.from_pretrained(memseg_folder)
    memseg.net.requires_grad_(False).eval()
    if not memseg.config.mask_prompt:
        raise RauInputError(f"--memseg: {memseg_dir} was trained without a mask prompt; the VLM's box reaches it as a prior")
    loaded = [load_memseg_cache(c, progress=progress) for c in caches]
    index = pair_index(loaded, exclude, 1)
    tokenizer = load_default()
    config = SegHeadConfig(hidden_size=vlm.config.hidden_size, n_queries=n_queries, box_prompt=False, seg_after="box",
                           vlm_sha256=weights_sha256(vlm_dir), decoder="memseg",
                           memseg_sha256=weights_sha256(memseg_folder))
    torch.manual_seed(seed)
    head = SegHeadModel(config)
    with torch.no_grad():  # zero tokens at step 0
        head.net.mlp[-1].weight.zero_()
        head.net.mlp[-1].bias.zero_()
    run_key = {"kind": "refvlm-seghead-memseg", "vlm": str(Path(vlm_dir).resolve()), "vlm_sha256": config.vlm_sha256,
               "memseg": str(memseg_folder.resolve()), "memseg_sha256": config.memseg_sha256,
               "caches": [Path(c.path).name for c in loaded], "pairs": len(index), "steps": steps,
               "batch_size": batch_size, "lr": lr, "warmup": warmup, "seed": seed, "exclude": [str(p) for p in exclude],
               "iou_weight": iou_weight, "config": _key_config(config)}
    v, grid, bins = vlm.vocab, vlm.config.grid, vlm.config.bins

    def step_loss(net, step, acc):
        rng = np.random.default_rng([seed, step, acc.process_index, acc.num_processes])
        pairs = draw_pairs(loaded, index, rng, batch_size, 1, 0.0, exclude)
        tgt, refs, ref_masks, gt, _ = batch_tensors(loaded, pairs, False)
        ref_np = ref_masks[:, 0, 0].numpy() > 0.5
        prompts = torch.tensor([v.prompt(*_prompt_args(tokenizer.encode(m))) for m in ref_np])
        rf, tf = F.adaptive_avg_pool2d(refs[:, 0], grid), F.adaptive_avg_pool2d(tgt, grid)
        pair = torch.arange(len(pairs))
        vlm.net.to(acc.device)
        memseg.net.to(acc.device)
        rf, tf, prompts, pair = (x.to(acc.device) for x in (rf, tf, prompts, pair))
        toks, _, _ = generate(vlm.net, v, rf, tf, prompts, pair, n_tokens=BOX_TOKENS)
        toks = toks.clone()
        toks[:, 0] = v.id["<yes>"]
        locs = (toks[:, 1:5] - v.loc_offset).cpu()
        boxes = answer_box_frame(locs, bins).numpy()
        # an answer whose box does not decode gets no mask at inference; here the reference mask as is
        prior = torch.from_numpy(np.stack([m.astype(np.float32) if box_tokens_reason(loc.tolist(), bins)
                                           else move_into_box(m, tuple(map(float, b)), m.shape)
                                           for m, b, loc in zip(ref_np, boxes, locs)]))
        blocks = torch.cat([prompts, toks], dim=1)
        tgt, refs, ref_masks, gt, prior = (x.to(acc.device) for x in (tgt, refs, ref_masks, gt, prior[:, None].float()))
        with acc.autocast():
            h = seg_hidden(vlm.net, acc.unwrap_model(net).seg_embed, rf, tf, blocks, pair)
            low, iou = memseg.net(tgt, refs, ref_masks, None, prior, acc.unwrap_model(net).tokens(h))
        loss, dice = memseg_loss(low, iou, gt, iou_weight)
        return loss, {"dice": float(dice.mean())}

    return run_training(head, out_dir, run_key, step_loss, steps=steps, lr=lr, warmup=warmup, save_every=save_every,
                        log_every=log_every, device=device, command=command, progress=progress,
                        desc="train rau-seg head (memseg)", loss_label="loss (mask BCE + Dice + IoU MSE)")


def _prompt_args(tokens) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A :class:`rau.tokens.masktok.MaskTokens` -> (loc, codes), the VLM prompt's arguments."""
    return tuple(tokens.loc), tuple(tokens.codes)
