"""The method registry: one :class:`MethodSpec` per name (what the user gets, its options class, its
build function), and :func:`create_method`.

    method = create_method("reg-fuse", device="cpu", seed=0)   # -> rau.methods.interfaces.Method
    for name, summary, weights in describe_methods(): ...      # what `rau methods` prints

Adding a method = one adapter module in :mod:`rau.methods` + one ``MethodSpec`` in ``METHODS``
(with an options class of :mod:`rau.methods.options`); the contract tests iterate over ``METHODS``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rau.errors import RauInputError
from rau.methods.interfaces import FUSE_SIGMA, Method
from rau.methods.options import (
    BoxPromptOptions,
    ChexOptions,
    MemSegOptions,
    MethodOptions,
    RauOptions,
    RauRefineOptions,
    RefineOptions,
    RegistrationOptions,
    Sam2MemoryOptions,
    UNetOptions,
    options_for,
)

#: Measured (docs/RESULTS.md, "Current figures", 2026-12-03, full protocol, same pairs): registration +
#: the refiner (``reg-refine``) against the former default ``rau-seg``: ARCADE 0.134 vs 0.022, held-out
#: DRR poses 0.860 vs 0.774, structure families no model here was trained on 0.870 vs 0.735, Wingspan
#: 0.932 vs 0.935. ``rau-seg`` is closed-set: it lands elsewhere on structures it never learned.
DEFAULT_METHOD = "reg-refine"
#: reg-refine's B-spline iterations: 20 instead of registration's 40 halves the registration time
#: at the same Dice after the refiner (HISTORY 2026-12-03, "Registration at 20 B-spline
#: iterations"); the ``registration`` baseline keeps 40, its best.
REFINE_BSPLINE_ITERATIONS = 20


@dataclass(frozen=True)
class MethodSpec:
    """One registry entry. ``summary``: one line on what the user gets; ``weights``: what it loads
    (and what the user must pass); ``build``: an ``options`` instance -> :class:`Method`."""

    name: str
    summary: str
    weights: str
    options: type[MethodOptions]
    build: Callable[[Any], Method]


# ---- parts shared by several methods


def _segmenter(o: BoxPromptOptions | RauOptions):
    """The segmenter behind the boxes: LiteMedSAM (box prompt) or SAM2 with the reference in memory."""
    if o.segmenter == "medsam":
        from rau.methods.medsam import MedSamSegmenter

        return MedSamSegmenter(device=o.device, precision=o.precision)
    from rau.methods.sam2_memory import Sam2MemorySegmenter

    return Sam2MemorySegmenter(checkpoint=o.sam2, config=o.sam2_config, device=o.device)


def _is_refvlm(folder) -> bool:
    """True when ``folder`` holds a compact RAU VLM (its config.json ``format`` is rau-refvlm...)."""
    import json

    cfg = Path(folder) / "config.json"
    try:
        return cfg.is_file() and json.loads(cfg.read_text()).get("format", "").startswith("rau-refvlm")
    except (OSError, ValueError, AttributeError):
        return False


def _rau_parts(o: RauOptions, *, with_segmenter: bool = True, seg_cues: str | None = None, shared=None):
    """(localizer, segmenter) of the RAU methods: the compact RAU VLM (shipped default, or a
    ``rau train refvlm`` folder given as ``vlm``) or a Qwen2.5-VL checkpoint folder (``vlm``)."""
    seg = _segmenter(o) if with_segmenter else None
    if o.vlm is None or _is_refvlm(o.vlm):
        from rau.methods.rau_vlm import RefVlmLocalizer, default_available

        if o.vlm is None and not default_available():
            raise RauInputError("--vlm: the shipped RAU VLM weights are missing from this install; pass --vlm PATH")
        return RefVlmLocalizer(o.vlm, device=o.device, shared_segmenter=shared or (seg if o.segmenter == "medsam" else None),
                               assign=o.assign, seg_cues=seg_cues, precision=o.precision), seg
    from rau.methods.qwen import QwenLocalizer

    return QwenLocalizer(o.vlm, device=o.device, lora=o.lora), seg


def _require_refvlm(o: RauOptions, method: str) -> None:
    """A method that reads the compact VLM's cues: ``vlm`` must be None (the shipped one) or a compact RAU VLM folder."""
    if o.vlm is not None and not _is_refvlm(o.vlm):
        raise RauInputError(f"--vlm: method '{method}' needs a compact RAU VLM folder (rau train refvlm), not a Qwen checkpoint")


