"""``rau serve``: a browser viewer (Gradio, on localhost) over the Python API.

    rau serve                                   # http://127.0.0.1:7860
    rau serve --method registration --port 8000 --bank bank.npz

A user picks a reference (the bundled chest X-ray sample, an uploaded image with one
``<structure>.png`` mask per structure, or a ``--bank``), uploads a target (PNG/JPEG/DICOM/NIfTI),
chooses a method and presses Run; the viewer shows the overlay (drawn as ``rau localize``'s
``overlay.png``), a table per structure, toggles to show or hide structures, and downloads:
``result.json``, ``masks.zip`` and the export formats of :func:`rau.data.export.write_formats`.

The app is a thin shell: :func:`localize_request` calls :func:`rau.pipeline.localize` (or
:func:`rau.pipeline.localize_from_bank`) with a method taken from a :class:`MethodCache` (building a
method is slow, so each (method, options) is built once), :func:`run_request` is the whole request
as a pure call that tests use without a browser, and :func:`build_app` wires it to Gradio
components. Errors reach the user as one line in the status box, never a traceback. Gradio is
imported inside :func:`build_app` only (the ``serve`` extra).
"""

from __future__ import annotations

import io
import logging
import shutil
import tempfile
import threading
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rau.atomic import write_bytes
from rau.data.annotated import AnnotatedImage, TargetResult
from rau.errors import RauInputError, one_line

log = logging.getLogger(__name__)

#: The bundled reference/target pair (present in a source checkout; the sample choice is hidden otherwise).
SAMPLE_DIR = Path(__file__).resolve().parents[2] / "samples" / "chest_xray"

#: Columns of the per-structure table (``box_xyxy_px``: pixel-edge x0, y0, x1, y1 in target pixels).
TABLE_HEADERS = ["structure", "answer", "found", "confidence", "presence", "score", "box_xyxy_px", "note"]

#: Export formats offered in the viewer (:data:`rau.data.export.FORMATS`; dicom-seg: DICOM targets only).
EXPORT_FORMATS = ("nifti", "coco", "dicom-seg")

SOURCE_SAMPLE, SOURCE_UPLOAD, SOURCE_BANK = "bundled sample (chest X-ray)", "upload", "reference bank"


class MethodCache:
    """Methods built once per (name, options) and reused across requests (thread-safe).

    ``get("registration", device="cpu")`` builds the method on the first call and returns the same
    object afterwards; a failed build is not cached (the error reaches the caller each time)."""

    def __init__(self) -> None:
        self._methods: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    def get(self, name: str | None = None, **options: Any):
        from rau.methods import DEFAULT_METHOD, create_method

        key = (name or DEFAULT_METHOD, tuple(sorted((k, str(v)) for k, v in options.items())))
        with self._lock:
            if key not in self._methods:
                self._methods[key] = create_method(key[0], **options)
            return self._methods[key]

    def __len__(self) -> int:
        return len(self._methods)


#: The cache :func:`run_request` uses unless given one (shared by every app of this process).
METHOD_CACHE = MethodCache()


@dataclass
class Outcome:
    """One finished request: the result, the target it belongs to, and the files written for it
    (download name -> path; ``result.json``, ``masks.zip``, ``overlay.png``, then the exports)."""

    result: TargetResult
    target: AnnotatedImage
    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)


# ----------------------------------------------------------------------------- inputs


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def load_uploaded_reference(image: str | Path | None, masks: Sequence[str | Path] | None) -> AnnotatedImage:
    """The reference from uploaded files: an image and one binary mask per structure, named by its
    file (``heart.png`` -> ``heart``), each the size of the image."""
    from rau.data.io import load_annotated

    if not image:
        raise RauInputError("reference image: upload one (PNG/JPEG/DICOM/NIfTI), or pick the bundled sample")
    if not masks:
        raise RauInputError("reference masks: upload one binary <structure>.png per structure, the size of the reference")
    named: dict[str, Path] = {}
    for p in map(Path, masks):
        name = _stem(p)
        if name in named:
            raise RauInputError(f"reference masks: two files name the structure {name!r} "
                                f"({named[name].name}, {p.name}); keep one")
        named[name] = p
    return load_annotated(image, named, arg="reference image")


