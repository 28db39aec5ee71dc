"""Score files and folders into a CSV, resumably.

Rows are appended batch by batch and flushed to disk, so an interrupted run loses at most the batch
in flight. A rerun with the same output skips every path already in the file (scored or failed;
``retry_failed=True`` drops the failed rows and tries those files again), and repairs a last line
cut short by a kill. Paths are stored resolved (absolute), so reruns from another directory match.
"""

from __future__ import annotations

import csv
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from .errors import ImageError, InputError, QualityGuideError
from .images import check_size, list_images, load_image
from .scorers.base import QualityScorer

FIELDS = ["path", "score", "error", "native_score"]


@dataclass
class ScoreSummary:
    scored: int = 0
    failed: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, error) for requested files

    @property
    def ok(self) -> bool:
        return not self.failures


def _repair_and_read(output: Path) -> dict[str, dict]:
    """Existing rows by path; truncates a partial last line; checks the header."""
    if not output.exists() or output.stat().st_size == 0:
        return {}
    with open(output, "rb+") as handle:
        data = handle.read()
        if not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            handle.truncate(cut)
            data = data[:cut]
    lines = data.decode("utf-8").splitlines()
    if not lines:
        return {}
    header = next(csv.reader([lines[0]]))
    if header != FIELDS:
        raise InputError(f"--output {output} exists with columns {header}, not {FIELDS}; "
                         "choose another --output or delete the file")
    rows = {}
    for row in csv.DictReader(lines):
        rows[row["path"]] = row
    return rows


