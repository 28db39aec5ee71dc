"""Clean-latent gradient steps and scheduler maths shared by LGDM's PMG and quality-guided sampling."""

from .schedule import alpha_bar, clean_estimate, ddim_sigma, ddim_update
from .x0 import StepResult, per_sample_norm, x0_step

__all__ = ["x0_step", "StepResult", "per_sample_norm", "alpha_bar", "clean_estimate", "ddim_update", "ddim_sigma"]
