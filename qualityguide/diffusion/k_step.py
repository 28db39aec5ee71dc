"""The quality term's K-step input: a short deterministic DDIM sample from ``z_t`` to the clean end, differentiable
through its last steps (DRaFT-K, Clark et al. 2024, section 4.2), built from the shared schedule maths."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import InputError
from .schedule import alpha_bar_at, clean_estimate, ddim_update


def k_step_timesteps(timesteps: torch.Tensor, k_steps: int) -> list[torch.Tensor]:
    """Each sample's DDIM timesteps ``t * (k_steps - i) // k_steps`` for ``i = 0..k_steps-1`` (evenly spaced from
    its own ``t`` towards 0; the step after the last lands on the clean end)."""
    t = torch.as_tensor(timesteps).long()
    return [t * (k_steps - i) // k_steps for i in range(k_steps)]


def ddim_to_clean(first_output: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor,
                  predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], alphas_cumprod: torch.Tensor,
                  prediction_type: str = "epsilon", k_steps: int = 4, k_grad_steps: int | None = None) -> torch.Tensor:
    """A ``k_steps`` DDIM sample (eta=0) from ``sample`` at ``timesteps`` down to the clean end, float32.

    Step ``i`` predicts the clean sample and noise at ``tau_i`` (Tweedie) and moves to ``tau_{i+1}`` with
    ``z = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps`` (Song et al. 2021, eq. 12); the last step returns its clean
    estimate (``a_prev = 1``). ``k_steps=1`` is the one-step clean estimate.

    Args:
        first_output: the model's output at ``(sample, timesteps)`` (reused for the first step).
        sample: the noisy samples ``z_t`` ``[B,...]``.
        timesteps: their timesteps ``[B]``.
        predict: ``(z, tau) -> model output`` for the later steps (the LoRA model, same conditioning).
        alphas_cumprod: the training schedule's table.
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        k_steps: number of DDIM steps.
        k_grad_steps: how many of the last steps carry gradients (None: all); earlier ones run without.
    """
    if isinstance(k_steps, bool) or not isinstance(k_steps, int) or k_steps < 1:
        raise InputError(f"k_steps={k_steps!r} must be a whole number >= 1, e.g. 4")
    if k_grad_steps is not None and not 1 <= k_grad_steps <= k_steps:
        raise InputError(f"k_grad_steps={k_grad_steps!r} must lie in [1, k_steps={k_steps}] or be None")
    taus = k_step_timesteps(timesteps, k_steps)
    first_grad = k_steps - (k_steps if k_grad_steps is None else k_grad_steps)
    grad = torch.is_grad_enabled()
    z, output = sample.float(), (first_output.detach() if first_grad > 0 else first_output)
    for i, tau in enumerate(taus):
        with torch.set_grad_enabled(grad and i >= first_grad):
            if i > 0:
                output = predict(z.to(sample.dtype), tau.to(sample.device))
            x0, eps = clean_estimate(output.float(), z, alpha_bar_at(alphas_cumprod, tau, z), prediction_type)
            if i < k_steps - 1:
                z = ddim_update(x0, eps, alpha_bar_at(alphas_cumprod, taus[i + 1], z))
    return x0
