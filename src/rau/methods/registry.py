"""Methods: comparable entries of one registry, each a localizer and/or a segmenter.

| name          | localizer                      | segmenter                 | masks from            |
|---------------|--------------------------------|---------------------------|-----------------------|
| reg-fuse      | registration (boxes + masks)   | LiteMedSAM (box prompt)   | fused                 |
| reg-box       | registration (boxes)           | LiteMedSAM (box prompt)   | segmenter             |
| registration  | registration (warped masks)    | -                         | localizer             |
| oracle-box    | ground-truth boxes (eval only) | LiteMedSAM                | segmenter             |
| rau           | RAU VLM (shipped compact model, or a Qwen2.5-VL checkpoint) | LiteMedSAM or SAM2-memory | fused                 |
| rau-ot        | RAU VLM, boxes assigned one-to-one (Hungarian) | LiteMedSAM | fused                 |
| rau-box       | RAU VLM boxes                  | LiteMedSAM                | segmenter             |
| rau-tokens    | RAU VLM (box + mask tokens)    | -                         | localizer             |
| rau-seg       | RAU VLM + <seg> query + its box | LiteMedSAM decoder (tuned) | localizer (DEFAULT) |
| sam2-memory   | -                              | SAM2, reference in memory | segmenter             |
| unet          | -                              | U-Net (fixed classes)     | segmenter             |
| chexanatomy   | CheXanatomy VLM (box + mask tokens) | -                    | localizer             |

Adding a method = one factory function + one ``METHODS`` entry; the contract tests iterate over
``METHODS``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rau.errors import RauInputError
from rau.methods.interfaces import Method

#: Measured (docs/BENCHMARKS.md, 2026-12-01, same pairs): the shipped VLM + box-prompted <seg> head
#: (``rau-seg``) beats the former default reg-fuse on Wingspan (Dice 0.936 vs 0.921) and on held-out
#: DRR poses (0.773 vs 0.700); on ARCADE every method fails (0.022 vs 0.036).
DEFAULT_METHOD = "rau-seg"
#: Blur of the warped reference mask before fusion, as a fraction of the target's longest side
#: (4 px at 512 px; picked on 15 Wingspan targets of the reference part, see docs/BENCHMARKS.md).
FUSE_SIGMA = 4 / 512


def _segmenter(name: str, *, sam2: str | Path | None, device: str, sam2_config=None, precision: str | None = None):
    if name == "medsam":
        from rau.encoders.litemedsam import MedSamSegmenter

        return MedSamSegmenter(device=device, precision=precision)
    if name == "sam2-memory":
        from rau.methods.sam2_memory import Sam2MemorySegmenter

        return Sam2MemorySegmenter(checkpoint=sam2, config=sam2_config, device=device)
    raise RauInputError(f"segmenter: unknown {name!r}; choose 'medsam' or 'sam2-memory'")


def _registration(**kw) -> Method:
    from rau.methods.registration import RegistrationLocalizer

    return Method("registration", RegistrationLocalizer(seed=kw.get("seed", 0)), None)


def _reg_box(**kw) -> Method:
    from rau.methods.registration import RegistrationLocalizer

    seg = _segmenter(kw.get("segmenter") or "medsam", sam2=kw.get("sam2"), device=kw.get("device", "cpu"),
                     precision=kw.get("precision"))
    return Method("reg-box", RegistrationLocalizer(seed=kw.get("seed", 0)), seg)


def _reg_fuse(**kw) -> Method:
    method = _reg_box(**kw)
    method.name, method.fuse_sigma = "reg-fuse", FUSE_SIGMA
    return method


def _oracle_box(**kw) -> Method:
    from rau.methods.oracle import OracleLocalizer

    seg = _segmenter(kw.get("segmenter") or "medsam", sam2=kw.get("sam2"), device=kw.get("device", "cpu"),
                     precision=kw.get("precision"))
    return Method("oracle-box", OracleLocalizer(), seg)


def _is_refvlm(folder) -> bool:
    import json

    cfg = Path(folder) / "config.json"
    try:
        return cfg.is_file() and json.loads(cfg.read_text()).get("format", "").startswith("rau-refvlm")
    except (OSError, ValueError, AttributeError):
        return False


def _rau_parts(kw: dict, *, segmenter: bool = True):
    """(localizer, segmenter) of the RAU methods: the compact RAU VLM (shipped default, or a
    ``rau train refvlm`` folder given as ``vlm``) or a Qwen2.5-VL checkpoint folder (``vlm``)."""
    device = kw.get("device", "cpu")
    seg_name = kw.get("segmenter") or "medsam"
    seg = _segmenter(seg_name, sam2=kw.get("sam2"), device=device, sam2_config=kw.get("sam2_config"),
                     precision=kw.get("precision")) if segmenter else None
    vlm = kw.get("vlm")
    if vlm is None or _is_refvlm(vlm):
        from rau.methods.rau_vlm import RefVlmLocalizer, default_available

        if vlm is None and not default_available():
            raise RauInputError("--vlm: the shipped RAU VLM weights are missing from this install; pass --vlm PATH")
        return RefVlmLocalizer(vlm, device=device, shared_segmenter=seg if seg_name == "medsam" else None,
                               assign=bool(kw.get("assign")), seg_head=kw.get("seg_head_folder"),
                               precision=kw.get("precision")), seg
    from rau.methods.qwen import QwenLocalizer

    return QwenLocalizer(vlm, device=device, lora=kw.get("lora")), seg


def _rau(**kw) -> Method:
    """RAU: the VLM's box prompts the segmenter; with LiteMedSAM the mask fuses LiteMedSAM's
    probability with the VLM's own mask tokens (as reg-fuse does with the warped mask)."""
    loc, seg = _rau_parts(kw)
    fuse = FUSE_SIGMA if (kw.get("segmenter") or "medsam") == "medsam" and loc.name == "rau-vlm" else None
    return Method("rau", loc, seg, fuse_sigma=fuse)


