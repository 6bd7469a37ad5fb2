"""Choosing a reference for a target: the most similar annotated image by thumbnail NCC.

Every image is reduced to a ``size`` x ``size`` thumbnail (area-averaged, aspect ignored), then
standardised (zero mean, unit norm), so the dot product of two thumbnails is their normalised
cross-correlation. The reference with the highest NCC wins; the target itself is never returned
(same id, same file, or identical pixels), also when the target and reference sets are one folder.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image


def thumbnail(image: np.ndarray, size: int = 32) -> np.ndarray:
    """(H, W) float in [0, 1] -> (size*size,) float32, zero mean, unit L2 norm."""
    pil = Image.fromarray(np.asarray(image, dtype=np.float32), mode="F").resize((size, size), Image.BOX)
    v = np.asarray(pil, dtype=np.float64).ravel()
    v = v - v.mean()
    n = np.linalg.norm(v)
    return (v / n if n > 0 else v).astype(np.float32)


@dataclass
class ThumbnailBank:
    """Thumbnails of a set of annotated images, keyed by id (and source path for self-exclusion)."""

    ids: list[str]
    sources: list[str]
    vectors: np.ndarray  # (N, size*size)
    digests: list[str]

    @classmethod
    def build(cls, ids: list[str], sources: list[str], images, size: int = 32) -> ThumbnailBank:
        vecs, digests = [], []
        for img in images:
            vecs.append(thumbnail(img, size))
            digests.append(pixel_digest(img))
        return cls(list(ids), list(sources), np.stack(vecs), digests)

    def rank(self, image: np.ndarray, *, exclude_id: str | None = None, exclude_source: str | None = None) -> list[tuple[str, float]]:
        """All bank entries as (id, ncc), best first, without the query image itself."""
        q = thumbnail(image, int(round(np.sqrt(self.vectors.shape[1]))))
        scores = self.vectors @ q
        digest = pixel_digest(image)
        order = np.argsort(-scores, kind="stable")
        out = []
        for i in order:
            if self.ids[i] == exclude_id or (exclude_source and self.sources[i] == exclude_source) or self.digests[i] == digest:
                continue
            out.append((self.ids[i], float(scores[i])))
        return out


def pixel_digest(image: np.ndarray) -> str:
    """Identity of an image's pixels (float32 bytes), to exclude a query's own copies."""
    return hashlib.sha1(np.ascontiguousarray(image, dtype=np.float32).tobytes()).hexdigest()[:16]