# ---- build functions: options -> Method


def _registration(o: RegistrationOptions) -> Method:
    from rau.methods.registration import RegistrationLocalizer

    return Method("registration", RegistrationLocalizer(seed=o.seed), None)


def _reg_box(o: BoxPromptOptions, *, name: str = "reg-box", fuse_sigma: float | None = None) -> Method:
    from rau.methods.registration import RegistrationLocalizer

    seg = _segmenter(o)
    return Method(name, RegistrationLocalizer(seed=o.seed), seg, fuse_sigma=fuse_sigma)


def _reg_fuse(o: BoxPromptOptions) -> Method:
    return _reg_box(o, name="reg-fuse", fuse_sigma=FUSE_SIGMA)


def _oracle_box(o: BoxPromptOptions) -> Method:
    from rau.methods.oracle import OracleLocalizer

    seg = _segmenter(o)
    return Method("oracle-box", OracleLocalizer(), seg)


def _rau(o: RauOptions, *, name: str = "rau") -> Method:
    """The VLM's box prompts the segmenter; with LiteMedSAM the mask fuses LiteMedSAM's probability
    with the VLM's own mask tokens (as reg-fuse does with the warped mask)."""
    loc, seg = _rau_parts(o)
    fuse = FUSE_SIGMA if o.segmenter == "medsam" and loc.name == "rau-vlm" else None
    return Method(name, loc, seg, fuse_sigma=fuse)


def _rau_ot(o: RauOptions) -> Method:
    return _rau(dataclasses.replace(o, assign=True), name="rau-ot")


def _rau_box(o: RauOptions) -> Method:
    loc, seg = _rau_parts(o)
    return Method("rau-box", loc, seg)


def _rau_tokens(o: RauOptions) -> Method:
    loc, _ = _rau_parts(o, with_segmenter=False)
    return Method("rau-tokens", loc, None)


def _rau_seg(o: RauOptions) -> Method:
    """The VLM's ``<seg>`` hidden state, projected into prompt tokens of a mask decoder, gives the
    mask. A ``decoder="memseg"`` head (the shipped default when present: the paper's RAU) prompts
    the memory segmenter (``memseg``: its folder, None the shipped one), which holds the reference
    image and mask in memory and reads the reference mask moved into the VLM's box as its prior; an
    older head prompts its own fine-tuned LiteMedSAM decoder beside the VLM's answer box.
    ``seg_head``: a ``rau train seg-head`` / ``seg-head-memseg`` folder."""
    from rau.models.refvlm.seghead import DEFAULT_HEAD_DIR, DEFAULT_MEMSEG_HEAD_DIR, SegHeadConfig

    folder = o.seg_head or (DEFAULT_MEMSEG_HEAD_DIR if (DEFAULT_MEMSEG_HEAD_DIR / "model.safetensors").is_file()
                            else DEFAULT_HEAD_DIR)
    if not (Path(folder) / "model.safetensors").is_file():
        raise RauInputError(f"--seg-head: method 'rau-seg' needs a trained <seg> head folder ({folder} has none; rau train seg-head)")
    _require_refvlm(o, "rau-seg")
    if SegHeadConfig.read(folder).decoder == "memseg":
        from rau.methods.memseg import DEFAULT_MEMSEG_DIR
        from rau.methods.rau_seg import MemSegQuerySegmenter
        from rau.training.checkpoints import model_folder

        seg = MemSegQuerySegmenter(folder, memseg=_memseg(o.memseg, o.device, o.precision, o.follow_unknown, "readout"),
                                   device=o.device, segment_all=o.segment_all)
        seg.head.check_memseg(model_folder(o.memseg or DEFAULT_MEMSEG_DIR))
        shared = seg.memseg
    else:
        from rau.methods.rau_seg import SegHeadSegmenter

        shared = _segmenter(dataclasses.replace(o, segmenter="medsam"))
        seg = SegHeadSegmenter(folder, shared=shared, device=o.device)
    loc, _ = _rau_parts(o, with_segmenter=False, seg_cues=seg.head.config.seg_after, shared=shared)
    seg.head.check_vlm(loc.model_dir)  # a head is tied to the VLM it was trained on (weight hash)
    method = Method("rau-seg", loc, seg)
    method.segment_all = getattr(seg, "segment_all", None)  # the LiteMedSAM-decoder head needs the VLM's box
    return method


