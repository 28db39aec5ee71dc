"""Training an IQA-Adapter: prompt encoding, condition dropout and the noise-prediction loss.

Only the adapter trains (its projection and per-layer key/value weights); the U-Net, VAE and text
encoders stay frozen. The loss is the ordinary noise-prediction MSE of
:mod:`qualityguide.diffusion.noising`; condition dropout (IQA-Adapter: text 5%, quality 1%, both 1%)
teaches the unconditional inputs that classifier-free guidance needs. Every random draw of a step
comes from the generator it is given, so a resumed run that rebuilds the generator for step ``s``
(:func:`qualityguide.train.data.step_generator`) repeats an uninterrupted run's losses exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..diffusion.conditioning import unet_conditioning
from ..diffusion.denoisers import call_unet
from ..diffusion.noising import add_noise, noise_prediction_loss, sample_timesteps, training_target
from ..errors import InputError
from ..train.prompts import PromptEncoder  # noqa: F401  (re-exported: the recipe's text inputs)
from .conditions import null_condition
from .wiring import unet_of


@dataclass
class DropoutConfig:
    """Per-sample condition dropout probabilities (exclusive events).

    Args:
        p_text: only the caption is replaced by the empty prompt's embedding.
        p_quality: only the quality condition is replaced by the null (all-zeros) input.
        p_both: both are dropped.
    """

    p_text: float = 0.05
    p_quality: float = 0.01
    p_both: float = 0.01

    def __post_init__(self):
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise InputError(f"{name}={value!r}: a probability in [0, 1]")
        if self.p_text + self.p_quality + self.p_both > 1:
            raise InputError(f"p_text + p_quality + p_both = {self.p_text + self.p_quality + self.p_both:g} > 1; "
                             "they are exclusive events")


def dropout_masks(batch: int, config: DropoutConfig, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(drop_text, drop_quality)`` boolean ``[batch]`` masks (CPU), from one uniform draw per sample."""
    u = torch.rand(batch, generator=generator)
    both = u < config.p_both
    text = (u >= config.p_both) & (u < config.p_both + config.p_text)
    quality = (u >= config.p_both + config.p_text) & (u < config.p_both + config.p_text + config.p_quality)
    return text | both, quality | both


class AdapterTrainer(nn.Module):
    """The trainable part (the adapter, a registered submodule) around a frozen U-Net (held, not registered).

    Its ``state_dict`` is the adapter's alone, so ``accelerator.prepare(trainer)`` wraps only trainable
    weights and ``accelerator.save_state`` stores only them. ``forward`` returns the loss terms.

    Args:
        adapter: an :class:`~qualityguide.adapter.IQAAdapter` or :class:`~qualityguide.adapter.ReferenceIQAAdapter`,
            attached to ``unet`` (float32 weights, e.g. ``attach(pipe, dtype=torch.float32)``).
        unet: the frozen ``UNet2DConditionModel`` (its parameters, LoRA ones included, get ``requires_grad=False``;
            the adapter's get ``True``: peft's ``add_adapter`` would otherwise have frozen them).
        scheduler: the pipeline's scheduler (``alphas_cumprod``, ``num_train_timesteps``, ``prediction_type``).
        snr_gamma: min-SNR-gamma loss weighting (None: plain MSE, as IQA-Adapter trains).
    """

    def __init__(self, adapter: nn.Module, unet, scheduler, snr_gamma: float | None = None):
        super().__init__()
        unet = unet_of(unet)
        if adapter.attached_unet is not unet:
            raise InputError("attach the adapter to this U-Net first: adapter.attach(pipe, dtype=torch.float32)")
        self.adapter = adapter
        object.__setattr__(self, "unet", unet)
        unet.requires_grad_(False)
        adapter.requires_grad_(True)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.prediction_type = scheduler.config.prediction_type
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.detach().float().clone(), persistent=False)
        self.snr_gamma = snr_gamma

    def forward(self, latents: torch.Tensor, encoder_hidden_states: torch.Tensor, condition: torch.Tensor,
                added_cond_kwargs: dict | None = None, drop_quality: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One batch's loss.

        Args:
            latents: clean latents ``z0`` ``[B,4,h,w]`` (scaled as the U-Net sees them).
            encoder_hidden_states, added_cond_kwargs: text inputs (:class:`PromptEncoder`, dropout applied).
            condition: adapter inputs ``[B, d]`` (``adapter.condition(...)``).
            drop_quality: rows whose condition is replaced by the null input.
            generator: the step's generator (CPU): timesteps, then noise.
        Returns:
            ``{"loss": scalar}`` (float32).
        """
        batch, device = latents.shape[0], latents.device
        if condition.shape != (batch, self.adapter.input_dim):
            raise InputError(f"condition must be [{batch}, {self.adapter.input_dim}], got {tuple(condition.shape)}")
        condition = condition.to(device=device, dtype=torch.float32)
        if drop_quality is not None:
            condition = torch.where(drop_quality.to(device).view(-1, 1), null_condition(batch, condition.shape[1],
                                                                                         like=condition), condition)
        timesteps = sample_timesteps(batch, self.num_train_timesteps, generator=generator, device=device)
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(device, latents.dtype)
        noisy = add_noise(latents, noise, timesteps, self.alphas_cumprod)
        target = training_target(latents, noise, timesteps, self.alphas_cumprod, self.prediction_type)
        added = {**(added_cond_kwargs or {}), "image_embeds": [condition.unsqueeze(1)]}
        unet_dtype = next(self.unet.parameters()).dtype
        output = call_unet(self.unet, noisy, timesteps, unet_conditioning(encoder_hidden_states, added), dtype=unet_dtype)
        loss = noise_prediction_loss(output, target, timesteps, self.alphas_cumprod, self.snr_gamma,
                                     self.prediction_type)
        return {"loss": loss}