def load_sample_reference() -> AnnotatedImage:
    """The bundled chest X-ray reference (``samples/chest_xray``: heart and both lungs)."""
    from rau.data.io import load_annotated

    if not (SAMPLE_DIR / "reference.png").is_file():
        raise RauInputError(f"reference: the bundled sample is not here ({SAMPLE_DIR}); upload a reference instead")
    return load_annotated(SAMPLE_DIR / "reference.png", SAMPLE_DIR / "reference_masks", arg="sample reference")


def _check_formats(formats: Sequence[str], target: AnnotatedImage) -> list[str]:
    """Checked format names; dicom-seg refused up front for a non-DICOM target (before the method runs)."""
    from rau.data.export import parse_formats
    from rau.data.io import file_kind

    chosen = parse_formats(list(formats))
    source = target.meta.get("source")
    if "dicom-seg" in chosen and not (source and Path(source).is_file() and file_kind(Path(source)) == "dicom"):
        got = Path(source).name if source else "an image with no source file"
        raise RauInputError(f"export formats: dicom-seg needs a DICOM target (a SEG references its source instance), "
                            f"got {got}; choose nifti or coco")
    return chosen


# ----------------------------------------------------------------------------- the request


def localize_request(
    reference,
    target: AnnotatedImage | str | Path,
    method_name: str | None = None,
    *,
    formats: Sequence[str] = (),
    out_dir: str | Path | None = None,
    cache: MethodCache | None = None,
    min_confidence: float | None = None,
    reference_choice: str = "similar",
    **method_options: Any,
) -> Outcome:
    """Run one method on one target and write every download.

    Args:
        reference: an :class:`AnnotatedImage`, or a :class:`rau.references.bank.ReferenceBank`
            (the reference is retrieved from it, as ``rau localize --bank``).
        target: an AnnotatedImage or an image path (PNG/JPEG/DICOM/NIfTI); any size.
        method_name: a registry name (default ``reg-refine``).
        formats: export formats (``nifti``, ``coco``, ``dicom-seg``), written next to result.json.
        out_dir: the output folder (as ``rau localize --out``; default: a new temporary folder).
        cache: where the method is built once (default :data:`METHOD_CACHE`).
        min_confidence: as ``rau localize --min-confidence`` (default: the method's calibrated threshold).
        reference_choice: with a bank, as ``rau localize --reference-choice`` (``similar`` or ``coverage``).
        method_options: :func:`rau.methods.create_method` options (``device``...).
    Raises:
        RauInputError (and the other ValueErrors/OSErrors of the readers): bad input, one line.
    """
    from rau.data.export import write_formats
    from rau.data.io import load_annotated
    from rau.pipeline import localize, localize_from_bank

    target_img = target if isinstance(target, AnnotatedImage) else load_annotated(target, arg="target")
    chosen = _check_formats(formats, target_img)
    method = (cache if cache is not None else METHOD_CACHE).get(method_name, **method_options)
    out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="rau-serve-")) / target_img.id
    if isinstance(reference, AnnotatedImage):
        result = localize(reference, target_img, method=method, out_dir=out_dir, min_confidence=min_confidence)
    else:
        result = localize_from_bank(reference, target_img, method=method, out_dir=out_dir, min_confidence=min_confidence,
                                    reference_choice=reference_choice)
    files = {"result.json": out_dir / "result.json", "masks.zip": zip_masks(out_dir), "overlay.png": out_dir / "overlay.png"}
    for path in write_formats(result, target_img, out_dir, chosen):
        files[path.name] = path
    for table in sorted(out_dir.glob("labels_labels.*")):  # the NIfTI label map's ITK-SNAP/JSON tables
        files[table.name] = table
    return Outcome(result, target_img, out_dir, files)


