"""An eval that measures in a child process (a fresh process per case: peak memory, clean state) starts its own
module again with ``python -m``, importable whatever the working folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the folder holding evals/


def module_command(module: str, *args: str) -> list[str]:
    """``python -m module args...`` with this interpreter.

    Args:
        module: the eval as a module name, e.g. ``"evals.bench_scoring"``.
        args: its command-line arguments.
    """
    return [sys.executable, "-m", module, *args]


def child_env(*first: str) -> dict[str, str]:
    """This environment with ``first`` (e.g. the qualityguide under measurement) and the repository folder at the
    head of ``PYTHONPATH``, so the child imports ``evals`` and the same library as its parent."""
    paths = [*first, str(REPO), os.environ.get("PYTHONPATH")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(p for p in paths if p))}