def _rau_memseg(o: RauOptions) -> Method:
    """The RAU VLM answers and boxes each structure; its box places the reference mask as the
    memory segmenter's prior (the reference image and mask in its memory); a structure the VLM
    answers "not visible" is segmented from memory alone (``segment_all``, default) or gets no mask."""
    _require_refvlm(o, "rau-memseg")
    seg = _memseg(o.memseg, o.device, o.precision, o.follow_unknown, "readout")
    loc, _ = _rau_parts(o, with_segmenter=False, seg_cues="prior", shared=seg)
    method = Method("rau-memseg", loc, seg)
    method.segment_all = o.segment_all
    return method


def _memseg(folder, device: str, precision: str | None, follow_unknown: bool = True, copy_from: str = "prior"):
    """The memory segmenter of ``folder`` (None: the shipped one), or a one-line error naming the fix.
    ``follow_unknown``, ``copy_from``: :class:`~rau.methods.memseg.MemSegSegmenter`'s (the VLM methods copy the
    readout: on calib-drr it follows the never-seen clavicles and scapulae better than their prior, the reference
    mask moved into the VLM's box, 0.808 vs 0.704; HISTORY 2026-12-06 s18)."""
    from rau.methods.memseg import DEFAULT_MEMSEG_DIR, MemSegSegmenter

    folder = folder or DEFAULT_MEMSEG_DIR
    if not ((Path(folder) / "model.safetensors").is_file() or (Path(folder) / "final" / "model.safetensors").is_file()):
        raise RauInputError(f"--memseg: {folder} holds no memory segmenter (rau train memseg; or --sam2 FOLDER for a real SAM2)")
    return MemSegSegmenter(folder, device=device, precision=precision, follow_unknown=follow_unknown, copy_from=copy_from)


def _sam2_memory(o: Sam2MemoryOptions) -> Method:
    """The reference's masks in memory alone (no localizer): the trained memory segmenter, or a
    real SAM2 when ``sam2`` (or, in tests, ``sam2_config``) is given."""
    if o.sam2 is not None or o.sam2_config is not None:
        from rau.methods.sam2_memory import Sam2MemorySegmenter

        return Method("sam2-memory", None, Sam2MemorySegmenter(checkpoint=o.sam2, config=o.sam2_config, device=o.device))
    return Method("sam2-memory", None, _memseg(o.memseg, o.device, o.precision, o.follow_unknown))


def _oracle_memory(o: Sam2MemoryOptions) -> Method:
    """``sam2-memory``'s segmenter with the target's own image and masks as its reference."""
    from rau.methods.oracle import SelfReferenceMethod

    return SelfReferenceMethod("oracle-memory", None, _sam2_memory(o).segmenter)


def _reg_memseg(o: MemSegOptions) -> Method:
    """Registration's warped reference mask is the memory segmenter's prior; the reference image
    and mask are in its memory."""
    from rau.methods.registration import RegistrationLocalizer

    return Method("reg-memseg", RegistrationLocalizer(seed=o.seed), _memseg(o.memseg, o.device, o.precision, o.follow_unknown))


