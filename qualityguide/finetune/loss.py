"""The ACPO loss (docs/design.md section 7): diffusion + anchor to the adapter-free base - perceptual quality.

One U-Net forward with gradients per step serves all three terms; the base prediction is the same U-Net with its
LoRA adapters switched off, run without gradients (no second copy of the U-Net).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..diffusion import (PREDICTION_TYPES, Conditioning, add_noise, ddim_to_clean, denoiser_for, frozen,
                         noise_prediction_loss, one_step_clean, pipeline_upcasts_vae, sample_timesteps, select,
                         training_target, unwrap)
from ..errors import InputError
from .config import ACPOConfig
from .lora import adapters_disabled, lora_parameters


def check_quality_scorer(scorer: nn.Module | None, config: ACPOConfig) -> None:
    """Refuse a missing or non-differentiable scorer when ``config.w_quality > 0`` (with 0 any scorer, or none, is
    fine: it is only logged)."""
    if config.w_quality == 0:
        return
    if scorer is None:
        raise InputError(f"w_quality={config.w_quality} needs a scorer; pass scorer=load_scorer(...) (--scorer SPEC), "
                         "or set w_quality=0")
    if not getattr(scorer, "differentiable", False):
        raise InputError(f"scorer {getattr(scorer, 'name', type(scorer).__name__)!r} is not differentiable, so it "
                         f"cannot train with w_quality={config.w_quality}; use a differentiable scorer (its "
                         ".differentiable is True: e.g. niqe-embedded@192, pyiqa:topiq_nr), or w_quality=0 to only "
                         "log its score")


class ACPOLoss:
    """Anchor-constrained perceptual loss for a U-Net carrying peft LoRA adapters.

    ``loss = w_diff * diffusion + w_anchor * anchor - w_quality * quality`` (see :class:`ACPOConfig`), where
    ``diffusion`` is the MSE of the U-Net's output to the training target (epsilon, or v for v-prediction
    schedulers), ``anchor`` the MSE of the same output to the adapter-free U-Net's output at the same input
    (epsilon or v), and ``quality`` the scorer's mean score of the decoded quality input of the samples with
    ``t <= t_quality_max`` (exactly 0, still differentiable, when there are none). Only LoRA parameters receive
    gradients: the U-Net's own weights must be frozen (:func:`add_lora` does it), and the VAE and scorer are frozen
    while the loss runs. Decoded images reach the scorer on the U-Net's device: move the scorer there. The loss holds
    no weights of its own, so it is a plain callable rather than an ``nn.Module`` (which would register the U-Net a
    second time in a recipe's module tree).

    Args:
        unet: a ``UNet2DConditionModel`` (SD, SDXL) or pixel-space ``UNet2DModel`` with a LoRA adapter (may be
            wrapped by ``accelerator.prepare``).
        scheduler: the training noise schedule (anything with ``alphas_cumprod`` and a ``prediction_type``, e.g.
            ``DDPMScheduler.from_config(pipe.scheduler.config)``).
        scorer: a differentiable :class:`~qualityguide.scorers.QualityScorer` (may be None when ``w_quality=0``;
            a non-differentiable one is accepted only then, for logging).
        config: the weights and options.
        vae: the VAE of a latent model (None for a ``UNet2DModel``).
        upcast_vae: decode an fp16 VAE in float32.
    """

    def __init__(self, unet: nn.Module, scheduler, scorer: nn.Module | None, config: ACPOConfig | None = None,
                 vae: nn.Module | None = None, upcast_vae: bool = False):
        self.config = ACPOConfig() if config is None else config
        if not isinstance(self.config, ACPOConfig):
            raise InputError(f"config must be an ACPOConfig, got {type(self.config).__name__}; build one with "
                             "ACPOConfig(...) or ACPOConfig.from_dict(d)")
        self.unet, self.scorer, self.vae = unet, scorer, vae
        self.denoiser = denoiser_for(unet, vae, upcast_vae)
        core = unwrap(unet)
        lora_parameters(core)
        trainable = [n for n, p in core.named_parameters() if p.requires_grad and "lora_" not in n]
        if trainable:
            raise InputError(f"{len(trainable)} non-LoRA U-Net parameters require gradients (e.g. {trainable[0]}); "
                             "ACPO trains LoRA only: freeze them with unet.requires_grad_(False) before adding the "
                             "adapter, or use qualityguide.finetune.add_lora(unet), which does")
        table = getattr(scheduler, "alphas_cumprod", None)
        if not isinstance(table, torch.Tensor):
            raise InputError(f"scheduler {type(scheduler).__name__} has no alphas_cumprod table; pass a VP training "
                             "scheduler, e.g. DDPMScheduler.from_config(pipe.scheduler.config)")
        self.alphas_cumprod = table.detach().float()
        self.num_train_timesteps = len(table)
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in PREDICTION_TYPES:
            raise InputError(f"scheduler prediction_type={self.prediction_type!r} is not supported; allowed: "
                             f"{', '.join(PREDICTION_TYPES)}")
        if self.config.t_quality_max >= self.num_train_timesteps:
            raise InputError(f"ACPOConfig.t_quality_max={self.config.t_quality_max} is outside the scheduler's "
                             f"{self.num_train_timesteps} training timesteps; use at most {self.num_train_timesteps - 1}")
        check_quality_scorer(scorer, self.config)

    @classmethod
    def from_pipeline(cls, pipe, scorer: nn.Module | None, config: ACPOConfig | None = None,
                      scheduler=None) -> ACPOLoss:
        """The loss for ``pipe.unet`` (with a LoRA adapter), decoding with ``pipe.vae`` when it has one.

        Args:
            pipe: a diffusers SD / SDXL / DDPM pipeline.
            scorer, config: as for the constructor.
            scheduler: the training schedule (default: ``pipe.scheduler``, whose ``alphas_cumprod`` it shares).
        """
        vae = getattr(pipe, "vae", None)
        return cls(pipe.unet, pipe.scheduler if scheduler is None else scheduler, scorer, config, vae=vae,
                   upcast_vae=vae is not None and pipeline_upcasts_vae(pipe))

    def quality_window(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Which samples of a batch of ``batch`` draw their timestep in the quality window ``[0, t_quality_max]``:
        each on its own with probability ``config.quality_fraction``, from one uniform draw per sample of
        ``generator`` (a CPU bool ``[batch]``). Per sample, so that a batch of 1 sees both windows in the configured
        proportion (a per-batch count would round it to all or nothing)."""
        return torch.rand(batch, generator=generator) < self.config.quality_fraction

    def draw_timesteps(self, batch: int, generator: torch.Generator | None = None,
                       device: str | torch.device | None = None) -> torch.Tensor:
        """``[batch]`` timesteps: uniform in ``[0, t_quality_max]`` for the samples of :meth:`quality_window`, uniform
        in ``(t_quality_max, num_train_timesteps)`` for the others (everything is the window when ``t_quality_max``
        is the last timestep).

        ``generator`` gives, in this order, the window draw and both candidate timesteps of every sample, so it
        advances by the same amount whatever the window holds (the noise drawn after it does not depend on it).
        """
        inside = self.quality_window(batch, generator)
        high = self.config.t_quality_max + 1
        low = sample_timesteps(batch, self.num_train_timesteps, generator, high=high)
        if high >= self.num_train_timesteps:
            return low.to(device)
        rest = sample_timesteps(batch, self.num_train_timesteps, generator, low=high)
        return torch.where(inside, low, rest).to(device)

    def __call__(self, clean: torch.Tensor, conditioning: Conditioning | None = None,
                 timesteps: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> dict[str, Any]:
        """The loss and its terms for one batch.

        Args:
            clean: clean model-space samples ``z0`` ``[B,C,h,w]``: scaled VAE latents (``self.denoiser.encode``), or
                pixels in [-1,1] for a ``UNet2DModel``.
            conditioning: U-Net keyword arguments, one row per sample: SD ``{"encoder_hidden_states": ...}``, SDXL
                also ``"added_cond_kwargs": {"text_embeds": ..., "time_ids": ...}``; None for a ``UNet2DModel``.
            timesteps: ``[B]`` training timesteps (None: :meth:`draw_timesteps`).
            noise: the noise ``eps`` (None: drawn with ``generator``).
            generator: a CPU generator for reproducible timesteps and noise.

        Returns:
            ``{"loss": total (backpropagate this), "diffusion", "anchor", "quality" (mean score, higher is better),
            "quality_samples" (how many samples were scored), "timesteps"}``.
        """
        cfg = self.config
        if not isinstance(clean, torch.Tensor) or clean.dim() < 2:
            raise InputError(f"clean must be a batch tensor [B,C,h,w], got {type(clean).__name__}")
        batch = clean.shape[0]
        conditioning = self.denoiser.check_conditioning(conditioning, batch)
        t = self._timesteps(timesteps, batch, generator, clean.device)
        if noise is None:
            noise = (torch.randn(clean.shape, generator=generator) if generator is not None
                     else torch.randn_like(clean, dtype=torch.float32)).to(clean.device, clean.dtype)
        elif noise.shape != clean.shape:
            raise InputError(f"noise {tuple(noise.shape)} must have the shape of clean {tuple(clean.shape)}")
        table = self.alphas_cumprod
        z_t = add_noise(clean, noise, t, table)
        target = training_target(clean, noise, t, table, self.prediction_type)
        with torch.no_grad(), adapters_disabled(unwrap(self.unet)):
            base = self.denoiser.predict(z_t, t, conditioning)
        output = self.denoiser.predict(z_t, t, conditioning)
        diffusion = noise_prediction_loss(output, target, t, table, cfg.snr_gamma, self.prediction_type)
        anchor = noise_prediction_loss(output, base.detach())
        quality, count = self._quality(output, z_t, t, conditioning)
        total = cfg.w_diff * diffusion + cfg.w_anchor * anchor - cfg.w_quality * quality
        return {"loss": total, "diffusion": diffusion, "anchor": anchor, "quality": quality,
                "quality_samples": count, "timesteps": t}

    def _timesteps(self, timesteps, batch: int, generator, device) -> torch.Tensor:
        if timesteps is None:
            return self.draw_timesteps(batch, generator, device)
        t = torch.as_tensor(timesteps, device=device)
        if t.is_floating_point() and not bool((t == t.round()).all()):
            raise InputError("timesteps must be whole training timesteps (ACPO trains on the discrete schedule); got "
                             f"{t.flatten()[:4].tolist()}")
        t = t.long().reshape(-1)
        if t.numel() != batch or bool(((t < 0) | (t >= self.num_train_timesteps)).any()):
            raise InputError(f"timesteps must be {batch} values in [0, {self.num_train_timesteps - 1}], got "
                             f"{t.tolist()[:8]}")
        return t

    def _quality(self, output: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor,
                 conditioning: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """Mean score of the quality input of the samples with ``t <= t_quality_max`` (only those are decoded)."""
        cfg = self.config
        index = (t <= cfg.t_quality_max).nonzero().flatten()
        if self.scorer is None or index.numel() == 0:
            return output.float().sum() * 0.0, 0  # exactly 0 and still part of the graph
        with frozen(self.vae, self.scorer), torch.set_grad_enabled(torch.is_grad_enabled() and cfg.w_quality > 0):
            if cfg.quality_input == "one_step":
                clean = one_step_clean(output[index], z_t[index], t[index], self.alphas_cumprod, self.prediction_type)
            else:
                cond = select(conditioning, index)
                clean = ddim_to_clean(output[index], z_t[index], t[index],
                                      lambda z, tau: self.denoiser.predict(z, tau, cond), self.alphas_cumprod,
                                      self.prediction_type, cfg.k_steps, cfg.k_grad_steps)
            images = self.denoiser.decode(clean)
            scores = self.scorer(images)
        return scores.float().mean().to(output.device), int(index.numel())
