"""Training-free memory readout: the reference masks carried to the target by feature similarity.

The non-parametric core of STM/XMem-style memory reading, on the same LiteMedSAM embeddings the memory
segmenter reads: each target cell takes the reference mask's value (area-pooled to the embedding grid)
from its ``neighbours`` most similar reference cells over all K references (cosine similarity / ``tau``,
minus ``locality`` x the squared distance between the two cells in units of the side: the same place is
the likelier match), softmax-weighted, then bilinear back to the 256 frame. No weight is trained, so it
knows no structure: on clavicles and scapulae the memory segmenter never trained on it follows the
reference far better than the trained model (drr-unseen 0.801 vs 0.598), on the structures the model
trained on it is worse (ARCADE, Wingspan). Used to measure how far the memory segmenter's mask strays
from what its own features say the reference shows (``readout_agreement``,
:mod:`rau.methods.confidence`). Settings: docs/HISTORY.md, 2026-12-06.
"""

from __future__ import annotations

from functools import lru_cache

from rau.models.memseg.configuration import FRAME

TAU = 0.05
NEIGHBOURS = 8
LOCALITY = 100.0


@lru_cache(maxsize=4)
def _squared_distances(grid: int):
    import torch

    yy, xx = torch.meshgrid(torch.arange(float(grid)), torch.arange(float(grid)), indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], 1) / grid
    return torch.cdist(pos, pos) ** 2


def feature_readout(target, references, reference_masks, *, tau: float = TAU, neighbours: int = NEIGHBOURS,
                    locality: float = LOCALITY):
    """target (C, G, G) embedding, references (K, C, G, G), reference_masks (S, K, FRAME, FRAME) in
    [0, 1] in the frame -> (S, FRAME, FRAME) float32 probabilities in the target's frame."""
    import torch
    import torch.nn.functional as F

    c, g = target.shape[0], target.shape[-1]
    k, s = references.shape[0], reference_masks.shape[0]
    if references.shape[1:] != target.shape or reference_masks.shape[1] != k:
        raise ValueError(f"feature_readout: target {tuple(target.shape)}, references {tuple(references.shape)} and "
                         f"masks {tuple(reference_masks.shape)} do not match")
    with torch.inference_mode():
        ft = F.normalize(target.reshape(c, g * g).float(), dim=0)
        fr = F.normalize(references.reshape(k, c, g * g).float(), dim=1).permute(1, 0, 2).reshape(c, k * g * g)
        logits = (ft.T @ fr) / tau - locality * _squared_distances(g).repeat(1, k)
        value, index = logits.topk(min(neighbours, k * g * g), dim=1)
        cells = F.adaptive_avg_pool2d(reference_masks.float().reshape(s * k, 1, FRAME, FRAME), g).reshape(s, k * g * g)
        read = (torch.softmax(value, 1)[None] * cells[:, index]).sum(-1)
        return F.interpolate(read.reshape(1, s, g, g), size=(FRAME, FRAME), mode="bilinear", align_corners=False)[0]