def _reg_refine(o: RefineOptions) -> Method:
    """Registration aligns the reference with the target; the refiner corrects each warped mask. On
    angiograms the memory segmenter segments too, as the second opinion; with ``angiogram_masks="memory"`` its
    masks are delivered and the refiner's are the opinion."""
    from rau.methods.refine import DEFAULT_REFINER_DIR, RefineSegmenter, RegRefineMethod
    from rau.methods.registration import RegistrationLocalizer
    from rau.methods.second_opinion import SecondOpinion

    folder = o.refiner or DEFAULT_REFINER_DIR
    if o.refiner is None and not (Path(folder) / "model.safetensors").is_file():
        raise RauInputError("--refiner: method 'reg-refine' needs a trained refiner folder and none ships in this "
                            "checkout (rau train refine ...; scripts/refine_recipe.sh)")
    localizer = RegistrationLocalizer(seed=o.seed, warped_cues=True, bspline_iterations=REFINE_BSPLINE_ITERATIONS)
    method = RegRefineMethod("reg-refine", localizer, RefineSegmenter(folder, device=o.device))
    if o.second_opinion:
        method.second_opinion = SecondOpinion(lambda: _shipped_memseg(o.device, o.precision,
                                                                      opinion_only=not o.delivers_memory_masks),
                                              delivers=o.delivers_memory_masks)
    return method


def _shipped_memseg(device: str, precision: str | None = None, opinion_only: bool = False):
    """The shipped memory segmenter as ``sam2-memory`` runs it (the same masks; its own confidence feature
    ``readout_agreement`` is not measured), or None where this checkout has none. ``opinion_only``: its masks
    are only compared, never delivered, so its memory attention and decoder run in the encoder's precision
    (bfloat16 on a CPU with native bf16 units: 0.35 s less per angiogram, the same confidence; docs/RESULTS.md s26)."""
    from rau.methods.memseg import DEFAULT_MEMSEG_DIR

    if not (Path(DEFAULT_MEMSEG_DIR) / "model.safetensors").is_file():
        return None
    seg = _memseg(None, device, precision)
    seg.measure_readout = False
    if opinion_only:
        seg.decode_precision = seg.precision
    return seg


def _rau_refine(o: RauRefineOptions) -> Method:
    """rau-seg (the VLM route) and reg-refine (the reference route), combined by agreement; the VLM
    route keeps the LiteMedSAM-decoder ``<seg>`` head unless ``seg_head`` names another."""
    from rau.methods.agreement import AgreementMethod
    from rau.models.refvlm.seghead import DEFAULT_HEAD_DIR

    rau = dataclasses.asdict(o)
    ref = {k: rau.pop(k) for k in ("refiner", "seed")}
    # its shipped calibration and figures are those of the LiteMedSAM-decoder <seg> head
    rau["seg_head"] = rau["seg_head"] or DEFAULT_HEAD_DIR
    # its reference route is reg-refine as calibrated and measured for it: the refiner's masks everywhere,
    # no memory pass (its confidence reads no second opinion)
    return AgreementMethod("rau-refine", _rau_seg(RauOptions(**rau)),
                           _reg_refine(RefineOptions(device=o.device, second_opinion=False, **ref)))


def _unet(o: UNetOptions) -> Method:
    from rau.methods.unet import UNetSegmenter

    return Method("unet", None, UNetSegmenter.from_pretrained(o.unet, device=o.device))


def _chexanatomy(o: ChexOptions) -> Method:
    from rau.methods.chexanatomy import DEFAULT_CHEX_DIR, ChexLocalizer

    folder = o.chex or DEFAULT_CHEX_DIR
    if o.chex is None and not (folder / "model.safetensors").is_file():
        raise RauInputError("--chex: method 'chexanatomy' needs a trained model folder and none ships in this checkout "
                            "(rau train chex ...; scripts/chexanatomy_ship.sh)")
    return Method("chexanatomy", ChexLocalizer(folder, device=o.device), None)