def zip_masks(out_dir: Path) -> Path:
    """``masks.zip`` (``masks/<structure>.png``) next to the output folder's masks/, atomically."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for png in sorted((out_dir / "masks").glob("*.png")):
            zf.write(png, f"masks/{png.name}")
    return write_bytes(out_dir / "masks.zip", buf.getvalue())


def render_overlay(result: TargetResult, target: AnnotatedImage, shown: Sequence[str] | None = None) -> np.ndarray:
    """(H, W, 3) uint8 overlay of the ``shown`` structures (default: all), drawn as ``overlay.png``;
    colours stay those of the full picture whichever structures are hidden."""
    from rau.render import draw_annotation

    names = list(result.structures)
    keep = names if shown is None else [n for n in names if n in set(shown)]
    h, w = target.shape
    masks = {n: result.structures[n].mask if result.structures[n].mask is not None else np.zeros((h, w), bool) for n in keep}
    boxes = {n: result.structures[n].box_xyxy_px for n in keep}
    return draw_annotation(target.image, masks, boxes=boxes, palette_names=names)


def table_rows(result: TargetResult) -> list[list[Any]]:
    """One row per structure, columns :data:`TABLE_HEADERS`."""
    rows = []
    for name, r in result.structures.items():
        box = ", ".join(f"{float(v):g}" for v in r.box_xyxy_px) if r.box_xyxy_px is not None else ""
        conf = round(float(r.confidence), 3) if r.confidence is not None else None
        present = round(float(r.presence), 3) if r.presence is not None else None
        note = r.reason or ("copied from the reference (a structure the model never trained on)" if r.copied else "")
        rows.append([name, r.answer or "", bool(r.found), conf, present, round(float(r.score), 4), box, note])
    return rows


def run_request(
    reference,
    target: AnnotatedImage | str | Path,
    method_name: str | None = None,
    structures_shown: Sequence[str] | None = None,
    *,
    formats: Sequence[str] = (),
    out_dir: str | Path | None = None,
    cache: MethodCache | None = None,
    min_confidence: float | None = None,
    **method_options: Any,
) -> tuple[np.ndarray, list[list[Any]], list[Path]]:
    """One viewer request without a browser: (overlay (H, W, 3) uint8 of the target's size,
    table rows (:data:`TABLE_HEADERS`), downloadable files). Arguments as :func:`localize_request`;
    ``structures_shown``: the structures drawn on the overlay (default: all)."""
    outcome = localize_request(reference, target, method_name, formats=formats, out_dir=out_dir, cache=cache,
                               min_confidence=min_confidence, **method_options)
    overlay = render_overlay(outcome.result, outcome.target, structures_shown)
    return overlay, table_rows(outcome.result), list(outcome.files.values())


def error_message(exc: BaseException) -> str:
    """``error: <one line>``: our messages (and the file system's) as they are, anything else with
    its class name (its traceback goes to the server's log only)."""
    if isinstance(exc, (ValueError, OSError)) and str(exc).strip():
        return f"error: {str(exc).strip().splitlines()[0]}"
    return f"error: {one_line(exc)}"


def short_paths(message: str, uploads: Sequence[str | Path]) -> str:
    """``message`` with each uploaded file's temporary folder left out (the user knows it by its name)."""
    for p in uploads:
        message = message.replace(str(Path(p)), Path(p).name)
    return message


def status_line(outcome: Outcome, refiner_masks: bool = True) -> str:
    """The line above the overlay; ``refiner_masks``: the default delivers its refiner's masks on angiograms (its
    ``angiogram_masks`` option is not "memory"), then a target it read as one gets the note ``rau localize`` prints."""
    from rau.pipeline import read_as_angiogram

    r = outcome.result
    found = sum(s.found for s in r.structures.values())
    note = ("; the target reads as a coronary angiogram, where sam2-memory's masks are right about twice as often as "
            "these (docs/RESULTS.md)" if refiner_masks and read_as_angiogram(r) else "")
    return f"{r.method}: {found}/{len(r.structures)} structures found in {r.seconds:.2f} s; reference: {r.reference_id}{note}"


# ----------------------------------------------------------------------------- the app


@dataclass
class _Viewer:
    """What the app's handlers share: the configuration given to :func:`build_app`."""

    bank: Any
    method_options: dict[str, Any]
    out_root: Path
    cache: MethodCache
    min_confidence: float | None = None
    reference_choice: str = "similar"

    def reference(self, source: str, image: str | None, masks: Sequence[str] | None):
        if source == SOURCE_BANK:
            if self.bank is None:
                raise RauInputError("reference: no bank was given; start `rau serve --bank BANK.npz`, or upload a reference")
            return self.bank
        if source == SOURCE_SAMPLE:
            return load_sample_reference()
        return load_uploaded_reference(image, masks)

    def run(self, source, ref_image, ref_masks, target, method, formats):
        """Run: (status, overlay, toggles, table, result.json, masks.zip, exports, state)."""
        import gradio as gr

        request_dir = None
        try:
            if not target:
                raise RauInputError("target: upload a target image (PNG/JPEG/DICOM/NIfTI)")
            reference = self.reference(source, ref_image, ref_masks)
            request_dir = Path(tempfile.mkdtemp(prefix="request-", dir=self.out_root))
            outcome = localize_request(reference, target, method, formats=formats or (), out_dir=request_dir / "out",
                                       cache=self.cache, min_confidence=self.min_confidence,
                                       reference_choice=self.reference_choice, **self.method_options)
        except Exception as exc:  # a request must never show a traceback; unexpected ones are logged
            if not isinstance(exc, (ValueError, OSError)):
                log.exception("rau serve: request failed")
            if request_dir is not None:
                shutil.rmtree(request_dir, ignore_errors=True)
            uploads = [p for p in (ref_image, *(ref_masks or []), target) if p]
            empty = gr.update(value=None, visible=False)
            return (short_paths(error_message(exc), uploads), None, gr.update(choices=[], value=[]), [], empty, empty, None, None)
        names = list(outcome.result.structures)
        exports = [str(p) for n, p in outcome.files.items() if n not in ("result.json", "masks.zip")]
        refiner_masks = self.method_options.get("angiogram_masks") in (None, "refiner")
        return (status_line(outcome, refiner_masks), render_overlay(outcome.result, outcome.target),
                gr.update(choices=names, value=names), table_rows(outcome.result),
                gr.update(value=str(outcome.files["result.json"]), visible=True),
                gr.update(value=str(outcome.files["masks.zip"]), visible=True), exports, outcome)

    @staticmethod
    def toggle(outcome: Outcome | None, shown: list[str]):
        return None if outcome is None else render_overlay(outcome.result, outcome.target, shown)


def build_app(
    *,
    bank: str | Path | None = None,
    method: str | None = None,
    device: str = "cpu",
    out_root: str | Path | None = None,
    cache: MethodCache | None = None,
    min_confidence: float | None = None,
    reference_choice: str = "similar",
):
    """The viewer as a ``gr.Blocks`` (call ``.launch()`` on it).

    Args:
        bank: a reference bank (``rau index``) offered as a reference source, loaded now.
        method: the method selected at start (default ``reg-refine``); checked now.
        device: torch device the methods run on.
        out_root: where each request's outputs go (default: a new temporary folder).
        cache: the methods built so far (default :data:`METHOD_CACHE`).
        min_confidence: as ``rau localize --min-confidence`` (default: each method's calibrated threshold).
        reference_choice: how the bank's reference is chosen, as ``rau localize --bank --reference-choice``
            (``similar`` or ``coverage``); checked now, and only with a bank.
    Returns the ``gr.Blocks``; its ``rau_out_root`` attribute is the folder of the requests' outputs
    (the caller removes it when done). The run endpoint is ``/run`` (inputs: reference source,
    reference image, reference masks, target, method, export formats), usable from ``gradio_client``.
    """
    import gradio as gr

    from rau.methods import DEFAULT_METHOD, METHODS
    from rau.pipeline import check_bank_choice

    method = method or DEFAULT_METHOD
    if method not in METHODS:
        raise RauInputError(f"--method: unknown {method!r}; choose one of {', '.join(METHODS)}")
    check_bank_choice(reference_choice, bank is not None, without="start `rau serve --bank BANK.npz`")
    loaded_bank = None
    if bank is not None:
        from rau.references.bank import ReferenceBank

        loaded_bank = ReferenceBank.load(bank)
    out_root = Path(out_root) if out_root is not None else Path(tempfile.mkdtemp(prefix="rau-serve-"))
    out_root.mkdir(parents=True, exist_ok=True)
    if min_confidence is not None:
        from rau.methods.confidence import resolve_min_confidence

        resolve_min_confidence(min_confidence, None)  # checked now
    viewer = _Viewer(loaded_bank, {"device": device}, out_root, cache if cache is not None else METHOD_CACHE,
                     min_confidence, reference_choice)

    sources = ([SOURCE_BANK] if loaded_bank is not None else []) + \
              ([SOURCE_SAMPLE] if (SAMPLE_DIR / "reference.png").is_file() else []) + [SOURCE_UPLOAD]
    with gr.Blocks(title="rau viewer", analytics_enabled=False) as app:
        gr.Markdown("## rau: find a reference's structures in a target image\n"
                    "Pick a reference (image + one mask per structure), upload a target, choose a method, press Run.")
        with gr.Row():
            with gr.Column(scale=1):
                source = gr.Radio(sources, value=sources[0], label="Reference", elem_id="reference-source")
                ref_image = gr.File(label="Reference image (PNG/JPEG/DICOM/NIfTI)", type="filepath", elem_id="reference-image",
                                    visible=sources[0] == SOURCE_UPLOAD)
                ref_masks = gr.File(label="Reference masks: one binary <structure>.png each", file_count="multiple",
                                    type="filepath", elem_id="reference-masks", visible=sources[0] == SOURCE_UPLOAD)
                target = gr.File(label="Target image (PNG/JPEG/DICOM/NIfTI)", type="filepath", elem_id="target")
                method_box = gr.Dropdown([(f"{n}: {s.summary}", n) for n, s in METHODS.items()], value=method, label="Method")
                formats = gr.CheckboxGroup(list(EXPORT_FORMATS), value=["nifti", "coco"], label="Export formats",
                                           info="dicom-seg: DICOM targets only")
                run = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column(scale=2):
                status = gr.Textbox(label="Status", interactive=False, lines=1, max_lines=2, elem_id="status")
                overlay = gr.Image(label="Overlay", type="numpy", format="png", interactive=False, elem_id="overlay")
                shown = gr.CheckboxGroup([], value=[], label="Show structures")
                table = gr.Dataframe(headers=TABLE_HEADERS, datatype=["str", "str", "bool", "number", "number", "str", "str"],
                                     interactive=False, label="Per structure (box: pixel-edge x0, y0, x1, y1)")
                with gr.Row():
                    result_json = gr.DownloadButton("result.json", visible=False)
                    masks_zip = gr.DownloadButton("masks.zip", visible=False)
                exports = gr.File(label="Overlay and exports", file_count="multiple", interactive=False)
        state = gr.State(None)

        def on_source(choice):
            return gr.update(visible=choice == SOURCE_UPLOAD), gr.update(visible=choice == SOURCE_UPLOAD)

        source.change(on_source, source, [ref_image, ref_masks], api_name=False)
        run.click(viewer.run, [source, ref_image, ref_masks, target, method_box, formats],
                  [status, overlay, shown, table, result_json, masks_zip, exports, state],
                  api_name="run", concurrency_limit=1)
        shown.input(viewer.toggle, [state, shown], overlay, api_name=False)
    app.rau_out_root = out_root  # where the requests' outputs go (the CLI removes it on exit)
    return app
