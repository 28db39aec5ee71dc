"""VAE encode/decode at the [-1,1] boundary, shared by LGDM and guidance, with fp16 overflow handled.

VAEs whose config sets ``force_upcast`` (SDXL's overflows to inf/NaN in fp16) run through a float32
copy when the pipeline holds them in fp16, as diffusers' own pipelines upcast before decoding. The copy
is made once per VAE object (it costs the VAE's fp32 size, ~335 MB for SD/SDXL).
"""

from __future__ import annotations

import copy
import weakref

import torch

from ..images import to_vae_range

_UPCAST: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def working_vae(vae):
    """``vae`` itself, or its float32 copy when it is fp16 and its config asks for upcasting."""
    if vae.dtype != torch.float16 or not vae.config.get("force_upcast", False):
        return vae
    upcast = _UPCAST.get(vae)
    if upcast is None or next(upcast.parameters()).device != next(vae.parameters()).device:
        upcast = copy.deepcopy(vae).float()
        _UPCAST[vae] = upcast
    return upcast


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """``D(z)``: scaled latents -> images in the VAE's [-1,1] range, float32."""
    module = working_vae(vae)
    shift = vae.config.get("shift_factor") or 0.0
    return module.decode((latents / vae.config.scaling_factor + shift).to(module.dtype)).sample.float()


def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """``E(x)``: images in [0,1] -> scaled latents (the posterior mean), float32."""
    module = working_vae(vae)
    z = module.encode(to_vae_range(images).to(module.dtype)).latent_dist.mean.float()
    shift = vae.config.get("shift_factor") or 0.0
    return (z - shift) * vae.config.scaling_factor
