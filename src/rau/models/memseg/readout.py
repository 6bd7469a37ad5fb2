"""Memory readout: the reference masks carried to the target by feature similarity.

The core of STM/XMem-style memory reading on LiteMedSAM embeddings: each target cell takes the
reference mask's value (area-pooled to the embedding grid) from its ``neighbours`` most similar
reference cells over all K references (cosine similarity / ``tau``, minus ``locality`` x the squared
distance between the two cells in units of the side: the same place is the likelier match),
softmax-weighted, then bilinear back to the 256 frame. The mask VALUES are carried, not drawn, so
the readout knows no structure's shape.

- :func:`feature_readout`: training-free, on the raw embeddings. On clavicles and scapulae the memory
  segmenter never trained on it follows the reference far better than the trained decoder (drr-unseen
  0.801 vs 0.598); on structures the decoder trained on it is worse. Used to measure how far the
  memory segmenter's mask strays from it (``readout_agreement``, :mod:`rau.methods.confidence`).
- :func:`readout` (differentiable, batched): the same reading on any features; a memory segmenter built
  with ``readout=True`` reads through a trained key projection (``MemSegNet.readout_key``, identity at
  initialisation, so it starts as :func:`feature_readout`), with a trained temperature and locality.

Settings: docs/HISTORY.md, 2026-12-06 (:data:`FOLLOW`: the 09:20 UTC entry).
"""

from __future__ import annotations

from functools import lru_cache

from rau.models.memseg.configuration import FRAME

TAU = 0.05
NEIGHBOURS = 8
LOCALITY = 100.0
#: The settings a memory segmenter's readout uses to copy a structure it never trained on
#: (:class:`rau.methods.memseg.MemSegSegmenter` ``follow_unknown``): the best of 27 on 144 random 3D
#: shapes no model here trained on (``scripts/readout_settings.py 10 3 4 5 6 7 8``: macro Dice 0.618,
#: against 0.575 for the settings above, which were chosen on drr-unseen targets and stay as the
#: trained readout's start and ``readout_agreement``'s definition).
FOLLOW = {"tau": 0.1, "neighbours": 4, "locality": 300.0}


@lru_cache(maxsize=4)
def _squared_distances(grid: int):
    import torch

    yy, xx = torch.meshgrid(torch.arange(float(grid)), torch.arange(float(grid)), indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], 1) / grid
    return torch.cdist(pos, pos) ** 2


def readout(target, references, reference_masks, *, tau=TAU, neighbours: int = NEIGHBOURS, locality=LOCALITY):
    """Differentiable batched readout. target (B, C, G, G) features, references (B, K, C, G, G),
    reference_masks (B, S, K, FRAME, FRAME) in [0, 1] -> (B, S, G, G) probabilities on the grid.
    ``tau`` and ``locality`` may be tensors (trained). The neighbours are found without gradients
    (the selection is piecewise constant) and only their logits are recomputed with them, so
    training holds (B, G^2, neighbours) logits, not (B, G^2, K G^2)."""
    import torch
    import torch.nn.functional as F

    b, c, g = target.shape[0], target.shape[1], target.shape[-1]
    k, s = references.shape[1], reference_masks.shape[1]
    if references.shape[0] != b or references.shape[2:] != target.shape[1:] or reference_masks.shape[:3] != (b, s, k):
        raise ValueError(f"readout: target {tuple(target.shape)}, references {tuple(references.shape)} and "
                         f"masks {tuple(reference_masks.shape)} do not match")
    n_cells = g * g
    ft = F.normalize(target.reshape(b, c, n_cells).float(), dim=1).transpose(1, 2)  # (B, N, C)
    fr = F.normalize(references.reshape(b, k, c, n_cells).float(), dim=2).permute(0, 1, 3, 2).reshape(b, k * n_cells, c)
    dist = _squared_distances(g).to(ft.device)  # (N, N)
    n = min(neighbours, k * n_cells)
    with torch.no_grad():
        tau_v, loc_v = float(tau), float(locality)
        index = torch.empty(b, n_cells, n, dtype=torch.long, device=ft.device)
        step = max(1, 2 ** 22 // (k * n_cells))  # target rows per chunk: ~16 MB of logits
        for i in range(b):
            for r in range(0, n_cells, step):
                logits = (ft[i, r:r + step] @ fr[i].T) / tau_v - loc_v * dist[r:r + step].repeat(1, k)
                index[i, r:r + step] = logits.topk(n, dim=1).indices
    picked = torch.gather(fr, 1, index.reshape(b, n_cells * n, 1).expand(-1, -1, c)).reshape(b, n_cells, n, c)
    cell = index % n_cells  # the picked cell's place in its reference
    near = torch.gather(dist.expand(b, -1, -1), 2, cell)  # (B, N, n) squared distance target cell -> picked cell
    value = (picked * ft[:, :, None]).sum(-1) / tau - locality * near
    cells = F.adaptive_avg_pool2d(reference_masks.float().reshape(b * s * k, 1, FRAME, FRAME), g)
    cells = cells.reshape(b, s, k * n_cells)
    weights = torch.softmax(value, 2)  # (B, N, n)
    values = torch.gather(cells, 2, index.reshape(b, 1, n_cells * n).expand(b, s, -1)).reshape(b, s, n_cells, n)
    return (weights[:, None] * values).sum(-1).reshape(b, s, g, g)


def to_frame(grid_probabilities):
    """(..., G, G) readout probabilities -> (..., FRAME, FRAME), bilinear."""
    import torch.nn.functional as F

    lead = grid_probabilities.shape[:-2]
    g = grid_probabilities.shape[-1]
    out = F.interpolate(grid_probabilities.reshape(-1, 1, g, g), size=(FRAME, FRAME), mode="bilinear", align_corners=False)
    return out.reshape(*lead, FRAME, FRAME)


def feature_readout(target, references, reference_masks, *, tau: float = TAU, neighbours: int = NEIGHBOURS,
                    locality: float = LOCALITY):
    """Training-free readout of one target. target (C, G, G) embedding, references (K, C, G, G),
    reference_masks (S, K, FRAME, FRAME) in [0, 1] in the frame -> (S, FRAME, FRAME) float32
    probabilities in the target's frame."""
    import torch

    k = references.shape[0]
    if references.shape[1:] != target.shape or reference_masks.shape[1] != k:
        raise ValueError(f"feature_readout: target {tuple(target.shape)}, references {tuple(references.shape)} and "
                         f"masks {tuple(reference_masks.shape)} do not match")
    with torch.inference_mode():
        return to_frame(readout(target[None], references[None], reference_masks[None], tau=tau, neighbours=neighbours,
                                locality=locality))[0]
