"""Forward noising and the training maths of noise-prediction models (VP schedules): timestep sampling, noising,
the regression target, the loss and the one-step clean estimate. Used by the IQA-Adapter and ACPO losses.

``z_t = sqrt(a_t) z_0 + sqrt(1 - a_t) eps`` with ``a_t = alphas_cumprod[t]`` (Ho et al. 2020, eq. 4).
"""

from __future__ import annotations

from typing import Literal

import torch

from ..errors import InputError
from .schedule import PREDICTION_TYPES, alpha_bar_at, clean_estimate

Reduction = Literal["none", "mean"]


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator | None = None,
                     device: str | torch.device | None = None, low: int = 0, high: int | None = None) -> torch.Tensor:
    """Timesteps drawn uniformly from ``[low, high)`` (default: every training timestep), ``[batch]`` long.

    Args:
        batch: how many.
        num_train_timesteps: the scheduler's ``config.num_train_timesteps``.
        generator: a CPU generator for reproducible draws (the draw happens on the CPU, then moves to ``device``).
        low, high: the range, e.g. ``high=t_quality_max + 1`` for a loss applied near the clean end only.
    """
    high = num_train_timesteps if high is None else high
    if not 0 <= low < high <= num_train_timesteps:
        raise InputError(f"need 0 <= low < high <= num_train_timesteps ({num_train_timesteps}), got low={low}, "
                         f"high={high}")
    return torch.randint(low, high, (batch,), generator=generator).to(device)


def add_noise(z0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``z_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps`` per sample (what ``DDPMScheduler.add_noise`` computes)."""
    a = alpha_bar_at(alphas_cumprod, timesteps, z0)
    return (a.sqrt() * z0.float() + (1 - a).sqrt() * noise.float()).to(z0.dtype)


def training_target(z0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                    prediction_type: str = "epsilon") -> torch.Tensor:
    """What the network regresses: ``eps``, ``v = sqrt(a_t) eps - sqrt(1 - a_t) z0`` (Salimans & Ho 2022) or ``z0``."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = alpha_bar_at(alphas_cumprod, timesteps, z0)
        return (a.sqrt() * noise.float() - (1 - a).sqrt() * z0.float()).to(z0.dtype)
    if prediction_type == "sample":
        return z0
    raise InputError(f"prediction_type {prediction_type!r} is not supported; allowed: {', '.join(PREDICTION_TYPES)}")


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``a_t / (1 - a_t)`` per timestep ``[B]`` (float32)."""
    a = alpha_bar_at(alphas_cumprod, timesteps)
    return a / (1 - a)


def noise_prediction_loss(model_output: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor | None = None,
                          alphas_cumprod: torch.Tensor | None = None, snr_gamma: float | None = None,
                          prediction_type: str = "epsilon", reduction: Reduction = "mean") -> torch.Tensor:
    """Mean squared error per sample, optionally min-SNR-gamma weighted (Hang et al. 2023), in float32.

    Args:
        model_output, target: ``[B,...]``.
        timesteps, alphas_cumprod: needed for ``snr_gamma``.
        snr_gamma: weight each sample by ``min(SNR, gamma) / SNR`` (epsilon), ``min(SNR, gamma) / (SNR + 1)``
            (v-prediction) or ``min(SNR, gamma)`` (sample); None: unweighted.
        reduction: ``"none"`` returns ``[B]``, ``"mean"`` a scalar.
    """
    if model_output.shape != target.shape:
        raise InputError(f"model_output {tuple(model_output.shape)} and target {tuple(target.shape)} differ in shape")
    per_sample = (model_output.float() - target.float()).pow(2).flatten(1).mean(1)
    if snr_gamma is not None:
        if timesteps is None or alphas_cumprod is None:
            raise InputError("snr_gamma needs timesteps and alphas_cumprod")
        if not snr_gamma > 0:
            raise InputError(f"snr_gamma must be positive or None, got {snr_gamma!r}")
        ratio = snr(alphas_cumprod, timesteps).to(per_sample.device)
        clipped = ratio.clamp(max=snr_gamma)
        weight = {"epsilon": clipped / ratio, "v_prediction": clipped / (ratio + 1), "sample": clipped}.get(prediction_type)
        if weight is None:
            raise InputError(f"prediction_type {prediction_type!r} is not supported; allowed: "
                             f"{', '.join(PREDICTION_TYPES)}")
        per_sample = per_sample * weight
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    raise InputError(f"reduction={reduction!r} is not allowed; use 'none' or 'mean'")


def one_step_clean(model_output: torch.Tensor, z_t: torch.Tensor, timesteps: torch.Tensor,
                   alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon") -> torch.Tensor:
    """The clean estimate ``z0|t`` of each sample at its own timestep (float32; differentiable)."""
    a = alpha_bar_at(alphas_cumprod, timesteps, z_t)
    return clean_estimate(model_output.float(), z_t.float(), a, prediction_type)[0]
