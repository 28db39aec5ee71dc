"""How to call each U-Net type and turn its clean samples into images: the call convention and small strategy objects.

- :func:`call_unet`: the one way the library calls a diffusers U-Net (raw output, one timestep per sample).
- :class:`LatentDenoiser`: ``UNet2DConditionModel`` on VAE latents (SD 1.x/2.x: ``encoder_hidden_states``; SDXL
  also ``added_cond_kwargs`` with ``text_embeds`` and ``time_ids``); the decoder is the VAE.
- :class:`PixelDenoiser`: ``UNet2DModel`` on pixels in [-1,1] (``DDPMPipeline``), unconditional; the decoder is
  the identity up to the [-1,1] -> [0,1] map.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from .conditioning import is_sdxl, unwrap
from .vae import decode_latents, encode_images, from_vae_range, to_vae_range

Conditioning = Mapping[str, Any]


def call_unet(unet: nn.Module, sample: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning | None = None,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """The U-Net's raw output (epsilon, v or sample) at ``sample``: diffusers' call convention in one place.

    Args:
        unet: a ``UNet2DConditionModel`` or ``UNet2DModel``, possibly DDP-wrapped (called through the wrapper, so
            gradients are synchronised).
        sample: the noisy model input ``[B,...]``.
        timesteps: one timestep per sample ``[B]``.
        conditioning: keyword arguments (:func:`~qualityguide.diffusion.unet_conditioning`); None: unconditional.
        dtype: cast ``sample`` and ``encoder_hidden_states`` to it first (the U-Net's dtype, for frozen half-precision
            models called with float32 inputs); None: as given (mixed-precision training casts under autocast).
    """
    kwargs = dict(conditioning or {})
    if dtype is not None:
        sample = sample.to(dtype)
        if isinstance(kwargs.get("encoder_hidden_states"), torch.Tensor):
            kwargs["encoder_hidden_states"] = kwargs["encoder_hidden_states"].to(dtype)
    return unet(sample, timesteps, **kwargs, return_dict=False)[0]


def select(conditioning: Conditioning, index: torch.Tensor) -> dict[str, Any]:
    """The conditioning of the samples at ``index`` (every tensor is indexed along its batch dimension)."""
    out = {}
    for key, value in conditioning.items():
        if isinstance(value, torch.Tensor):
            out[key] = value[index.to(value.device)]
        elif isinstance(value, Mapping):
            out[key] = select(value, index)
        else:
            out[key] = value
    return out


class Denoiser:
    """One U-Net type: how to call it and how to decode its clean samples."""

    def __init__(self, unet: nn.Module):
        self.unet = unet

    def check_conditioning(self, conditioning: Conditioning | None, batch: int) -> dict[str, Any]:
        """The conditioning as U-Net keyword arguments, validated against a batch of ``batch``."""
        raise NotImplementedError

    def predict(self, sample: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The U-Net's output (epsilon, v or sample) at ``sample``, one timestep per sample."""
        return call_unet(self.unet, sample, timesteps, conditioning)

    def decode(self, clean: torch.Tensor) -> torch.Tensor:
        """Clean model-space samples -> images ``[B,3,H,W]`` in [0,1] (float32, differentiable)."""
        raise NotImplementedError

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0,1] -> the clean model-space samples the loss takes."""
        raise NotImplementedError


def _check_batch(name: str, value: object, batch: int, fix: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise InputError(f"conditioning[{name!r}] is missing or not a tensor (got {type(value).__name__}); {fix}")
    if value.shape[0] != batch:
        raise InputError(f"conditioning[{name!r}] has batch {value.shape[0]}, the latents {batch}; pass one row per "
                         "sample (repeat it with .repeat_interleave)")


class LatentDenoiser(Denoiser):
    """``UNet2DConditionModel`` on scaled VAE latents; SDXL when its config has ``addition_embed_type="text_time"``.

    Args:
        unet: the (adapted) U-Net.
        vae: the pipeline's ``AutoencoderKL``.
        upcast_vae: decode an fp16 VAE in float32 (``qualityguide.diffusion.pipeline_upcasts_vae(pipe)``).
    """

    def __init__(self, unet: nn.Module, vae: nn.Module, upcast_vae: bool = False):
        super().__init__(unet)
        self.vae, self.upcast_vae = vae, upcast_vae
        self.sdxl = is_sdxl(unet)

    def check_conditioning(self, conditioning: Conditioning | None, batch: int) -> dict[str, Any]:
        conditioning = dict(conditioning or {})
        allowed = ("encoder_hidden_states", "added_cond_kwargs") if self.sdxl else ("encoder_hidden_states",)
        extra = sorted(set(conditioning) - set(allowed))
        if extra:
            raise InputError(f"conditioning keys {extra} are not used by this "
                             f"{'SDXL' if self.sdxl else 'SD'} U-Net; allowed: {', '.join(allowed)}")
        _check_batch("encoder_hidden_states", conditioning.get("encoder_hidden_states"), batch,
                     "pass the prompt embeddings, e.g. pipe.encode_prompt(...)[0]")
        if self.sdxl:
            added = conditioning.get("added_cond_kwargs")
            fix = ("SDXL needs added_cond_kwargs={'text_embeds': pooled prompt embeddings, 'time_ids': ...}, one "
                   "row per sample: build it with qualityguide.diffusion.sdxl_added_conditions")
            if not isinstance(added, Mapping):
                raise InputError(f"conditioning['added_cond_kwargs'] is missing; {fix}")
            for key in ("text_embeds", "time_ids"):
                _check_batch(f"added_cond_kwargs.{key}", added.get(key), batch, fix)
        return conditioning

    def decode(self, clean: torch.Tensor) -> torch.Tensor:
        return from_vae_range(decode_latents(self.vae, clean, upcast=self.upcast_vae))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return encode_images(self.vae, images, upcast=self.upcast_vae)


class PixelDenoiser(Denoiser):
    """Unconditional ``UNet2DModel`` on images in [-1,1] (the range ``DDPMPipeline`` maps back with
    ``image / 2 + 0.5``)."""

    def check_conditioning(self, conditioning: Conditioning | None, batch: int) -> dict[str, Any]:
        if conditioning:
            raise InputError(f"conditioning keys {sorted(conditioning)} given, but a UNet2DModel is unconditional; "
                             "pass conditioning=None")
        return {}

    def decode(self, clean: torch.Tensor) -> torch.Tensor:
        return from_vae_range(clean.float())

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return to_vae_range(images)


def denoiser_for(unet: nn.Module, vae: nn.Module | None = None, upcast_vae: bool = False) -> Denoiser:
    """The strategy for ``unet``: latent (needs ``vae``) or pixel space (refuses a ``vae``).

    Args:
        unet: a diffusers ``UNet2DConditionModel`` or ``UNet2DModel`` (possibly DDP-wrapped).
        vae: the VAE of a latent model.
        upcast_vae: decode an fp16 VAE in float32.
    """
    name = type(unwrap(unet)).__name__
    if name == "UNet2DConditionModel":
        if vae is None:
            raise InputError("a UNet2DConditionModel works on VAE latents, so the loss needs vae=pipe.vae")
        return LatentDenoiser(unet, vae, upcast_vae)
    if name == "UNet2DModel":
        if vae is not None:
            raise InputError("vae given for a pixel-space UNet2DModel, whose decoder is the identity; pass vae=None")
        return PixelDenoiser(unet)
    raise InputError(f"unet is a {name}; ACPO supports diffusers' UNet2DConditionModel (SD, SDXL) and UNet2DModel "
                     "(pixel-space DDPM)")
