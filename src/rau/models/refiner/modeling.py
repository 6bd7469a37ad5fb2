"""The registration refiner: a small U-Net that corrects a reference mask warped onto the target.

Registration (SimpleITK affine + B-spline, :mod:`rau.methods.registration`) brings the reference
image and its masks onto the target; what it gets wrong is local: an edge off by a few pixels,
a thin structure smeared, a part the smooth deformation could not bend. The refiner reads, per
structure, three aligned channels at ``image_size``:

1. the target image, 2. the reference image warped onto it, 3. the warped reference mask (the prior),

and writes the target's mask. It is class-agnostic: it never learns a structure's name, only how a
warped mask relates to the two images, so it can be trained on some structure families and
applied to others (``held_out`` records which families its training never saw). Its output logit
is ``unet(x) + gain * (2 * prior - 1)``: an untrained refiner returns the registration mask, and
training learns corrections to it.

Inputs are preprocessed at their own size (as the U-Net baseline, :mod:`rau.models.unet.modeling`)
and squashed to ``image_size`` (not aspect-preserving); probabilities are resized back.
"""

from __future__ import annotations

import numpy as np

from rau.models.refiner.configuration import RefinerConfig
from rau.models.unet.modeling import UNetModel, preprocess, resize


#: Square window around a prior (:func:`window`): margin = ``MARGIN`` x the box's longer side + ``PAD`` px.
MARGIN, PAD = 0.25, 8


def window(prior: np.ndarray, *, margin: float = MARGIN, pad: int = PAD, jitter: np.ndarray | None = None
           ) -> tuple[int, int, int] | None:
    """Square window (y0, x0, side) around the prior's >= 0.5 box, or None when the prior is empty.

    side = longer box side x (1 + 2 margin) + 2 pad; ``jitter`` (3,) in units of that side moves the
    centre (dy, dx) and scales the side (1 + j); the window may run past the image (zero-padded)."""
    ys, xs = np.nonzero(prior >= 0.5 * (255 if prior.dtype == np.uint8 else 1))
    if not len(ys):
        return None
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    side = max(y1 - y0, x1 - x0) * (1 + 2 * margin) + 2 * pad
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    if jitter is not None:
        cy, cx, side = cy + jitter[0] * side, cx + jitter[1] * side, side * (1 + jitter[2])
    side = max(16, int(round(side)))
    return int(round(cy - side / 2)), int(round(cx - side / 2)), side


def cut(array: np.ndarray, win: tuple[int, int, int]) -> np.ndarray:
    """array[..., y0:y0+side, x0:x0+side] with zeros outside the image."""
    y0, x0, side = win
    h, w = array.shape[-2:]
    out = np.zeros((*array.shape[:-2], side, side), array.dtype)
    ya, yb, xa, xb = max(0, y0), min(h, y0 + side), max(0, x0), min(w, x0 + side)
    if ya < yb and xa < xb:
        out[..., ya - y0:yb - y0, xa - x0:xb - x0] = array[..., ya:yb, xa:xb]
    return out


def build_refiner_network(config: RefinerConfig):
    """(B, 3, S, S) [target, warped reference, prior] -> (B, 1, S, S) logits. Seeded init."""
    import torch
    from monai.networks.nets import BasicUNet

    class RefinerNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = BasicUNet(spatial_dims=2, in_channels=3, out_channels=1, features=config.channels,
                                  norm=("instance", {"affine": True}))
            self.gain = torch.nn.Parameter(torch.tensor(float(config.prior_gain)))

        def forward(self, x):
            return self.unet(x) + self.gain * (2.0 * x[:, 2:3] - 1.0)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net = RefinerNet()
        torch.nn.init.zeros_(net.unet.final_conv.weight)  # start exactly at the prior
        torch.nn.init.zeros_(net.unet.final_conv.bias)
        return net


def image_channel(image: np.ndarray, config: RefinerConfig):
    """(H, W) image -> (1, 1, S, S) float32 tensor in [0, 1] (preprocess at native size, then resize)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(preprocess(image, config.preprocessing)))[None, None]
    return resize(t, (config.image_size, config.image_size)).clamp_(0.0, 1.0)


class RefinerModel(UNetModel):
    """A refiner network with its config and model folder (the U-Net's folder format and training
    protocol, :class:`rau.models.unet.modeling.UNetModel`)."""

    config_class = RefinerConfig
    kind = "refiner"

    def __repr__(self) -> str:
        return f"RefinerModel(image_size={self.config.image_size}, held_out={self.config.held_out})"

    @staticmethod
    def build_network(config):
        return build_refiner_network(config)

    def predict_probs(self, target: np.ndarray, warped: np.ndarray, priors: list[np.ndarray], *,
                      batch: int = 16) -> np.ndarray:
        """Refine ``priors`` (each (H, W) in [0, 1], warped onto ``target``) -> (K, H, W) float32.

        ``target``: (H, W) image; ``warped``: the reference image warped onto it, same size. Each
        prior is read in its :func:`window` at ``crop`` px; outside the window the prior stays."""
        import torch

        if not priors:
            return np.zeros((0, *target.shape), np.float32)
        s = self.config.image_size
        images = torch.cat([image_channel(target, self.config), image_channel(warped, self.config)], 1)[0].numpy()
        full = resize(torch.from_numpy(np.stack([np.asarray(q, np.float32) for q in priors]))[:, None], (s, s))
        full = full[:, 0].clamp_(0.0, 1.0).numpy()
        wins = [window(p) for p in full]
        todo = [i for i, w in enumerate(wins) if w is not None]
        with torch.inference_mode():
            for j in range(0, len(todo), batch):
                idx = todo[j:j + batch]
                x = torch.stack([torch.from_numpy(window_input(images, full[i], wins[i], self.config.crop)) for i in idx])
                prob = torch.sigmoid(self.net(x.to(self.device)).float()).cpu()
                for i, p in zip(idx, prob):
                    paste(full[i], resize(p[None], (wins[i][2],) * 2)[0, 0].numpy(), wins[i])
        out = resize(torch.from_numpy(full)[:, None], tuple(target.shape[:2]))
        return out[:, 0].clamp_(0.0, 1.0).numpy()


def window_input(images: np.ndarray, prior: np.ndarray, win: tuple[int, int, int], crop: int) -> np.ndarray:
    """(2, S, S) [target, warped] + (S, S) prior, all in [0, 1] -> (3, crop, crop) float32 window."""
    import torch

    x = cut(np.concatenate([images, prior[None]]).astype(np.float32, copy=False), win)
    return resize(torch.from_numpy(x)[None], (crop, crop))[0].clamp_(0.0, 1.0).numpy()


def paste(full: np.ndarray, part: np.ndarray, win: tuple[int, int, int]) -> None:
    """Write the (side, side) ``part`` into ``full`` at window ``win`` (clipped to the image), in place."""
    y0, x0, side = win
    h, w = full.shape
    ya, yb, xa, xb = max(0, y0), min(h, y0 + side), max(0, x0), min(w, x0 + side)
    if ya < yb and xa < xb:
        full[ya:yb, xa:xb] = part[ya - y0:yb - y0, xa - x0:xb - x0]
