"""Noise-schedule maths shared by PMG and sampling guidance, read off a scheduler's own tables.

VP parameterisation: ``z_t = sqrt(a_t) z_0 + sqrt(1 - a_t) eps`` with ``a_t = alphas_cumprod[t]``.
"""

from __future__ import annotations

import torch

from ..errors import InputError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def alpha_bar_at(alphas_cumprod: torch.Tensor, timesteps: int | torch.Tensor,
                 like: torch.Tensor | None = None) -> torch.Tensor:
    """``alphas_cumprod[t]`` in float32: the one lookup of a noise level in a VP table.

    Args:
        alphas_cumprod: the scheduler's table.
        timesteps: one timestep (a scalar result) or one per sample of ``like`` (``[B,1,...]``, to broadcast).
        like: the batch the levels scale, whose device they take; None: ``[B]`` levels on the table's device.
    """
    n = len(alphas_cumprod)
    t = torch.as_tensor(timesteps, device=alphas_cumprod.device).long()
    if like is not None and t.dim() > 0:
        t = t.reshape(-1)
        if t.numel() != like.shape[0]:
            raise InputError(f"got {t.numel()} timesteps for a batch of {like.shape[0]}; pass one per sample")
    if bool(((t < 0) | (t >= n)).any()):
        raise InputError(f"timesteps must lie in [0, {n - 1}] (the scheduler's {n} training timesteps), got min "
                         f"{int(t.min())}, max {int(t.max())}")
    a = alphas_cumprod.to(torch.float32)[t]
    if like is None:
        return a
    return a.to(like.device).view(-1, *([1] * (like.dim() - 1))) if t.dim() > 0 else a.to(like.device)


def alpha_bar(scheduler, timestep: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``alphas_cumprod[t]`` as a float32 scalar tensor on ``like``'s device (t < 0 means 1: the clean end)."""
    t = int(timestep)
    if t < 0:
        return torch.ones((), device=like.device, dtype=torch.float32)
    return alpha_bar_at(scheduler.alphas_cumprod, t, like)


def clean_estimate(model_output: torch.Tensor, sample: torch.Tensor, a_t: torch.Tensor,
                   prediction_type: str = "epsilon") -> tuple[torch.Tensor, torch.Tensor]:
    """Tweedie's estimate of the clean sample and the implied noise, ``(z0|t, eps_t)``.

    Args:
        model_output: the network's prediction at ``sample``.
        sample: the noisy sample ``z_t``.
        a_t: ``alphas_cumprod[t]`` (scalar tensor).
        prediction_type: ``"epsilon"`` (DDPM), ``"v_prediction"`` (Salimans & Ho 2022) or ``"sample"``.
    """
    sqrt_a, sqrt_1ma = a_t.sqrt(), (1 - a_t).sqrt()
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - sqrt_1ma * eps) / sqrt_a  # Tweedie, Algorithm 1 line 6 (Saini et al. 2025)
    elif prediction_type == "v_prediction":
        x0 = sqrt_a * sample - sqrt_1ma * model_output
        eps = sqrt_a * model_output + sqrt_1ma * sample
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - sqrt_a * x0) / sqrt_1ma
    else:
        raise InputError(f"prediction_type {prediction_type!r} is not supported; allowed: {', '.join(PREDICTION_TYPES)}")
    return x0, eps


def ddim_update(x0: torch.Tensor, eps: torch.Tensor, a_prev: torch.Tensor, sigma: torch.Tensor | float = 0.0,
                noise: torch.Tensor | None = None) -> torch.Tensor:
    """One DDIM step to the previous noise level (Song et al. 2021, eq. 12, with the standard plus sign).

    ``z_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma * noise``.
    """
    sigma = torch.as_tensor(sigma, device=x0.device, dtype=torch.float32)
    direction = (1 - a_prev - sigma**2).clamp_min(0).sqrt() * eps
    out = a_prev.sqrt() * x0 + direction
    if noise is not None and float(sigma) > 0:
        out = out + sigma * noise
    return out


def ddim_sigma(a_t: torch.Tensor, a_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """DDIM's sigma_t(eta) (Song et al. 2021, eq. 16); eta=0 is deterministic DDIM, eta=1 DDPM-like."""
    return eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp_min(0).sqrt()
