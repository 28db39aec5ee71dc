"""The scores CSV that ``qualityguide score`` writes and resumes: format, ownership, lock, repair.

Format: UTF-8 CSV (RFC 4180, ``\\r\\n`` line ends) with the header ``path,score,error,native_score,settings``.

- ``path``: the file's absolute path, symlinks resolved. Any character a file name can hold is kept
  (the csv module quotes line breaks); a name that is not valid UTF-8 is stored as its Python bytes
  literal, ``b'/data/caf\\xe9.png'`` (:func:`decode_path` gives the ``os`` path back).
- ``settings``: what the values depend on (:func:`scorer_settings`), on every row, so rows cannot be
  separated from it. A run whose settings differ from the file's is refused.

Safety: a file is only written after its first line was read and found to be exactly this header
(an empty file is taken over); anything else is refused unchanged. While a run has the file open it
holds an exclusive ``flock`` on it (released by the OS if the process dies), and a second run on the
same file is refused at once. Repair: only a last record without a line end after it that is not a
complete row (a write cut short) is dropped, once every check has passed; any other malformation is
refused with the line it starts on. A rewrite (``--retry-failed``) goes to a new locked file that atomically
replaces the old one, so a kill leaves either the old rows or the new ones.
"""

from __future__ import annotations

import ast
import csv
import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import torch

from ..errors import InputError, QualityGuideError, printable
from ..files import atomic_write, file_sha256
from ..images import LOOP, link_problem, special_kind

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; documented
    fcntl = None

FIELDS = ["path", "score", "error", "native_score", "settings"]
HEADER = ",".join(FIELDS).encode()
_OLD_HEADER = b"path,score,error,native_score"
_BINARY = getattr(os, "O_BINARY", 0)


