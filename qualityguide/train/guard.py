"""Stop a run before a non-finite loss reaches the optimizer, and average loss terms over processes for logs."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..errors import InputError, TrainingError


def _value(value: torch.Tensor | float) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise InputError(f"loss terms must be scalars, got a tensor of shape {tuple(value.shape)}; reduce it "
                             "(e.g. .mean()) first")
        return float(value.detach().float().item())
    return float(value)


def check_finite(losses: Mapping[str, torch.Tensor | float], step: int) -> None:
    """Raise :class:`TrainingError` naming every NaN or infinite term; call it after ``backward()`` and before
    ``optimizer.step()``, so the weights saved in the last checkpoint stay finite.

    Include ``"grad_norm": accelerator.clip_grad_norm_(...)`` to catch non-finite gradients of a finite loss too.
    One ``.item()`` per term (a device sync); with several processes the failing one stops and ``accelerate
    launch`` ends the others.

    Args:
        losses: term name -> scalar tensor or float (e.g. ``{"diffusion": ..., "anchor": ..., "quality": ...}``).
        step: the optimizer step, for the message.
    """
    values = {name: _value(v) for name, v in losses.items()}
    bad = {name: v for name, v in values.items() if not math.isfinite(v)}
    if bad:
        others = ", ".join(f"{n}={v:.4g}" for n, v in values.items() if n not in bad) or "none"
        terms = ", ".join(f"{n!r} is {v}" for n, v in bad.items())
        raise TrainingError(f"step {step}: loss term {terms} (finite terms: {others}); stopped before the optimizer "
                            "step. Fix: lower the learning rate or a loss weight, train in bf16 or fp32 instead of "
                            "fp16, and resume with --resume_from_checkpoint latest")


def check_step_finite(values: Mapping[str, torch.Tensor | float], grad_norm: torch.Tensor | float, step: int,
                      mixed_precision: str) -> None:
    """:func:`check_finite` on a step's loss terms and gradient norm, as both recipes call it before
    ``optimizer.step()``.

    Under fp16 the gradient norm is left out: the GradScaler makes it infinite on purpose when the scale overflows
    and then skips that optimizer step itself (and lowers the scale), so an infinite norm there is not a failure.
    Elsewhere a non-finite norm of a finite loss is one.

    Args:
        values: term name -> scalar (already averaged over processes, so all processes stop together).
        grad_norm: ``accelerator.clip_grad_norm_(...)``.
        step: the optimizer step, for the message.
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"``.
    """
    check_finite({**values, **({} if mixed_precision == "fp16" else {"grad_norm": grad_norm})}, step)


def mean_over_processes(losses: Mapping[str, torch.Tensor | float], accelerator) -> dict[str, float]:
    """Each term averaged over all processes (one collective for all terms), as floats for logging.

    Args:
        losses: term name -> scalar tensor or float, the same names on every process.
        accelerator: the run's ``accelerate.Accelerator``.
    """
    names = list(losses)
    if not names:
        return {}
    local = torch.tensor([_value(losses[n]) for n in names], dtype=torch.float64, device=accelerator.device)
    mean = accelerator.reduce(local, reduction="mean")
    return dict(zip(names, mean.cpu().tolist()))
