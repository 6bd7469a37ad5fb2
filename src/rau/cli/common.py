"""What every ``rau`` command shares: the error contract, option parsers, option annotations.

The error contract (one for the whole tool): a user error -- :data:`USER_ERRORS`, which includes
:class:`rau.errors.RauInputError` and :class:`rau.errors.CheckpointError` (both ``ValueError``) --
prints ``error: <first line of the message>`` on stderr and exits with code 2::

    with user_errors():
        ...  # the command's work

Only typer is imported here; every command imports its heavy code inside its body.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer

#: Exceptions that mean "bad input" (not a bug): RauInputError/CheckpointError are ValueErrors; a
#: FloatingPointError is a training that diverged (NaN loss) with its settings.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, NotADirectoryError, PermissionError, IsADirectoryError, FloatingPointError,
)

#: Exit code of a user error (the same as click's usage errors).
USER_ERROR_EXIT = 2


def first_line(exc: BaseException) -> str:
    """The first non-empty line of the exception's message (its class name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


def fail(exc: BaseException) -> NoReturn:
    """Print ``error: <first line>`` on stderr and exit with code 2."""
    typer.echo(f"error: {first_line(exc)}", err=True)
    raise typer.Exit(code=USER_ERROR_EXIT)


def one_line_warnings() -> None:
    """Show rau's own warnings as one ``warning: <message>`` line on stderr (as errors are), not Python's
    file:line form with the source line; other packages' warnings keep Python's form."""
    import warnings

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if str(Path(filename).resolve()).startswith(str(Path(__file__).resolve().parents[1])):
            typer.echo(f"warning: {first_line(message) if isinstance(message, BaseException) else message}", err=True)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a :data:`USER_ERRORS` raised inside the block into one ``error:`` line and exit code 2."""
    try:
        yield
    except USER_ERRORS as exc:
        fail(exc)


def command_line() -> str:
    """The command as typed (``rau ...``), recorded in the training runs it produces."""
    return " ".join(["rau", *sys.argv[1:]])


# ------------------------------------------------------------------------------------ parsers


def split_names(value: Optional[str], arg: str = "--structures") -> Optional[list[str]]:
    """``"heart, left_lung"`` -> ``["heart", "left_lung"]``; None stays None (the command's default)."""
    if value is None:
        return None
    names = [s.strip() for s in value.split(",") if s.strip()]
    if not names:
        raise ValueError(f"{arg}: give a comma-separated list of names, e.g. heart,left_lung")
    return names


def parse_range(value: Optional[str], arg: str) -> Optional[slice]:
    """``"160:200"`` -> ``slice(160, 200)`` (either end may be empty); None stays None."""
    if value is None:
        return None
    try:
        start, stop = value.split(":")
        return slice(int(start) if start else None, int(stop) if stop else None)
    except ValueError:
        raise ValueError(f"{arg}: expected START:STOP indices into the id-sorted images (e.g. 160:200), got {value!r}") from None


def split_numbers(value: Optional[str], arg: str, kind: type = float) -> Optional[list[Any]]:
    """``"0.6,0.4"`` -> ``[0.6, 0.4]`` (``kind=int`` for integers); None stays None."""
    if value is None:
        return None
    try:
        numbers = [kind(v) for v in value.split(",")]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise ValueError(f"{arg}: expected comma-separated {what} (e.g. {'16,32,64' if kind is int else '0.6,0.4'}), got {value!r}") from None
    return numbers


def set_threads(threads: Optional[int], arg: str = "--threads") -> None:
    """Set torch's CPU thread count (None: leave torch's default)."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"{arg}: expected an integer >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


# ------------------------------------------------------------------------- option annotations

MethodOpt = Annotated[Optional[str], typer.Option("--method", "-m", help="Method name (see `rau methods`). Default: reg-refine.")]
StructOpt = Annotated[Optional[str], typer.Option("--structures", "-s", help="Comma-separated structure names (default: all of the reference's).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="torch device for the models: cpu, cuda, cuda:1 ...")]
VlmOpt = Annotated[Optional[Path], typer.Option("--vlm", help="Methods rau/rau-box/rau-tokens: a `rau train refvlm` model folder, or a local Qwen2.5-VL checkpoint folder (default: the shipped compact RAU VLM).")]
LoraOpt = Annotated[Optional[Path], typer.Option("--lora", help="Local PEFT LoRA adapter folder applied on top of --vlm.")]
Sam2Opt = Annotated[Optional[Path], typer.Option("--sam2", help="Local SAM2 (transformers Sam2Video) checkpoint folder.")]
UnetOpt = Annotated[Optional[Path], typer.Option("--unet", help="Trained U-Net folder for method 'unet' (rau train unet).")]
ChexOpt = Annotated[Optional[Path], typer.Option("--chex", help="Trained CheXanatomy model folder for method 'chexanatomy' (rau train chex).")]
SegHeadOpt = Annotated[Optional[Path], typer.Option("--seg-head", help="Method rau-seg: a `rau train seg-head` folder (default: the shipped head, if any).")]
RefinerOpt = Annotated[Optional[Path], typer.Option("--refiner", help="Method reg-refine: a `rau train refine` folder (default: the shipped refiner).")]
MemSegOpt = Annotated[Optional[Path], typer.Option("--memseg", help="Methods sam2-memory/reg-memseg: a `rau train memseg` folder (default: the shipped memory segmenter).")]
FollowOpt = Annotated[bool, typer.Option("--follow-unknown/--decode-unknown", help="Methods sam2-memory, reg-memseg, rau-seg, "
    "rau-memseg: a structure whose name the memory segmenter never trained on is copied from the reference (reg-memseg: "
    "registration's warped mask; the others: the memory readout) instead of drawn by its decoder (default: follow; "
    "--decode-unknown reads the method's <method>_decode.json calibration).")]
SegmentAllOpt = Annotated[bool, typer.Option("--segment-all/--segment-visible", help="Methods rau-seg, rau-memseg: a "
    "structure the VLM answers \"not visible\" is still segmented by the memory segmenter from memory alone, and the "
    "calibrated confidence and presence (which read the VLM's answer) decide what is withheld (default). "
    "--segment-visible: the VLM's \"no\" stands and no mask is delivered (the paper's gate; reads the method's "
    "<method>_visible.json calibration).")]
SecondOpinionOpt = Annotated[bool, typer.Option("--second-opinion/--no-second-opinion", help="Method reg-refine: on targets "
    "read as coronary angiograms the shipped memory segmenter segments the same structures too, and the agreement of its "
    "masks with the refiner's feeds the confidence (about 1.2 s more per such target on 2 CPU cores). Off: no memory pass, "
    "the refiner's masks are delivered. Default: on.")]
AngiogramMasksOpt = Annotated[str, typer.Option("--angiogram-masks", help="Method reg-refine with the second opinion on: whose "
    "masks are delivered on angiograms, refiner (default) or memory (the better coronary masks, with a confidence that "
    "separates right from wrong less well; its own calibration); the other's are the second opinion.")]
SegOpt = Annotated[Optional[str], typer.Option("--segmenter", help="Segmenter behind the boxes: medsam (default) or sam2-memory.")]
PrecisionOpt = Annotated[Optional[str], typer.Option("--precision", help="LiteMedSAM encoder precision: auto (bf16 on CPUs with AMX/AVX512-BF16, else fp32), fp32 or bf16. Default: $RAU_ENCODER_PRECISION or auto.")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="torch CPU threads.")]
CacheWeightsOpt = Annotated[Optional[str], typer.Option("--cache-weights", help="Comma-separated sampling weights per cache (default: by size).")]
TrainDeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]


def option(help_text: str, *names: str) -> Any:
    """A ``typer.Option`` with its help text first (the flag names follow, when not derived)."""
    return typer.Option(*names, help=help_text)


# options several trainings share (help text only; each command sets its own default)
RunDirOpt = Annotated[Path, option("Run folder: checkpoints, loss.json/png, final/. An existing run there is resumed.")]
StepsOpt = Annotated[int, option("Optimizer steps.")]
SaveEveryOpt = Annotated[int, option("Checkpoint every N steps.")]
PeakLrOpt = Annotated[float, option("AdamW peak learning rate (cosine to 10%).")]

ExcludeOpt = Annotated[Optional[list[str]], option(
    "Structure-name pattern held out (shell style, e.g. '*clavicle*'); repeat for several.", "--exclude")]


def method_options(device: str, vlm: Optional[Path], lora: Optional[Path], sam2: Optional[Path], segmenter: Optional[str],
                   seed: int = 0, unet: Optional[Path] = None, chex: Optional[Path] = None,
                   seg_head: Optional[Path] = None, precision: Optional[str] = None,
                   memseg: Optional[Path] = None, refiner: Optional[Path] = None, follow_unknown: bool = True,
                   segment_all: bool = True, second_opinion: bool = True,
                   angiogram_masks: str = "refiner") -> dict[str, Any]:
    """The keyword arguments of :func:`rau.methods.create_method` from the shared method options.

    A bad ``--precision`` fails here, before any model loads."""
    from rau.encoders.litemedsam import resolve_precision

    resolve_precision(precision, device)
    return {"device": device, "vlm": vlm, "lora": lora, "sam2": sam2, "segmenter": segmenter, "seed": seed,
            "unet": unet, "chex": chex, "seg_head": seg_head, "precision": precision, "memseg": memseg,
            "refiner": refiner, "follow_unknown": follow_unknown, "segment_all": segment_all,
            "second_opinion": second_opinion, "angiogram_masks": angiogram_masks}