def encode_path(path: str) -> str:
    """The ``path`` cell for an ``os`` path: itself, or its bytes literal when it is not valid UTF-8."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:  # undecodable bytes, held by Python as lone surrogates
        return repr(os.fsencode(path))


def decode_path(cell: str) -> str:
    """Inverse of :func:`encode_path`: the ``os`` path of a ``path`` cell (absolute paths never start with ``b'``)."""
    if cell.startswith(("b'", 'b"')):
        return os.fsdecode(ast.literal_eval(cell))
    return cell


def scorer_settings(scorer: torch.nn.Module) -> str:
    """The settings a scorer's values depend on, as ``scorer=NAME[;weights_sha256=HEX16][;dtype=...]``.

    ``NAME`` is the scorer's spec (with any size suffix; a scorer whose spec is a folder, ``lgdm:<dir>``, is named
    by the folder's content instead: its ``settings_name``); the weights are identified by the content of
    the parameter file a (sub)module reports as its ``source``, never by its path; reduced precision
    is named. The device is not: CPU and CUDA agree to float rounding.
    """
    parts = [f"scorer={getattr(scorer, 'settings_name', None) or getattr(scorer, 'name', type(scorer).__name__)}"]
    for module in scorer.modules():
        source = getattr(module, "source", None)
        if isinstance(source, (str, os.PathLike)) and str(source) and os.path.isfile(source):
            parts.append(f"weights_sha256={file_sha256(source)[:16]}")
            break
    low = sorted({str(t.dtype).replace("torch.", "") for t in [*scorer.parameters(), *scorer.buffers()]
                  if t.dtype in (torch.float16, torch.bfloat16)})
    if low:
        parts.append(f"dtype={'+'.join(low)}")
    return printable(";".join(parts))


class _Lines:
    """The lines of ``data`` (split after each ``\\n``) as text for :func:`csv.reader`, remembering where each ends.

    UTF-8 never uses the byte ``\\n`` inside a character, so splitting the bytes first is safe; an incomplete
    character at the very end (a write cut inside it) is left out, anything else not UTF-8 is refused.
    """

    def __init__(self, output: Path, data: bytes):
        self.output, self.data = output, data
        self.ends: list[int] = []  # byte offset after each line handed out
        self.exhausted = False  # the reader asked for more after the last line

    def __iter__(self):
        start = 0
        while start < len(self.data):
            end = self.data.find(b"\n", start)
            end = len(self.data) if end < 0 else end + 1
            self.ends.append(end)
            yield self._decode(self.data[start:end], last=end == len(self.data))
            start = end
        self.exhausted = True

    def _decode(self, line: bytes, last: bool) -> str:
        try:
            return line.decode("utf-8")
        except UnicodeDecodeError as exc:
            if last and exc.reason == "unexpected end of data":
                return line[:exc.start].decode("utf-8")
            raise InputError(f"--output {self.output}: line {len(self.ends)} is not UTF-8 (byte {exc.start} of "
                             "the line), so the file was edited by another program; restore it or pass another "
                             "--output") from None


class _Tail(NamedTuple):
    """What follows the last line end: the line it starts on, its cells, whether it ends inside a quoted cell."""

    line: int
    cells: list[str]
    open_quote: bool


def _read_records(output: Path, data: bytes) -> tuple[list[tuple[int, list[str]]], int, _Tail | None]:
    """Parse ``data`` (header first) strictly: ``(records, end, tail)``.

    ``records`` are ``(line, cells)`` of the records ended by a line end, ``end`` the byte offset after the
    last of them, ``tail`` what follows without a line end (None if nothing does):
    the last row of a write cut short by a kill or a full disk, or a complete row whose final line end
    is missing. A quote opened and never closed makes the tail run to the end of the file, so the tail
    may span lines (a file name with a line break, cut inside its quoted cell).
    """
    lines = _Lines(output, data)
    reader = csv.reader(lines, strict=True)
    records: list[tuple[int, list[str]]] = []
    end = 0
    while True:
        line = len(lines.ends) + 1  # the record about to be read starts on this line
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            if not lines.exhausted:
                raise InputError(f"--output {output}: the record starting on line {line} is not valid CSV ({exc}); "
                                 "the file was edited by another program: fix or delete that record, or pass "
                                 "another --output") from None
            text = data[end:].decode("utf-8", "ignore")  # a quote never closed: the tail, read leniently
            return records[1:], end, _Tail(line, next(csv.reader(io.StringIO(text, newline=""))), True)
        if lines.ends[-1] == len(data) and not data.endswith(b"\n"):
            return records[1:], end, _Tail(line, cells, False)
        records.append((line, cells))
        end = lines.ends[-1]
    return records[1:], end, None


# A cell starting with one of these is run as a formula by spreadsheets (Excel, LibreOffice, Google Sheets).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def error_cell(message: str) -> str:
    """``message`` on one line (:func:`~qualityguide.errors.printable`), starting with a plain word when it would
    start like a formula: an error names its file first, and a file may be called ``=HYPERLINK(...).png``. Path
    cells are never changed (they are identity); error cells are only read by people."""
    text = printable(message)
    return f"file {text}" if text.startswith(_FORMULA_START) else text


def _foreign(output: Path, data: bytes) -> InputError:
    first = data.split(b"\n", 1)[0].rstrip(b"\r")
    fix = ("it was left unchanged. Pass --output with a new file name (or a scores CSV this command "
           "wrote) to keep both")
    if first == _OLD_HEADER:
        return InputError(f"--output {output} was written by an older qualityguide without the settings column, "
                          f"so its scores cannot be checked against this run's scorer; {fix}")
    try:
        columns = next(csv.reader([first.decode("utf-8")]))
        what = f"its first line has columns {printable(str(columns[:8]))}"
    except (UnicodeDecodeError, StopIteration, csv.Error):
        what = f"it starts with bytes {first[:16]!r} (not text)"
    return InputError(f"--output {output} exists and is not a qualityguide scores CSV ({what}; ours has "
                      f"columns {','.join(FIELDS)}); {fix}")


def check_output(output: str | os.PathLike) -> Path:
    """``output`` as a Path if it can name the scores CSV: not a folder (existing, or written with a trailing
    separator, ``out/``), not another kind of non-file; else an :class:`InputError` naming a file to use instead."""
    text = os.fspath(output)
    path = Path(output)
    folder = path.is_dir() or text.endswith(tuple(sep for sep in (os.sep, os.altsep) if sep))
    if folder:
        raise InputError(f"--output {printable(text)} is a folder, not a file: the scores go into one CSV file; pass a "
                         f"file name, e.g. --output {printable(str(path / 'scores.csv'))}")
    kind = special_kind(path)
    if kind:
        raise InputError(f"--output {printable(text)} exists and is {kind}, not a regular file; pass a CSV file name")
    return path


def _through_link(output: Path) -> Path:
    """The file to read and replace for ``output``: itself, or the target when it is a symlink, so that a rewrite
    replaces the target and the link stays. A link whose target is missing is written through (the target is
    created) when the target's folder exists, as for any link; when that folder is missing too (often an
    unmounted drive), nothing is created there: an :class:`InputError` names the target."""
    problem = link_problem(output)
    if not output.is_symlink():
        return output
    target = Path(os.path.realpath(output))
    if problem and problem.startswith(LOOP):
        raise InputError(f"--output {printable(str(output))}: {problem}; fix the link or pass another --output")
    if not target.parent.is_dir():
        raise InputError(f"--output {printable(str(output))} is a symlink to {printable(os.readlink(output))}, whose "
                         f"folder {printable(str(target.parent))} does not exist (an unmounted drive?); nothing was "
                         "created there: fix the link, create that folder, or pass another --output")
    return target


class ScoreFile:
    """A scores CSV opened for resuming: locked, checked to be ours, repaired, read.

    Use :meth:`open` as a context manager. ``rows`` maps each ``path`` cell to its row (a dict).
    """

    def __init__(self, output: Path, settings: str, lock_fd: int, path: Path | None = None):
        self.output, self.settings = output, settings
        self.path = path or output  # the file itself: the target when --output is a symlink
        self._fds = [lock_fd]
        self._write_fd = -1
        self.rows: dict[str, dict] = {}

    @classmethod
    def open(cls, output: str | os.PathLike, settings: str) -> "ScoreFile":
        """Lock ``output`` (creating it if absent), check it is ours and was made with ``settings``, and read it."""
        output = check_output(output)
        path = _through_link(output)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            table = cls(output, settings, _open_locked(path), path)
        except OSError as exc:
            raise InputError(f"--output {output}: cannot open it ({exc.strerror}); pass a path you can write to "
                             "with --output") from None
        try:
            table._load()
        except OSError as exc:
            table.close()
            raise InputError(f"--output {output}: cannot read or write it ({exc.strerror}); pass a path you can "
                             "write to with --output") from None
        except BaseException:
            table.close()
            raise
        return table

    def __enter__(self) -> "ScoreFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for fd in {*self._fds, self._write_fd} - {-1}:
            os.close(fd)
        self._fds, self._write_fd = [], -1

    def _load(self) -> None:
        data = _read_all(self._fds[0])
        if data.startswith((HEADER + b"\r\n", HEADER + b"\n")):
            keep, line_end = self._parse(data)  # every refusal comes before the file is touched
        elif not data:
            keep, line_end = 0, False  # an empty file holds nothing to lose (a run killed right after creating it)
        else:
            raise _foreign(self.output, data)
        if not os.access(self.output, os.W_OK):
            raise InputError(f"--output {self.output} is not writable by this user; fix its permissions or "
                             "pass another --output")
        self._write_fd = os.open(self.output, os.O_WRONLY | os.O_APPEND | _BINARY)
        if keep < len(data):
            os.ftruncate(self._write_fd, keep)
        if keep == 0:
            self._write(_encode_rows([], header=True))
        elif line_end:
            self._write(b"\r\n")

    def _parse(self, data: bytes) -> tuple[int, bool]:
        """Read the rows of ``data`` into :attr:`rows` and check their settings: ``(bytes to keep, whether the
        kept bytes need a final line end)``. What follows the last line end is a cut write (dropped) unless it
        is a complete row; any other malformation is refused, naming its line."""
        records, end, tail = _read_records(self.output, data)
        for line, cells in records:
            self._check_record(line, cells)
        found = {cells[-1]: None for _, cells in records}  # the settings seen, in order
        keep, line_end = end, False
        if tail is not None and self._complete_tail(tail, [*found, self.settings]):
            records.append((tail.line, tail.cells))
            found[tail.cells[-1]] = None
            keep, line_end = len(data.rstrip(b"\r")), True
        others = [s for s in found if s != self.settings]
        if others:
            raise InputError(f"--output {self.output} holds scores made with settings {' and '.join(map(repr, others))}"
                             f" but this run's settings are {self.settings!r}; values from different scorers, "
                             "weights or options must not share a column. Pass another --output (one CSV per "
                             "setting) or rerun with the settings of the file")
        self.rows = {row["path"]: row for row in (dict(zip(FIELDS, cells)) for _, cells in records)}
        return keep, line_end

    def _check_record(self, line: int, cells: list[str]) -> None:
        if len(cells) != len(FIELDS):
            raise InputError(f"--output {self.output}: the record starting on line {line} has {len(cells)} fields, "
                             f"not {len(FIELDS)} ({printable(str(cells)[:120])}); the file was edited or mixed with "
                             "another one: fix or delete that record, or pass another --output")

    def _complete_tail(self, tail: _Tail, settings: list[str]) -> bool:
        """Whether the record after the last line end is a complete row (kept) rather than a cut write (dropped).

        A cut row has fewer cells, ends inside a quoted cell, or has a settings cell cut short (a prefix of known
        settings). Only the path cell can hold line breaks, and a row's text never does, so a tail that would hold
        a line break elsewhere, or rows inside its path cell, is a quote opened by hand: refused, not dropped.
        """
        line, cells, open_quote = tail
        if any("\n" in cell or "\r" in cell for cell in cells[1:]) or _holds_rows(cells[0], settings):
            why = "a quote opened in it is never closed" if open_quote else "rows or line breaks are inside one cell"
            raise InputError(f"--output {self.output}: the record starting on line {line} runs to the end of the "
                             f"file ({printable(str(cells)[:120])}): {why}, so the file was edited; fix that "
                             "record (close or remove the quote), or pass another --output")
        if len(cells) > len(FIELDS):
            self._check_record(line, cells)
        if open_quote or len(cells) < len(FIELDS) or cells[-1] not in settings and any(
                s.startswith(cells[-1]) for s in settings):
            return False
        self._check_record(line, cells)
        return True

    def append(self, rows: list[dict]) -> None:
        """Append rows (``path`` cells already encoded) and flush them to disk; ``error`` cells become
        :func:`error_cell` text (in ``rows`` too, so what is printed is what is stored)."""
        for row in rows:
            row["settings"] = self.settings
            row["error"] = error_cell(row["error"])
        self._write(_encode_rows(rows))
        for row in rows:
            self.rows[row["path"]] = row

    def forget(self, paths: Iterable[str]) -> int:
        """Drop the rows of ``paths`` with one atomic rewrite; returns how many were dropped."""
        drop = set(paths) & self.rows.keys()
        if not drop:
            return 0
        self._rewrite([row for key, row in self.rows.items() if key not in drop])
        return len(drop)

    def merge(self, rows: Iterable[dict]) -> int:
        """Add ``rows`` (another file's, same settings) after this file's with one atomic rewrite, skipping paths
        already here, so merging the same rows twice (a rerun after a kill between rewrite and cleanup) adds
        nothing; returns how many were added."""
        new = {}
        for row in rows:
            if row["settings"] != self.settings:
                raise InputError(f"--output {self.output}: cannot merge rows made with settings {row['settings']!r} "
                                 f"into a file of settings {self.settings!r}")
            if row["path"] not in self.rows:
                new.setdefault(row["path"], row)
        if new:
            self._rewrite([*self.rows.values(), *new.values()])
        return len(new)

    def _rewrite(self, keep: list[dict]) -> None:
        """Replace the file by ``keep`` atomically; the new file is locked before it replaces the old one."""
        fds: list[int] = []

        def write(tmp: Path) -> None:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | _BINARY, 0o600)
            fds.append(fd)
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fresh inode: locked before anyone can see it
            _write_all(fd, _encode_rows(keep, header=True))

        try:  # the target: a symlink given as --output stays a symlink; the old file's permissions are kept
            atomic_write(self.path, write, durability="folder", keep_mode=True)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        fd = fds[0]
        self._fds.append(fd)  # the old inode stays locked too, for anyone who opened it before the replace
        os.close(self._write_fd)
        self._write_fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | _BINARY)
        self.rows = {row["path"]: row for row in keep}

    def _write(self, data: bytes) -> None:
        try:
            _write_all(self._write_fd, data)
            os.fsync(self._write_fd)
        except OSError as exc:  # e.g. a full disk: what was flushed before stays, a partial row is redone
            raise QualityGuideError(f"--output {self.output}: writing failed ({exc.strerror}); the rows written "
                                    "so far are kept: fix the cause and rerun the same command to resume") from None


