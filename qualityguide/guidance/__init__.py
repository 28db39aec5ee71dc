"""Quality-guided sampling: the diffusers callback, and the clean-latent step it takes (from :mod:`qualityguide.diffusion`)."""

from ..diffusion.x0 import StepResult, frozen, per_sample_norm, x0_step
from .callback import QualityGuidance

__all__ = ["QualityGuidance", "x0_step", "StepResult", "per_sample_norm", "frozen"]