_LITEMEDSAM = "LiteMedSAM (installed with rau)"
_SHIPPED_VLM = "shipped RAU VLM (or --vlm FOLDER)"

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("reg-fuse", "registration's warped masks fused with LiteMedSAM's masks in their boxes",
               _LITEMEDSAM, BoxPromptOptions, _reg_fuse),
    MethodSpec("reg-box", "registration's boxes prompt LiteMedSAM (or --segmenter sam2-memory)",
               _LITEMEDSAM, BoxPromptOptions, _reg_box),
    MethodSpec("registration", "the reference's masks warped onto the target (SimpleITK affine + B-spline)",
               "none", RegistrationOptions, _registration),
    MethodSpec("oracle-box", "ground-truth boxes prompt LiteMedSAM: the box route's upper bound (evaluation only)",
               _LITEMEDSAM, BoxPromptOptions, _oracle_box),
    MethodSpec("rau", "RAU VLM boxes prompt LiteMedSAM, fused with the VLM's mask tokens (or a Qwen2.5-VL --vlm)",
               f"{_SHIPPED_VLM} + {_LITEMEDSAM}", RauOptions, _rau),
    MethodSpec("rau-ot", "rau with boxes assigned to structures one-to-one (Hungarian matching)",
               f"{_SHIPPED_VLM} + {_LITEMEDSAM}", RauOptions, _rau_ot),
    MethodSpec("rau-box", "RAU VLM boxes prompt LiteMedSAM (no fusion)",
               f"{_SHIPPED_VLM} + {_LITEMEDSAM}", RauOptions, _rau_box),
    MethodSpec("rau-tokens", "the RAU VLM alone: box and mask tokens", _SHIPPED_VLM, RauOptions, _rau_tokens),
    MethodSpec("rau-seg", "the RAU VLM answers and boxes; its <seg> query and box prompt the memory segmenter (reference in memory)",
               "shipped RAU VLM + memory segmenter + <seg> head (or --vlm, --memseg, --seg-head FOLDER)", RauOptions, _rau_seg),
    MethodSpec("sam2-memory", "the memory segmenter: the reference's image and masks in SAM2-style memory segment the target",
               "shipped memory segmenter (or --memseg FOLDER, or a real SAM2 with --sam2 FOLDER)", Sam2MemoryOptions,
               _sam2_memory),
    MethodSpec("oracle-memory", "the memory segmenter given the target itself as its reference: how closely it can "
               "follow a perfect reference (evaluation only)",
               "shipped memory segmenter (or --memseg FOLDER, or --sam2 FOLDER)", Sam2MemoryOptions, _oracle_memory),
    MethodSpec("rau-memseg", "the RAU VLM's answer and box place the reference mask as the memory segmenter's prior",
               "shipped RAU VLM + memory segmenter (or --vlm, --memseg FOLDER)", RauOptions, _rau_memseg),
    MethodSpec("reg-memseg", "registration's warped masks are the memory segmenter's prior, the reference in its memory",
               "shipped memory segmenter (or --memseg FOLDER)", MemSegOptions, _reg_memseg),
    MethodSpec("reg-refine", "registration's warped masks corrected by the refiner (target + warped reference -> mask); "
               "on angiograms the memory segmenter gives a second opinion (--angiogram-masks memory: its masks)",
               "shipped refiner (or --refiner FOLDER)", RefineOptions, _reg_refine),
    MethodSpec("rau-refine", "rau-seg's masks where they agree with reg-refine's (their consensus), reg-refine's where not",
               "shipped RAU VLM + <seg> head + refiner", RauRefineOptions, _rau_refine),
    MethodSpec("unet", "a U-Net trained for fixed structures; the reference only names them",
               "--unet FOLDER (none ships with rau)", UNetOptions, _unet),
    MethodSpec("chexanatomy", "the CheXanatomy VLM (reference-free box and mask tokens); the reference only names them",
               "shipped CheXanatomy model (or --chex FOLDER)", ChexOptions, _chexanatomy),
)}


