"""Errors raised on bad user input.

Every message names the argument, what it got and how to fix it; the CLI prints the message on
one line and exits non-zero.
"""

from __future__ import annotations


class RauInputError(ValueError):
    """Bad user input (unreadable file, mismatched sizes, empty mask, unknown structure...)."""


class ModelOutputError(ValueError):
    """A model produced output that cannot be parsed (never raised out of a parser: see parsing)."""


class CheckpointError(ValueError):
    """A checkpoint directory is missing, truncated or does not match its config."""


def one_line(exc: BaseException) -> str:
    """``"ErrorClass: first line of the message"`` (200 characters at most), for wrapping a foreign
    exception (a truncated file, a failed import) into one of ours without a traceback."""
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0][:200]}" if text else exc.__class__.__name__
