"""The finished pieces of a long eval, kept as they finish so a rerun after a kill continues where it stopped."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from qualityguide.files import atomic_write


class PartStore:
    """The finished pieces of a long run (e.g. one trained model's measurements each, with its samples where a grid
    needs them), kept under ``folder/<hash of the settings>/`` so a rerun with the same settings picks them up
    and one with other settings does not. JSON and safetensors (never pickle), each written atomically;
    ``folder`` None keeps nothing.

    Args:
        folder: where the pieces go (e.g. the eval's ``OUT/parts``), or None.
        settings: everything the measurements depend on (hashed into the subfolder's name).
    """

    def __init__(self, folder: Path | None, settings: dict):
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.folder = None if folder is None else Path(folder) / digest

    def load(self, name: str, keep_samples: bool) -> tuple[dict | None, dict]:
        """``(record, samples)`` of piece ``name`` (``samples``: its tensors by name, when ``keep_samples``), or
        ``(None, {})`` when it is not there or cannot be read (then it is measured again)."""
        if self.folder is None or not (self.folder / f"{name}.json").is_file():
            return None, {}
        try:
            record = json.loads((self.folder / f"{name}.json").read_text())
            kept = load_file(self.folder / f"{name}.safetensors") if keep_samples else {}
        except (OSError, ValueError, RuntimeError):  # a damaged piece is measured again
            return None, {}
        return record, kept

    def save(self, name: str, record: dict, samples: dict) -> None:
        """Keep piece ``name``: the samples first, then the record that marks it finished."""
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if samples:
            atomic_write(self.folder / f"{name}.safetensors", lambda tmp: save_file(
                {k: v.contiguous() for k, v in samples.items()}, str(tmp)))
        atomic_write(self.folder / f"{name}.json", json.dumps(record))
