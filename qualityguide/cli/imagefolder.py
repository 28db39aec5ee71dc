"""The ``metadata.csv`` of a Hugging Face ``datasets`` "imagefolder": read, check, write atomically.

``datasets.load_dataset("imagefolder", data_dir=DIR)`` reads ``DIR/metadata.csv`` (pandas ``read_csv``): the
``file_name`` column holds each image's path relative to DIR, every other column becomes a feature, and
only the images named there become examples. This module keeps the user's file as it is (every column,
row and cell, the row order, a UTF-8 byte-order mark and the line ends) and changes only the columns a
caller sets. Writes go to a temporary file in the same folder that replaces the old one atomically, so a
kill leaves either the old file or the new one.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, printable
from ..files import atomic_write

METADATA = "metadata.csv"
FILE_NAME = "file_name"
# The metadata file names datasets' folder builder looks for (datasets 5.x, FolderBasedBuilder.METADATA_FILENAMES).
METADATA_NAMES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")
_BOM = "\ufeff"


def loaded_extensions() -> frozenset[str] | None:
    """The image file extensions datasets' imagefolder loads (``ImageFolder.EXTENSIONS``; lower case), or None
    when datasets cannot be imported. Pillow may open more (AVIF): such files are no examples of the folder."""
    try:
        from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
    except ImportError:
        return None
    return frozenset(ext.lower() for ext in ImageFolder.EXTENSIONS)


def normalise_name(file_name: str) -> str:
    """A ``file_name`` cell as datasets resolves it against the metadata's folder: normalised, ``/``-separated."""
    return os.path.normpath(file_name).replace("\\", "/")


@dataclass
class MetadataTable:
    """A metadata CSV in memory: ``header`` and ``rows`` as lists of cells (rows padded to the header).

    Attributes:
        path: the file it was read from or will be written to.
        bom: whether the file starts with a UTF-8 byte-order mark (Excel writes one); kept on write.
        newline: the line end of the file's first line (``"\\n"`` for a new file); kept on write.
    """

    path: Path
    header: list[str] = field(default_factory=lambda: [FILE_NAME])
    rows: list[list[str]] = field(default_factory=list)
    bom: bool = False
    newline: str = "\n"

    def column(self, name: str) -> int:
        """The index of column ``name``, appended (empty in every row) if the table lacks it."""
        if name not in self.header:
            self.header.append(name)
            for row in self.rows:
                row.append("")
        return self.header.index(name)

    def encode(self) -> bytes:
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer, lineterminator=self.newline)
        writer.writerow(self.header)
        writer.writerows(self.rows)
        return ((_BOM if self.bom else "") + buffer.getvalue()).encode("utf-8")


def read_metadata(path: str | os.PathLike) -> MetadataTable | None:
    """Read ``path`` if it exists (None if not); an :class:`InputError` naming the file and the fix if it is not a
    UTF-8 CSV with a ``file_name`` column and at most as many cells per row as columns."""
    path = Path(path)
    fix = (f"fix {printable(str(path))} (a UTF-8 CSV whose first line names the columns, one of them {FILE_NAME}, "
           "the image's path relative to the folder) or move it away to have a new one written")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InputError(f"{printable(str(path))}: cannot read it ({exc.strerror}); fix its permissions") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{printable(str(path))}: byte {exc.start} is not UTF-8, and datasets reads metadata.csv as "
                         f"UTF-8; re-save it as UTF-8, or {fix}") from None
    bom = text.startswith(_BOM)
    text = text[len(_BOM):] if bom else text
    first = text.split("\n", 1)[0]
    newline = "\r\n" if first.endswith("\r") else "\n"
    records = _strict_records(path, text, fix)
    if not records or FILE_NAME not in records[0]:
        columns = printable(str(records[0][:8])) if records else "none (the file is empty)"
        raise InputError(f"{printable(str(path))} has no {FILE_NAME!r} column (its columns: {columns}), so datasets "
                         f"cannot tell which image a row describes; {fix}")
    header, rows = records[0], records[1:]
    for number, row in enumerate(rows, start=2):
        if len(row) > len(header):
            raise InputError(f"{printable(str(path))}: record {number} has {len(row)} cells but the header names "
                             f"{len(header)} columns ({printable(str(row)[:120])}); datasets cannot read it: {fix}")
        row.extend([""] * (len(header) - len(row)))
    return MetadataTable(path, header, rows, bom, newline)


def _strict_records(path: Path, text: str, fix: str) -> list[list[str]]:
    """The non-blank records of ``text`` (pandas skips blank lines), parsed strictly: a quote that is never closed
    would fold every following row into one cell, and the file would be rewritten that way, so it is refused
    naming the line its record starts on."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    records = []
    while True:
        line = reader.line_num + 1
        try:
            record = next(reader)
        except StopIteration:
            return records
        except csv.Error as exc:
            why = "a quote opened there is never closed" if str(exc) == "unexpected end of data" else str(exc)
            raise InputError(f"{printable(str(path))}: the record starting on line {line} is not valid CSV ({why}); "
                             f"it was left unchanged: {fix}") from None
        if record:
            records.append(record)


def other_metadata(folder: Path, recursive: bool) -> list[Path]:
    """Metadata files datasets would read besides ``folder/metadata.csv``: ``metadata.jsonl``/``.parquet`` beside it,
    and (``recursive``) any metadata file in a sub-folder, outside hidden folders."""
    found = [folder / name for name in METADATA_NAMES[1:] if (folder / name).is_file()]
    if recursive:
        for name in METADATA_NAMES:
            found += [path for path in sorted(folder.rglob(name)) if path.parent != folder and path.is_file()
                      and not any(part.startswith(".") for part in path.relative_to(folder).parts)]
    return found


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically and durably (file and folder fsynced): ``metadata.csv`` is the
    user's file. It keeps its permissions (a new one gets the usual ``0666`` minus the umask)."""
    atomic_write(path, data, durability="folder", keep_mode=True)
