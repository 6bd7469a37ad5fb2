"""The shipped default weights (safetensors + config), one folder per model; see the README."""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
