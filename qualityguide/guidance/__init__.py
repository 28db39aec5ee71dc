"""Clean-latent gradient steps, scheduler maths and the quality-guidance callback for diffusers pipelines."""

from .callback import QualityGuidance
from .schedule import alpha_bar, alpha_bar_at, clean_estimate, ddim_sigma, ddim_update, is_sigma_parameterised
from .x0 import StepResult, frozen, per_sample_norm, x0_step

__all__ = ["x0_step", "StepResult", "per_sample_norm", "frozen", "alpha_bar", "alpha_bar_at", "clean_estimate",
           "ddim_update", "ddim_sigma", "is_sigma_parameterised", "QualityGuidance"]
