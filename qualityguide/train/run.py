"""The one run skeleton both training recipes stand on: what every run does the same way lives here once.

A recipe shows only what differs (its model, data, loss and what it saves); :class:`TrainingRun` holds the rest:

- setup checks (``--mixed_precision``, ``--report_to``, the device, the LR schedule flags) and the ``Accelerator``;
- the optimizer's LR schedule (diffusers' ``get_scheduler``, prepared with the model and optimizer);
- the run identity and resume: a checkpoint saved for other settings is refused with the differing field named;
- the step (:func:`train_step`): gradient accumulation, clipping, the non-finite guard averaged over processes
  (fp16-overflow aware), the logged terms, learning rate and gradient norm;
- accelerate's logger with the lines users of diffusers' scripts expect (running training, resuming, saved
  checkpoint, where the outputs went), ``train_log.jsonl``, the trackers, validation and ``training_curves.png``
  at each checkpoint and at the end;
- teardown. The exit codes are :func:`qualityguide.train.setup.run_training`'s (0 done, 1 stopped, 2 refused,
  130 interrupted).

The evals that train (``evals/acpo_toy.py``, ``evals/adapter_control.py``, ``evals/toy``) call the same
:func:`train_step`, without an ``Accelerator``.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import InputError
from .checkpoints import CheckpointManager, read_marker
from .curves import write_training_curves
from .guard import check_step_finite, mean_over_processes
from .log import StepLog
from .setup import check_schedule_arguments, make_accelerator, make_lr_scheduler

LOGGER_NAME = "qualityguide.train"
VALIDATION_PREFIX = "validation/"


def identity_difference(stored: dict | None, current: dict) -> str | None:
    """The first top-level field where a checkpoint's identity differs from this run's, as a message; else None.

    Args:
        stored: the identity a checkpoint was saved with (its marker's ``extra["identity"]``); None: none saved.
        current: this run's identity, its fields in the order they should be reported (the likely cause first).
    """
    stored = stored if isinstance(stored, dict) else {}
    for key in [*current, *(k for k in stored if k not in current)]:  # a field only the checkpoint has differs too
        if stored.get(key) != current.get(key):
            there, here = (json.dumps(v, sort_keys=True) for v in (stored.get(key), current.get(key)))
            return f"{key}={there} there, {here} here"
    return None


def _scalar(value) -> torch.Tensor:
    return value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))


def train_step(accelerator, model, optimizer, lr_scheduler, params: Iterable[torch.nn.Parameter],
               micro_step: Callable[[int], Mapping[str, torch.Tensor]], accum: int = 1,
               max_grad_norm: float | None = 1.0, step: int = 0, mixed_precision: str = "no",
               weighted: Mapping[str, str] | None = None) -> dict[str, float]:
    """One optimizer step over ``accum`` micro-batches; the step both recipes and the evals that train share.

    ``micro_step(micro)`` computes micro-batch ``micro``'s loss terms (a dict of 0-dim tensors with ``"loss"``
    among them); its loss, divided by ``accum``, is back-propagated under ``no_sync`` except on the last
    micro-batch, so DDP reduces gradients once per step. The gradients are clipped to ``max_grad_norm``, the terms
    averaged over micro-batches and processes, and a NaN or infinite term or gradient norm stops the run
    (:class:`~qualityguide.errors.TrainingError`) before ``optimizer.step()``, on every process together, so the
    last checkpoint stays good (under fp16 an infinite norm is the GradScaler's overflow signal and skips the
    step: not a failure).

    Args:
        accelerator: the run's ``Accelerator``; None for a plain single-process loop (the evals), which then
            calls ``backward`` and ``clip_grad_norm_`` itself.
        model: the prepared model (for ``no_sync``); ignored without an accelerator.
        optimizer, lr_scheduler: the prepared optimizer and LR schedule (``lr_scheduler`` may be None).
        params: the trained parameters (clipped, and the gradient norm measured over them).
        micro_step: micro-batch index -> loss terms.
        accum: micro-batches per optimizer step (``--gradient_accumulation_steps``).
        max_grad_norm: clipping threshold (None: measure the norm, clip nothing).
        step: the optimizer step (0-based), for the guard's message.
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"``.
        weighted: term -> the term counting the samples it is a mean over (ACPO: ``{"quality": "quality_samples"}``):
            that term is averaged over the samples, not the micro-batches, so a micro-batch that scored no sample
            (its term is 0) does not pull the mean toward 0; NaN when no sample of the step counted.

    Returns:
        The terms averaged over micro-batches and processes, ``"lr"`` (the learning rate this step used) and
        ``"grad_norm"`` (before clipping), as floats.
    """
    weighted = dict(weighted or {})
    params = [p for p in params]
    sums: dict[str, torch.Tensor] = {}
    for micro in range(accum):
        sync = accelerator.no_sync(model) if accelerator is not None and micro < accum - 1 else nullcontext()
        with sync:
            terms = micro_step(micro)
            if "loss" not in terms:
                raise TypeError(f"micro_step must return a dict with a 'loss' term, got {sorted(terms)}")
            loss = terms["loss"] / accum
            accelerator.backward(loss) if accelerator is not None else loss.backward()
        for name, value in terms.items():
            value = _scalar(value)
            if name in weighted:
                value = value * _scalar(terms[weighted[name]])  # a sum over the samples; divided below
            sums[name] = sums.get(name, 0.0) + value / accum
    limit = float("inf") if max_grad_norm is None else max_grad_norm
    if accelerator is not None:
        grad_norm = accelerator.clip_grad_norm_(params, limit)
        values = mean_over_processes(sums, accelerator)  # NaN on any process reaches all: they stop together
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, limit)
        values = {name: float(value) for name, value in sums.items()}
    check_step_finite(values, grad_norm, step, mixed_precision)
    for name, count in weighted.items():  # both sides averaged alike over micro-batches and processes
        values[name] = values[name] / values[count] if values[count] > 0 else float("nan")
    values["lr"] = (lr_scheduler.get_last_lr()[0] if lr_scheduler is not None
                    else optimizer.param_groups[0]["lr"])  # the lr this step uses
    values["grad_norm"] = float(grad_norm)
    optimizer.step()
    if lr_scheduler is not None:
        lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return values


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when a line is logged (not when it was made), so lines
    follow a redirected or captured stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _console_logging() -> None:
    """Show this package's INFO lines (the run's progress lines) on stderr, as diffusers' scripts do with
    ``logging.basicConfig``, without turning on every other library's INFO logging."""
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s - %(levelname)s - %(name)s - %(message)s",
                                               datefmt="%m/%d/%Y %H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


