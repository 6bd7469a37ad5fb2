"""``rau serve``: the browser viewer (:mod:`rau.serve`, Gradio) on localhost.

    rau serve                                           # http://127.0.0.1:7860, default method
    rau serve --method registration --port 8000 --bank bank.npz
    rau serve --method sam2-memory --bank angiograms.npz --reference-choice coverage

Needs the ``serve`` extra (``pip install 'rau[serve]'``); without it the command prints one
``error:`` line saying so.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Optional

import typer

from rau.cli.common import DeviceOpt, MethodOpt, user_errors

INSTALL_HINT = "pip install 'rau[serve]'"


def _require_gradio() -> None:
    from rau.errors import RauInputError, one_line

    try:
        import gradio  # noqa: F401
    except ImportError as exc:
        raise RauInputError(f"rau serve needs gradio, which cannot be imported ({one_line(exc)}); "
                            f"install it: {INSTALL_HINT}") from None


def serve(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 7860,
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).")] = "127.0.0.1",
    bank: Annotated[Optional[Path], typer.Option(help="Reference bank (rau index) offered as a reference source.")] = None,
    method: MethodOpt = None,
    device: DeviceOpt = "cpu",
    min_confidence: Annotated[Optional[float], typer.Option(help="As `rau localize --min-confidence` (default: each method's calibrated threshold; 0 keeps every output).")] = None,
    reference_choice: Annotated[str, typer.Option(help="With --bank, as `rau localize --reference-choice`: similar (the most similar "
        "reference) or coverage (of the 10 most similar, the one expected to cover most of what the target shows: coronary segments).")] = "similar",
) -> None:
    """Open the browser viewer: pick a reference, upload a target, run a method, see and download the result."""
    with user_errors():
        from rau.errors import RauInputError

        if not 1 <= port <= 65535:
            raise RauInputError(f"--port: expected 1..65535, got {port}")
        _require_gradio()
        from rau.serve import build_app

        app = build_app(bank=bank, method=method, device=device, min_confidence=min_confidence,
                        reference_choice=reference_choice)
        out_root = app.rau_out_root
        try:
            try:
                app.launch(server_name=host, server_port=port, allowed_paths=[str(out_root)], quiet=True,
                           prevent_thread_lock=True)
            except OSError as exc:
                why = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
                raise RauInputError(f"--port/--host: cannot listen on {host}:{port} ({why}); pick another --port") from None
            typer.echo(f"rau viewer on http://{host}:{port}  (Ctrl-C stops it; outputs in {out_root})")
            app.block_thread()  # until Ctrl-C, then closes the server
        finally:
            shutil.rmtree(out_root, ignore_errors=True)
