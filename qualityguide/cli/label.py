"""Score columns for a training image folder's ``metadata.csv`` (``qualityguide label``), resumably.

Each column is one scorer's higher-is-better scores. Scores go first into one scores CSV per column
inside the folder (``DIR/.qualityguide/labels/``, a :class:`~qualityguide.cli.scorefile.ScoreFile`: rows
flushed batch by batch, settings checked), keyed by the image's path relative to DIR, so a killed
run loses at most the batch in flight and a moved folder resumes. Only at the end are the columns
merged into ``DIR/metadata.csv`` (:mod:`qualityguide.cli.imagefolder`), which is replaced atomically. Under
``accelerate launch`` the processes share the images out, each into its own part (:mod:`qualityguide.cli.shards`).
``labels/columns.json`` records which columns ``label`` wrote and with which settings: any other
column of the same name is the user's and is only replaced with ``overwrite=True``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import InputError, printable
from ..files import FORMATS
from ..images import collect_multi_frame, image_extensions, scan_images
from ..scorers.base import QualityScorer
from .imagefolder import (
    FILE_NAME,
    METADATA,
    MetadataTable,
    loaded_extensions,
    normalise_name,
    other_metadata,
    read_metadata,
    write_atomic,
)
from .score import score_chunk
from .scorefile import ScoreFile, scorer_settings
from .shards import Processes, parts_folder, processes_for, score_into

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None

OWNED = Path(".qualityguide") / "labels"
RECORD = "columns.json"


def recorded_columns(folder: str | os.PathLike) -> dict[str, dict]:
    """The score columns ``label`` wrote into ``folder``'s ``metadata.csv``, each with the settings that scored it
    (scorer, weights SHA-256, ...), as recorded in ``.qualityguide/labels/columns.json``; {} for a folder ``label``
    never wrote or whose record cannot be read (a model card then names the columns alone).

    Args:
        folder: an image folder (a recipe's ``--train_data_dir``).
    """
    try:
        record = json.loads((Path(folder) / OWNED / RECORD).read_text("utf-8"))["columns"]
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


@dataclass
class LabelSummary:
    """What :func:`label_folder` did.

    Attributes:
        metadata: the ``metadata.csv`` written.
        columns: the score columns, in order.
        images: image files found in the folder (and labelled, unless they failed).
        scored: per column, images scored by this run (the rest were done by an earlier run).
        added_rows: rows appended for images the metadata did not name.
        failures: ``(file_name, column, error)`` for every image whose cell stays empty, earlier runs' included.
        missing: ``file_name`` of rows whose file does not exist (their score cells are empty).
        unlabelled: ``(file_name, why)`` for rows whose file exists but was not labelled (e.g. in a sub-folder
            without ``recursive``); their cells keep any score an earlier run gave them, else stay empty.
        notes: one line each (links skipped, multi-frame files, names that cannot be written).
        main: False on the other processes of ``accelerate launch``; only the main process merges and reports
            (``failures``, ``missing``, ``unlabelled`` and ``added_rows`` are its alone).
    """

    metadata: Path
    columns: list[str]
    images: int = 0
    scored: dict[str, int] = field(default_factory=dict)
    added_rows: int = 0
    failures: list[tuple[str, str, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unlabelled: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    main: bool = True

    @property
    def ok(self) -> bool:
        """True when no image failed (rows naming missing files do not count)."""
        return not self.failures


def score_file_name(column: str) -> str:
    """The scores CSV of ``column`` in the owned folder: readable, and unique through a hash of the name."""
    readable = re.sub(r"[^A-Za-z0-9._@-]+", "_", column).strip("._")[:80] or "column"
    return f"{readable}-{hashlib.sha256(column.encode('utf-8')).hexdigest()[:8]}.csv"


def _check_columns(scorers: dict[str, QualityScorer]) -> None:
    if not isinstance(scorers, dict) or not scorers:
        raise InputError(f"scorers must be a non-empty dict {{column name: scorer}}, got {scorers!r}; e.g. "
                         "{'niqe-embedded': load_scorer('niqe-embedded')}")
    for column, scorer in scorers.items():
        if not isinstance(column, str) or not column.strip() or column != column.strip():
            raise InputError(f"score column name {column!r}: must be a non-empty string without leading or trailing "
                             "spaces; use the scorer's spec, e.g. 'niqe-embedded'")
        if column == FILE_NAME or column.endswith(("_file_name", "file_names")):
            raise InputError(f"score column name {column!r}: datasets reads {FILE_NAME!r}, '*_file_name' and "
                             "'*file_names' columns as image paths; name the column after the scorer's spec")
        if not isinstance(scorer, QualityScorer):
            raise InputError(f"scorers[{column!r}] is a {type(scorer).__name__}, not a QualityScorer; build one with "
                             f"qualityguide.load_scorer({column!r})")


class _Owned:
    """The folder ``label`` owns inside DIR: locked for the whole run; holds the record and the scores CSVs."""

    def __init__(self, folder: Path):
        self.path = folder / OWNED
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise InputError(f"{printable(str(self.path))}: cannot create it ({exc.strerror}); `label` keeps its "
                             "progress inside the folder it labels: make the folder writable") from None
        if fcntl is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._fd)
                raise InputError(f"{printable(str(folder))} is being labelled by another `qualityguide label` run (it "
                                 f"holds {printable(str(self.path / 'lock'))}); wait for it to finish") from None
        try:
            self.record: dict[str, dict] = json.loads((self.path / RECORD).read_text("utf-8"))["columns"]
        except FileNotFoundError:
            self.record = {}
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            self.close()
            raise InputError(f"{printable(str(self.path / RECORD))} is not the record `label` writes (which columns "
                             f"it owns); restore it, or delete {printable(str(self.path))} to start labelling "
                             "afresh (existing score columns are then refused unless --overwrite)") from None

    def save(self) -> None:
        data = json.dumps({"format": FORMATS["labels"], "columns": self.record}, indent=1, ensure_ascii=False,
                          sort_keys=True)
        write_atomic(self.path / RECORD, data.encode("utf-8"))

    def close(self) -> None:
        os.close(self._fd)


def _claim(owned: _Owned, table: MetadataTable | None, settings: dict[str, str], overwrite: bool) -> None:
    """Refuse score columns that are the user's, or label's with other settings (unless ``overwrite``); record
    every column as label's, with its settings, before any score is written."""
    header = table.header if table is not None else []
    foreign = [c for c in settings if c in header and c not in owned.record]
    if foreign and not overwrite:
        raise InputError(f"{printable(str(table.path))} already has column(s) {', '.join(map(repr, foreign))}, not "
                         "written by `qualityguide label`; they were left unchanged. Pass --overwrite (overwrite=True) "
                         "to replace them, or move them to other column names")
    changed = {c: owned.record[c]["settings"] for c in settings
               if c in owned.record and owned.record[c].get("settings") != settings[c]}
    if changed and not overwrite:
        column, old = next(iter(changed.items()))
        raise InputError(f"column {column!r} was labelled with settings {old!r} but this run's are "
                         f"{settings[column]!r}; values from different scorers, weights or options must not share a "
                         "column. Rerun with the settings of the earlier run (the same --weights), or pass "
                         "--overwrite to label the column afresh")
    for column, setting in settings.items():
        file = owned.record.get(column, {}).get("file") or score_file_name(column)
        if column in changed:
            (owned.path / file).unlink(missing_ok=True)
            shutil.rmtree(parts_folder(owned.path / file), ignore_errors=True)  # a killed sharded run's: old settings
        owned.record[column] = {"file": file, "settings": setting}
    owned.save()


def label_folder(folder: str | os.PathLike, scorers: dict[str, QualityScorer], batch_size: int = 8,
                 recursive: bool = False, device: str | torch.device = "cpu", overwrite: bool = False,
                 retry_failed: bool = False, progress: bool = True) -> LabelSummary:
    """Score the images of ``folder`` and write the scores as columns of ``folder/metadata.csv``.

    Existing columns, rows and their order are kept; images the file does not name get a new row (other
    cells empty); rows whose file is missing are kept with empty score cells. A failing image leaves its
    cell empty and is listed in the summary; the rest go on. Rerunning resumes: images already scored
    for a column are not scored again.

    Args:
        folder: the training image folder (``datasets`` "imagefolder" layout).
        scorers: ``{column name: scorer}``; the CLI names each column after the scorer's spec. Scorers are
            already on ``device``.
        batch_size: images loaded and recorded per step (a kill loses at most one step).
        recursive: label images in sub-folders too (``file_name`` then holds ``sub/name.png``).
        device: where batches are scored.
        overwrite: replace existing columns of these names that ``label`` did not write, and relabel afresh
            a column labelled earlier with other settings; without it both are refused unchanged.
        retry_failed: score again the images recorded as failed for these columns.
        progress: show a tqdm bar per column on stderr.

    Under ``accelerate launch`` the main process holds the folder's lock and does every check, each process
    scores a contiguous share of each column's images into its own part of the column's scores CSV
    (:mod:`qualityguide.cli.shards`), and the main process merges the parts and writes ``metadata.csv``.
    """
    _check_columns(scorers)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"--batch-size must be a whole number >= 1, got {batch_size!r}")
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{printable(str(folder))} is not a folder; pass the training image folder (the one that "
                         f"holds, or will hold, {METADATA})")
    others = other_metadata(folder, recursive)
    if others:
        raise InputError(f"{printable(str(others[0]))}: datasets would read it besides {METADATA}, and `label` writes "
                         f"only {printable(str(folder / METADATA))}; merge it into that file (or label its folder on "
                         "its own, without --recursive) and rerun")
    read_metadata(folder / METADATA)  # a broken file is refused before any scoring
    names, keys, notes = _scan(folder, recursive)
    if not names:
        raise InputError(f"no image files found in {printable(str(folder))} (extensions "
                         f"{', '.join(image_extensions())}){''.join(f'; {note}' for note in notes)}"
                         f"{'' if recursive else '; use --recursive for images in sub-folders'}")
    summary = LabelSummary(folder / METADATA, list(scorers), images=len(names), notes=notes)
    settings = {column: scorer_settings(scorer) for column, scorer in scorers.items()}
    processes = processes_for(torch.device(device))
    owned: list[_Owned] = []

    def claim() -> dict[str, str]:  # on the main process only: it holds the folder's lock for the whole run
        owned.append(_Owned(folder))
        _claim(owned[0], read_metadata(folder / METADATA), settings, overwrite)
        return {column: owned[0].record[column]["file"] for column in scorers}

    try:
        files = claim() if processes is None else processes.agree(claim)
        tables, multi_frame = {}, []
        for column, scorer in scorers.items():
            tables[column], summary.scored[column], frames = _label_column(
                folder / OWNED / files[column], column, settings[column], scorer, names, folder, batch_size, device,
                retry_failed, progress, processes)
            multi_frame += frames
        if multi_frame:
            summary.notes.append(f"{len(set(multi_frame))} file(s) have several frames (animated GIF, multi-page "
                                 "TIFF, ...) and were labelled on their first frame only, e.g. "
                                 f"{printable(multi_frame[0])}")
        summary.main = processes is None or processes.is_main
        if summary.main:  # re-read now: edits made to metadata.csv while scoring ran are kept
            _merge(read_metadata(folder / METADATA), tables, names, keys, folder, recursive, summary)
    finally:
        for lock in owned:
            lock.close()
    return summary


