"""The ``Accelerator`` both training recipes start from: trackers checked, a logging folder, mixed precision checked.

accelerate's trackers (tensorboard, ...) need a logging folder from a ``ProjectConfiguration``; without one
``--report_to tensorboard`` stops at ``init_trackers``. Both recipes build their accelerator here, so they cannot
drift apart on it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

LOGS = "logs"


def make_accelerator(output_dir: str | os.PathLike, mixed_precision: str, report_to: str | None
                     ) -> tuple[object, torch.dtype | None]:
    """An ``accelerate.Accelerator`` logging to ``output_dir/logs``, and the frozen weights' dtype.

    Args:
        output_dir: the run's output folder (tracker logs go to its ``logs`` subfolder).
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"``; fp16 on a CPU is refused (it would stop later in the
            attention kernels with a dtype traceback).
        report_to: ``--report_to`` as :func:`qualityguide.finetune.training.check_report_to` reads it (None:
            tensorboard when installed; ``"none"``: no tracker).

    Returns:
        (accelerator, weight dtype: None for float32, else float16 / bfloat16).

    Raises:
        InputError: an unknown or uninstalled tracker, an unknown precision, fp16 on a CPU.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from ..finetune.training import check_mixed_precision, check_report_to

    trackers = check_report_to(report_to)
    out = Path(output_dir)
    accelerator = Accelerator(mixed_precision=mixed_precision, log_with=trackers,
                              project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / LOGS)))
    return accelerator, check_mixed_precision(mixed_precision, accelerator.device)
