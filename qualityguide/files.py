"""One home for the file jobs every capability shares: atomic replace, folder fsync, hashes, format tags, prompts.

A file is replaced, never rewritten in place: the new bytes go to a temporary file beside the target (same
folder, so same file system) and ``os.replace`` swaps it in, so a kill leaves the old file or the new one, never
half of either. How hard to push the bytes to the disk is the caller's choice (:data:`Durability`): a checkpoint
or a file a user keeps (``metadata.csv``) must survive a power cut; a cache entry or a log that is rebuilt or
cut on resume need not pay for an fsync.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import uuid
from pathlib import Path
from typing import Callable, Literal, Union

from .errors import InputError

# How far a write is pushed to the disk before it counts as done:
# "none": rename only (the OS flushes later; a power cut may lose the new file, never half of it);
# "file": fsync the new file before the rename; "folder": also fsync the folder after it, so the rename itself
# survives a power cut.
Durability = Literal["none", "file", "folder"]
DURABILITIES = ("none", "file", "folder")

# The format tags written into files, one table so readers and writers cannot drift. The strings are what old
# files hold: never change one (bump the trailing number for a new layout and keep reading the old).
FORMATS = {
    "checkpoint": "qualityguide.checkpoint/1",  # train/checkpoints.py: the marker of a finished checkpoint
    "latent_cache": "qualityguide.latent_cache/1",  # train/latents.py: key.json of a VAE latent cache
    "self_samples": "qualityguide.self_samples/1",  # train/self_samples.py: settings of a self-sample folder
    "weights_identity": "qualityguide.weights_identity/1",  # identity.py: the safetensors metadata of an identity
    "iqa_adapter": "qualityguide-iqa-adapter",  # adapter/model.py: adapter_config.json
    "lgdm_cache": 1,  # lgdm/cache.py: manifest.json "format"
    "labels": 1,  # cli/label.py: columns.json "format"
}

Content = Union[bytes, str, Callable[[Path], object]]


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable (fsync the folder's entry list).

    Best effort: a folder that cannot be opened or synced (Windows, some network file systems) is skipped, since
    the rename it would secure has already happened.
    """
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


def _new_file_mode(path: Path) -> int:
    """The permissions ``path`` has, or those a new file gets (``0666`` minus the umask)."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, content: Content, durability: Durability = "none",
                 keep_mode: bool = False) -> Path:
    """Replace ``path`` by ``content`` through a temporary file beside it and ``os.replace``.

    Args:
        path: the target; its folder must exist.
        content: bytes, text (written as UTF-8), or ``write(tmp_path)`` for writers that want a path
            (``safetensors.save_file``, ``PIL.Image.save``; the temporary name has no image suffix, so pass the
            format). The temporary name starts with a dot and holds ``.tmp-``, so folder listings skip it.
        durability: ``"none"``, ``"file"`` or ``"folder"`` (see :data:`Durability`): what a crash may lose.
        keep_mode: give the new file the old one's permissions (a file the user owns, such as ``metadata.csv``);
            else it gets what a new file gets.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    if durability not in DURABILITIES:
        raise ValueError(f"durability={durability!r}; use one of {DURABILITIES}")
    path = Path(path)
    mode = _new_file_mode(path) if keep_mode else None
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        if callable(content):
            content(tmp)
        else:
            tmp.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        if durability != "none":
            with open(tmp, "r+b") as handle:  # write access: Windows refuses to flush a read-only handle
                os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)  # after the fsync: the kept mode may be read-only
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if durability == "folder":
        fsync_dir(path.parent)
    return path


def write_json(path: str | os.PathLike, data: object, durability: Durability = "none", indent: int = 2,
               default: Callable[[object], object] | None = None) -> Path:
    """Replace ``path`` by ``data`` as JSON, atomically (:func:`atomic_write`).

    Args:
        path: the target file.
        data: anything ``json.dumps`` takes.
        durability: see :data:`Durability`.
        indent: JSON indentation (files keep the layout they always had).
        default: ``json.dumps``' fallback for other objects (``str`` writes paths and dtypes as text).
    """
    return atomic_write(path, json.dumps(data, indent=indent, default=default), durability)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB blocks so memory stays bounded."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def json_sha256(value: object) -> str:
    """SHA-256 (hex) of ``value`` as JSON with sorted keys: equal settings give equal hashes, whatever the order
    they were built in. Objects JSON cannot hold are hashed by their ``str``."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


# Far beyond any text encoder's window (CLIP reads 77 tokens, a few hundred characters): a longer line is a wrong
# file (no line breaks, a binary), not a prompt.
MAX_PROMPT_CHARS = 10_000


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per line of a UTF-8 text file, the rule every recipe and eval shares.

    Surrounding spaces are stripped; blank lines and lines starting with ``#`` (comments) are skipped, so one
    commented prompt file serves guided sampling and ACPO's self samples alike and both see the same prompts. A
    leading byte-order mark (what Windows editors write) is dropped rather than becoming part of the first prompt.

    Raises:
        InputError: the file is missing, not UTF-8 text (a binary file, or UTF-16, which holds NUL bytes), holds a
            line longer than :data:`MAX_PROMPT_CHARS`, or holds no prompt.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompts file {path} does not exist; pass a text file with one prompt per line (--prompts)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"prompt file {path} is not UTF-8 text (byte {exc.start} cannot be decoded; is it a binary "
                         "file?); pass a UTF-8 text file with one prompt per line (re-save it as UTF-8, e.g. iconv -f "
                         "latin1 -t utf-8)") from None
    if "\x00" in text:
        raise InputError(f"prompts file {path} holds NUL bytes, so it is a binary file (or UTF-16), not UTF-8 text; "
                         "pass a UTF-8 text file with one prompt per line")
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if len(line) > MAX_PROMPT_CHARS:
            raise InputError(f"prompts file {path}, line {number}: {len(line)} characters, more than "
                             f"{MAX_PROMPT_CHARS} (a text encoder reads only its first 77 tokens, a few hundred "
                             "characters); shorten that line (is it really one prompt per line?)")
    prompts = [line.strip() for line in lines]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise InputError(f"prompts file {path} holds no prompts (one per line; # starts a comment)")
    return prompts
