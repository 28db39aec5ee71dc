"""Anchor-constrained perceptual LoRA fine-tuning (ACPO, docs/design.md section 7).

- :mod:`.config`: :class:`ACPOConfig`, the term weights and the quality input (one-step or K-step DDIM).
- :mod:`.loss`: :class:`ACPOLoss`, diffusion + anchor to the adapter-free base - quality, one dict per batch.
- :mod:`.lora`: add a LoRA adapter, switch it off for the base prediction, save and load it.
- :mod:`.training`: the training run's pieces (LoRA preparation, training samples, LoRA-only checkpoints, checks).
- :mod:`.validation`: validation images with fixed seeds, grids and scores, sent to trackers.

How SD, SDXL and pixel-space U-Nets are called and decoded (:class:`Denoiser`) and the K-step DDIM sample
(:func:`ddim_to_clean`) are shared maths in :mod:`qualityguide.diffusion`, re-exported here where they were first
published.
"""

from ..diffusion import Denoiser, LatentDenoiser, PixelDenoiser, ddim_to_clean, denoiser_for, k_step_timesteps
from .config import QUALITY_INPUTS, ACPOConfig
from .lora import (DEFAULT_TARGET_MODULES, adapters_disabled, add_lora, check_target_modules, load_lora,
                   lora_parameters, save_lora, tuner_layers)
from .loss import ACPOLoss

__all__ = ["QUALITY_INPUTS", "ACPOConfig", "ACPOLoss", "Denoiser", "LatentDenoiser", "PixelDenoiser", "denoiser_for",
           "DEFAULT_TARGET_MODULES", "adapters_disabled", "add_lora", "check_target_modules", "load_lora",
           "lora_parameters", "save_lora", "tuner_layers", "ddim_to_clean", "k_step_timesteps"]
