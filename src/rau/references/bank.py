"""Reference bank: annotated images indexed by an image embedding, searched by cosine similarity.

``rau index --dataset DIR --out BANK.npz`` embeds every image of an annotated dataset once;
``rau localize --bank BANK.npz`` and ``rau eval --bank BANK.npz`` then pick each target's
reference(s) by retrieval instead of being given one. With ``k > 1`` the method runs once per
retrieved reference and the answers are fused (:func:`fuse_results`).

Encoders (``encoder=``):

- ``litemedsam`` (default): the shipped LiteMedSAM image encoder (the one the segmenter and the
  CheXanatomy VLM use), its (256, 64, 64) embedding average-pooled to 4 x 4 cells -> 4096 values;
- ``thumbnail``: a 32 x 32 area-averaged thumbnail (1024 values), the cheap baseline that ``rau
  eval`` uses by default (its cosine after centring is normalised cross-correlation);
- any other name: a ``module:function`` path to a callable ``images -> (N, D) array``.

Vectors are centred on the bank's mean and L2-normalised, so the dot product is a centred cosine
similarity. Search is an exact matrix product in numpy; with ``faiss`` installed and more than
:data:`FAISS_MIN` entries, an exact ``IndexFlatIP`` is used instead (same results, less memory
traffic for large banks). A query never returns itself: entries with the query's source file or
identical pixels are skipped. The bank file (``.npz``, written atomically) holds the vectors, the
ids, their source paths and pixel digests, and the dataset root it was built from.
"""

from __future__ import annotations

import importlib
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rau.atomic import write_bytes
from rau.errors import CheckpointError, RauInputError
from rau.references.thumbnails import pixel_digest

FORMAT = "rau-bank-v1"
FAISS_MIN = 50_000
ENCODERS = ("litemedsam", "thumbnail")


def _litemedsam(images: Sequence[np.ndarray]) -> np.ndarray:
    """(N, 4096): LiteMedSAM's embedding (equalised, padded 256 frame) pooled to 4 x 4 cells."""
    from rau.encoders.litemedsam import encode_images

    return encode_images(images, grid=4).flatten(1).numpy().astype(np.float32)


def _thumbnail(images: Sequence[np.ndarray]) -> np.ndarray:
    from rau.references.thumbnails import thumbnail

    return np.stack([thumbnail(im, 32) for im in images]).astype(np.float32)


def get_encoder(name: str) -> Callable[[Sequence[np.ndarray]], np.ndarray]:
    """Encoder by name (see the module docstring); RauInputError for an unknown one."""
    if name == "litemedsam":
        return _litemedsam
    if name == "thumbnail":
        return _thumbnail
    if ":" in name:
        module, func = name.split(":", 1)
        try:
            return getattr(importlib.import_module(module), func)
        except (ImportError, AttributeError) as exc:
            raise RauInputError(f"--encoder: cannot import {name!r} ({exc.__class__.__name__})") from None
    raise RauInputError(f"--encoder: unknown {name!r}; choose {', '.join(ENCODERS)} or module:function")


def _normalise(v: np.ndarray, mean: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float32) - mean
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(n, 1e-12)


