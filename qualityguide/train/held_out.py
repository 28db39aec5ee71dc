"""A guard against reward hacking: held-out scorers beside the guiding one, a warning when they part, and the
checkpoint with the best held-out score kept and exported (``--held_out_scorer``, ``--keep_best held_out``).

A fine-tune that maximises one scorer can learn that scorer's blind spots (ACPO on the toy raises BRISQUE while NIQE
never improves, by saturating colours BRISQUE likes). A scorer the loss never saw does not reward those; when the
guiding score rises while a held-out one falls, the gain is suspect. The values are the validation values the
run logs (``validation/...``); checkpoints carry them in their marker's ``extra["validation"]``, so the choice of the
best checkpoint is made from what is on disk and survives a resume.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .checkpoints import CheckpointManager, read_marker

QUALITY_KEY = "validation/quality"
HELD_OUT = "validation/held_out/"
GAP = "validation/guiding_minus_held_out/"
KEEP_BEST = ("held_out",)


def held_out_key(name: str) -> str:
    """The logged key of held-out scorer ``name``'s mean validation score."""
    return HELD_OUT + name


def validation_values(guiding: float | None, held_out: dict[str, float]) -> dict[str, float]:
    """The values one validation logs: the guiding scorer's mean (``validation/quality``), each held-out scorer's
    mean (``validation/held_out/<name>``) and their difference (``validation/guiding_minus_held_out/<name>``, in the
    scorers' own units: it widens when the guiding score rises while the held-out one falls).

    Args:
        guiding: mean score of the guiding scorer (None: none was measured).
        held_out: ``{scorer name: mean score}``.
    """
    values = {} if guiding is None else {QUALITY_KEY: float(guiding)}
    for name, value in held_out.items():
        values[held_out_key(name)] = float(value)
        if guiding is not None:
            values[GAP + name] = float(guiding) - float(value)
    return values


class HeldOutGuard:
    """Remembers each validation's values and says when the guiding score has risen above, and a held-out score fallen
    below, what they were at the held-out scorer's best validation so far.

    Args:
        history: earlier ``(step, values)`` (a resumed run's checkpoint markers; step 0 may be the base model).
    """

    def __init__(self, history: list[tuple[int, dict]] | None = None):
        self.history = list(history or [])

    def remember(self, step: int, values: dict[str, float]) -> None:
        """Add a validation to the history without judging it (the base model, step 0, which a resumed run scores
        after its checkpoints' validations were read back)."""
        self.history = sorted([*self.history, (int(step), dict(values))], key=lambda item: item[0])

    def observe(self, step: int, values: dict[str, float]) -> list[str]:
        """Record the validation of ``step`` and return one warning per held-out scorer that parted from the guiding
        one (empty when none did)."""
        found = []
        for key in (k for k in values if k.startswith(HELD_OUT)):
            earlier = [(s, v) for s, v in self.history if _finite(v, key) and _finite(v, QUALITY_KEY)]
            if not earlier or not (_finite(values, key) and _finite(values, QUALITY_KEY)):
                continue
            best_step, best = max(earlier, key=lambda item: item[1][key])  # the first of equal bests
            if values[QUALITY_KEY] > best[QUALITY_KEY] and values[key] < best[key]:
                name = key[len(HELD_OUT):]
                found.append(f"step {step}: the guiding score rose from {best[QUALITY_KEY]:.4g} to "
                             f"{values[QUALITY_KEY]:.4g} since step {best_step} while held-out {name} fell from "
                             f"{best[key]:.4g} to {values[key]:.4g}: the fine-tune may be exploiting the guiding "
                             "scorer (reward hacking); look at the validation grids, and consider --keep_best "
                             "held_out, a larger --w_anchor or a lower --w_quality")
        self.history.append((int(step), dict(values)))
        return found


def _finite(values: dict, key: str) -> bool:
    value = values.get(key)
    return isinstance(value, (int, float)) and math.isfinite(value)


def validated_checkpoints(output_dir: str | os.PathLike, key: str) -> list[tuple[int, Path, float]]:
    """The complete checkpoints of ``output_dir`` whose marker holds a finite ``key`` validation value, oldest first.

    Args:
        output_dir: the run's output folder.
        key: a logged validation key (e.g. :func:`held_out_key`).
    """
    found = []
    for step, path in CheckpointManager(output_dir).checkpoints():
        values = ((read_marker(path) or {}).get("extra") or {}).get("validation") or {}
        if _finite(values, key):
            found.append((step, path, float(values[key])))
    return found


def best_of(candidates: list[tuple[int, Path | None, float]]) -> tuple[int, Path | None, float] | None:
    """The candidate ``(step, path, value)`` with the highest value (scores are higher-better); of equal values the
    earliest step (the least fine-tuned). None for no candidates."""
    return max(sorted(candidates, key=lambda c: c[0]), key=lambda c: c[2], default=None)


class KeepBestCheckpoint:
    """``CheckpointManager.keep`` for ``--keep_best held_out``: the checkpoint with the best ``key`` value is spared
    by ``--checkpoints_total_limit``.

    Args:
        output_dir: the run's output folder.
        key: the validation value that ranks checkpoints (the first held-out scorer's :func:`held_out_key`).
    """

    def __init__(self, output_dir: str | os.PathLike, key: str):
        self.output_dir, self.key = Path(output_dir), key

    def __call__(self, checkpoints: list[tuple[int, Path]]) -> set[Path]:
        best = best_of(validated_checkpoints(self.output_dir, self.key))
        return set() if best is None else {best[1]}


class RewardHackingWarning(UserWarning):
    """The guiding score rose while a held-out score fell (see :class:`HeldOutGuard`)."""


def checkpoint_validations(output_dir: str | os.PathLike, through_step: int) -> list[tuple[int, dict]]:
    """``(step, validation values)`` of the complete checkpoints up to ``through_step`` (a resumed run's history for
    :class:`HeldOutGuard`), oldest first."""
    found = []
    for step, path in CheckpointManager(output_dir).checkpoints():
        values = ((read_marker(path) or {}).get("extra") or {}).get("validation") or {}
        if step <= through_step and values:
            found.append((step, values))
    return found


def choose_export(output_dir: str | os.PathLike, key: str, final_step: int,
                  final_value: float | None) -> tuple[int, Path | None, float] | None:
    """What ``--keep_best`` exports: the best of the validated checkpoints and the final weights (path None), by
    ``key``; None when nothing was validated.

    Args:
        output_dir: the run's output folder.
        key: the ranking validation value (:func:`held_out_key`).
        final_step: the run's last step.
        final_value: ``key``'s value at the last step (None: not validated there).
    """
    candidates: list[tuple[int, Path | None, float]] = list(validated_checkpoints(output_dir, key))
    if final_value is not None and math.isfinite(final_value):
        candidates.append((int(final_step), None, float(final_value)))
    return best_of(candidates)
