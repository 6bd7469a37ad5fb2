"""The ``rau`` command line (typer): a thin shell over the Python API."""

from rau.cli.app import app, main

__all__ = ["app", "main"]