def _resolved(path: Path) -> str:
    """``path`` absolute with links resolved, as :func:`~qualityguide.images.scan_images` keys its files."""
    try:
        return str(path.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return os.path.abspath(path)


def _scan(folder: Path, recursive: bool) -> tuple[list[str], dict[str, str], list[str]]:
    """``file_name`` of each image in ``folder``, {resolved path: file_name}, notes.

    Hidden files and folders (names starting with ``.``, the owned ``.qualityguide`` among them) are left out,
    as datasets leaves them out of a folder's data files.
    """
    listing = scan_images([folder], recursive=recursive)
    notes = listing.notes()
    loaded = loaded_extensions()
    names, keys, hidden, unnamable, unloaded = [], {}, 0, [], []
    for path, key in zip(listing.files, listing.keys):
        name = path.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in name.split("/")):
            hidden += 1
            continue
        if loaded is not None and path.suffix.lower() not in loaded:
            unloaded.append(name)
            continue
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            unnamable.append(name)
            continue
        names.append(name)
        keys[key] = name
    if hidden:
        notes.append(f"{hidden} hidden image file(s) (a name or folder starting with '.') were not labelled; datasets "
                     "leaves them out too")
    if unloaded:
        kinds = ", ".join(sorted({Path(name).suffix.lower() for name in unloaded}))
        notes.append(f"{len(unloaded)} image(s) in a format datasets' imagefolder does not load ({kinds}) were not "
                     f"labelled, as they would be no examples; convert them (e.g. to PNG), e.g. "
                     f"{printable(unloaded[0])}")
    if unnamable:
        notes.append(f"{len(unnamable)} image(s) have names that are not valid UTF-8, which metadata.csv cannot hold, "
                     f"and were not labelled; rename them, e.g. {printable(unnamable[0])}")
    return names, keys, notes