def _holds_rows(cell: str, settings: list[str]) -> bool:
    """Whether a line of ``cell`` after its first reads as a whole row with known ``settings`` (rows swallowed
    by a quote that was opened by hand, not a file name with a line break)."""
    for line in cell.splitlines()[1:]:
        try:
            cells = next(csv.reader([line]), [])
        except csv.Error:
            continue
        if len(cells) == len(FIELDS) and cells[-1] in settings:
            return True
    return False


def _encode_rows(rows: list[dict], header: bool = False) -> bytes:
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=FIELDS)
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _open_locked(output: Path) -> int:
    """A read-only fd of ``output`` holding its exclusive lock (the file is created empty if absent)."""
    for _ in range(100):
        try:
            fd = os.open(output, os.O_RDONLY | _BINARY)
        except FileNotFoundError:
            try:
                fd = os.open(output, os.O_RDWR | os.O_CREAT | os.O_EXCL | _BINARY, 0o666)
            except FileExistsError:
                continue
        if fcntl is None:
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(f"--output {output} is in use by another `qualityguide score` run (it holds the file's "
                             "lock); wait for it to finish, or pass another --output") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(output))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # replaced by another run's rewrite between our open and our lock: look again
    raise InputError(f"--output {output} keeps being replaced by another process; pass another --output")
