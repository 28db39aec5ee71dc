"""The ``Accelerator`` both training recipes start from: trackers checked, a logging folder, mixed precision checked.

accelerate's trackers (tensorboard, ...) need a logging folder from a ``ProjectConfiguration``; without one
``--report_to tensorboard`` stops at ``init_trackers``. Both recipes build their accelerator here, so they cannot
drift apart on it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import InputError, TrainingError, closest
from ..runtime import run_main
from .checkpoints import RESUME_HINT

LOGS = "logs"
MIXED_PRECISIONS = ("no", "fp16", "bf16")


def run_training(main, argv: list[str] | None = None) -> int:
    """A training recipe's exit code: 0 done, 1 the run stopped (a non-finite loss: :class:`TrainingError`), 2 bad
    input (one line on stderr), 130 Ctrl-C with the ``--resume_from_checkpoint`` hint (both recipes exit here).

    Args:
        main: the recipe's ``main(argv) -> int``.
        argv: its command line (None: ``sys.argv[1:]``).
    """
    return run_main(lambda: main(argv), resume_hint=RESUME_HINT, exit_codes={TrainingError: 1})


def make_accelerator(output_dir: str | os.PathLike, mixed_precision: str, report_to: str | None
                     ) -> tuple[object, torch.dtype | None]:
    """An ``accelerate.Accelerator`` logging to ``output_dir/logs``, and the frozen weights' dtype.

    Args:
        output_dir: the run's output folder (tracker logs go to its ``logs`` subfolder).
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"``; fp16 on a CPU is refused (it would stop later in the
            attention kernels with a dtype traceback).
        report_to: ``--report_to`` as :func:`check_report_to` reads it (None:
            tensorboard when installed; ``"none"``: no tracker).

    Returns:
        (accelerator, weight dtype: None for float32, else float16 / bfloat16).

    Raises:
        InputError: an unknown or uninstalled tracker, an unknown precision, fp16 on a CPU.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    trackers = check_report_to(report_to)
    out = Path(output_dir)
    accelerator = Accelerator(mixed_precision=mixed_precision, log_with=trackers,
                              project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / LOGS)))
    return accelerator, check_mixed_precision(mixed_precision, accelerator.device)


def check_mixed_precision(mixed_precision: str, device: torch.device | str) -> torch.dtype | None:
    """The frozen weights' dtype for ``--mixed_precision`` (None: float32); fp16 is refused on a CPU.

    Args:
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"``.
        device: the device training runs on (``accelerator.device``).
    """
    if mixed_precision not in MIXED_PRECISIONS:
        raise InputError(f"--mixed_precision {mixed_precision!r} is not known; allowed: {', '.join(MIXED_PRECISIONS)}")
    if mixed_precision == "fp16" and torch.device(device).type == "cpu":
        raise InputError("--mixed_precision fp16 on a CPU: CPUs have no fp16 autocast with gradient scaling; use "
                         "--mixed_precision bf16 or no on a CPU, or run on a GPU")
    return {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def check_report_to(report_to: str | None) -> list[str] | None:
    """The accelerate trackers for ``--report_to`` (comma-separated; ``none``: no tracker; ``all``: every installed
    one; None: tensorboard when it is installed, else none). A tracker accelerate does not know, or one that is not
    installed, is refused here, before training, instead of being dropped with a log line.
    """
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    if report_to is None:
        installed = {str(getattr(t, "value", t)) for t in get_available_trackers()}
        return ["tensorboard"] if "tensorboard" in installed else None
    if str(report_to).strip().lower() in ("", "none"):
        return None
    names = [n.strip() for n in str(report_to).split(",") if n.strip()]
    if "all" in names:
        return ["all"]
    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            guess = closest(name, sorted(LOGGER_TYPE_TO_CLASS))
            raise InputError(f"--report_to {name!r} is not an accelerate tracker; known: "
                             f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))}, all, none"
                             + (f". Did you mean {guess!r}?" if guess else ""))
        if name not in available:
            raise InputError(f"--report_to {name}: the {name} package is not installed; pip install {name}, or "
                             f"drop --report_to (installed trackers: {', '.join(sorted(available)) or 'none'})")
    return names
