"""What runs around the models: the entry points' setup, devices, processes and timing.

- :func:`quiet_third_party`: what our entry points (the CLI, the recipes, the evals' ``main``) set up before they
  import the model stack. Library use (``import qualityguide``) calls none of it, so it changes no logging and no
  environment.
- :func:`check_device`: refuse a device that does not exist here, with one line that names it and lists what
  does. It is the one check :func:`qualityguide.load_scorer`, :func:`qualityguide.load_pipeline` and the CLI's
  ``--device`` share, so that ``cuda:7`` on a two-GPU machine, ``cuda`` without CUDA or ``meta`` (shapes without
  values: nothing can be scored on it) fail before anything is built, not deep inside torch.
- :func:`launched`, :func:`process_state`, :func:`split_for_process`: work sharded over ``accelerate launch``
  processes, shared by LGDM extraction, ``score``/``label`` and the recipes.
- :func:`run_main`: the one exit wrapper of the CLI and the recipes: a user's error is one line on stderr and exit
  code 2, Ctrl-C a resume hint and 130, never a traceback.
- :func:`synchronize`, :func:`timed`: wall-clock timing that waits for the GPU (evals' benchmarks, timed
  generation).
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import time
import warnings
from typing import Callable, Mapping, Sequence

import torch

from .errors import InputError, QualityGuideError

# Packages whose warnings a command-line user cannot act on; library users (import qualityguide) keep them all.
THIRD_PARTY = ("bitsandbytes", "kernels", "diffusers", "transformers", "huggingface_hub")

# bitsandbytes' CPU backend fetches this kernel from the Hugging Face Hub at import on CPUs with AVX512-BF16
# (bitsandbytes/backends/cpu/ops.py); it serves only 4-bit CPU inference, which nothing here runs.
BNB_CPU_KERNEL = "kernels-community/quantization-bitsandbytes"


def keep_bitsandbytes_off_the_hub() -> None:
    """Point the ``kernels`` package's ``LOCAL_KERNELS`` override for bitsandbytes' CPU kernel at an empty path.

    diffusers and peft import bitsandbytes whenever it is installed, quantizing or not, and its import calls
    ``kernels.get_kernel`` for that kernel: online a hub query (publisher check, download), offline two log
    lines. With a local override ``kernels`` looks only at that path, finds no build there and raises, which
    bitsandbytes catches and logs; its other kernels (the 8-bit optimizers on CUDA) are untouched. Must run
    before bitsandbytes is first imported; an override the user set for the same kernel wins.
    """
    current = os.environ.get("LOCAL_KERNELS", "")
    if any(entry.split("=", 1)[0] == BNB_CPU_KERNEL for entry in current.split(":") if entry):
        return
    entry = f"{BNB_CPU_KERNEL}={os.devnull}"
    os.environ["LOCAL_KERNELS"] = f"{current}:{entry}" if current else entry


def quiet_third_party(quiet: bool = False) -> None:
    """Keep stderr for qualityguide's own lines: third-party warnings off (their errors still print).

    Seen here: bitsandbytes, which diffusers and peft import, and the ``kernels`` package it calls log about a
    CPU kernel at import (see :func:`keep_bitsandbytes_off_the_hub`, called here too); diffusers logs
    hub-connection notices for cached hub ids when offline. The Hugging Face libraries read their verbosity
    from the environment when first used (a value the user set wins); bitsandbytes and ``kernels`` log through
    plain ``logging``. Call it first thing in an entry point, before the model stack is imported.

    Args:
        quiet: also drop the progress bars of the model loaders (diffusers' "Loading pipeline components",
            transformers' "Loading weights") and of huggingface_hub's downloads.
    """
    keep_bitsandbytes_off_the_hub()
    for variable, library in (("DIFFUSERS_VERBOSITY", "diffusers"), ("TRANSFORMERS_VERBOSITY", "transformers"),
                              ("HF_HUB_VERBOSITY", "huggingface_hub")):
        if variable not in os.environ:
            os.environ[variable] = "error"
            # also when the library is imported already (qualityguide's hub classes import huggingface_hub), so
            # the variable was read before it was set: its root logger is where the verbosity lives
            logging.getLogger(library).setLevel(logging.ERROR)
    for name in ("bitsandbytes", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=rf"({'|'.join(THIRD_PARTY)})(\.|$)")
    if quiet:
        from diffusers.utils import logging as diffusers_logging
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        disable_progress_bars()


def release_processes() -> None:
    """Leave the ``torch.distributed`` process group this process joined under ``accelerate launch``, if any.

    Call it when an entry point's work is done: a process that exits still holding a gloo group can abort at exit
    ("terminate called without an active exception", SIGABRT) after finishing its work, and the launcher then
    reports the whole run as failed. A process that joined none is left as it is.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# Devices

RESUME_HINT = "rerun the same command to resume"


def run_main(main: Callable[[], int], prog: str | None = None, resume_hint: str = RESUME_HINT,
             exit_codes: Mapping[type[QualityGuideError], int] | None = None) -> int:
    """``main()``'s exit code, with the errors a user can act on as one line on stderr instead of a traceback.

    A :class:`~qualityguide.errors.QualityGuideError` prints ``PROG: error: MESSAGE`` (``error: MESSAGE`` without
    a ``prog``) and returns 2, the code argparse gives bad usage; Ctrl-C prints ``interrupted; RESUME_HINT`` and
    returns 130 (128 + SIGINT, as a shell reports it). Other exceptions are bugs and keep their traceback.

    Args:
        main: the entry point, called with no arguments; returns the exit code.
        prog: the name that starts the error line, as the user typed it (``"qualityguide score"``).
        resume_hint: how to continue after an interrupt; every entry point here keeps finished work.
        exit_codes: other codes for some error types (the first type the error is an instance of wins), e.g.
            ``{TrainingError: 1}`` where a stopped run is not a usage error.
    """
    try:
        return main()
    except QualityGuideError as exc:
        print(f"{prog}: error: {exc}" if prog else f"error: {exc}", file=sys.stderr)
        return next((code for kind, code in (exit_codes or {}).items() if isinstance(exc, kind)), 2)
    except KeyboardInterrupt:
        print(f"interrupted; {resume_hint}", file=sys.stderr)
        return 130


def available_devices() -> list[str]:
    """The devices this machine can compute on: ``cpu``, then ``cuda:0``... and ``mps`` where present."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def check_device(device: str | torch.device, argument: str = "device") -> torch.device:
    """``device`` as a :class:`torch.device` if it exists on this machine, else an :class:`InputError`.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, a :class:`torch.device`, ...
        argument: how to name the argument in the message (``"--device"`` on the command line).
    """
    def show(value: str) -> str:  # as the user wrote it: `--device cuda:7` or `device='cuda:7'`
        return f"{argument} {value}" if argument.startswith("-") else f"{argument}={value!r}"

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"{show(str(device))} is not a torch device; use one of: "
                         f"{', '.join(available_devices())}") from None
    fix = f"devices here: {', '.join(available_devices())}; pass one of them, e.g. {show('cpu')}"
    if parsed.type == "meta":
        raise InputError(f"{show(str(parsed))}: the meta device holds shapes but no values, so nothing can be "
                         f"computed on it; {fix}")
    if parsed.type == "cpu":
        return parsed
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{show(str(parsed))}: CUDA is not available on this machine (no GPU, or no driver "
                             f"torch can use); {fix}")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise InputError(f"{show(str(parsed))}: no such GPU; {fix}")
        return parsed
    backend = getattr(torch.backends, parsed.type, None) or getattr(torch, parsed.type, None)
    is_available = getattr(backend, "is_available", None)
    if callable(is_available) and not is_available():
        raise InputError(f"{show(str(parsed))}: {parsed.type} is not available on this machine; {fix}")
    return parsed


# Processes

def launched() -> bool:
    """Whether this process is one of several started by ``accelerate launch`` (or ``torchrun``), read from the
    ``WORLD_SIZE`` they set, so that a plain run never imports accelerate."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def process_state(cpu: bool = False):
    """accelerate's per-process state; CPU processes (``--device cpu`` or ``ACCELERATE_USE_CPU=1``) join a gloo
    group when launched with several processes."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=cpu or parse_flag_from_env("ACCELERATE_USE_CPU"))


def split_for_process(state, items: Sequence) -> list:
    """This process's contiguous share of ``items`` (accelerate's ``split_between_processes``).

    No padding: a process with nothing left gets an empty list rather than a repeat of the last item,
    so no image or prompt is done twice. One process gets everything.
    """
    with state.split_between_processes(list(items)) as mine:
        return list(mine)


# Timing

def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued CUDA work on ``device`` (no-op elsewhere), so a timer measures the work itself."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device | str | None, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