def _label_column(path: Path, column: str, settings: str, scorer: QualityScorer, names: list[str], folder: Path,
                  batch_size: int, device, retry_failed: bool, progress: bool,
                  processes: Processes | None) -> tuple[dict[str, dict] | None, int, list[str]]:
    """Score the images not yet in the column's scores CSV ``path`` (sharded over ``processes``, if any): its rows
    ({file_name: row}) after the run (None off the main process), how many were scored, the multi-frame files."""
    device = torch.device(device)

    def prepare(table: ScoreFile) -> list[str]:
        if retry_failed:
            table.forget([name for name in names if name in table.rows and table.rows[name]["error"]])
        return [name for name in names if name not in table.rows]

    def work(table: ScoreFile, todo: list[str], main: bool) -> tuple[int, list[str]]:
        with collect_multi_frame() as multi_frame, \
                tqdm(total=len(todo), desc=f"labelling {column}", unit="img", file=sys.stderr,
                     disable=not progress or not main) as bar:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                rows = score_chunk(scorer, [(name, folder / name) for name in chunk], device)
                for row in rows:
                    if row["score"] and not math.isfinite(float(row["score"])):
                        row["error"] = f"{folder / row['path']}: {column} gave a non-finite score ({row['score']})"
                        row["score"] = row["native_score"] = ""
                table.append(rows)
                bar.update(len(chunk))
        return len(todo), list(multi_frame)

    rows, results = score_into(path, settings, prepare, work, processes)
    return rows, sum(r[0] for r in results), [name for r in results for name in r[1]]