def _spec(name: str | None) -> MethodSpec:
    name = name or DEFAULT_METHOD
    if name not in METHODS:
        raise RauInputError(f"--method: unknown {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def method_options(name: str | None = None, **options: Any) -> MethodOptions:
    """The checked options of method ``name`` (default ``reg-refine``), without loading any model: call
    it to fail early on bad input. Rules as in :func:`create_method`."""
    return options_for(_spec(name).options, options)


def create_method(name: str | None = None, **options: Any) -> Method:
    """Build a method by registry name (default ``reg-refine``: registration + the shipped refiner).

    Options (keywords; None means "not given"): ``device`` ("cpu"), ``precision`` (LiteMedSAM
    encoder: auto, fp32, bf16), ``vlm`` (RAU VLM or Qwen2.5-VL folder), ``lora``, ``seg_head``
    (``rau-seg`` head folder), ``memseg`` (memory-segmenter folder), ``segmenter`` ("medsam" | "sam2-memory"), ``sam2`` (SAM2 checkpoint
    folder), ``sam2_config``, ``unet`` (U-Net folder), ``chex`` (CheXanatomy folder), ``seed``
    (registration), ``assign``, ``calibration`` (a confidence calibration JSON, or False / "none" for
    none; default: the shipped ones of this method, if any, for one and for k references, and with
    ``follow_unknown=False`` its decoding ones where shipped, and for the masks a second opinion delivers
    (``reg-refine`` on angiograms) its ``_memory`` one: :mod:`rau.methods.confidence`). Each method takes the options of its class in
    :mod:`rau.methods.options` and ignores the other methods' options (callers may pass one shared
    set); an option no method takes, or a bad value, raises RauInputError.
    """
    from rau.methods.confidence import Calibration, default_calibration

    calibration = options.pop("calibration", None)
    spec = _spec(name)
    opts = options_for(spec.options, options)
    method = spec.build(opts)
    if calibration is False or calibration == "none":
        method.calibration = None
    elif calibration:  # a user's file assesses results of one and of k references alike
        method.calibration = Calibration.load(calibration)
    else:  # --decode-unknown / --segment-visible read the method's calibration of that mode where one is shipped
        decode = getattr(opts, "follow_unknown", True) is False
        visible = method.segment_all is False
        method.calibration = default_calibration(spec.name, decode=decode, visible=visible)
        method.calibration_k = default_calibration(spec.name, k_references=True, decode=decode, visible=visible)
        if getattr(method.second_opinion, "delivers", False):  # the masks it delivers (reg-refine on angiograms)
            method.calibration_memory = default_calibration(spec.name, memory=True)
    _warn_calibration_mode(method)
    return method


def _warn_calibration_mode(method: Method) -> None:
    """Warn once when ``method``'s calibration was fitted in another mode than the run's: its memory
    segmenter copies unknown structures and the calibration was fitted decoding them, or the reverse (the
    record's ``follow_unknown``, absent: copying; the confidence of structures the model never trained on is
    then read for the other mode's masks: decoded clavicles with a copying calibration had ECE 0.30 on
    drr-unseen, HISTORY 2026-12-06); or a VLM method segments what its VLM answers "not visible" and the
    calibration was fitted with the VLM's "no" standing, or the reverse (the record's ``segment_all``, absent:
    the "no" stood, as before the choice existed)."""
    from rau.methods.memseg import MemSegSegmenter

    cals = {id(c): c for c in (method.calibration, method.calibration_k) if c is not None}.values()
    seg = getattr(method.segmenter, "memseg", method.segmenter)
    for cal in cals if isinstance(seg, MemSegSegmenter) else ():
        fitted = cal.record.get("follow_unknown", True) is not False
        if fitted != seg.follow_unknown:
            flag, mode = ("--follow-unknown" if seg.follow_unknown else "--decode-unknown"), ("copying" if fitted else "decoding")
            warnings.warn(f"{method.name}: its confidence was calibrated {mode} structures the memory segmenter never "
                          f"trained on, and this run uses {flag}; their confidence may be off (rau calibrate --method "
                          f"{method.name} {flag} fits one)")
            return
    for cal in cals if method.segment_all is not None else ():
        fitted = cal.record.get("segment_all", False) is True
        if fitted != method.segment_all:
            flag = "--segment-all" if method.segment_all else "--segment-visible"
            mode = "segmenting" if fitted else "withholding"
            warnings.warn(f"{method.name}: its confidence was calibrated {mode} the structures its VLM answers \"not "
                          f"visible\", and this run uses {flag}; the confidence may be off (rau calibrate --method "
                          f"{method.name} {flag} fits one)")
            return


def describe_methods() -> list[tuple[str, str, str]]:
    """(name, one-line summary, weights it loads) of every registered method, in registry order
    (``DEFAULT_METHOD`` names the default)."""
    return [(s.name, s.summary, s.weights) for s in METHODS.values()]


__all__ = ["DEFAULT_METHOD", "METHODS", "Method", "MethodSpec", "create_method", "describe_methods", "method_options"]
