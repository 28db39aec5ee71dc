"""Refuse a device that does not exist here, with one line that names it and lists what does.

:func:`check_device` is the one check :func:`qualityguide.load_scorer`, :func:`qualityguide.load_pipeline` and the
CLI's ``--device`` share, so that ``cuda:7`` on a two-GPU machine, ``cuda`` without CUDA or ``meta`` (shapes
without values: nothing can be scored on it) fail before anything is built, not deep inside torch.
"""

from __future__ import annotations

import torch

from .errors import InputError


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
