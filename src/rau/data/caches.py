"""Training data for the CheXanatomy VLM: cached image features + answer tokens per structure.

The vision tower is frozen, so each image is encoded once (:func:`build_cache`) and training reads
the cache. A cache file (``.npz``, written atomically) holds for N images and S structures:

    features  (N, C, g, g) float16   pooled LiteMedSAM features (rau.models.decoder.encode_features)
    loc       (N, S, 4) int16        location tokens (ymin, xmin, ymax, xmax), -1 = structure absent
    codes     (N, S, 16) int16       mask tokenizer codes, -1 = absent
    ids       (N,)                   image ids; names (S,) structure names; meta: json string

Tokens come from the shipped mask tokenizer (:func:`rau.tokens.masktok.load_default`), exactly the
tokens the model must emit.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rau.atomic import write_bytes
from rau.errors import CheckpointError, RauInputError


@dataclass
class TokenCache:
    features: np.ndarray
    loc: np.ndarray
    codes: np.ndarray
    ids: list[str]
    names: list[str]
    meta: dict

    def __len__(self) -> int:
        return len(self.ids)

    def present(self) -> np.ndarray:
        """(N, S) bool: structure annotated (non-empty) in the image."""
        return self.loc[..., 0] >= 0


def build_cache(dataset_root: str | Path, out_file: str | Path, *, structures: Sequence[str] | None = None,
                id_range: slice | None = None, ids: Sequence[str] | None = None, config=None,
                device: str = "cpu", progress: bool = True) -> TokenCache:
    """Encode a dataset folder's images and tokenize its masks -> ``out_file`` (npz)."""
    import torch

    from rau.tokens.masktok import load_default
    from rau.models.chex.configuration import ChexConfig
    from rau.models.decoder import encode_features
    from rau.data.dataset import load_dataset

    ds = load_dataset(dataset_root)
    if id_range is not None:
        ds = ds.slice(id_range)
    if ids is not None:
        ds = ds.subset(list(ids))
    names = list(structures) if structures is not None else ds.structures
    if not names or len(ds) == 0:
        raise RauInputError(f"dataset: {dataset_root} has no images or structures to cache")
    config = config or ChexConfig(names=names)
    tok = load_default()
    images, locs, codes, img_ids = [], [], [], []
    from tqdm.auto import tqdm

    for item in tqdm(ds, total=len(ds), desc="tokenize", unit="image", disable=not progress):
        images.append(item.image)
        img_ids.append(item.id)
        loc_row, code_row = np.full((len(names), 4), -1, np.int16), np.full((len(names), config.n_codes), -1, np.int16)
        for j, name in enumerate(names):
            mask = item.masks.get(name)
            if mask is not None and mask.any():
                t = tok.encode(mask)
                loc_row[j], code_row[j] = t.loc, t.codes
        locs.append(loc_row)
        codes.append(code_row)
    with torch.no_grad():
        feats = encode_features(images, config, device=device, progress=progress, precision="fp32").numpy().astype(np.float16)
    cache = TokenCache(feats, np.stack(locs), np.stack(codes), img_ids, names,
                       {"dataset": str(dataset_root), "grid": config.grid, "image_size": config.image_size,
                        "preprocessing": config.preprocessing, "vision": config.vision})
    save_cache(cache, out_file)
    return cache


def save_cache(cache: TokenCache, path: str | Path) -> None:
    buf = io.BytesIO()
    np.savez(buf, features=cache.features, loc=cache.loc, codes=cache.codes, ids=np.array(cache.ids),
             names=np.array(cache.names), meta=np.array(json.dumps(cache.meta)))
    write_bytes(Path(path), buf.getvalue())


def load_cache(path: str | Path) -> TokenCache:
    p = Path(path)
    if not p.is_file():
        raise RauInputError(f"cache: {p} does not exist; build it with `rau train chex-cache`")
    try:
        with np.load(p, allow_pickle=False) as z:
            return TokenCache(z["features"], z["loc"].astype(np.int64), z["codes"].astype(np.int64),
                              [str(s) for s in z["ids"]], [str(s) for s in z["names"]], json.loads(str(z["meta"])))
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cache: {p} is unreadable ({exc.__class__.__name__}); delete it and rebuild") from None