@dataclass
class ReferenceBank:
    ids: list[str]
    sources: list[str]
    digests: list[str]
    vectors: np.ndarray  # (N, D) centred, unit norm
    mean: np.ndarray  # (D,)
    encoder: str
    root: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return _normalise(get_encoder(self.encoder)(images), self.mean)

    def search(self, image: np.ndarray, k: int = 1, *, exclude_source: str | None = None,
               exclude_id: str | None = None) -> list[tuple[str, float]]:
        """Top-``k`` (id, cosine) for ``image``, best first, never the image itself."""
        if not isinstance(k, int) or k < 1:
            raise RauInputError(f"--k-references: must be a positive integer, got {k!r}")
        q = self.embed([image])[0]
        digest = pixel_digest(image)
        skip = {i for i, (s, d, n) in enumerate(zip(self.sources, self.digests, self.ids))
                if d == digest or (exclude_source and s == exclude_source) or n == exclude_id}
        want = min(len(self), k + len(skip))
        order, scores = self._top(q, want)
        out = [(self.ids[i], float(s)) for i, s in zip(order, scores) if i not in skip][:k]
        if not out:
            raise RauInputError("--bank: no reference left once the target itself is excluded")
        return out

    def fit(self, reference: np.ndarray, target: np.ndarray) -> float:
        """How well ``reference`` fits ``target``: centred cosine of their embeddings in this
        bank's space (1 = same picture; a flipped chest or another modality scores low)."""
        a, b = self.embed([reference, target])
        return float(a @ b)

    def fit_threshold(self, quantile: float = 0.05) -> float:
        """Abstention threshold calibrated on the bank alone: the ``quantile`` of each entry's
        best similarity to ANOTHER entry (what a matching reference typically scores)."""
        digests = np.array(self.digests)
        best = np.empty(len(self))
        for start in range(0, len(self), 1024):  # blocks of rows: memory stays O(1024 x N)
            sims = self.vectors[start : start + 1024] @ self.vectors.T
            sims[digests[start : start + 1024, None] == digests[None, :]] = -np.inf  # itself and its copies
            best[start : start + 1024] = sims.max(1)
        return float(np.quantile(best, quantile))

    def _top(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self) > FAISS_MIN:
            try:
                import faiss  # optional: exact inner-product search for large banks

                index = faiss.IndexFlatIP(self.vectors.shape[1])
                index.add(self.vectors)
                scores, order = index.search(q[None], k)
                return order[0], scores[0]
            except ImportError:
                pass
        scores = self.vectors @ q
        order = np.argsort(-scores, kind="stable")[:k]
        return order, scores[order]

    def save(self, path: str | Path) -> Path:
        buf = io.BytesIO()
        meta = {"format": FORMAT, "encoder": self.encoder, "root": self.root, **self.meta}
        np.savez(buf, vectors=self.vectors, mean=self.mean, ids=np.array(self.ids), sources=np.array(self.sources),
                 digests=np.array(self.digests), meta=np.array(json.dumps(meta)))
        return write_bytes(Path(path), buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> ReferenceBank:
        p = Path(path)
        if not p.is_file():
            raise RauInputError(f"--bank: {p} does not exist; build one with `rau index --dataset DIR --out {p}`")
        try:
            with np.load(p, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if meta.get("format") != FORMAT:
                    raise ValueError(f"format {meta.get('format')!r}")
                return cls([str(s) for s in z["ids"]], [str(s) for s in z["sources"]], [str(s) for s in z["digests"]],
                           z["vectors"].astype(np.float32), z["mean"].astype(np.float32), meta["encoder"], meta["root"],
                           {k: v for k, v in meta.items() if k not in ("format", "encoder", "root")})
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"--bank: {p} is not a readable rau bank ({exc.__class__.__name__}: {exc}); rebuild it") from None

    def dataset(self):
        """The annotated dataset the bank indexes (its entries, in bank order)."""
        from rau.data.dataset import load_dataset

        ds = load_dataset(self.root, arg="--bank dataset")
        missing = sorted(set(self.ids) - {e.id for e in ds.entries})
        if missing:
            raise RauInputError(f"--bank: {len(missing)} indexed images are gone from {self.root} (e.g. {missing[0]}); rebuild the bank")
        return ds.subset(self.ids)


def build_bank(dataset, *, encoder: str = "litemedsam", batch: int = 16, progress: bool = True) -> ReferenceBank:
    """Embed every image of an annotated dataset (folder path or Dataset)."""
    from tqdm.auto import tqdm

    from rau.data.dataset import Dataset, load_dataset
    from rau.data.io import read_image

    ds = dataset if isinstance(dataset, Dataset) else load_dataset(dataset, arg="--dataset")
    if len(ds) == 0:
        raise RauInputError(f"--dataset: {ds.root} has no images to index")
    fn = get_encoder(encoder)
    vecs, digests = [], []
    entries = ds.entries
    for start in tqdm(range(0, len(entries), batch), desc=f"index ({encoder})", unit="batch", disable=not progress):
        images = [read_image(e.image_path, arg="--dataset image")[0] for e in entries[start : start + batch]]
        vecs.append(np.asarray(fn(images), np.float32))
        digests += [pixel_digest(im) for im in images]
    raw = np.concatenate(vecs)
    mean = raw.mean(0)
    return ReferenceBank([e.id for e in entries], [str(e.image_path.resolve()) for e in entries], digests,
                         _normalise(raw, mean), mean, encoder, str(Path(ds.root).resolve()))


def predict_with_references(method, references: list, target, structures: list[str] | None = None):
    """Run ``method`` once per reference on ``target`` and fuse (:func:`fuse_results`), or, for a
    method that fuses references in memory (:attr:`rau.methods.interfaces.Method.fuses_in_memory`),
    once with all of them in memory.

    Asked structures: ``structures``, or those the first reference annotates non-empty (for
    memory fusion: those any reference annotates); each reference is asked the ones it annotates
    non-empty. Returns (fused TargetResult, asked)."""
    if len(references) > 1 and getattr(method, "fuses_in_memory", False):
        asked = list(structures) if structures is not None else sorted(
            {s for r in references for s in r.structures if r.annotates(s)})
        return method.predict_k(references, target, asked), asked
    asked = list(structures) if structures is not None else [s for s in references[0].structures
                                                             if references[0].annotates(s)]
    results = [method.predict(ref, target, [s for s in asked if ref.annotates(s)])
               for ref in references]
    return fuse_results(results, method.name), asked


def _fused_confidence(parts: list, w: np.ndarray) -> dict:
    """Confidence and presence of a pixel vote: the weighted means of the parts' (None if one has
    none); flagged (blank, noise, no fit) only when every part is, absent only when every part is."""
    conf = None if any(p.confidence is None for p in parts) else float(sum(wi * p.confidence for wi, p in zip(w, parts)))
    presence = None if any(p.presence is None for p in parts) else float(sum(wi * p.presence for wi, p in zip(w, parts)))
    flag = parts[0].flag if all(p.flag is not None for p in parts) else None
    absent = parts[0].absent if all(p.absent is not None for p in parts) else None
    return {"confidence": conf, "flag": flag, "presence": presence, "absent": absent}


def fuse_results(results: list, method_name: str | None = None, weights: Sequence[float] | None = None):
    """Fuse one target's results from k references (:class:`~rau.data.annotated.TargetResult`).

    Per structure: weighted pixel vote of the masks (a pixel is kept when the weights of the
    references that include it exceed half the total; a reference that found nothing votes
    against), box = the fused mask's box, score = weighted mean score; answer "yes" when the fused
    mask is not empty. ``weights`` default to equal. Seconds add up; the reference id lists all."""
    from rau.data.annotated import StructureResult, TargetResult
    from rau.geometry import mask_to_box

    if not results:
        raise ValueError("fuse_results: no results")
    if len(results) == 1:
        return results[0]
    w = np.asarray(weights if weights is not None else [1.0] * len(results), np.float64)
    w = w / w.sum()
    fused = {}
    for name in results[0].structures:
        parts = [r.structures.get(name) or StructureResult(name) for r in results]
        shape = next((p.mask.shape for p in parts if p.mask is not None), None)
        mask = None
        if shape is not None:
            votes = sum(wi * (p.mask.astype(np.float64) if p.mask is not None else 0.0) for wi, p in zip(w, parts))
            mask = np.asarray(votes > 0.5)
            mask = mask if mask.any() else None
        score = float(sum(wi * p.score for wi, p in zip(w, parts)))
        reason = None if mask is not None else f"fewer than half of the {len(parts)} references found it"
        fused[name] = StructureResult(name, "yes" if mask is not None else "no", mask_to_box(mask) if mask is not None else None,
                                      score, mask, reason, **_fused_confidence(parts, w))
    return TargetResult(results[0].target_id, "+".join(r.reference_id for r in results),
                        method_name or results[0].method, fused, float(sum(r.seconds for r in results)))
