"""The ``Accelerator`` both training recipes start from: trackers checked, a logging folder, mixed precision checked.

accelerate's trackers (tensorboard, ...) need a logging folder from a ``ProjectConfiguration``; without one
``--report_to tensorboard`` stops at ``init_trackers``. Both recipes build their accelerator here, so they cannot
drift apart on it. The flags both recipes share with diffusers' training scripts (model, revision, variant, LR
schedule, sample limit) are declared, checked and turned into objects here for the same reason.
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


# diffusers' LR schedules by the names its training scripts take (piecewise_constant needs a rule string: left out)
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def add_model_arguments(parser, model_help: str) -> None:
    """``--pretrained_model_name_or_path`` (diffusers' name; ``--model`` is an alias with the same dest ``model``),
    ``--revision`` and ``--variant``, as diffusers' training scripts take them.

    Args:
        parser: the recipe's ``argparse.ArgumentParser``.
        model_help: what the recipe accepts as a model.
    """
    parser.add_argument("--pretrained_model_name_or_path", "--model", dest="model", required=True, help=model_help)
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of the model")
    parser.add_argument("--variant", default=None, help="weights variant of the model files, e.g. fp16")


def add_schedule_arguments(parser) -> None:
    """``--lr_scheduler``, ``--lr_warmup_steps`` and ``--max_train_samples`` as diffusers' training scripts take them.

    Args:
        parser: the recipe's ``argparse.ArgumentParser``.
    """
    parser.add_argument("--lr_scheduler", default="constant", help=f"LR schedule: {', '.join(LR_SCHEDULERS)} "
                        "(default constant)")
    parser.add_argument("--lr_warmup_steps", type=int, default=0, help="optimizer steps of linear warmup")
    parser.add_argument("--max_train_samples", type=int, default=None,
                        help="train on the first N items of the dataset only (in dataset order)")


def check_schedule_arguments(args) -> None:
    """Refuse an unknown ``--lr_scheduler`` (with the list and a close match), a negative ``--lr_warmup_steps`` and a
    ``--max_train_samples`` below 1, before anything loads.

    Args:
        args: the parsed arguments of :func:`add_schedule_arguments`.
    """
    if args.lr_scheduler not in LR_SCHEDULERS:
        guess = closest(args.lr_scheduler, list(LR_SCHEDULERS))
        raise InputError(f"--lr_scheduler {args.lr_scheduler!r} is not known; allowed: {', '.join(LR_SCHEDULERS)}"
                         + (f". Did you mean {guess!r}?" if guess else ""))
    if args.lr_warmup_steps < 0:
        raise InputError(f"--lr_warmup_steps {args.lr_warmup_steps}: must be >= 0 (0: no warmup)")
    if args.max_train_samples is not None and args.max_train_samples < 1:
        raise InputError(f"--max_train_samples {args.max_train_samples}: must be >= 1 (leave it out to use every item)")


def schedule_identity(args) -> dict:
    """The settings that shape the learning rate and the data, for a run's resume identity: resuming under another
    schedule or sample limit would not continue the same run.

    Args:
        args: the parsed arguments of :func:`add_schedule_arguments` (and ``--learning_rate``, ``--max_train_steps``).
    """
    steps = None if args.lr_scheduler.startswith("constant") else args.max_train_steps  # the decay's length
    return {"lr_scheduler": args.lr_scheduler, "lr_warmup_steps": args.lr_warmup_steps,
            "lr_schedule_steps": steps, "max_train_samples": args.max_train_samples}


def make_lr_scheduler(optimizer, name: str, warmup_steps: int, max_train_steps: int, num_processes: int):
    """diffusers' ``get_scheduler`` for ``optimizer``, counted as accelerate steps it once prepared.

    A prepared scheduler steps ``num_processes`` times per optimizer step (accelerate scales for a global batch), so
    its warmup and length are scaled by the same factor, as diffusers' training scripts do; the lr of optimizer step
    ``s`` is then the same with any number of processes. Pass the result to ``accelerator.prepare`` (its state is
    then in every checkpoint) and call ``step()`` after each ``optimizer.step()``.

    Args:
        optimizer: the run's optimizer (not yet prepared is fine).
        name: one of :data:`LR_SCHEDULERS`.
        warmup_steps: optimizer steps of linear warmup.
        max_train_steps: optimizer steps of the run (the decay's length).
        num_processes: ``accelerator.num_processes``.
    """
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps * num_processes,
                         num_training_steps=max_train_steps * num_processes)


def first_samples(dataset, count: int | None):
    """The first ``count`` items of an image-folder dataset, in its order (None: all of them); ``--max_train_samples``.

    Args:
        dataset: an :class:`~qualityguide.train.data.ImageFolderDataset`.
        count: how many items to keep (>= 1), or None.
    """
    if count is None or count >= len(dataset):
        return dataset
    return dataset.first(count)
