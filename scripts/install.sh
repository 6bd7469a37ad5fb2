#!/usr/bin/env bash
# Create .venv (if missing) and install rau with its test, DRR and serve (Gradio viewer) extras. Idempotent; no downloads
# beyond the package registry. torch/torchvision are pinned to the builds that install from this
# machine kind's local disk (see README, "Dependencies").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e ".[test,drr,serve]"
# diffdrr declares pyvista[all] (VTK, Jupyter...) for its 3D viewer only; rau renders DRRs without it.
.venv/bin/python -m pip install -q --no-deps "diffdrr>=0.6"