class TrainingRun:
    """One training run's skeleton: accelerator, schedule, identity and resume, the step loop, logs, checkpoints,
    validation, curves and teardown.

    Build it first in a recipe's ``main`` (it checks the flags every recipe shares before anything loads), then:
    :meth:`check_identity` with the run's settings (before any weights change, so a refused resume costs nothing),
    :meth:`prepare` the trained module and optimizer, :meth:`load` the checkpoint, :meth:`train`, :meth:`finish`.

    Args:
        args: the recipe's parsed arguments; reads ``output_dir``, ``mixed_precision``, ``report_to``,
            ``learning_rate``, ``lr_scheduler``, ``lr_warmup_steps``, ``max_train_steps``,
            ``gradient_accumulation_steps``, ``train_batch_size``, ``max_grad_norm``, ``checkpointing_steps``,
            ``checkpoints_total_limit``, ``resume_from_checkpoint``, ``validation_steps`` (optional) and ``seed``.
        name: the recipe's name (tracker project, logger lines), e.g. ``"train_acpo_lora"``.
        title: the progress bar's label, e.g. ``"ACPO"``.
    """

    def __init__(self, args, name: str, title: str):
        check_schedule_arguments(args)
        self.args, self.name, self.title = args, name, title
        self.output_dir = Path(args.output_dir)
        self.accelerator, self.weight_dtype = make_accelerator(self.output_dir, args.mixed_precision, args.report_to)
        _console_logging()
        from accelerate.logging import get_logger

        self.logger = get_logger(f"{LOGGER_NAME}.{name}")
        self.manager = CheckpointManager(self.output_dir, args.checkpoints_total_limit)
        self.resume_path = self.manager.resolve(args.resume_from_checkpoint)
        self.identity: dict = {}
        self.start = 0
        self.model = self.optimizer = self.lr_scheduler = None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def check_identity(self, identity: dict, fix: str = "resume with the same settings") -> None:
        """Record the run's identity (saved in every checkpoint) and refuse a resume checkpoint saved for other
        settings, naming the first field that differs.

        Args:
            identity: the settings a resumed run must share, the likely cause of a mismatch first.
            fix: what the user should do instead, for the message (a new ``--output_dir`` is always offered).
        """
        self.identity = identity
        if self.resume_path is None:
            return
        why = identity_difference((read_marker(self.resume_path).get("extra") or {}).get("identity"), identity)
        if why is not None:
            raise InputError(f"{self.resume_path} was saved for other settings ({why}); {fix}, or use a new "
                             "--output_dir")

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
        """Make the LR schedule for ``optimizer`` and prepare the three with accelerate (DDP, mixed precision, the
        schedule's state in every checkpoint); returns the prepared model."""
        args = self.args
        lr_scheduler = make_lr_scheduler(optimizer, args.lr_scheduler, args.lr_warmup_steps, args.max_train_steps,
                                         self.accelerator.num_processes)
        self.model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(model, optimizer, lr_scheduler)
        return self.model

    def load(self) -> int:
        """Load the resume checkpoint, if any (after :meth:`prepare`); returns the step training starts at."""
        if self.resume_path is not None:
            self.start = self.manager.load(self.accelerator, self.resume_path)[0]
            self.logger.info(f"Resuming from {self.resume_path.name} at step {self.start}")
        return self.start

    def _validation_due(self, done: int) -> bool:
        every = getattr(self.args, "validation_steps", None) or self.args.checkpointing_steps
        return done % every == 0 or done == self.args.max_train_steps

    def train(self, micro_step: Callable[[int, int, int], Mapping[str, torch.Tensor]],
              params: Iterable[torch.nn.Parameter], num_examples: int,
              validate: Callable[[int], Mapping[str, float]] | None = None,
              postfix: tuple[str, ...] = ("loss",), weighted: Mapping[str, str] | None = None) -> None:
        """The step loop from :meth:`load`'s step to ``--max_train_steps``.

        After each optimizer step (``done`` steps completed): validation when due (every ``--validation_steps``,
        by default at every checkpoint, and at the end) merged into the step's record, the record written to
        ``train_log.jsonl`` and the trackers, a checkpoint every ``--checkpointing_steps`` (with the identity and the
        validation values), and ``training_curves.png`` redrawn at each checkpoint.

        Args:
            micro_step: ``(step, micro, index)`` -> loss terms of micro-batch ``micro`` of optimizer step ``step``,
                where ``index = step * accumulation + micro`` (the micro-step every batch and generator is keyed
                by). Must return the same term names on every call.
            params: the trained parameters.
            num_examples: training examples (for the start line).
            validate: ``done`` -> ``{"validation/...": value}``, called on every process when validation is due
                (it does its main-process-only work itself and returns the same keys on all processes, or {}).
            postfix: terms shown on the progress bar.
            weighted: terms that are means over a counted subset of samples (:func:`train_step`).
        """
        args, accelerator = self.args, self.accelerator
        accum, params = args.gradient_accumulation_steps, list(params)
        if accelerator.log_with:
            accelerator.init_trackers(self.name, config={k: v for k, v in vars(args).items()
                                                         if isinstance(v, (int, float, str, bool))})
        log = StepLog(self.output_dir, self.start) if accelerator.is_main_process else None
        world = accelerator.num_processes
        self.logger.info(f"***** Running training ({self.name}) *****")
        self.logger.info(f"  Num examples = {num_examples}")
        self.logger.info(f"  Num processes = {world}")
        self.logger.info(f"  Instantaneous batch size per process = {args.train_batch_size}")
        self.logger.info(f"  Total train batch size (w. parallel & accumulation) = "
                         f"{args.train_batch_size * world * accum}")
        self.logger.info(f"  Gradient accumulation steps = {accum}")
        self.logger.info(f"  Total optimization steps = {args.max_train_steps} (starting at step {self.start})")
        progress = tqdm(range(self.start, args.max_train_steps), initial=self.start, total=args.max_train_steps,
                        desc=self.title, disable=not accelerator.is_main_process)
        try:
            for step in progress:
                values = train_step(accelerator, self.model, self.optimizer, self.lr_scheduler, params,
                                    lambda micro, step=step: micro_step(step, micro, step * accum + micro), accum,
                                    args.max_grad_norm, step, args.mixed_precision, weighted)
                done = step + 1
                checkpoint = done % args.checkpointing_steps == 0
                validation: dict[str, float] = {}
                if validate is not None and self._validation_due(done):
                    validation = dict(validate(done) or {})
                    accelerator.wait_for_everyone()
                values.update(validation)
                if log is not None:
                    log.write(step, values)
                    progress.set_postfix({k: f"{values[k]:.4f}" for k in postfix if k in values})
                accelerator.log(values, step=step)
                if checkpoint:
                    path = self.manager.save(accelerator, done, extra={"identity": self.identity,
                                                                       "validation": validation})
                    self.logger.info(f"Saved {path.name} (step {done}) to {path}")
                    if log is not None:
                        self.write_curves()
        finally:
            if log is not None:
                log.close()

    def write_curves(self) -> Path:
        """Redraw ``OUTPUT_DIR/training_curves.png`` from ``train_log.jsonl`` (main process)."""
        return write_training_curves(self.output_dir)

    def finish(self, save: Callable[[], Path | str | None]) -> None:
        """Wait for every process, ``save()`` the result on the main process, redraw the curves, log where the
        outputs went and tear down (DDP and trackers released, so a gloo process exits cleanly)."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            saved = save()
            curves = self.write_curves()
            self.logger.info(f"Outputs in {self.output_dir}: {saved or 'nothing saved'}"
                             + (f", {curves.name}" if curves else ""))
        # a gloo process that exits still holding DDP can abort (torch 2.14): drop every reference first
        self.model = self.optimizer = self.lr_scheduler = None
        accelerator.free_memory()
        accelerator.end_training()