def _merge(table: MetadataTable | None, tables: dict[str, dict[str, dict]], names: list[str], keys: dict[str, str],
           folder: Path, recursive: bool, summary: LabelSummary) -> None:
    """Write the score columns into metadata.csv: every existing row kept in place, new images appended."""
    path = folder / METADATA
    table = table or MetadataTable(path)
    where = {column: table.column(column) for column in tables}
    name_at = table.header.index(FILE_NAME)
    listed, named = set(names), set()
    for row in table.rows:
        name = normalise_name(row[name_at])
        named.add(name)
        key: str | None = name
        if name not in listed:
            if not (folder / name).exists():
                key = None
                summary.missing.append(row[name_at])
            else:  # another name of a listed image (a link), or one labelled by an earlier run
                key = keys.get(_resolved(folder / name), name)
                if key not in listed and not any(key in rows for rows in tables.values()):
                    summary.unlabelled.append((row[name_at], _why_not(folder, name, recursive)))
        for column, rows in tables.items():
            row[where[column]] = rows.get(key, {}).get("score", "") if key is not None else ""
    for name in names:
        if name not in named:
            new = [""] * len(table.header)
            new[name_at] = name
            for column, rows in tables.items():
                new[where[column]] = rows.get(name, {}).get("score", "")
            table.rows.append(new)
            summary.added_rows += 1
    for name in names:
        for column, rows in tables.items():
            if name in rows and rows[name]["error"]:
                summary.failures.append((name, column, rows[name]["error"]))
    data = table.encode()
    if not path.exists() or path.read_bytes() != data:
        write_atomic(path, data)


def _why_not(folder: Path, name: str, recursive: bool) -> str:
    path = folder / name
    if path.is_dir():
        return "a folder, not an image file"
    if path.suffix.lower() not in image_extensions():
        return f"not an image file name (extensions {', '.join(image_extensions())})"
    if "/" in name and not recursive:
        return "in a sub-folder: pass --recursive to label it"
    return "not found as an image by the folder scan (a link that cannot be followed?)"
