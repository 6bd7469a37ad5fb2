"""Per-structure confidence that an output is right, and abstention with a reason.

A method's raw ``score`` (e.g. a decoder's IoU estimate times a VLM's box probability) is neither
a probability nor comparable across methods: on pure noise the shipped default scored 0.022, on the
bundled chest 0.025. This module turns what is known about one output into a calibrated
probability that it is right, and says when not to answer.

- :func:`target_checks`: does the target look like an image at all (blank, noise)?
  Physical rules, the same for every method.
- :func:`mirror_reason`: is the target mirrored left-right against the reference? The laterality
  model (:mod:`rau.models.laterality`) reads which way round each image is from its own anatomy;
  a confident disagreement of the two is the "mirrored" rule, the same for every method.
- :func:`kind_reason`: are the reference and the target different kinds of image (an angiogram
  against a chest, a CT slice, smooth noise)? The image-kind model (:mod:`rau.models.imagekind`)
  reads each image on its own; a low probability that the two are the same kind is the first
  "reference does not fit" rule, the same for every method, before the calibration's thumbnail-fit rule.
- :func:`pair_features` and :func:`structure_features`: cheap measurements of one output
  (reference/target thumbnail agreement, and whether it fits the target better mirrored; the
  mask's size and position next to the reference's, its fragmentation, the method's own score);
  and what a segmenter measures itself (:attr:`rau.methods.interfaces.SegmentationOutput.features`):
  the memory segmenter's ``readout_agreement``, the Dice between its mask and a training-free readout
  of the reference mask through the encoder's own features (:mod:`rau.models.memseg.readout`): low
  where the decoder redraws a structure it trained on instead of the one the reference shows.
- :class:`Calibration`: a logistic model over those features followed by isotonic regression,
  fitted on a calibration split (pairs never used by the bench) per method
  (:func:`rau.eval.calibrate.fit_calibration`), stored as JSON next to the weights
  (``rau/assets/calibration/<method>.json``). ``predict`` -> P(Dice >= 0.5), or, for a structure
  absent from the target, P(the method says so).
- :class:`Presence`: the same kind of model (logistic + isotonic) for another question, whether the
  structure is in the target at all (a coronary segment the reference shows is often not in the
  target's view), fitted where the calibration split has absent structures; stored inside the
  calibration. Below its threshold an output is withheld as "structure absent from target".
- :func:`assess` sets ``confidence``, ``presence`` and the reasons it would abstain on every
  structure of a result (masks untouched); :func:`abstain` then removes the masks below
  ``min_confidence`` (default: the calibration's threshold) and those judged absent, with the reason.

Everything here is numpy/scipy and runs in milliseconds per target, except the two affine
registrations of ``mirror_fit_gain`` (SimpleITK, 0.15-0.35 s per target, measured only where something reads it:
:func:`reads_mirror_fit`) and the laterality and image-kind CNNs (a 64 x 64 thumbnail per image, milliseconds).
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from rau.errors import RauInputError

#: The features of one output, in the order the logistic model reads them.
FEATURES = ("score", "found", "log_area_ratio", "centroid_shift", "largest_part", "fit", "mirror_gain",
            "orientation", "smoothness", "contrast", "score_logit", "edge", "inside_contrast", "agreement", "support",
            "readout_agreement", "p_yes", "mirror_fit_gain", "visibility", "second_opinion")

#: Features only a k-reference result has (:func:`k_reference_features`): a calibration fitted on
#: one-reference outputs lacks them, one fitted with ``rau calibrate --k-references K`` reads them.
K_FEATURES = ("agreement", "support")

#: Features a segmenter measures on its own output (:attr:`rau.methods.interfaces.SegmentationOutput.features`):
#: only the memory segmenter's results have them, and a calibration fitted without them ignores them.
SEGMENTER_FEATURES = ("readout_agreement",)

#: Features a localizer measures (:attr:`rau.methods.interfaces.Localization.features`): the RAU VLM's
#: P(yes) for "is the structure visible", for every structure it answers; a calibration fitted without
#: it ignores it.
LOCALIZER_FEATURES = ("p_yes",)

#: Features only some targets or structures have: the shipped visibility model's P(the target shows
#: it) (:func:`default_visibility`), for the names it learnt (ARCADE's segments; a lung has none), and
#: ``second_opinion``, the agreement of the output with a second segmenter's mask on the targets that
#: get one (:mod:`rau.methods.second_opinion`: angiograms, for ``reg-refine``). A calibration fits them
#: where some of its outputs have them (the others read as the mean).
TARGET_FEATURES = ("visibility", "second_opinion")

#: A feature the calibration itself supplies: the share of right outputs for the structure's name on
#: the calibration split, shrunk towards the pooled share (:meth:`Calibration.structure_prior`). A
#: structure the calibration never saw (a user's own) gets the pooled share.
PRIOR_FEATURE = "structure_prior"

#: Below this standard deviation (intensities in [0, 1]) a target is blank: nothing to answer on.
MIN_CONTRAST = 0.01
#: Below this lag-1 autocorrelation (at 128 px) a target is noise: every radiograph measured on the
#: datasets is above 0.8 (docs/RESULTS.md), white noise is near 0.
MIN_SMOOTHNESS = 0.5

#: Below this laterality agreement (:meth:`rau.models.laterality.modeling.LateralityModel.agreement`,
#: in [-1, 1]; P(same way round) = (1 + agreement) / 2, so below 0.25) the target is taken as
#: mirrored: both images show a side, confidently opposite. Since s22 the agreement reads the score
#: with its fitted temperature (0.83, was the uncalibrated 0.5); on the calibration pairs the rule
#: flags the same pairs either way.
#: Set on the calibration pairs (docs/HISTORY.md, 2026-12-06 s20): it catches 12 of the 12 mirrored
#: calibration radiographs and flags 0 of 80 correct Wingspan, 0 of 80 DRR and 0 of 240 correct
#: ARCADE pairs, with the most similar reference or a random one (s20 counted 2 ARCADE pairs: its
#: script read two references from ARCADE val, which shares ids with train; s22).
MIN_LATERALITY = -0.5

#: Below this probability that the reference and the target are the same kind of image (the
#: image-kind model's agreement, :meth:`rau.models.imagekind.modeling.ImageKindModel.agreement`)
#: the reference does not fit, whatever the thumbnail fit: an angiogram against a chest, a CT slice,
#: smooth noise. Not tuned (the two are likelier different kinds than the same); on the calibration
#: pairs it flags 0 of 400 correct pairs and every angiogram and smooth-noise target (docs/HISTORY.md,
#: 2026-12-06 s21).
MIN_KIND = 0.5

#: The former "mirrored" rule, used only where a pair has no ``laterality`` (no laterality model,
#: or a report made before it): above this gain in affine-registered correlation from mirroring the
#: reference left-right (:func:`rau.methods.registration.mirror_fit_gain`). With a reference
#: unlike the target it flagged 10% of correct Wingspan and 41% of correct ARCADE pairs.
MAX_MIRROR_FIT_GAIN = 0.0

#: The default ``min_confidence`` of a method without a calibration: above 0, so flagged targets
#: (blank, noise) are withheld; outputs without a confidence never are.
UNCALIBRATED_THRESHOLD = 1e-6

REASON_BLANK = "reference does not fit this image: the target is blank"
REASON_NOISE = "reference does not fit this image: the target looks like noise"
REASON_FIT = "reference does not fit this image"
REASON_MIRROR = "reference does not fit this image: the target looks mirrored left-right"
REASON_ABSENT = "structure absent from target"
REASON_LOW = "low confidence"
#: The pair rules, in the order they are tried (:meth:`Calibration.pair_rule`): reference fit,
#: the "mirrored" rule (:func:`mirror_reason`), the thumbnail orientation rule (off in current calibrations).
RULES = ("fit", "mirrored", "orientation")


def rule_key(rule: str, found: bool = True) -> str:
    """The key of :attr:`Calibration.rule_rates` for an output pair rule ``rule`` withholds: the
    rule itself where the method delivered a mask, ``"<rule>, no mask"`` where it answered "not
    there" (on an angiogram against a chest that answer is right, a mask never is)."""
    return rule if found else f"{rule}, no mask"


