"""Score files and folders into a CSV, resumably.

Rows are appended batch by batch and flushed to disk, so an interrupted run loses at most the batch
in flight. A rerun with the same output skips every path already in the file (scored or failed;
``retry_failed=True`` tries the failed ones of the files given again). The file itself (format,
ownership check, lock, settings, repair of a last row cut short by a kill) is :mod:`qualityguide.cli.scorefile`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from ..errors import ImageError, InputError, printable
from ..images import check_size, collect_multi_frame, load_image, scan_images
from ..scorers.base import QualityScorer
from ..scorers.batching import BATCH_PIXELS, batches_by_pixels, image_cost, score_tensors
from .scorefile import FIELDS, ScoreFile, decode_path, encode_path, scorer_settings
from .shards import processes_for, score_into

__all__ = ["BATCH_PIXELS", "FIELDS", "ScoreSummary", "batches_by_pixels", "decode_path", "image_cost", "score_paths",
           "score_tensors", "scorer_settings"]


@dataclass
class ScoreSummary:
    scored: int = 0
    failed: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path cell, error) for requested files
    notes: list[str] = field(default_factory=list)  # one line each: links or formats skipped, multi-frame files
    main: bool = True  # False on the other processes of `accelerate launch`: the main one reports the run

    @property
    def ok(self) -> bool:
        return not self.failures


def _fmt(value: float) -> str:
    return f"{value:.9g}"


def score_paths(paths: Sequence[str | os.PathLike], scorer: QualityScorer, output: str | os.PathLike,
                batch_size: int = 8, recursive: bool = False, device: str | torch.device = "cpu",
                retry_failed: bool = False, progress: bool = True, settings: str | None = None) -> ScoreSummary:
    """Score image files and folders into ``output`` (CSV ``path,score,error,native_score,settings``).

    Args:
        paths: files and folders (folders: their image files; ``recursive`` descends).
        scorer: any :class:`QualityScorer` (already on ``device``).
        output: CSV to create or resume; a file that is not such a CSV, or one made with other
            settings, is refused unchanged; one in use by another run is refused.
        batch_size: files loaded and written per step.
        retry_failed: drop the error rows of the files given here and try those files again.
        settings: what the values depend on (default :func:`scorer_settings` of ``scorer``).

    Under ``accelerate launch`` each process scores a contiguous share of the files into its own part,
    merged into ``output`` at the end (:mod:`qualityguide.cli.shards`); the summary's counts are every
    process's; ``failures`` is filled on the main process, from the merged output (``main`` is False elsewhere).
    """
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    listing = scan_images(paths, recursive=recursive)
    if not listing.files:
        raise InputError(f"no image files found in {[printable(str(p)) for p in paths]}; "
                         f"{''.join(f'{note}; ' for note in listing.notes())}pass image files or folders (use "
                         "--recursive for nested folders)")
    keys = [encode_path(key) for key in listing.keys]
    summary = ScoreSummary(notes=listing.notes())
    device = torch.device(device)

    def prepare(table: ScoreFile) -> list[tuple[str, Path]]:
        if retry_failed:
            table.forget([key for key in keys if key in table.rows and table.rows[key]["error"]])
        return [(key, path) for key, path in zip(keys, listing.files) if key not in table.rows]

    def work(table: ScoreFile, todo: list[tuple[str, Path]], main: bool) -> tuple[int, int, list[str]]:
        scored = failed = 0
        with collect_multi_frame() as multi_frame, \
                tqdm(total=len(todo), desc=f"scoring ({scorer.name})", unit="img", file=sys.stderr,
                     disable=not progress or not main) as bar:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                rows = score_chunk(scorer, chunk, device)
                table.append(rows)  # error cells: one line, UTF-8, never a formula, whatever the file name holds
                for row in rows:
                    if row["error"]:
                        failed += 1
                        bar.write(f"error: {row['error']}", file=sys.stderr)
                    else:
                        scored += 1
                bar.update(len(chunk))
        return scored, failed, list(multi_frame)

    processes = processes_for(device)
    rows, results = score_into(output, settings or scorer_settings(scorer), prepare, work, processes)
    summary.scored, summary.failed = sum(r[0] for r in results), sum(r[1] for r in results)
    summary.skipped = len(keys) - summary.scored - summary.failed
    summary.main = rows is not None  # one process, or the main one: it read the whole output
    if summary.main:
        summary.failures = [(key, rows[key]["error"]) for key in keys if key in rows and rows[key]["error"]]
    multi_frame = [name for r in results for name in r[2]]
    if multi_frame:
        summary.notes.append(f"{len(multi_frame)} file(s) have several frames (animated GIF, multi-page TIFF, ...) "
                             f"and were scored on their first frame only, e.g. {printable(multi_frame[0])}")
    return summary


def score_chunk(scorer: QualityScorer, chunk: list[tuple[str, Path]], device: torch.device,
                 max_pixels: int | None = None) -> list[dict]:
    """Rows for ``chunk``; images are loaded only until ``max_pixels`` (default :data:`BATCH_PIXELS`) wait,
    then scored and released."""
    max_pixels = BATCH_PIXELS if max_pixels is None else max_pixels
    rows: list[dict] = [{"path": key, "score": "", "error": "", "native_score": ""} for key, _ in chunk]
    pending: list[tuple[int, torch.Tensor, int]] = []  # (row, image, cost in pixels)

    def flush() -> None:
        results = score_tensors(scorer, [image for _, image, _ in pending], device, max_pixels)
        for (i, _, _), result in zip(pending, results):
            if isinstance(result, Exception):
                rows[i]["error"] = f"{chunk[i][1]}: {result}"
            else:
                rows[i]["score"], rows[i]["native_score"] = _fmt(result[0]), _fmt(result[1])
        pending.clear()

    for i, (key, path) in enumerate(chunk):
        try:
            image = load_image(path)
            check_size(image.shape[-2], image.shape[-1], scorer.min_side, str(path))
            cost = image_cost(scorer, image.shape[-2], image.shape[-1], str(path))
        except ImageError as exc:
            rows[i]["error"] = str(exc)
            continue
        if pending and _pixels(pending) + cost > max_pixels:
            flush()
        pending.append((i, image, cost))
        del image
        if _pixels(pending) >= max_pixels:  # full: score it before loading more (a huge photo alone)
            flush()
    if pending:
        flush()
    return rows


def _pixels(pending: list[tuple[int, torch.Tensor, int]]) -> int:
    return sum(cost for _, _, cost in pending)
