"""Screenshot of the ``rau serve`` viewer after one run on the bundled chest X-ray sample.

    .venv/bin/python scripts/serve_screenshot.py                      # default method -> docs/img/serve.png
    .venv/bin/python scripts/serve_screenshot.py --method registration --out /tmp/serve.png

Starts the app in this process on a free localhost port, drives it in headless Chromium with
playwright (reference: the bundled sample; target: ``samples/chest_xray/target.png`` set on the
target's file input; Run clicked; waits for the overlay and the status line), then saves a
full-page screenshot. Needs ``pip install playwright`` and a Chromium: ``--chromium PATH``, else the
first of chromium / chromium-browser / google-chrome on PATH (``apt-get install chromium``), else
playwright's own (``python -m playwright install chromium``). CPU only: about 40 s with the default
method (rau-seg, deterministic: the overlay is the one ``rau localize`` writes), 15 s with
registration (whose result varies from run to run).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_chromium(given: str | None) -> str | None:
    """The Chromium executable to drive (None: playwright's bundled one)."""
    if given:
        return given
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def capture(url: str, target: Path, out: Path, chromium: str | None, width: int, height: int, timeout_s: float) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # --no-sandbox: Chromium refuses to run as root with its sandbox (containers).
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url, wait_until="domcontentloaded")
            page.locator("#target input[type=file]").set_input_files(str(target))
            page.locator("#target").get_by_text(target.name).first.wait_for(timeout=timeout_s * 1000)
            page.locator("#run").click()
            page.locator("#overlay img").first.wait_for(state="visible", timeout=timeout_s * 1000)
            page.wait_for_function("() => document.querySelector('#status textarea')?.value.includes('structures found')",
                                   timeout=timeout_s * 1000)
            page.wait_for_timeout(1000)  # let the table and download buttons settle
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "serve.png")
    ap.add_argument("--method", default=None, help="method run in the screenshot (default: rau's default method)")
    ap.add_argument("--chromium", help="Chromium/Chrome executable (default: found on PATH, else playwright's)")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=1000)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each step")
    args = ap.parse_args()

    from rau.serve import SAMPLE_DIR, build_app

    out_root = Path(tempfile.mkdtemp(prefix="rau-serve-shot-"))
    app = build_app(method=args.method, out_root=out_root)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        capture(f"http://127.0.0.1:{port}/", SAMPLE_DIR / "target.png", args.out, find_chromium(args.chromium),
                args.width, args.height, args.timeout)
    finally:
        app.close()
        shutil.rmtree(out_root, ignore_errors=True)
    print(f"screenshot -> {args.out}")


if __name__ == "__main__":
    main()