CALIBRATION_DIR = Path(__file__).resolve().parents[1] / "assets" / "calibration"


# ---- measurements (pure functions)


def _small(image: np.ndarray, size: int) -> np.ndarray:
    pil = Image.fromarray(np.asarray(image, np.float32), mode="F").resize((size, size), Image.BOX)
    return np.asarray(pil, np.float64)


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    n = np.linalg.norm(a) * np.linalg.norm(b)
    return float((a * b).sum() / n) if n > 0 else 0.0


def target_checks(image: np.ndarray) -> dict[str, float]:
    """``contrast`` (standard deviation) and ``smoothness`` (mean lag-1 autocorrelation along rows
    and columns) of the target at 128 x 128; a blank target has contrast 0, white noise smoothness 0."""
    x = _small(image, 128)
    contrast = float(x.std())
    if contrast == 0:
        return {"contrast": 0.0, "smoothness": 0.0}
    smooth = 0.5 * (_ncc(x[:, 1:], x[:, :-1]) + _ncc(x[1:, :], x[:-1, :]))
    return {"contrast": contrast, "smoothness": float(smooth)}


def pair_features(reference: np.ndarray, target: np.ndarray, *, registered: bool = True,
                  mirror_fit: bool = True) -> dict[str, float]:
    """``fit``: NCC of the 32 x 32 thumbnails of reference and target (the reference-choice rule's
    similarity); ``mirror_gain``: how much better the target's thumbnail fits the left-right mirrored
    reference's; ``orientation``: :meth:`Orientation.agreement` of the shipped orientation model
    (< 0: the target faces the other way; 0 without the model); with ``registered``,
    ``mirror_fit_gain``: :func:`rau.methods.registration.mirror_fit_gain`, and ``laterality``: the
    shipped laterality model's agreement (:func:`default_laterality`; the "mirrored" rule's
    measurement; absent without the model), and ``kind``: the shipped image-kind model's probability
    that the two are the same kind of image (:func:`default_imagekind`; the first "does not fit"
    rule, :func:`kind_reason`; absent without the model). ``mirror_fit`` False skips ``mirror_fit_gain``
    (two or three affine registrations, 0.15-0.35 s) where nothing reads it (:func:`reads_mirror_fit`)."""
    from rau.methods.registration import mirror_fit_gain

    r, t = _small(reference, 32), _small(target, 32)
    fit = _ncc(r, t)
    orient = default_orientation()
    out = {"fit": fit, "mirror_gain": _ncc(r[:, ::-1], t) - fit,
           "orientation": orient.agreement(reference, target) if orient is not None else 0.0}
    if registered:
        if mirror_fit:
            out["mirror_fit_gain"] = mirror_fit_gain(target, reference)
        lat = default_laterality()
        if lat is not None:
            out["laterality"] = lat.agreement(reference, target)
        p_ref = image_kind_probs(reference)
        if p_ref is not None:  # P(same kind) = sum_k p_reference(k) p_target(k)
            out["kind"] = float(p_ref @ image_kind_probs(target))
    return out


