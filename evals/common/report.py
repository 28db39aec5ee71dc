"""Reports: the slug that names a run's files, and the JSON + markdown (+ PNG) trio every eval writes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterable, Sequence


def slug(spec: str, *parts: object) -> str:
    """A file-name-safe name for a model or scorer spec and the settings of a run, e.g.
    ``slug("tiny:sd", "64px", "10steps") == "tiny_sd_64px_10steps"``.

    Args:
        spec: a model id or scorer spec; every run of characters outside ``[A-Za-z0-9_.-]`` becomes ``_``
            (``:`` and ``/`` of hub ids and ``tiny:`` specs, ``@`` of ``SPEC@SIZE``).
        parts: settings appended with ``_`` (so two runs with other settings do not overwrite each other).
    """
    return "_".join([re.sub(r"[^A-Za-z0-9_.-]+", "_", spec), *(str(p) for p in parts)])


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """The lines of a markdown table: ``header``, the ``|---|`` rule, then one line per row (cells as ``str``).

    Args:
        header: the column titles.
        rows: the cells of each row, already formatted where a number wants fixed digits.
    """
    return [_table_line(header), "|" + "---|" * len(header)] + [_table_line(row) for row in rows]


def _table_line(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def write_report(out: Path, stem: str, result: dict, markdown: str,
                 plot: Callable[[dict, Path], None] | None = None, json_stem: str | None = None) -> None:
    """Write ``out/<stem>.json`` (``result``, indented), ``out/<stem>.md`` (``markdown``) and, with ``plot``,
    ``out/<stem>.png`` (``plot(result, path)``).

    Args:
        out: the results folder (created if missing).
        stem: the files' common name (``"results"``, or a :func:`slug`).
        result: the numbers, JSON-serialisable.
        markdown: the same numbers as a table for people.
        plot: draws ``result`` into a PNG; None writes no figure.
        json_stem: another name for the JSON (the toy evals write ``summary.json`` beside ``results.md``).
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{json_stem or stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text(markdown)
    if plot is not None:
        plot(result, out / f"{stem}.png")
