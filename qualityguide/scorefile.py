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
same file is refused at once. A rewrite (``--retry-failed``) goes to a new locked file that atomically
replaces the old one, so a kill leaves either the old rows or the new ones.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import io
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from .errors import InputError, QualityGuideError, printable

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


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
            parts.append(f"weights_sha256={_sha256(source)[:16]}")
            break
    low = sorted({str(t.dtype).replace("torch.", "") for t in [*scorer.parameters(), *scorer.buffers()]
                  if t.dtype in (torch.float16, torch.bfloat16)})
    if low:
        parts.append(f"dtype={'+'.join(low)}")
    return printable(";".join(parts))


def _complete_prefix(data: bytes) -> int:
    """Length of the longest prefix of whole records: it ends at a line end outside quotes.

    Inside a quoted field quotes come in pairs, so a newline is a record end iff an even number of
    quotes precedes it. A kill mid-write leaves a partial last record, which this cuts off.
    """
    quotes = data.count(b'"')
    end = len(data)
    while True:
        newline = data.rfind(b"\n", 0, end)
        if newline < 0:
            return 0
        quotes -= data.count(b'"', newline, end)
        if quotes % 2 == 0:
            return newline + 1
        end = newline


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
    if path.exists() and not path.is_file():
        raise InputError(f"--output {printable(text)} exists and is not a regular file (a device, socket or pipe); "
                         "pass a CSV file name")
    return path


class ScoreFile:
    """A scores CSV opened for resuming: locked, checked to be ours, repaired, read.

    Use :meth:`open` as a context manager. ``rows`` maps each ``path`` cell to its row (a dict).
    """

    def __init__(self, output: Path, settings: str, lock_fd: int):
        self.output, self.settings = output, settings
        self._fds = [lock_fd]
        self._write_fd = -1
        self.rows: dict[str, dict] = {}

    @classmethod
    def open(cls, output: str | os.PathLike, settings: str) -> "ScoreFile":
        """Lock ``output`` (creating it if absent), check it is ours and was made with ``settings``, and read it."""
        output = check_output(output)
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            table = cls(output, settings, _open_locked(output))
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
            keep = _complete_prefix(data)
        elif not data:
            keep = 0  # an empty file holds nothing to lose (a run killed right after creating it leaves one)
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
            return
        self.rows = self._parse(data[:keep])

    def _parse(self, data: bytes) -> dict[str, dict]:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"--output {self.output}: byte {exc.start} is not UTF-8, so the file was edited by "
                             "another program; restore it or pass another --output") from None
        reader = csv.reader(io.StringIO(text, newline=""))
        next(reader)
        rows: dict[str, dict] = {}
        found: dict[str, None] = {}  # the settings seen, in order
        for record in reader:
            if len(record) != len(FIELDS):
                raise InputError(f"--output {self.output}: the record ending on line {reader.line_num} has {len(record)} fields, not "
                                 f"{len(FIELDS)} ({printable(str(record)[:120])}); the file was edited or mixed with "
                                 "another one: fix or delete that record, or pass another --output")
            row = dict(zip(FIELDS, record))
            rows[row["path"]] = row
            found[row["settings"]] = None
        others = [s for s in found if s != self.settings]
        if others:
            raise InputError(f"--output {self.output} holds scores made with settings {' and '.join(map(repr, others))}"
                             f" but this run's settings are {self.settings!r}; values from different scorers, "
                             "weights or options must not share a column. Pass another --output (one CSV per "
                             "setting) or rerun with the settings of the file")
        return rows

    def append(self, rows: list[dict]) -> None:
        """Append rows (``path`` cells already encoded) and flush them to disk."""
        for row in rows:
            row["settings"] = self.settings
        self._write(_encode_rows(rows))
        for row in rows:
            self.rows[row["path"]] = row

    def forget(self, paths: Iterable[str]) -> int:
        """Drop the rows of ``paths`` with one atomic rewrite; returns how many were dropped."""
        drop = set(paths) & self.rows.keys()
        if not drop:
            return 0
        keep = [row for key, row in self.rows.items() if key not in drop]
        fd, tmp = tempfile.mkstemp(dir=self.output.parent, prefix=f".{self.output.name}.", suffix=".tmp")
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fresh inode: locked before anyone can see it
            if hasattr(os, "fchmod"):  # mkstemp makes 0600 files; keep the old file's permissions
                os.fchmod(fd, stat.S_IMODE(os.fstat(self._write_fd).st_mode))
            _write_all(fd, _encode_rows(keep, header=True))
            os.fsync(fd)
            os.replace(tmp, self.output)
        except BaseException:
            os.close(fd)
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        _fsync_dir(self.output.parent)
        self._fds.append(fd)  # the old inode stays locked too, for anyone who opened it before the replace
        os.close(self._write_fd)
        self._write_fd = os.open(self.output, os.O_WRONLY | os.O_APPEND | _BINARY)
        self.rows = {row["path"]: row for row in keep}
        return len(drop)

    def _write(self, data: bytes) -> None:
        try:
            _write_all(self._write_fd, data)
            os.fsync(self._write_fd)
        except OSError as exc:  # e.g. a full disk: what was flushed before stays, a partial row is redone
            raise QualityGuideError(f"--output {self.output}: writing failed ({exc.strerror}); the rows written "
                                    "so far are kept: fix the cause and rerun the same command to resume") from None


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


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
