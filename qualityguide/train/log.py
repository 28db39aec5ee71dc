"""A per-step loss log (``train_log.jsonl``) that a resumed run continues without duplicates or gaps."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..errors import InputError
from ..files import atomic_write

LOG_NAME = "train_log.jsonl"


class StepLog:
    """One JSON line per optimizer step: ``{"step": s, "loss": ..., <other terms>}``.

    Opening it for a run that starts at step ``start`` keeps the lines of steps ``< start`` (those the checkpoint
    covers) and drops later ones, which a killed run wrote after its last checkpoint and the resumed run is about
    to redo; the rewrite is atomic. Only the main process should open it.

    Args:
        output_dir: the run's output folder.
        start: the first step this run will log (0, or the step of the checkpoint it resumed from).
    """

    def __init__(self, output_dir: str | os.PathLike, start: int):
        self.path = Path(output_dir) / LOG_NAME
        kept: list[str] = []
        if self.path.is_file():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            for number, line in enumerate(lines, 1):
                try:
                    record = json.loads(line)
                    step = int(record["step"])
                except (ValueError, KeyError, TypeError):
                    if number == len(lines):
                        break  # a last line cut short by a kill
                    raise InputError(f"{self.path} line {number} is not a step record; it is not this recipe's "
                                     "log: use another --output_dir") from None
                if step < start:
                    kept.append(line)
            atomic_write(self.path, "".join(line + "\n" for line in kept))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "a", encoding="utf-8")

    def write(self, step: int, values: dict[str, float]) -> None:
        record = {"step": int(step), **{k: (float(v) if math.isfinite(float(v)) else str(float(v)))
                                        for k, v in values.items()}}
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def read_log(output_dir: str | os.PathLike) -> list[dict]:
    """The records of ``train_log.jsonl`` in step order."""
    path = Path(output_dir) / LOG_NAME
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
