"""Loading weight files without running code from them.

A ``.pth`` file is a pickle, and unpickling runs whatever callables the file names. qualityguide
reads every weights file a user passes with ``torch.load(weights_only=True)`` (tensors, containers
and numbers only) or a non-pickle parser (safetensors, LIBSVM text, MAT, NPZ without pickles); a file
that needs more is refused. pyiqa loads ``pretrained_model_path`` with ``weights_only=False``, so a
user's checkpoint reaches it only as a copy re-saved from what the safe load returned.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import InputError, WeightsNotFoundError, closest, printable


_WEIGHT_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors", ".mat", ".npz", ".pkl")


def weights_file(path: str | os.PathLike, label: str, how: str) -> Path:
    """``path`` (``~`` expanded) if it is an existing, non-empty regular file, else one error naming what it is.

    Args:
        label: how the message names it, e.g. ``"niqe: weights file x.mat"`` or ``"niqe: $QUALITYGUIDE_NIQE_WEIGHTS=x"``.
        how: the fix, appended to the message (where such files come from, how to pass one).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in _WEIGHT_SUFFIXES and p.is_file())
        found = f" (it holds {', '.join(inside[:3])}{', ...' if len(inside) > 3 else ''})" if inside else ""
        raise InputError(f"{label} is a folder, not a weights file{found}; pass the file itself: {how}")
    if not path.exists():
        raise WeightsNotFoundError(f"{label} does not exist; {how}")
    if not path.is_file():
        raise InputError(f"{label} is not a regular file; {how}")
    if path.stat().st_size == 0:
        raise InputError(f"{label} is empty (0 bytes), e.g. an interrupted download; {how}")
    return path


def file_kind(path: str | os.PathLike) -> str | None:
    """What a file's first bytes say it is, for messages: None for a ``torch.save`` file (zip archive or pickle)."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return None
    kinds = {b"\xff\xd8\xff": "a JPEG image", b"\x89PNG": "a PNG image", b"GIF8": "a GIF image",
             b"MATLAB": "a MATLAB .mat file", b"\x93NUMPY": "a numpy .npy file", b"svm_type": "a LIBSVM model file"}
    for magic, kind in kinds.items():
        if head.startswith(magic):
            return kind
    if len(head) > 9 and head[8:10] == b'{"':
        return "a safetensors file"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "a binary file of another kind"


def load_torch_weights(path: str | os.PathLike, what: str, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a file holding other Python objects is refused, and so is
    a file that is no ``torch.save`` file at all (an image, a text file), saying what it is.

    Args:
        path: a ``torch.save`` file.
        what: how to name the file's role in messages (e.g. ``"brisque weights"``).
        mmap: map a zip-format file's tensors instead of reading them (a cheap check that it loads).
    """
    kind = file_kind(path)
    if kind is not None:
        raise InputError(f"{what}: {path} is not a weights file: its bytes are {kind}, not a torch.save checkpoint "
                         "(a zip archive or a pickle); pass the checkpoint file itself")
    try:
        with open(path, "rb") as handle:
            zipped = handle.read(4) == b"PK\x03\x04"
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipped)
    except pickle.UnpicklingError as exc:
        match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", str(exc))
        detail = match.group(1).strip()[:160] if match else type(exc).__name__
        raise InputError(f"{what}: {path} is not a plain tensor file (torch.load(weights_only=True) refused it: "
                         f"{detail}); qualityguide never unpickles more than tensors, because that can run code "
                         "stored in the file. Fix: if you trust the file, re-save its tensors with safetensors (or "
                         "torch.save of a dict/tuple of tensors), or use the original file from the metric's "
                         "authors") from None
    except Exception as exc:  # a zip that is no torch archive, a truncated file, ...
        detail = printable(str(exc).strip().splitlines()[0][:160]) if str(exc).strip() else ""
        raise InputError(f"{what}: {path} is not a readable torch.save checkpoint ({type(exc).__name__}"
                         f"{': ' + detail if detail else ''}); pass the checkpoint file itself, re-downloaded if it "
                         "was cut short") from None


def check_checkpoint(path: str | os.PathLike, what: str) -> None:
    """Raise unless :func:`sanitized_checkpoint` would accept ``path`` (a MAT file, or a plain torch.save file);
    tensors are memory-mapped, not read, where the format allows."""
    if file_kind(path) == "a MATLAB .mat file":
        return
    load_torch_weights(path, what, mmap=True)


@contextlib.contextmanager
def sanitized_checkpoint(path: str | os.PathLike, what: str) -> Iterator[str]:
    """A path for code that unpickles without restrictions (pyiqa's ``pretrained_model_path``).

    MAT files (``pyiqa:niqe``) are not pickles and pass as they are. Any other file must load with
    ``weights_only=True``; what that returns is re-saved to a private temporary file, whose path is
    yielded and which is deleted afterwards.
    """
    with open(path, "rb") as handle:
        if handle.read(6) == b"MATLAB":  # read by scipy.io.loadmat; as a pickle it fails at its first bytes
            yield str(path)
            return
    state = load_torch_weights(path, what)
    with tempfile.TemporaryDirectory(prefix="qualityguide-weights-") as folder:
        copy = Path(folder) / Path(path).name
        torch.save(state, copy)
        del state
        yield str(copy)


