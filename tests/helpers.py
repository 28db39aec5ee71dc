"""Small pieces several test files share (pytest puts ``tests/`` on ``sys.path``: ``from helpers import ...``)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from qualityguide.scorers import QualityScorer

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str):
    """A recipe of this repository (e.g. ``"recipes/train_acpo_lora.py"``) as a fresh module (evals are a package:
    tests import them as ``evals.<name>``)."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state, so the next ``Accelerator()`` in this process starts clean."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def cosine_with_warmup(lr: float, warmup: int, total: int, step: int) -> float:
    """diffusers' cosine schedule written out: linear warmup, then half a cosine down to 0 at ``total``."""
    if step < warmup:
        return lr * step / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def log_killed_at(step: int):
    """A ``StepLog`` that raises KeyboardInterrupt when asked to write ``step`` (a kill after the previous step's
    line; patch it over a recipe's ``StepLog``)."""
    from qualityguide.train.log import StepLog

    class KilledLog(StepLog):
        def write(self, at, values):
            if at == step:
                raise KeyboardInterrupt
            super().write(at, values)

    return KilledLog


class Brightness(QualityScorer):
    """A differentiable scorer whose value is known by hand: the mean pixel value."""

    name, differentiable = "test-brightness", True

    def native(self, x):
        return x.mean((1, 2, 3))


class Frozen(Brightness):
    """The same values, declared non-differentiable."""

    name, differentiable = "test-nondiff", False