def _rau_ot(**kw) -> Method:
    """``rau`` with a global one-to-one assignment of the predicted boxes to the structures
    (Hungarian matching on the VLM's box likelihoods): two structures never claim the same box."""
    method = _rau(**{**kw, "assign": True})
    method.name = "rau-ot"
    return method


def _rau_box(**kw) -> Method:
    loc, seg = _rau_parts(kw)
    return Method("rau-box", loc, seg)


def _rau_tokens(**kw) -> Method:
    loc, _ = _rau_parts(kw, segmenter=False)
    return Method("rau-tokens", loc, None)


def _rau_seg(**kw) -> Method:
    """RAU's <SEG> route (the default method): the VLM's ``<seg>`` hidden state, projected into prompt
    tokens of a fine-tuned LiteMedSAM mask decoder (beside the VLM's own answer box for heads trained
    with box prompts, as the shipped one), gives the mask (``seg_head``: a ``rau train seg-head``
    folder; default: the shipped head, whose ``<seg>`` follows the answer box directly)."""
    from rau.models.refvlm.seghead import DEFAULT_HEAD_DIR

    folder = kw.get("seg_head") or DEFAULT_HEAD_DIR
    if not (Path(folder) / "model.safetensors").is_file():
        raise RauInputError(f"--seg-head: method 'rau-seg' needs a trained <seg> head folder ({folder} has none; rau train seg-head)")
    if kw.get("vlm") is not None and not _is_refvlm(kw["vlm"]):
        raise RauInputError("--vlm: method 'rau-seg' needs a compact RAU VLM folder (rau train refvlm), not a Qwen checkpoint")
    loc, _ = _rau_parts({**kw, "seg_head_folder": folder}, segmenter=False)
    return Method("rau-seg", loc, None)


def _sam2_memory(**kw) -> Method:
    seg = _segmenter("sam2-memory", sam2=kw.get("sam2"), device=kw.get("device", "cpu"), sam2_config=kw.get("sam2_config"))
    return Method("sam2-memory", None, seg)


def _unet(**kw) -> Method:
    """A U-Net trained for fixed structures (CheXanatomy's baseline): the reference only names
    what to segment; structures the U-Net was not trained on come back as not found."""
    if not kw.get("unet"):
        raise RauInputError(
            "--unet: method 'unet' needs a trained U-Net folder (python -m rau.models.unet.modeling train ...); "
            "none ships with rau"
        )
    from rau.models.unet.modeling import UNetSegmenter

    return Method("unet", None, UNetSegmenter.from_pretrained(kw["unet"], device=kw.get("device", "cpu")))


def _chexanatomy(**kw) -> Method:
    """The CheXanatomy VLM (:mod:`rau.models.chex`): reference-free, boxes and masks as tokens; the
    reference only names the structures."""
    if not kw.get("chex"):
        raise RauInputError(
            "--chex: method 'chexanatomy' needs a trained model folder (rau train chex ...; see docs/BENCHMARKS.md)"
        )
    from rau.methods.chexanatomy import ChexLocalizer

    return Method("chexanatomy", ChexLocalizer(kw["chex"], device=kw.get("device", "cpu")), None)


METHODS: dict[str, Callable[..., Method]] = {
    "reg-fuse": _reg_fuse,
    "reg-box": _reg_box,
    "registration": _registration,
    "oracle-box": _oracle_box,
    "rau": _rau,
    "rau-ot": _rau_ot,
    "rau-box": _rau_box,
    "rau-tokens": _rau_tokens,
    "rau-seg": _rau_seg,
    "sam2-memory": _sam2_memory,
    "unet": _unet,
    "chexanatomy": _chexanatomy,
}


def create_method(name: str | None = None, **options) -> Method:
    """Build a method by registry name (default ``rau-seg``: the shipped compact RAU VLM + <seg> head).

    Options: ``device`` ("cpu"), ``vlm`` (local VLM checkpoint folder, for ``rau``), ``lora``,
    ``seg_head`` (``rau-seg`` head folder), ``sam2`` (local SAM2 checkpoint folder), ``unet`` (trained U-Net folder), ``chex`` (CheXanatomy model folder), ``segmenter`` ("medsam" | "sam2-memory"), ``seed``.
    """
    name = name or DEFAULT_METHOD
    if name not in METHODS:
        raise RauInputError(f"--method: unknown {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name](**options)


__all__ = ["DEFAULT_METHOD", "METHODS", "Method", "create_method"]
