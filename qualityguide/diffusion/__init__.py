"""The diffusion maths every capability shares (LGDM, guidance, adapter, fine-tuning); imports nothing above it.

- :mod:`.schedule`: noise levels read off a scheduler's own tables (the one ``alphas_cumprod[t]`` lookup), the
  clean estimate for epsilon / v / sample prediction, DDIM updates, and which scheduler families are supported.
- :mod:`.families`: which schedulers guidance supports, and the noise levels and clean estimate of one sampling
  step for each family (VP, k-diffusion sigmas, EDM preconditioning).
- :mod:`.x0`: the one clean-latent gradient step (PMG and sampling guidance), :func:`frozen` and the flag restore.
- :mod:`.vae`: images in [0,1] <-> scaled latents at the VAE's [-1,1] boundary, half-precision safe.
- :mod:`.noising`: timestep sampling, forward noising, regression targets, the noise-prediction loss.
- :mod:`.conditioning`: SDXL detection (:func:`is_sdxl`) and SDXL's added conditions (``text_embeds``, ``time_ids``).
- :mod:`.denoisers`: the U-Net call convention (:func:`call_unet`) and the SD / SDXL / pixel U-Net strategies.
- :mod:`.k_step`: the differentiable K-step DDIM sample to the clean end (DRaFT-K).
"""

from .conditioning import (check_time_embedding_width, is_sdxl, sdxl_added_conditions, sdxl_time_ids,
                           unet_conditioning, unwrap)
from .denoisers import Conditioning, Denoiser, LatentDenoiser, PixelDenoiser, call_unet, denoiser_for, select
from .families import (SUPPORTED_SCHEDULERS, StepLevels, edm_clean_estimate, edm_scalings,
                       restarts_from_saved_sample, scheduler_family, step_levels)
from .k_step import ddim_to_clean, k_step_timesteps
from .noising import add_noise, noise_prediction_loss, one_step_clean, sample_timesteps, snr, training_target
from .schedule import PREDICTION_TYPES, alpha_bar, alpha_bar_at, clean_estimate, ddim_sigma, ddim_update
from .vae import decode_latents, encode_images, from_vae_range, pipeline_upcasts_vae, to_vae_range
from .x0 import NORMALIZE, StepResult, frozen, grad_flags_restored, per_sample_norm, x0_step

__all__ = ["check_time_embedding_width", "is_sdxl", "sdxl_added_conditions", "sdxl_time_ids", "unet_conditioning",
           "unwrap", "Conditioning", "Denoiser", "LatentDenoiser", "PixelDenoiser", "call_unet", "denoiser_for",
           "select", "SUPPORTED_SCHEDULERS", "StepLevels", "edm_clean_estimate", "edm_scalings",
           "restarts_from_saved_sample", "scheduler_family", "step_levels", "ddim_to_clean", "k_step_timesteps",
           "add_noise", "noise_prediction_loss", "one_step_clean", "sample_timesteps", "snr", "training_target",
           "PREDICTION_TYPES", "alpha_bar", "alpha_bar_at", "clean_estimate", "ddim_sigma", "ddim_update",
           "decode_latents", "encode_images", "from_vae_range", "pipeline_upcasts_vae", "to_vae_range", "NORMALIZE",
           "StepResult", "frozen", "grad_flags_restored", "per_sample_norm", "x0_step"]
