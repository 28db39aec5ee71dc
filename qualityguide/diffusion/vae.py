"""The VAE boundary: images in [0,1] <-> scaled latents, the only place that converts to the VAE's [-1,1].

Latents follow the diffusers convention ``z = (E(x) - shift) * scaling_factor`` or, for VAEs whose config
carries ``latents_mean``/``latents_std`` (Playground-v2.5-style SDXL), ``(E(x) - mean) * scaling / std``.

Half precision: diffusers' SDXL-family pipelines decode an fp16 VAE in float32 when its config sets
``force_upcast`` (SDXL's VAE overflows in fp16); SD 1.x/2.x pipelines never upcast, although the VAE
config defaults to ``force_upcast=True``. :func:`pipeline_upcasts_vae` reproduces that rule, and
``upcast=True`` runs the VAE's decoder (or encoder) in float32 through ``torch.func.functional_call``
on float32 views of its parameters: the user's module is never modified and no second copy is kept.
The float32 parameters live only as long as the autograd graph that uses them (one decoder's worth,
~200 MB for SD/SDXL, freed after the backward) and cost one cast per call.
"""

from __future__ import annotations

import torch
from torch import nn


def to_vae_range(images: torch.Tensor) -> torch.Tensor:
    """[0,1] images -> the [-1,1] range diffusers VAEs take."""
    return images * 2.0 - 1.0


def from_vae_range(decoded: torch.Tensor) -> torch.Tensor:
    """VAE decoder output in [-1,1] -> images in [0,1] (clamped)."""
    return ((decoded + 1.0) / 2.0).clamp(0.0, 1.0)


def pipeline_upcasts_vae(pipe) -> bool:
    """Whether diffusers' own pipeline decodes its VAE in float32 when the VAE is fp16.

    SDXL-family pipelines (they have ``upcast_vae``) do so when ``vae.config.force_upcast`` is set;
    Stable Diffusion 1.x/2.x pipelines never do.
    """
    vae = getattr(pipe, "vae", None)
    return vae is not None and hasattr(pipe, "upcast_vae") and bool(vae.config.get("force_upcast", False))


def _latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """(mean, std) of the latent normalisation: per-channel for Playground-style VAEs, else (shift, 1)."""
    config = vae.config
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is not None and std is not None:
        shape = (1, len(mean), 1, 1)
        return (torch.tensor(mean, device=like.device, dtype=torch.float32).view(shape),
                torch.tensor(std, device=like.device, dtype=torch.float32).view(shape))
    return float(config.get("shift_factor") or 0.0), 1.0


class _Call(nn.Module):
    """``vae.<method>`` as a module, so ``functional_call`` can run it on float32 parameters."""

    def __init__(self, vae, method: str):
        super().__init__()
        self.vae, self.method = vae, method

    def forward(self, x: torch.Tensor):
        return getattr(self.vae, self.method)(x)


def _run(vae, method: str, x: torch.Tensor, prefixes: tuple[str, ...], upcast: bool):
    if not upcast or vae.dtype != torch.float16:
        return getattr(vae, method)(x.to(vae.dtype))
    params = {f"vae.{name}": p.float() for name, p in vae.named_parameters() if name.startswith(prefixes)}
    return torch.func.functional_call(_Call(vae, method), params, (x.float(),), strict=False)


def decode_latents(vae, latents: torch.Tensor, upcast: bool = False) -> torch.Tensor:
    """``D(z)``: scaled latents -> images in the VAE's [-1,1] range, float32.

    Args:
        vae: a diffusers ``AutoencoderKL`` (any dtype).
        latents: scaled latents ``[B,C,h,w]``.
        upcast: decode an fp16 VAE in float32 (pass :func:`pipeline_upcasts_vae` of the pipeline).
    """
    mean, std = _latent_stats(vae, latents)
    z = latents.float() * std / vae.config.scaling_factor + mean
    return _run(vae, "decode", z, ("decoder.", "post_quant_conv."), upcast).sample.float()


def encode_posterior(vae, images: torch.Tensor, upcast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``E(x)`` as the encoder's Gaussian: (mean, std) in scaled-latent space, float32.

    ``mean + std * noise`` with ``noise ~ N(0, I)`` is diffusers' ``latent_dist.sample()`` scaled like the mean.
    """
    dist = _run(vae, "encode", to_vae_range(images), ("encoder.", "quant_conv."), upcast).latent_dist
    z = dist.mean.float()
    mean, std = _latent_stats(vae, z)
    return (z - mean) * vae.config.scaling_factor / std, dist.std.float() * vae.config.scaling_factor / std


def encode_images(vae, images: torch.Tensor, upcast: bool = False) -> torch.Tensor:
    """``E(x)``: images in [0,1] -> scaled latents (the posterior mean), float32."""
    return encode_posterior(vae, images, upcast)[0]
