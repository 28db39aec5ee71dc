"""Exceptions for user input.

Every message names the argument or file, the bad value, what is allowed and how to fix it. The CLI
prints :class:`QualityGuideError` subclasses as one line on stderr (no traceback).
"""

from __future__ import annotations


class QualityGuideError(Exception):
    """Base class for errors caused by user input, configuration or the environment."""


class InputError(QualityGuideError, ValueError):
    """An argument has a value that is not allowed."""


class ImageError(InputError):
    """One image (a file or an array) cannot be used; ``source`` names it."""

    def __init__(self, source: str, problem: str, fix: str | None = None):
        self.source = source
        self.problem = problem
        self.fix = fix
        message = f"{source}: {problem}"
        if fix:
            message += f" ({fix})"
        super().__init__(message)


class TrainingError(QualityGuideError, RuntimeError):
    """Training cannot go on (a loss term became NaN or infinite); the message names the term and the step."""


class WeightsNotFoundError(QualityGuideError, FileNotFoundError):
    """Weights or parameter files needed offline are not on this machine."""


def closest(name: str, known: list[str]) -> str | None:
    """The known name closest to ``name`` (difflib), or None if nothing is close."""
    import difflib

    matches = difflib.get_close_matches(name, known, n=1, cutoff=0.4)
    return matches[0] if matches else None


def printable(text: str) -> str:
    """``text`` on one line, as UTF-8: line breaks and other control characters escaped (``\\n``, ``\\u2028``),
    undecodable file-name bytes (lone surrogates) shown as ``\\xNN``. For messages, never for identity."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # surrogates that are not escaped bytes
        raw = text.encode("utf-8", "backslashreplace")
    text = raw.decode("utf-8", "backslashreplace")
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)
