"""Loading weight files without running code from them.

A ``.pth`` file is a pickle, and unpickling runs whatever callables the file names. qualityguide
reads every weights file a user passes with ``torch.load(weights_only=True)`` (tensors, containers
and numbers only) or a non-pickle parser (safetensors, LIBSVM text, MAT, NPZ without pickles); a file
that needs more is refused. pyiqa loads ``pretrained_model_path`` with ``weights_only=False``, so a
user's checkpoint reaches it only as a copy re-saved from what the safe load returned.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import InputError


def load_torch_weights(path: str | os.PathLike, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a file holding other Python objects is refused.

    Args:
        path: a ``torch.save`` file.
        what: how to name the file's role in messages (e.g. ``"brisque weights"``).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", str(exc))
        detail = match.group(1).strip()[:160] if match else type(exc).__name__
        raise InputError(f"{what}: {path} is not a plain tensor file (torch.load(weights_only=True) refused it: "
                         f"{detail}); qualityguide never unpickles more than tensors, because that can run code "
                         "stored in the file. Fix: if you trust the file, re-save its tensors with safetensors (or "
                         "torch.save of a dict/tuple of tensors), or use the original file from the metric's "
                         "authors") from None


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
