"""The diffusion maths every capability shares (LGDM, guidance, adapter, fine-tuning); imports nothing above it.

- :mod:`.schedule`: noise levels read off a scheduler's own tables, the clean estimate for epsilon / v /
  sample prediction, DDIM updates, and which scheduler families are supported.
- :mod:`.families`: which schedulers guidance supports, and the noise levels and clean estimate of one sampling
  step for each family (VP, k-diffusion sigmas, EDM preconditioning).
- :mod:`.x0`: the one clean-latent gradient step (PMG and sampling guidance) and :func:`frozen`.
- :mod:`.vae`: images in [0,1] <-> scaled latents at the VAE's [-1,1] boundary, half-precision safe.
- :mod:`.training`: timestep sampling, forward noising, regression targets, the noise-prediction loss.
"""

from .families import (SUPPORTED_SCHEDULERS, StepLevels, edm_clean_estimate, edm_scalings,
                       restarts_from_saved_sample, scheduler_family, step_levels)
from .schedule import PREDICTION_TYPES, alpha_bar, clean_estimate, ddim_sigma, ddim_update
from .training import add_noise, noise_prediction_loss, one_step_clean, sample_timesteps, snr, training_target
from .vae import decode_latents, encode_images, from_vae_range, pipeline_upcasts_vae, to_vae_range
from .x0 import NORMALIZE, StepResult, frozen, per_sample_norm, x0_step

__all__ = ["SUPPORTED_SCHEDULERS", "StepLevels", "edm_clean_estimate", "edm_scalings", "restarts_from_saved_sample",
           "scheduler_family", "step_levels", "PREDICTION_TYPES", "alpha_bar", "clean_estimate",
           "ddim_sigma", "ddim_update", "add_noise", "noise_prediction_loss", "one_step_clean", "sample_timesteps", "snr", "training_target", "decode_latents", "encode_images", "from_vae_range", "pipeline_upcasts_vae",
           "to_vae_range", "NORMALIZE", "StepResult", "frozen", "per_sample_norm", "x0_step"]
