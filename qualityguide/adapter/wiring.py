"""Attaching an IQA-Adapter to a U-Net through diffusers' own IP-Adapter path.

What attaching does (as ``UNet2DConditionModel._load_ip_adapter_weights`` would, without a checkpoint):
``unet.encoder_hid_proj = MultiIPAdapterImageProjection([projection])``, the attribute
``unet.config.encoder_hid_dim_type = "ip_image_proj"`` (plain attribute assignment, so a saved U-Net
config is unchanged), and the adapter's ``IPAdapterAttnProcessor2_0`` on every cross-attention layer,
self-attention processors untouched. Pipelines' ``ip_adapter_image_embeds`` argument and
``pipe.set_ip_adapter_scale`` then work unchanged. ``detach`` restores the very processor objects,
``encoder_hid_proj`` and config value that were there before.

A forward pre-hook on the U-Net, active only while this adapter is the one attached, checks the
embeddings each call (a missing argument, a wrong leading size that diffusers would run silently
with the wrong number of tokens per sample) and implements **per-sample targets**: embeddings of
shape ``[1(+1), M, d]`` reach the U-Net as ``[R, M, d]`` (the pipeline repeats them for each of the
``M`` images, and once more for the negative half), and row ``r`` keeps only its own target
``r mod M``. A sweep of 8 targets is therefore one batched call with ``num_images_per_prompt=8``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError

IP_HID_TYPE = "ip_image_proj"
ATTACHED_ATTR = "_qualityguide_iqa_adapter"


class AdapterCallError(InputError):
    """A U-Net call that does not carry what the attached adapter needs."""


@dataclass(frozen=True)
class CrossAttentionLayer:
    """One cross-attention layer: its processor name, width (query/output) and the key input width."""

    name: str
    hidden_size: int
    cross_attention_dim: int


def unet_of(target):
    """The U-Net of a pipeline, or the U-Net itself."""
    unet = getattr(target, "unet", target)
    if not (isinstance(unet, nn.Module) and hasattr(unet, "attn_processors") and hasattr(unet, "set_attn_processor")):
        raise InputError(f"cannot attach an IQA-Adapter to {type(target).__name__}: pass a diffusers pipeline with a "
                         "`unet` (StableDiffusion[XL][Img2Img]Pipeline) or a UNet2DConditionModel")
    return unet


def cross_attention_layers(unet) -> list[CrossAttentionLayer]:
    """Every cross-attention layer, in ``unet.attn_processors`` order (the order of diffusers' IP-Adapter files)."""
    layers = []
    for name in unet.attn_processors:
        layer = name[: -len(".processor")]
        attn = unet.get_submodule(layer)
        if name.endswith("attn1.processor"):
            if getattr(attn, "is_cross_attention", False):  # only_cross_attention=True blocks
                raise InputError(
                    f"{type(unet).__name__} has cross-attention in the self-attention slot ({layer}; built with "
                    "only_cross_attention=True): with an IP-Adapter attached, diffusers hands that layer the "
                    "(text, image tokens) pair and its forward fails, for diffusers' own load_ip_adapter too. Use a "
                    "U-Net whose transformer blocks start with self-attention (SD 1.x/2.x, SDXL), or build it with "
                    "only_cross_attention=False")
            continue
        if not getattr(attn, "is_cross_attention", False):
            continue
        layers.append(CrossAttentionLayer(name, int(attn.to_k.out_features), int(attn.to_k.in_features)))
    if not layers:
        raise InputError(f"{type(unet).__name__} has no cross-attention layers; an IQA-Adapter needs a "
                         "UNet2DConditionModel with cross-attention blocks")
    return layers


def describe(layers: list[CrossAttentionLayer]) -> str:
    widths = sorted({layer.hidden_size for layer in layers})
    dims = sorted({layer.cross_attention_dim for layer in layers})
    return (f"{len(layers)} cross-attention layers, widths {widths}, cross_attention_dim "
            f"{dims[0] if len(dims) == 1 else dims}")


def _embeds_error(message: str) -> AdapterCallError:
    return AdapterCallError(
        f"IQA-Adapter attached: {message}. Pass ip_adapter_image_embeds=adapter.embeds(percentiles={{...}}, "
        "do_cfg=guidance_scale > 1) to the pipeline (or added_cond_kwargs={'image_embeds': ...} to the U-Net), or "
        "adapter.detach(pipe) to generate without it")


class AttachHook:
    """The U-Net forward pre-hook: checks the embeddings and hands each image its own target."""

    def __init__(self, adapter, projection: nn.Module):
        self.adapter_ref = adapter
        self.projection = projection

    def _active(self, unet) -> bool:
        proj = getattr(unet, "encoder_hid_proj", None)
        layers = getattr(proj, "image_projection_layers", None)
        return (getattr(unet, ATTACHED_ATTR, None) is self.adapter_ref and layers is not None and len(layers) == 1
                and layers[0] is self.projection)

    def __call__(self, unet, args, kwargs):
        if not self._active(unet):  # unloaded behind our back (pipe.unload_ip_adapter): stay out of the way
            return None
        sample = args[0] if args else kwargs.get("sample")
        added = kwargs.get("added_cond_kwargs")
        if added is None or "image_embeds" not in added:
            raise _embeds_error("this U-Net call has no image embeddings")
        embeds = added["image_embeds"]
        if isinstance(embeds, torch.Tensor):
            embeds = [embeds]
        if not isinstance(embeds, (list, tuple)) or len(embeds) != 1:
            raise _embeds_error(f"expected a list with one tensor (one adapter), got {type(embeds).__name__} of "
                                f"length {len(embeds) if isinstance(embeds, (list, tuple)) else '?'}")
        e = embeds[0]
        width = self.adapter_ref.input_dim
        if not isinstance(e, torch.Tensor) or e.dim() != 3 or e.shape[-1] != width:
            shape = tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__
            raise _embeds_error(f"embeddings must be [batch, targets, {width}], got {shape}")
        rows, targets = e.shape[0], e.shape[1]
        batch = sample.shape[0]
        if rows != batch:
            raise _embeds_error(
                f"the embeddings cover {rows} samples but the U-Net batch has {batch}; with classifier-free guidance "
                "pass both halves stacked as [2, targets, d] (what adapter.embeds(do_cfg=True) returns), without it "
                "[1, targets, d] -- never one row per image (the pipeline repeats the rows itself)")
        if targets > 1:
            if batch not in (targets, 2 * targets):
                raise _embeds_error(f"{targets} per-image targets for a U-Net batch of {batch}: give one target per "
                                    "generated image (prompts x num_images_per_prompt), or a single target for all")
            pick = torch.arange(batch, device=e.device) % targets
            e = e[torch.arange(batch, device=e.device), pick].unsqueeze(1)
        return args, {**kwargs, "added_cond_kwargs": {**added, "image_embeds": [e]}}