@dataclass
class Orientation:
    """Which way round an image is: a linear score on the left-right antisymmetric part of its
    rank-equalised ``size`` x ``size`` thumbnail. The score is odd under mirroring (a mirrored
    image scores the negative), so the product of a reference's and a target's squashed scores
    (:meth:`agreement`) is > 0 when they face the same way, < 0 when one is mirrored, and near 0
    when the anatomy shows no side (the model learnt none for it). Fitted on calibration images and
    their mirror images (:func:`rau.eval.calibrate.fit_orientation`); one model for all methods."""

    size: int
    weights: list[float]
    record: dict[str, Any] = field(default_factory=dict)

    def score(self, image: np.ndarray) -> float:
        return float(orientation_features(image, self.size) @ np.asarray(self.weights))

    def agreement(self, reference: np.ndarray, target: np.ndarray) -> float:
        return float(np.tanh(self.score(reference)) * np.tanh(self.score(target)))

    def save(self, path: str | Path) -> Path:
        from rau.atomic import write_json

        return write_json(path, dataclasses.asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> Orientation:
        try:
            o = cls(**json.loads(Path(path).read_text()))
            if len(o.weights) != o.size * (o.size // 2):
                raise ValueError(f"{len(o.weights)} weights for size {o.size}")
        except (OSError, ValueError, TypeError) as exc:
            raise RauInputError(f"orientation model {path}: not readable ({exc})") from None
        return o


def orientation_features(image: np.ndarray, size: int = 16) -> np.ndarray:
    """The left half of the antisymmetric part (image minus its mirror) of the rank-equalised
    ``size`` x ``size`` thumbnail: (size * size // 2,), odd under mirroring."""
    x = _small(image, size)
    x = np.argsort(np.argsort(x.ravel(), kind="stable"), kind="stable").reshape(x.shape) / x.size
    return (x - x[:, ::-1])[:, : size // 2].ravel()


_ORIENTATION: dict[str, Orientation | None] = {}


def default_orientation() -> Orientation | None:
    """The shipped orientation model (``assets/calibration/orientation.json``), or None; read once."""
    path = CALIBRATION_DIR / "orientation.json"
    key = str(path)
    if key not in _ORIENTATION:
        _ORIENTATION[key] = Orientation.load(path) if path.is_file() else None
    return _ORIENTATION[key]


LATERALITY_DIR = Path(__file__).resolve().parents[1] / "assets" / "laterality"
IMAGEKIND_DIR = Path(__file__).resolve().parents[1] / "assets" / "imagekind"
VISIBILITY_DIR = Path(__file__).resolve().parents[1] / "assets" / "visibility"
_SHIPPED: dict[str, Any] = {}


def _shipped(folder: Path, load) -> Any:
    """The model folder ``folder`` read by ``load`` once, or None where it is not there."""
    key = str(folder)
    if key not in _SHIPPED:
        _SHIPPED[key] = load(folder) if (folder / "model.safetensors").is_file() else None
    return _SHIPPED[key]


def default_laterality():
    """The shipped laterality model (``assets/laterality``, on CPU), or None where it is not there; read once."""
    from rau.models.laterality.modeling import LateralityModel

    return _shipped(LATERALITY_DIR, lambda f: LateralityModel.from_pretrained(f, what="shipped laterality model"))


def default_imagekind():
    """The shipped image-kind model (``assets/imagekind``, on CPU), or None where it is not there; read once."""
    from rau.models.imagekind.modeling import ImageKindModel

    return _shipped(IMAGEKIND_DIR, lambda f: ImageKindModel.from_pretrained(f, what="shipped image-kind model"))


#: Images whose image-kind probabilities :func:`image_kind_probs` remembers: a target's are read by the
#: "does not fit" rule and by the second opinion (:mod:`rau.methods.second_opinion`), a reference's for
#: every target it serves.
KIND_MEMO_IMAGES = 4
_KIND_MEMO: OrderedDict = OrderedDict()


def image_kind_probs(image: np.ndarray) -> np.ndarray | None:
    """The shipped image-kind model's probabilities of ``image``'s kind, in the order of its
    ``config.kinds`` (None without the model); the last :data:`KIND_MEMO_IMAGES` images are remembered
    by their pixels."""
    from rau.references.thumbnails import pixel_digest

    model = default_imagekind()
    if model is None:
        return None
    key = (model, pixel_digest(image), np.shape(image))
    if key in _KIND_MEMO:
        _KIND_MEMO.move_to_end(key)
    else:
        _KIND_MEMO[key] = model.probs(image)
        while len(_KIND_MEMO) > KIND_MEMO_IMAGES:
            _KIND_MEMO.popitem(last=False)
    return _KIND_MEMO[key]


def default_visibility():
    """The shipped visibility model (``assets/visibility``, on CPU), or None where it is not there; read once."""
    from rau.models.visibility.modeling import VisibilityModel

    return _shipped(VISIBILITY_DIR, lambda f: VisibilityModel.from_pretrained(f, what="shipped visibility model"))


def target_visibility(target: np.ndarray, names) -> dict[str, float]:
    """name -> the shipped visibility model's P(the target shows it), for those of ``names`` it
    learnt (none without the model, or where it learnt none of them: then it is not run)."""
    vis = default_visibility()
    if vis is None or not set(names) & set(vis.config.structures):
        return {}
    p = vis.probs(target)
    return {n: p[n] for n in names if n in p}


def _centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return np.array([xs.mean() / w, ys.mean() / h])


def score_logit(score: float) -> float:
    """The method's score on the logit scale (clipped to [1e-4, 1 - 1e-4]): it spreads the scores
    near 1, where a split with nearly all outputs right (DRR) keeps its few wrong ones. Derived from
    ``score``, so a report written before it existed gets it back (:func:`with_derived`)."""
    s = min(max(float(score), 1e-4), 1 - 1e-4)
    return float(np.log(s / (1 - s)))


def with_derived(features: dict[str, float]) -> dict[str, float]:
    """``features`` with the derived ones (``score_logit``) filled in where missing."""
    if "score_logit" in features or "score" not in features:
        return features
    return {**features, "score_logit": score_logit(features["score"])}


def structure_features(score: float, mask: np.ndarray | None, reference_mask: np.ndarray) -> dict[str, float]:
    """Features of one structure's output: the method's ``score`` (and ``score_logit``), ``found``,
    ``log_area_ratio`` (mask area fraction over the reference mask's), ``centroid_shift`` (centroid
    distance in image fractions), ``largest_part`` (share of the mask in its largest connected part)."""
    ref_frac = float(reference_mask.mean())
    scores = {"score": float(score), "score_logit": score_logit(score)}
    if mask is None or not mask.any():
        return {**scores, "found": 0.0, "log_area_ratio": float(np.log((1e-4) / (ref_frac + 1e-4))),
                "centroid_shift": 1.0, "largest_part": 0.0}
    labels, n = ndimage.label(mask)
    sizes = np.bincount(labels.ravel())[1:] if n else np.array([0])
    return {**scores, "found": 1.0,
            "log_area_ratio": float(np.log((mask.mean() + 1e-4) / (ref_frac + 1e-4))),
            "centroid_shift": float(np.linalg.norm(_centroid(mask) - _centroid(reference_mask))),
            "largest_part": float(sizes.max() / max(sizes.sum(), 1))}


def gray_float(image: np.ndarray) -> np.ndarray:
    """The image as one float32 channel (colour averaged), as :func:`mask_image_features` reads it."""
    x = np.asarray(image, np.float32)
    return x.mean(-1) if x.ndim == 3 else x


def image_gradient(image: np.ndarray) -> np.ndarray:
    """Gradient magnitude of the target (Gaussian sigma 1 px, Sobel), shared by its structures'
    :func:`mask_image_features`."""
    x = ndimage.gaussian_filter(gray_float(image), 1.0)
    return np.hypot(ndimage.sobel(x, 0), ndimage.sobel(x, 1))


def mask_image_features(image: np.ndarray, mask: np.ndarray | None, gradient: np.ndarray | None = None) -> dict[str, float]:
    """How well an output mask sits on the target's own pixels: ``edge``, the mean gradient
    magnitude on the mask's boundary over the image's mean (a mask that follows a structure's
    edges, a vessel's walls, reads high; one on featureless background near 1 or below), and
    ``inside_contrast``, the absolute difference of mean intensity inside the mask and in a ring
    around it (1% of the image side wide) over the intensity spread of both (a mask on a
    contrast-filled vessel or a lung reads high). Both 0 without a mask."""
    if mask is None or not mask.any():
        return {"edge": 0.0, "inside_contrast": 0.0}
    x = gray_float(image)  # no copy when the caller passes gray_float's result
    g = image_gradient(x) if gradient is None else gradient
    mask = np.asarray(mask, bool)
    boundary = mask & ~ndimage.binary_erosion(mask)
    width = max(2, round(0.01 * max(mask.shape)))
    ring = ndimage.binary_dilation(mask, iterations=width) & ~mask
    edge = float(g[boundary].mean() / (g.mean() + 1e-6)) if boundary.any() else 0.0
    if not ring.any():  # the mask covers the image
        return {"edge": edge, "inside_contrast": 0.0}
    spread = float(x[mask | ring].std()) + 1e-6
    return {"edge": edge, "inside_contrast": float(abs(x[ring].mean() - x[mask].mean()) / spread)}


def mirror_reason(pair: dict[str, float]) -> str | None:
    """"Mirrored" from the pair's ``laterality`` (below :data:`MIN_LATERALITY`), or None: the same
    rule for every method, no calibration. A pair without ``laterality`` falls back to the former
    registration rule (``mirror_fit_gain`` > 0), which cannot tell a mirrored chest from a correct
    one against an unlike reference (docs/HISTORY.md, 2026-12-06 s19)."""
    lat = pair.get("laterality")
    if lat is not None:
        if lat < MIN_LATERALITY:
            return f"{REASON_MIRROR} (the two images show opposite sides: laterality agreement {lat:+.2f})"
        return None
    gain = pair.get("mirror_fit_gain")
    if gain is not None and gain > MAX_MIRROR_FIT_GAIN:
        return f"{REASON_MIRROR} (it fits the mirrored reference better: correlation {gain:+.3f})"
    return None


def kind_reason(pair: dict[str, float]) -> str | None:
    """"Does not fit" from the pair's ``kind`` (below :data:`MIN_KIND`: the two look like different
    kinds of image), or None; the same rule for every method, no calibration, tried before the
    calibration's thumbnail-fit rule (:meth:`Calibration.fit_reason`)."""
    kind = pair.get("kind")
    if kind is not None and kind < MIN_KIND:
        return f"{REASON_FIT} (the two look like different kinds of image: same kind with probability {kind:.2f})"
    return None


def uncalibrated_reason(pair: dict[str, float]) -> str | None:
    """The pair rules of a method without a calibration: the default method's "does not fit" rule
    (its calibration's ``min_fit``; the thumbnail fit does not depend on the method), then "mirrored".
    Before the laterality rule, the registration "mirrored" rule caught most angiograms read against a
    chest for these methods, for the wrong reason (docs/HISTORY.md, 2026-12-06 s20)."""
    from rau.methods.registry import DEFAULT_METHOD

    if DEFAULT_METHOD not in _DEFAULT_RULES:  # read once
        _DEFAULT_RULES[DEFAULT_METHOD] = default_calibration(DEFAULT_METHOD)
    default = _DEFAULT_RULES[DEFAULT_METHOD]
    why = default.fit_reason(pair) if default is not None else kind_reason(pair)
    return why or mirror_reason(pair)


_DEFAULT_RULES: dict[str, Any] = {}


def target_reason(checks: dict[str, float]) -> str | None:
    """The reason to abstain on every structure of a target from its own pixels, or None."""
    if checks["contrast"] < MIN_CONTRAST:
        return f"{REASON_BLANK} (contrast {checks['contrast']:.4f} < {MIN_CONTRAST})"
    if checks["smoothness"] < MIN_SMOOTHNESS:
        return f"{REASON_NOISE} (neighbour correlation {checks['smoothness']:.2f} < {MIN_SMOOTHNESS})"
    return None


# ---- the calibrated model


def _feature(row: dict[str, float], name: str, mean: float) -> float:
    """Feature ``name`` of one output; one that only some segmenters, localizers or structures have
    (:data:`SEGMENTER_FEATURES`, :data:`LOCALIZER_FEATURES`, :data:`TARGET_FEATURES`: e.g. ``rau-seg``
    with the former ``<seg>`` head has no memory readout, a lung no visibility) reads as the
    calibration split's mean, no evidence either way. Any other missing feature is an error (KeyError)."""
    if name in row or name not in SEGMENTER_FEATURES + LOCALIZER_FEATURES + TARGET_FEATURES:
        return row[name]
    return mean


def _logistic_iso(x: np.ndarray, mean, std, coef, intercept, iso_x, iso_y) -> np.ndarray:
    """A logistic model on standardised features, then its isotonic map -> probabilities in [0, 1]."""
    z = (x - np.asarray(mean)) / np.asarray(std)
    p = 1.0 / (1.0 + np.exp(-(z @ np.asarray(coef) + intercept)))
    return np.clip(np.interp(p, iso_x, iso_y), 0.0, 1.0)


@dataclass
class Presence:
    """P(the structure is in the target) of one output: a logistic model on standardised
    ``features`` (:data:`FEATURES` the calibration split measured, and :data:`PRIOR_FEATURE`, here
    the structure name's shrunk share of targets that hold it when the reference does:
    ``structure_rates``, ``prior_rate`` for a name it never saw) followed by an isotonic map,
    fitted on the correct-pair calibration outputs (:func:`rau.eval.calibrate.fit_presence`).
    ``threshold``: below it the output is "structure absent from target" (at most 0.5, the
    likelier answer; lower where that would withhold more than 5% of right masks). ``record``: its
    out-of-fold figures."""

    features: list[str]
    mean: list[float]
    std: list[float]
    coef: list[float]
    intercept: float
    iso_x: list[float]
    iso_y: list[float]
    threshold: float
    structure_rates: dict[str, float] = field(default_factory=dict)
    prior_rate: float = 0.5
    record: dict[str, Any] = field(default_factory=dict)

    def predict(self, feats: list[dict[str, float]], structures: list[str]) -> np.ndarray:
        """P(present) for each feature dict, ``structures`` their names."""
        rows = [with_derived(r) for r in feats]
        x = np.array([[self.structure_rates.get(n, self.prior_rate) if k == PRIOR_FEATURE else _feature(r, k, m)
                       for k, m in zip(self.features, self.mean)]
                      for r, n in zip(rows, structures)], np.float64).reshape(len(rows), len(self.features))
        return _logistic_iso(x, self.mean, self.std, self.coef, self.intercept, self.iso_x, self.iso_y)

    def reason(self, p: float) -> str | None:
        """"Structure absent from target" when ``p`` is below the threshold, else None."""
        return f"{REASON_ABSENT} (presence {p:.2f} < {self.threshold:.2f})" if p < self.threshold else None

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Presence:
        pres = cls(**doc)
        n = len(pres.features)
        if not (len(pres.mean) == len(pres.std) == len(pres.coef) == n) or len(pres.iso_x) != len(pres.iso_y) \
                or not pres.iso_x or unknown_features(pres.features):
            raise ValueError("presence: inconsistent lengths or unknown features")
        return pres


@dataclass
class Calibration:
    """Logistic model + isotonic map, per method; JSON on disk.

    ``mean``/``std``/``coef``/``intercept``: the logistic model on standardised :data:`FEATURES`;
    ``iso_x``/``iso_y``: the isotonic map from its probability to the calibrated one;
    ``threshold``: the default ``min_confidence`` (chosen on the calibration split: at most 5% of
    right outputs abstain); ``min_fit``/``min_orientation``: pair-level rules ("reference does not
    fit", "mirrored") chosen on the same split; ``gated_rate``: the share of right outputs among
    the calibration outputs those rules caught (their confidence); ``target_rate``: the share of
    right "not there" answers among the calibration's blank and noise targets, which are never run
    (their confidence; None in files from before it: ``gated_rate``); ``structure_rates`` /
    ``prior_rate``: per structure name, the shrunk share of right outputs on the calibration split,
    and the pooled share for names it never saw (:data:`PRIOR_FEATURE`, when ``features`` has it);
    ``rule_rates`` / ``rule_pooled``: the same per pair rule (:data:`RULES`) among the outputs that
    rule caught (a mirrored radiograph's heart mask is usually right, its lungs are swapped), kept
    apart for outputs with and without a mask (:func:`rule_key`), the confidence of an output a
    rule withholds (empty in files from before them: ``gated_rate``);
    ``presence``: the :class:`Presence` model as JSON (None where the calibration split had too few
    absent structures, and in files from before it);
    ``record``: how it was made."""

    method: str
    mean: list[float]
    std: list[float]
    coef: list[float]
    intercept: float
    iso_x: list[float]
    iso_y: list[float]
    threshold: float
    min_fit: float | None = None
    min_orientation: float | None = None
    gated_rate: float = 0.0
    features: list[str] = field(default_factory=lambda: list(FEATURES))
    record: dict[str, Any] = field(default_factory=dict)
    structure_rates: dict[str, float] = field(default_factory=dict)
    prior_rate: float = 0.5
    target_rate: float | None = None
    rule_rates: dict[str, dict[str, float]] = field(default_factory=dict)
    rule_pooled: dict[str, float] = field(default_factory=dict)
    presence: dict[str, Any] | None = None

    def presence_model(self) -> Presence | None:
        """The :class:`Presence` model, or None (checked when the file is loaded)."""
        return None if self.presence is None else Presence.from_json(self.presence)

    def rule_confidence(self, rule: str, name: str | None = None, found: bool = True) -> float:
        """The confidence of structure ``name``'s output when pair rule ``rule`` (:data:`RULES`)
        withholds it, ``found``: whether the method delivered a mask (:func:`rule_key`): the
        calibration's shrunk share right for that key and name, the key's pooled share for a name it
        never saw; a key it never saw falls back to the rule's key with a mask (files from before
        the split), then to ``gated_rate`` (a rule it never saw)."""
        key = rule_key(rule, found)
        if key not in self.rule_pooled:
            key = rule
        if key not in self.rule_pooled:
            return float(self.gated_rate)
        return float(self.rule_rates.get(key, {}).get(name, self.rule_pooled[key]))

    def never_run_confidence(self) -> float:
        """The confidence of an output on a blank or noise target (never run: "not there")."""
        return self.gated_rate if self.target_rate is None else float(self.target_rate)

    def structure_prior(self, name: str) -> float:
        """The calibration split's (shrunk) share of right outputs for structure ``name``; the
        pooled share for a name it never saw."""
        return float(self.structure_rates.get(name, self.prior_rate))

    def predict(self, feats: dict[str, float] | list[dict[str, float]],
                structures: list[str] | None = None) -> np.ndarray:
        """Calibrated P(right) for one feature dict or a list of them; ``structures``: their
        structure names, which supply :data:`PRIOR_FEATURE` where the features lack it."""
        rows = [with_derived(r) for r in ([feats] if isinstance(feats, dict) else feats)]
        if PRIOR_FEATURE in self.features:
            names = structures or [None] * len(rows)
            rows = [r if PRIOR_FEATURE in r else {**r, PRIOR_FEATURE: self.structure_prior(n)} for r, n in zip(rows, names)]
        x = np.array([[_feature(r, k, m) for k, m in zip(self.features, self.mean)] for r in rows], np.float64)
        return _logistic_iso(x, self.mean, self.std, self.coef, self.intercept, self.iso_x, self.iso_y)

    def fit_reason(self, pair: dict[str, float]) -> str | None:
        """"Reference does not fit" (other anatomy, modality, noise) from the pair features, or None:
        the image-kind rule (:func:`kind_reason`), then the thumbnail fit below ``min_fit``."""
        why = kind_reason(pair)
        if why is not None:
            return why
        if self.min_fit is not None and pair["fit"] < self.min_fit:
            return f"{REASON_FIT} (similarity {pair['fit']:.2f} < {self.min_fit:.2f}: other anatomy or modality?)"
        return None

    def orientation_reason(self, pair: dict[str, float]) -> str | None:
        """"Mirrored" from the orientation model's agreement, or None."""
        if self.min_orientation is not None and pair.get("orientation", 0.0) < self.min_orientation:
            return f"{REASON_MIRROR} (orientation agreement {pair['orientation']:+.2f} < {self.min_orientation:+.2f})"
        return None

    def pair_rule(self, pair: dict[str, float]) -> tuple[str, str] | None:
        """The pair rules in order, first one wins -> (its :data:`RULES` key, the reason), or None:
        "does not fit" (an angiogram against a chest may also fit the chest better mirrored, and
        "mirrored" would name the wrong cause), the "mirrored" rule (:func:`mirror_reason`),
        then the orientation rule."""
        for key, reason in zip(RULES, (self.fit_reason, mirror_reason, self.orientation_reason)):
            why = reason(pair)
            if why is not None:
                return key, why
        return None

    def pair_reason(self, pair: dict[str, float]) -> str | None:
        """The reason of :meth:`pair_rule`, or None."""
        rule = self.pair_rule(pair)
        return rule[1] if rule else None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> Path:
        from rau.atomic import write_json

        return write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
            cal = cls(**doc)
            n = len(cal.features)
            if not (len(cal.mean) == len(cal.std) == len(cal.coef) == n) or len(cal.iso_x) != len(cal.iso_y) \
                    or not cal.iso_x or unknown_features(cal.features):
                raise ValueError("inconsistent lengths or unknown features")
            cal.presence_model()
        except (OSError, ValueError, TypeError) as exc:
            raise RauInputError(f"calibration {path}: not a rau calibration file ({exc})") from None
        return cal


def unknown_features(names: list[str]) -> list[str]:
    return [n for n in names if n not in FEATURES and n != PRIOR_FEATURE]


def calibration_path(method: str, k_references: bool = False, decode: bool = False, visible: bool = False,
                     memory: bool = False) -> Path:
    """Where the shipped calibration of ``method`` lives: ``assets/calibration/<method>.json``, for its
    k-reference results ``<method>_k.json``, for a memory-segmenter method run with ``--decode-unknown``
    (``decode``: every structure decoded, none copied) ``<method>[_k]_decode.json``, for a VLM method run
    with ``--segment-visible`` (``visible``: the VLM's "no" stands) ``<method>[_k][_decode]_visible.json``, and
    for the results whose masks a second opinion delivered (``memory``: ``reg-refine`` on angiograms,
    :attr:`rau.methods.interfaces.Method.calibration_memory`) ``<method>_memory.json``."""
    if memory:
        return CALIBRATION_DIR / f"{method}_memory.json"
    return CALIBRATION_DIR / f"{method}{'_k' if k_references else ''}{'_decode' if decode else ''}{'_visible' if visible else ''}.json"


def default_calibration(method: str, k_references: bool = False, decode: bool = False,
                        visible: bool = False, memory: bool = False) -> Calibration | None:
    """The shipped calibration of a registry method (:func:`calibration_path`), or None: the one of the
    asked mode where shipped, else the nearest (without ``visible``, then without ``decode``); a mode
    mismatch is what :func:`rau.methods.registry.create_method` warns about. ``memory``: that file or None."""
    if memory:
        path = calibration_path(method, memory=True)
        return Calibration.load(path) if path.is_file() else None
    for d, v in dict.fromkeys([(decode, visible), (decode, False), (False, visible), (False, False)]):
        path = calibration_path(method, k_references, d, v)
        if path.is_file():
            return Calibration.load(path)
    return None


def k_reference_features(masks: list[np.ndarray | None], annotated: int) -> dict[str, float]:
    """What k references say about one structure's output, beyond the first reference's features:
    ``agreement``, the mean Dice over every two of the k references' outputs (a reference without
    the structure, or an empty output, agrees with nothing), and ``support``, the share of the k
    references that annotate it. Thin vessels of another patient's tree land on the wrong branch
    in some references and not others: on ARCADE calibration pairs the agreement of `reg-refine`'s
    first-reference output with the other two alone separated right from wrong at AUROC 0.76
    (HISTORY 2026-12-04)."""
    from rau.metrics import dice

    k = len(masks)
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    given = [m is not None and bool(m.any()) for m in masks]
    total = sum(dice(masks[i], masks[j]) for i, j in pairs if given[i] and given[j])
    return {"agreement": total / len(pairs) if pairs else 1.0, "support": annotated / k if k else 1.0}


# ---- applying it to results


def best_fit(references: list[np.ndarray], target: np.ndarray) -> float:
    """k references: the ``fit`` (:func:`pair_features`) of the best-fitting one. The bank retrieves by
    embedding, and its first reference can be a poor thumbnail match for a right output (the 1%
    quantile of right outputs' first-reference fit on ARCADE calibration pairs is 0.31, which would
    drag the "does not fit" rule below the wrong inputs' 0.44); "does any of them fit" keeps the rule
    apart (right outputs' 1% quantile 0.59; HISTORY 2026-12-04)."""
    t = _small(target, 32)
    return max(_ncc(_small(r, 32), t) for r in references)


def output_features(result, reference, target_image: np.ndarray,
                    checks: dict[str, float] | None = None,
                    reference_masks: dict[str, np.ndarray] | None = None, *,
                    mirror_fit: bool = True) -> dict[str, dict[str, float]]:
    """structure -> the :data:`FEATURES` of its output in ``result`` (a TargetResult);
    ``checks``: the target's :func:`target_checks` when already computed; ``reference_masks``:
    per structure, the reference mask to compare with instead of ``reference``'s (k references:
    the first reference that annotates it); ``mirror_fit``: as :func:`pair_features`."""
    checks = checks or target_checks(target_image)
    # a blank or noise target is withheld whatever its pair fits: no registration on it
    runs = target_reason(checks) is None  # a blank or noise target: no registration, no visibility
    pair = {**pair_features(reference.image, target_image, registered=runs, mirror_fit=mirror_fit), **checks}
    visible = target_visibility(target_image, list(result.structures)) if runs else {}
    out, gray, gradient = {}, None, None
    for name, r in result.structures.items():
        ref_mask = (reference_masks or {}).get(name)
        ref_mask = reference.masks.get(name) if ref_mask is None else ref_mask
        if ref_mask is None or not ref_mask.any():
            continue
        if gradient is None and r.mask is not None and r.mask.any():  # once per target, not per structure
            gray = gray_float(target_image)
            gradient = image_gradient(gray)
        out[name] = {**structure_features(r.score, r.mask, ref_mask),
                     **mask_image_features(target_image if gray is None else gray, r.mask, gradient), **pair,
                     **({"visibility": visible[name]} if name in visible else {})}
    return out


def reads_mirror_fit(calibration: Calibration | None) -> bool:
    """Whether an assessment with ``calibration`` needs ``mirror_fit_gain``: its logistic model or its presence
    model reads it, or there is no calibration (what ``rau calibrate`` runs: the fit chooses from every
    feature), or the laterality model is missing (the "mirrored" rule then falls back to it, :func:`mirror_reason`).
    Elsewhere its affine registrations (0.15-0.35 s per target) are skipped: most calibrations do not read it."""
    if calibration is None or default_laterality() is None:
        return True
    return "mirror_fit_gain" in calibration.features \
        or "mirror_fit_gain" in ((calibration.presence or {}).get("features") or ())


def assess(result, reference, target_image: np.ndarray, calibration: Calibration | None,
           checks: dict[str, float] | None = None, *, reference_masks: dict[str, np.ndarray] | None = None,
           extra: dict[str, dict[str, float]] | None = None):
    """Set ``confidence``, ``flag`` (the reason to abstain whatever the threshold) and ``features``
    on every structure of ``result`` (in place; masks untouched) and return it. Without a
    calibration only the target rules (blank, noise) apply and ``confidence`` stays None.
    ``checks``: the target's :func:`target_checks` when the caller has them. k references:
    ``reference_masks`` as in :func:`output_features`, ``extra`` the :func:`k_reference_features`
    per structure (a calibration without them ignores them)."""
    checks = checks or target_checks(target_image)
    reason = target_reason(checks)
    feats = output_features(result, reference, target_image, checks, reference_masks,
                            mirror_fit=reads_mirror_fit(calibration))
    for name, more in (extra or {}).items():
        if name in feats:
            feats[name].update(more)
    pair = next(iter(feats.values()), None)  # pair features: the same in every entry
    never_run = reason is not None  # blank or noise: no method runs on it
    rule = None
    if reason is None and pair is not None:
        if calibration is not None:
            rule = calibration.pair_rule(pair)
            reason = rule[1] if rule else None
        else:
            reason = uncalibrated_reason(pair)
    probs, present = {}, {}
    presence = calibration.presence_model() if calibration is not None else None
    if calibration is not None and feats:
        names = list(feats)
        probs = dict(zip(names, calibration.predict([feats[n] for n in names], names).tolist()))
        if presence is not None and reason is None:  # a flagged pair is withheld whatever is present
            present = dict(zip(names, presence.predict([feats[n] for n in names], names).tolist()))
    if calibration is not None and hasattr(result, "threshold"):
        result.threshold = calibration.threshold  # the default min_confidence for this result
    for name, r in result.structures.items():
        r.features = feats.get(name)
        r.flag = reason
        r.presence = present.get(name)
        r.absent = presence.reason(r.presence) if r.presence is not None else None
        if calibration is not None:
            r.confidence = calibration.never_run_confidence() if never_run \
                else calibration.rule_confidence(rule[0], name, bool(r.found)) if rule else probs.get(name)
        elif reason is not None:
            r.confidence = 0.0
    return result


def resolve_min_confidence(min_confidence: float | None, calibration: Calibration | None) -> float:
    """``None`` -> the calibration's threshold (without one: :data:`UNCALIBRATED_THRESHOLD`, which
    withholds the flagged targets only); else checked to lie in [0, 1]."""
    if min_confidence is None:
        return calibration.threshold if calibration is not None else UNCALIBRATED_THRESHOLD
    if not 0.0 <= float(min_confidence) <= 1.0:
        raise RauInputError(f"--min-confidence: must lie in [0, 1], got {min_confidence}")
    return float(min_confidence)


def result_threshold(result, min_confidence: float | None, calibration: Calibration | None) -> float:
    """The ``min_confidence`` to withhold ``result``'s outputs at: the one given, else the threshold of the
    calibration that assessed it (:attr:`rau.data.annotated.TargetResult.threshold`: ``reg-refine``'s memory
    masks have their own), else :func:`resolve_min_confidence` of ``calibration``."""
    if min_confidence is None and getattr(result, "threshold", None) is not None:
        return float(result.threshold)
    return resolve_min_confidence(min_confidence, calibration)


def abstention_reason(r, min_confidence: float) -> str | None:
    """Why ``r`` (an assessed StructureResult) is withheld at ``min_confidence``, or None: its
    flag (target or pair rule), "structure absent from target" by the presence model (``absent``),
    or a confidence below ``min_confidence``. ``min_confidence`` 0 withholds nothing."""
    if min_confidence <= 0:
        return None
    if r.flag is not None:
        return r.flag
    if r.absent is not None:
        return r.absent
    if r.confidence is None or r.confidence >= min_confidence:
        return None
    f = r.features or {}
    if not r.found or f.get("log_area_ratio", 0.0) < np.log(0.2):
        return f"{REASON_ABSENT} (confidence {r.confidence:.2f} < {min_confidence:.2f})"
    return f"{REASON_LOW} ({r.confidence:.2f} < {min_confidence:.2f})"


def abstain(result, min_confidence: float):
    """Withhold every structure :func:`abstention_reason` names: no mask, no box, answer "no",
    ``abstained`` True, the reason kept (in place; returns ``result``)."""
    for r in result.structures.values():
        why = abstention_reason(r, min_confidence)
        if why is not None:
            r.mask, r.box_xyxy_px, r.answer, r.reason, r.abstained = None, None, "no", why, True
    return result