# --------------------------------------------------------------------------- config.json and safetensors files
# Folders of saved models (an IQA-Adapter, an LGDM head) come from other people: their config.json can ask for any
# size and their weights file can be anything. Sizes are checked against the weights file's header, which costs no
# memory, before any module is built.

def read_json_object(path: str | os.PathLike, what: str, fix: str) -> dict:
    """The JSON object (a dict) stored in ``path``, or one :class:`InputError` naming what is wrong with the file.

    Args:
        path: the file (a missing file raises ``FileNotFoundError`` for the caller to explain).
        what: how the message names it, e.g. ``"IQA-Adapter config"``.
        fix: the fix appended to every message, e.g. ``"save the adapter again"``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} {path} is not UTF-8 text (byte {exc.start}); {fix}") from None
    except OSError as exc:
        raise InputError(f"{what} {path} cannot be read ({exc.strerror or type(exc).__name__}); {fix}") from None
    try:
        payload = json.loads(text)
    except ValueError as exc:
        raise InputError(f"{what} {path} is not valid JSON ({printable(str(exc))}); {fix}") from None
    except RecursionError:  # json nests by recursion: thousands of brackets exhaust the stack
        raise InputError(f"{what} {path} is nested too deeply to be a config; {fix}") from None
    if not isinstance(payload, dict):
        raise InputError(f"{what} {path} holds a JSON {type(payload).__name__}, not an object "
                         f"({{\"field\": value, ...}}); {fix}")
    return payload


def check_fields(data: dict, known: list[str], what: str, fix: str) -> None:
    """Refuse fields of a config read from a file that the config class does not have, naming them, the known
    ones and the closest known name (a typo such as ``num_token``).

    Args:
        data: the config's fields as read.
        known: the config class's fields (``[f.name for f in dataclasses.fields(cls)]``).
        what: how the message names the config, e.g. ``"LGDM head config dir/config.json"``.
        fix: appended to the message.
    """
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        guess = closest(unknown[0], list(known))
        hint = f" (did you mean {guess!r} for {unknown[0]!r}?)" if guess else ""
        raise InputError(f"{what} has unknown field(s) {printable(str(unknown))[:200]}{hint}; known: "
                         f"{', '.join(known)}. {fix}")


def safetensors_shapes(path: str | os.PathLike, what: str, fix: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a safetensors file, read from its header only (nothing is allocated).

    A file that is not safetensors (a ``torch.save`` pickle renamed, a truncated download) is refused naming what
    its bytes are; it is never unpickled.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} is missing or not a file; {fix}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as exc:  # SafetensorError, OSError: a header that does not parse or point inside the file
        kind = file_kind(path) or "a torch.save checkpoint (never unpickled here: that can run code stored in it)"
        detail = printable(str(exc).strip().splitlines()[0][:160]) if str(exc).strip() else type(exc).__name__
        raise InputError(f"{what} {path} is not a readable safetensors file (its bytes are {kind}; {detail}); "
                         f"{fix}") from None


def load_checked_safetensors(path: str | os.PathLike, expected: dict[str, tuple[tuple[int, ...], dict]],
                             what: str, fix: str) -> dict[str, torch.Tensor]:
    """Read a safetensors file whose tensors must have the names and shapes a config implies, and finite values.

    Names and shapes are compared with the header before any tensor is read, so a config that asks for a huge
    module is refused at no cost; the tensors read are then as large as the file.

    Args:
        expected: name -> (shape the config implies, {config field: value} that size it), in the order to check.
        what: how the message names the weights file, e.g. ``"IQA-Adapter weights"``.
        fix: appended to every message.
    """
    from safetensors.torch import load_file

    found = safetensors_shapes(path, what, fix)
    missing = [n for n in expected if n not in found]
    extra = [n for n in found if n not in expected]
    if missing or extra:
        raise InputError(f"{what} {path} does not match its config.json: tensors {missing[:3]} missing, "
                         f"{extra[:3]} not expected ({len(missing)} missing, {len(extra)} extra); {fix}")
    for name, (shape, fields) in expected.items():
        if tuple(shape) != found[name]:
            sized_by = ", ".join(f"{k}={printable(repr(v))[:200]}" for k, v in fields.items()) or "the architecture"
            raise InputError(f"{what} {path} does not match its config.json: {sized_by} make {name} "
                             f"{list(shape)} ({math.prod(shape):.3g} values), but the weights file holds "
                             f"{list(found[name])}; {fix}")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # the header was fine but the data is not (a file cut short after the header)
        raise InputError(f"{what} {path} cannot be read ({printable(str(exc))[:160]}); {fix}") from None
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise InputError(f"{what} {path}: tensor {name} holds {bad} NaN/inf value(s) of {tensor.numel()} (a "
                             f"training run that diverged, or a damaged file); {fix}")
    return tensors
