"""The project's error types for bad input, and how a library error is quoted in our messages."""

from __future__ import annotations


class DataError(ValueError):
    """Input data cannot be used; the message names the file, line or row and what to do."""


class ExampleError(DataError):
    """A single example cannot be used; the message says which one and why."""


class ExportError(ValueError):
    """A bad input to an export; the message says which file or folder and what to do."""


def error_reason(error: BaseException) -> str:
    """A library error's first line, to quote inside a sentence of our own."""
    text = str(error).strip()
    return text.splitlines()[0].rstrip(".") if text else type(error).__name__
