"""The one clean-latent gradient step, shared by LGDM's PMG and quality-guided sampling.

``x0' = x0 + scale * normalize(grad_x0 objective(x0))`` per sample. No backward through the
denoiser is needed (manifold-preserving guidance): only through whatever ``objective`` runs
(a VAE decoder and a scorer, or PMG's consistency terms).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Literal

import torch

from ..errors import InputError

Normalize = Literal["none", "unit", "rms"]
NORMALIZE = ("none", "unit", "rms")


@dataclass
class StepResult:
    """What :func:`x0_step` did.

    Attributes:
        x0: ``x0_in + delta``; keeps ``x0_in``'s graph, so gradients flow through the input while the
            correction itself is a constant (unless ``create_graph``).
        delta: the change applied (zero for skipped samples; detached unless ``create_graph``).
        objective: the objective per sample at the input ``[B]`` (detached).
        skipped: bool ``[B]``, samples whose gradient was not finite (left unchanged).
    """

    x0: torch.Tensor
    delta: torch.Tensor
    objective: torch.Tensor
    skipped: torch.Tensor


@contextmanager
def grad_flags_restored(params: Iterable[torch.nn.Parameter]):
    """Each parameter's ``requires_grad`` is put back on exit, whatever the body (or a library it calls) set.

    Args:
        params: the parameters whose flags to keep (read once, on entry).
    """
    flags = [(p, p.requires_grad) for p in params]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def frozen(*modules: torch.nn.Module | None):
    """Parameters need no gradient while guidance differentiates w.r.t. latents or images; each flag is restored
    afterwards (the modules usually belong to a user's pipeline)."""
    params = [p for m in modules if m is not None for p in m.parameters()]
    with grad_flags_restored(params):
        for p in params:
            p.requires_grad_(False)
        yield


def per_sample_norm(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of each sample in float32, shaped to broadcast against ``x``; safe at zero (gradient 0, not
    NaN)."""
    return x.float().pow(2).flatten(1).sum(1).clamp_min(1e-30).sqrt().view(-1, *([1] * (x.dim() - 1)))


def x0_step(x0: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor], scale: float | torch.Tensor,
            normalize: Normalize = "none", max_norm: float | None = None, create_graph: bool = False,
            warn: bool = True) -> StepResult:
    """Move ``x0`` along the gradient of ``objective`` (ascent for ``scale > 0``).

    Args:
        x0: clean estimate ``[B,...]`` (latents or pixels).
        objective: ``x0 -> [B]``, the quantity to increase (a score, or minus a distance).
        scale: step size (a float or a ``[B]`` tensor).
        normalize: ``"none"`` raw gradient; ``"unit"`` each sample's gradient scaled to norm 1 (the step
            has norm ``scale``); ``"rms"`` scaled to root-mean-square 1 (each element moves about ``scale``).
        max_norm: cap on each sample's change norm (None: no cap).
        create_graph: keep the graph so the step itself is differentiable (second order); otherwise the
            gradient is taken on a detached copy and treated as a constant.
        warn: warn when samples are skipped for a non-finite gradient.
    """
    if normalize not in NORMALIZE:
        raise InputError(f"normalize={normalize!r} is not allowed; use one of {', '.join(NORMALIZE)}")
    if max_norm is not None and not max_norm > 0:
        raise InputError(f"max_norm must be positive or None, got {max_norm!r}")
    with torch.enable_grad():
        if create_graph and x0.requires_grad:
            point = x0
        else:
            point = x0.detach().requires_grad_(True)
        value = objective(point)
        if value.dim() != 1 or value.shape[0] != x0.shape[0]:
            raise InputError(f"objective returned shape {tuple(value.shape)}; expected [{x0.shape[0]}] (one value "
                             "per sample)")
        (grad,) = torch.autograd.grad(value.sum(), point, create_graph=create_graph)
    finite = torch.isfinite(grad.detach().flatten(1)).all(1) & torch.isfinite(value.detach())
    shape = (-1,) + (1,) * (x0.dim() - 1)
    # Normalise in float32: in fp16 a norm's floor (1e-30) is 0, and 0/0 would turn a skipped or zero-gradient
    # sample into NaN. Skipped and zero-gradient samples get an exact zero step in every dtype.
    grad = torch.where(finite.view(shape), grad.float(), torch.zeros((), device=grad.device))
    if normalize != "none":
        norm = per_sample_norm(grad)
        if normalize == "rms":
            norm = norm / grad[0].numel() ** 0.5
        grad = torch.where(norm > 0, grad / norm.clamp_min(1e-30), torch.zeros((), device=grad.device))
    scale = torch.as_tensor(scale, device=x0.device, dtype=torch.float32)
    delta = (scale.view(shape) if scale.dim() else scale) * grad
    if max_norm is not None:
        delta = delta * (max_norm / per_sample_norm(delta)).clamp(max=1.0)
    skipped = ~finite
    if warn and bool(skipped.any()):
        warnings.warn(f"x0_step: non-finite gradient for sample(s) {skipped.nonzero().flatten().tolist()}; "
                      "their step was skipped", RuntimeWarning, stacklevel=2)
    delta = delta.to(x0.dtype) if create_graph else delta.detach().to(x0.dtype)
    return StepResult(x0=x0 + delta, delta=delta, objective=value.detach(), skipped=skipped)