def _rewrite(output: Path, rows: list[dict]) -> None:
    tmp = output.with_suffix(output.suffix + ".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, output)


def _fmt(value: float) -> str:
    return f"{value:.9g}"


# Images per batch are bounded by their pixel count, so memory does not grow with --batch-size: 8 phone
# photos (12 MP each) are 8 batches, 8 thumbnails one. A larger image is a batch of its own (NIQE and
# BRISQUE then bound their own memory by tiling).
BATCH_PIXELS = 16 * 2**20


def batches_by_pixels(shapes: Sequence[tuple[int, ...]], max_pixels: int | None = None) -> list[list[int]]:
    """Indices of same-size images grouped into batches of at most ``max_pixels`` pixels (default
    :data:`BATCH_PIXELS`; at least one image)."""
    max_pixels = BATCH_PIXELS if max_pixels is None else max_pixels
    groups: dict[tuple, list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(i)
    batches = []
    for shape, indices in groups.items():
        per_batch = max(1, max_pixels // (shape[-2] * shape[-1]))
        batches.extend(indices[start:start + per_batch] for start in range(0, len(indices), per_batch))
    return batches


def score_tensors(scorer: QualityScorer, images: list[torch.Tensor], device: torch.device,
                  max_pixels: int | None = None) -> list[tuple[float, float] | Exception]:
    """Score images of possibly different sizes in batches of same-size images of at most ``max_pixels``
    pixels (:func:`batches_by_pixels`); a failing batch is retried one by one."""
    results: list[tuple[float, float] | Exception] = [None] * len(images)  # type: ignore[list-item]
    for indices in batches_by_pixels([image.shape for image in images], max_pixels):
        try:
            _score_group(scorer, images, indices, device, results)
        except QualityGuideError as exc:
            if len(indices) == 1:
                results[indices[0]] = exc
                continue
            for i in indices:
                try:
                    _score_group(scorer, images, [i], device, results)
                except QualityGuideError as exc:
                    results[i] = exc
    return results


def _score_group(scorer, images, indices, device, results) -> None:
    if len(indices) == 1:
        batch = images[indices[0]][None].to(device)  # a view: a big photo is not copied
    else:
        batch = torch.stack([images[i] for i in indices]).to(device)
    with torch.no_grad():
        scores, native = scorer.score_with_native(batch)
    for j, i in enumerate(indices):
        results[i] = (float(scores[j]), float(native[j]))


def score_paths(paths: Sequence[str | os.PathLike], scorer: QualityScorer, output: str | os.PathLike,
                batch_size: int = 8, recursive: bool = False, device: str | torch.device = "cpu",
                retry_failed: bool = False, progress: bool = True) -> ScoreSummary:
    """Score image files and folders into ``output`` (CSV ``path,score,error,native_score``).

    Args:
        paths: files and folders (folders: their image files; ``recursive`` descends).
        scorer: any :class:`QualityScorer` (already on ``device``).
        output: CSV to create or resume.
        batch_size: files loaded and written per step.
        retry_failed: drop rows with errors from ``output`` and try those files again.
    """
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    output = Path(output)
    files = list_images(paths, recursive=recursive)
    if not files:
        raise InputError(f"no image files found in {[str(p) for p in paths]}; pass image files or folders "
                         "(use --recursive for nested folders)")
    existing = _repair_and_read(output)
    if retry_failed and any(row["error"] for row in existing.values()):
        existing = {k: v for k, v in existing.items() if not v["error"]}
        _rewrite(output, list(existing.values()))
    keys = [str(p.resolve()) for p in files]
    todo = [(key, path) for key, path in zip(keys, files) if key not in existing]
    summary = ScoreSummary(skipped=len(files) - len(todo))
    output.parent.mkdir(parents=True, exist_ok=True)
    new_file = not output.exists() or output.stat().st_size == 0
    device = torch.device(device)
    with open(output, "a", newline="") as handle, \
            tqdm(total=len(todo), desc=f"scoring ({scorer.name})", unit="img", file=sys.stderr,
                 disable=not progress) as bar:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            rows = _score_chunk(scorer, chunk, device)
            writer.writerows(rows)
            handle.flush()
            os.fsync(handle.fileno())
            for row in rows:
                if row["error"]:
                    summary.failed += 1
                    bar.write(f"error: {row['error']}", file=sys.stderr)
                else:
                    summary.scored += 1
            bar.update(len(chunk))
    with open(output, newline="") as handle:
        final = {row["path"]: row for row in csv.DictReader(handle)}
    summary.failures = [(key, final[key]["error"]) for key in keys if key in final and final[key]["error"]]
    return summary


def _score_chunk(scorer: QualityScorer, chunk: list[tuple[str, Path]], device: torch.device,
                 max_pixels: int | None = None) -> list[dict]:
    """Rows for ``chunk``; images are loaded only until ``max_pixels`` (default :data:`BATCH_PIXELS`) wait,
    then scored and released."""
    max_pixels = BATCH_PIXELS if max_pixels is None else max_pixels
    rows: list[dict] = [{"path": key, "score": "", "error": "", "native_score": ""} for key, _ in chunk]
    pending: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        results = score_tensors(scorer, [image for _, image in pending], device, max_pixels)
        for (i, _), result in zip(pending, results):
            if isinstance(result, Exception):
                rows[i]["error"] = f"{chunk[i][1]}: {result}"
            else:
                rows[i]["score"], rows[i]["native_score"] = _fmt(result[0]), _fmt(result[1])
        pending.clear()

    for i, (key, path) in enumerate(chunk):
        try:
            image = load_image(path)
            check_size(image.shape[-2], image.shape[-1], scorer.min_side, str(path))
        except ImageError as exc:
            rows[i]["error"] = str(exc)
            continue
        if pending and _pixels(pending) + image.shape[-2] * image.shape[-1] > max_pixels:
            flush()
        pending.append((i, image))
        del image
        if _pixels(pending) >= max_pixels:  # full: score it before loading more (a huge photo alone)
            flush()
    if pending:
        flush()
    return rows


def _pixels(pending: list[tuple[int, torch.Tensor]]) -> int:
    return sum(image.shape[-2] * image.shape[-1] for _, image in pending)
