"""What a U-Net is conditioned on: SD's text states, SDXL's added conditions, and the one test for SDXL.

SDXL U-Nets (config ``addition_embed_type="text_time"``) take, besides ``encoder_hidden_states``,
``added_cond_kwargs={"text_embeds": pooled text embedding, "time_ids": [B,6]}``, where each row of ``time_ids`` is
``original_size + crop_top_left + target_size`` as (height, width), (top, left), (height, width) in pixels
(Podell et al. 2023, section 2.2, "micro-conditioning"). Every capability builds them here, so the rule has one home.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import InputError

# One (height, width) or (top, left) pair for the whole batch, or one pair per sample.
Pairs = Sequence[int] | Sequence[Sequence[int]] | torch.Tensor


def unwrap(unet: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (``accelerator.prepare``), for reading its type and config."""
    return unet.module if isinstance(unet, nn.parallel.DistributedDataParallel) else unet


def is_sdxl(unet_or_pipe: Any) -> bool:
    """Whether a U-Net (or a pipeline's ``unet``, possibly DDP-wrapped) takes SDXL's added conditions.

    The U-Net's config decides (``addition_embed_type="text_time"``), not the pipeline's class or its encoders: it
    is what the call must match.
    """
    unet = unwrap(getattr(unet_or_pipe, "unet", unet_or_pipe))
    config = getattr(unet, "config", None)
    return config is not None and config.get("addition_embed_type") == "text_time"


def unet_conditioning(encoder_hidden_states: torch.Tensor, added_cond_kwargs: Mapping[str, Any] | None = None
                      ) -> dict[str, Any]:
    """The keyword arguments of a conditional U-Net call (``added_cond_kwargs`` only when there are any).

    Args:
        encoder_hidden_states: the prompt embeddings ``[B, tokens, dim]``.
        added_cond_kwargs: SDXL's ``text_embeds`` and ``time_ids``, an adapter's ``image_embeds``; None or empty: none.
    """
    return {"encoder_hidden_states": encoder_hidden_states,
            **({"added_cond_kwargs": dict(added_cond_kwargs)} if added_cond_kwargs else {})}


def _per_sample_pairs(name: str, value: Pairs, batch: int) -> torch.Tensor:
    """``value`` as a ``[batch, 2]`` float64 tensor: one pair repeated, or one pair per sample checked for count."""
    pairs = torch.as_tensor(value, dtype=torch.float64)
    if pairs.shape == (2,):
        return pairs.expand(batch, 2)
    if pairs.dim() != 2 or pairs.shape[1] != 2 or pairs.shape[0] != batch:
        raise InputError(f"{name} must be one pair or {batch} pairs (one per sample), got shape "
                         f"{tuple(pairs.shape)}; pass e.g. (1024, 1024) or a [{batch}, 2] list")
    return pairs


def sdxl_time_ids(original_size: Pairs, crop_top_left: Pairs, target_size: Pairs, batch: int,
                  dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """SDXL's ``time_ids`` ``[batch, 6]``: ``original_size + crop_top_left + target_size`` per sample.

    The same rows ``StableDiffusionXLPipeline._get_add_time_ids`` builds for one sample; here each sample may carry
    its own image's size and crop.

    Args:
        original_size: (height, width) of the source image, one pair or one per sample.
        crop_top_left: (top, left) of the crop taken from it, one pair or one per sample.
        target_size: (height, width) of the image the U-Net generates, one pair or one per sample.
        batch: the number of rows.
        dtype, device: of the result (the prompt embeddings' dtype, as the pipeline uses).
    """
    parts = [_per_sample_pairs(name, value, batch) for name, value in
             (("original_size", original_size), ("crop_top_left", crop_top_left), ("target_size", target_size))]
    return torch.cat(parts, dim=1).to(device=device, dtype=dtype)


def check_time_embedding_width(unet: nn.Module, projection_dim: int, n_time_ids: int = 6) -> None:
    """Refuse a pooled embedding whose width, with the time ids, is not what the U-Net's add embedding takes.

    Args:
        unet: an SDXL U-Net (possibly DDP-wrapped).
        projection_dim: the pooled text embedding's width (``text_encoder_2.config.projection_dim``).
        n_time_ids: entries per ``time_ids`` row.
    """
    unet = unwrap(unet)
    passed = int(unet.config.addition_time_embed_dim) * n_time_ids + int(projection_dim)
    expected = unet.add_embedding.linear_1.in_features
    if passed != expected:
        raise InputError(f"the U-Net's added time embedding takes {expected} values, but {n_time_ids} time ids and a "
                         f"pooled text embedding of width {projection_dim} give {passed}; use the second text "
                         "encoder of the U-Net's own pipeline (its config.projection_dim must match)")


def sdxl_added_conditions(unet: nn.Module, pooled: torch.Tensor, original_size: Pairs, crop_top_left: Pairs,
                          target_size: Pairs, text_encoder_2: nn.Module | None = None,
                          dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """SDXL's ``added_cond_kwargs``: ``{"text_embeds": pooled, "time_ids": [B,6]}``, one row per pooled embedding.

    The width check follows the SDXL pipelines: the pooled width is ``text_encoder_2.config.projection_dim``, or
    the pooled embedding's own last dimension when there is no second encoder.

    Args:
        unet: the SDXL U-Net the conditions are for.
        pooled: pooled prompt embeddings ``[B, projection_dim]`` (``pipe.encode_prompt(...)[2]``).
        original_size, crop_top_left, target_size: as for :func:`sdxl_time_ids`, one pair or one per sample.
        text_encoder_2: the pipeline's second text encoder (None: read the width off ``pooled``).
        dtype: of ``time_ids`` (None: ``pooled``'s).
    """
    projection_dim = int(pooled.shape[-1]) if text_encoder_2 is None else text_encoder_2.config.projection_dim
    check_time_embedding_width(unet, projection_dim)
    time_ids = sdxl_time_ids(original_size, crop_top_left, target_size, pooled.shape[0],
                             dtype=pooled.dtype if dtype is None else dtype, device=pooled.device)
    return {"text_embeds": pooled, "time_ids": time_ids}
