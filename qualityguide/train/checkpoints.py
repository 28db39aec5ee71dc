"""Crash-safe training checkpoints around ``accelerator.save_state`` / ``load_state``.

A checkpoint is the folder ``OUTPUT/checkpoint-<step>`` holding accelerate's state (models as safetensors;
optimizer, scheduler, scaler and RNG states as accelerate writes them) plus ``qualityguide_checkpoint.json`` (step
and the recipe's ``extra`` dict). It is written as ``checkpoint-<step>.tmp-partial``, completed with the marker,
flushed to disk and renamed in one step, so a kill at any moment leaves either the complete folder or a
``*.tmp-*`` folder that is never picked and is removed by the next save.

Security (accelerate 1.15, read from its source): ``load_state`` reads models with safetensors, and the optimizer,
scheduler, GradScaler, sampler and RNG files with ``torch.load(weights_only=True)`` (allowing only numpy arrays and
dtypes and ``codecs.encode`` besides tensors), but objects registered with ``register_for_checkpointing`` are read
with ``weights_only=False``, which can run code stored in the file. So :class:`CheckpointManager` refuses custom
objects on save and load (keep small state in ``extra``), and loads only folders that carry its marker. Note that
accelerate silently skips RNG states it cannot read ("Could not load random states" at INFO level); the recipes'
randomness comes from :func:`qualityguide.train.data.step_generator` and does not depend on them.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Callable

import torch

from ..errors import InputError, QualityGuideError
from ..files import FORMATS, fsync_dir

MARKER = "qualityguide_checkpoint.json"
FORMAT = FORMATS["checkpoint"]
PREFIX = "checkpoint-"
# What a training recipe tells a user who pressed Ctrl-C: work since the last checkpoint is redone, no more.
RESUME_HINT = "rerun with --resume_from_checkpoint latest to continue from the last checkpoint"
COMPLETE = re.compile(r"^checkpoint-(\d+)$")
# optimizer state kept per parameter with the parameter's shape (torch's Adam/AdamW/SGD, bitsandbytes' 8-bit Adam);
# other entries (step counters, 8-bit block maxima and quantile maps) have shapes of their own
PARAMETER_SHAPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "state1", "state2")
logger = logging.getLogger(__name__)


def read_marker(path: str | os.PathLike) -> dict | None:
    """The marker of a complete checkpoint folder (``step``, ``extra``, ``num_processes``), or None if absent or
    unreadable."""
    try:
        data = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("step"), int):
        return None
    return data


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` (and the folder itself) to disk."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def _no_custom_objects(accelerator, what: str) -> None:
    if getattr(accelerator, "_custom_objects", None):
        raise InputError(f"cannot {what} with objects registered by accelerator.register_for_checkpointing: accelerate "
                         "reads them back with pickle (weights_only=False), which can run code from the file. Fix: "
                         "keep small state in CheckpointManager.save(..., extra={...}), models in accelerator.prepare")


class CheckpointManager:
    """Save, find and load ``checkpoint-<step>`` folders in ``output_dir``.

    Args:
        output_dir: the run's output folder (shared by all processes).
        total_limit: keep only this many newest complete checkpoints (None keeps all).
        keep: ``keep(checkpoints) -> paths`` never deleted by ``total_limit`` (e.g. the best validated one), and not
            counted in it; None spares none.
    """

    def __init__(self, output_dir: str | os.PathLike, total_limit: int | None = None,
                 keep: Callable[[list[tuple[int, Path]]], set[Path]] | None = None):
        if total_limit is not None and (isinstance(total_limit, bool) or not isinstance(total_limit, int)
                                        or total_limit < 1):
            raise InputError(f"total_limit {total_limit!r} (--checkpoints_total_limit): must be a positive whole "
                             "number of checkpoints to keep, or None to keep all")
        self.output_dir = Path(output_dir)
        self.total_limit = total_limit
        self.keep = keep

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first: folders named ``checkpoint-<step>`` whose marker has that step."""
        if not self.output_dir.is_dir():
            return []
        found = []
        for path in self.output_dir.iterdir():
            match = COMPLETE.match(path.name)
            marker = read_marker(path) if match and path.is_dir() else None
            if marker is not None and marker["step"] == int(match.group(1)):
                found.append((marker["step"], path))
        return sorted(found)

    def _names(self) -> str:
        names = [p.name for _, p in self.checkpoints()]
        return f"{names}" if names else f"none in {self.output_dir}"

    # ------------------------------------------------------------------------------------------------ save
    def save(self, accelerator, step: int, extra: dict | None = None) -> Path:
        """Save ``accelerator``'s state as ``output_dir/checkpoint-<step>``; call it on every process.

        Models go through ``accelerator.save_state(safe_serialization=True)`` (safetensors) and its save hooks (e.g.
        a LoRA recipe's hook that keeps only adapter weights). A checkpoint of the same step is replaced. Then the
        oldest complete checkpoints beyond ``total_limit`` are deleted.

        Args:
            accelerator: the run's ``accelerate.Accelerator``.
            step: the optimizer step just completed (the next run starts at ``step``).
            extra: JSON-serialisable state of the recipe (epoch counters, arguments), returned by :meth:`load`.

        Returns:
            the checkpoint folder.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise InputError(f"step {step!r}: must be a whole number >= 0 (the optimizer step just completed)")
        try:
            extra_json = json.loads(json.dumps(extra or {}))
        except (TypeError, ValueError) as exc:
            raise InputError(f"extra: must be JSON-serialisable (numbers, strings, lists, dicts), got an error: "
                             f"{exc}; convert tensors with .item() / .tolist() first") from None
        if accelerator.project_configuration.automatic_checkpoint_naming:
            raise InputError("ProjectConfiguration(automatic_checkpoint_naming=True) makes accelerate ignore the "
                             "folder it is given; leave it off: CheckpointManager names checkpoints itself")
        _no_custom_objects(accelerator, "save a checkpoint")
        writer = accelerator.is_local_main_process if accelerator.project_configuration.save_on_each_node \
            else accelerator.is_main_process
        final = self.output_dir / f"{PREFIX}{step}"
        tmp = self.output_dir / f"{PREFIX}{step}.tmp-partial"
        if writer:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._remove_stale()
            tmp.mkdir()
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if writer:
            marker = {"format": FORMAT, "step": step, "extra": extra_json,
                      "num_processes": accelerator.num_processes}
            (tmp / MARKER).write_text(json.dumps(marker, indent=1))
            _fsync_tree(tmp)
            old = None
            if final.exists():  # the same step saved again: move the old one out of the way first
                old = self.output_dir / f"{PREFIX}{step}.tmp-replaced"
                os.replace(final, old)
            os.replace(tmp, final)
            fsync_dir(self.output_dir)
            if old is not None:
                shutil.rmtree(old)
            self._prune()
        accelerator.wait_for_everyone()
        return final

    def _remove_stale(self) -> None:
        for path in self.output_dir.glob(f"{PREFIX}*.tmp-*"):
            logger.info("removing %s, left by an interrupted save", path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()

    def _prune(self) -> None:
        spared = self.keep(self.checkpoints()) if self.keep is not None else set()
        complete = [(step, path) for step, path in self.checkpoints() if path not in spared]
        if self.total_limit is None or len(complete) <= self.total_limit:
            return
        for _, path in complete[:len(complete) - self.total_limit]:
            doomed = path.with_name(path.name + ".tmp-deleting")  # renamed first: a half-deleted folder is never picked
            os.replace(path, doomed)
            shutil.rmtree(doomed)
            logger.info("deleted %s (total_limit=%d)", path, self.total_limit)

    # ------------------------------------------------------------------------------------------------ resume
    def resolve(self, resume_from_checkpoint: str | os.PathLike | None) -> Path | None:
        """The checkpoint to resume from.

        Args:
            resume_from_checkpoint: None (start fresh), ``"latest"`` (the newest complete checkpoint in
                ``output_dir``; None, with an INFO log, when there is none), a name such as ``"checkpoint-500"``
                (inside ``output_dir``), or a path to a checkpoint folder written by this class.

        Raises:
            InputError: an unknown name or path, or a folder without this class's marker (including interrupted
                ``*.tmp-*`` folders); the message lists the complete checkpoints.
        """
        if resume_from_checkpoint is None:
            return None
        value = os.fspath(resume_from_checkpoint)
        if value == "latest":
            complete = self.checkpoints()
            if not complete:
                logger.info("no complete checkpoint in %s; starting from scratch", self.output_dir)
                return None
            return complete[-1][1]
        path = self.output_dir / value if COMPLETE.match(value) else Path(value)
        fix = f"pass 'latest', the name of a complete checkpoint ({self._names()}) or the path of one"
        if not path.is_dir():
            raise InputError(f"--resume_from_checkpoint {value!r}: {path} does not exist; {fix}")
        if ".tmp-" in path.name or read_marker(path) is None:
            raise InputError(f"--resume_from_checkpoint {value!r}: {path} is not a complete qualityguide checkpoint (no "
                             f"readable {MARKER}; interrupted saves end in .tmp-*); {fix}")
        return path

    def load(self, accelerator, path: str | os.PathLike) -> tuple[int, dict]:
        """Restore ``accelerator``'s state from a checkpoint (models, optimizers, schedulers, RNG states) after
        ``accelerator.prepare``; call it on every process.

        Args:
            accelerator: the run's ``accelerate.Accelerator``, with the same prepared objects as when it was saved.
            path: a checkpoint folder, usually from :meth:`resolve`.

        Returns:
            (step, extra) as given to :meth:`save`: continue with optimizer step ``step``.

        Raises:
            InputError: not a complete checkpoint, pickled custom objects, or a damaged checkpoint (an optimizer state
                file missing or unreadable, optimizer state whose shapes are not the parameters'); the message names
                the checkpoint and how to go on (delete it to resume from the previous one, or start fresh).
        """
        path = Path(path)
        marker = read_marker(path)
        if marker is None:
            raise InputError(f"{path} is not a complete qualityguide checkpoint (no readable {MARKER}); complete "
                             f"checkpoints: {self._names()}")
        _no_custom_objects(accelerator, "load a checkpoint")
        pickled = sorted(p.name for p in path.glob("custom_checkpoint_*.pkl"))
        if pickled:
            raise InputError(f"{path} holds {pickled}, which accelerate would unpickle with weights_only=False (this "
                             "can run code from the file); CheckpointManager does not load them. Remove them if you "
                             "trust and do not need them")
        if marker.get("num_processes") != accelerator.num_processes:
            warnings.warn(f"{path} was saved by {marker.get('num_processes')} process(es), this run has "
                          f"{accelerator.num_processes}: the global batch and the per-process data order change from "
                          "here on", stacklevel=2)
        from safetensors import SafetensorError

        damaged = self._damaged(path)
        self._check_files(accelerator, path, damaged)
        try:
            accelerator.load_state(str(path))
        except QualityGuideError:
            raise  # a load hook's own explanation (e.g. a LoRA of another rank)
        except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError, SafetensorError) as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise damaged(f"it cannot be read ({type(exc).__name__}: {first})") from None
        self._check_optimizer_shapes(accelerator, damaged)
        return marker["step"], marker.get("extra") or {}

    def _damaged(self, path: Path):
        """An ``InputError`` factory for a damaged checkpoint: names it and how to go on without it."""
        older = [p.name for _, p in self.checkpoints() if p != path]

        def error(why: str) -> InputError:
            previous = (f"resume from the previous checkpoint ({older[-1]}) with --resume_from_checkpoint latest"
                        if older else "start fresh (there is no older checkpoint)")
            return InputError(f"checkpoint {path} is damaged: {why}. Fix: delete {path} and {previous}, or start "
                              "fresh without --resume_from_checkpoint")
        return error

    @staticmethod
    def _check_files(accelerator, path: Path, damaged) -> None:
        """Every optimizer state file accelerate will read exists (it would stop with a bare FileNotFoundError)."""
        for i in range(len(getattr(accelerator, "_optimizers", []))):
            name = "optimizer.bin" if i == 0 else f"optimizer_{i}.bin"
            if not (path / name).is_file():
                raise damaged(f"{name} (the optimizer state) is missing")

    @staticmethod
    def _check_optimizer_shapes(accelerator, damaged) -> None:
        """Refuse optimizer state whose tensors do not have their parameters' shapes: torch loads it without a word
        and the first ``step()`` fails (or, with broadcasting, trains on garbage)."""
        for optimizer in getattr(accelerator, "_optimizers", []):
            optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds torch's optimizer
            for g, group in enumerate(optimizer.param_groups):
                for k, param in enumerate(group["params"]):
                    for key, value in optimizer.state.get(param, {}).items():
                        if key in PARAMETER_SHAPED and isinstance(value, torch.Tensor) and value.shape != param.shape:
                            raise damaged(f"its optimizer state {key!r} of parameter {k} (group {g}) has shape "
                                          f"{tuple(value.shape)}, the parameter {tuple(param.shape)}: it was saved "
                                          "for another model")
