"""Captions -> the U-Net's text inputs for training, exactly as SD / SDXL pipelines build them."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ..diffusion.conditioning import is_sdxl, sdxl_added_conditions

# diffusers' encode_prompt logs this, followed by the whole cut-off text, at every call with a long prompt
TRUNCATION_WARNING = "The following part of your input was truncated"


class _DropTruncationWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TRUNCATION_WARNING)


def quiet_truncation_warnings(pipe) -> None:
    """Drop diffusers' truncation warning for ``pipe``'s class (once per logger; other warnings stay).

    It repeats the cut-off text at every encoder call: a training loop re-encodes its captions every step, so one
    long prompt fills megabytes of stderr. :func:`long_prompts_note` says it once instead.
    """
    for cls in type(pipe).__mro__:
        if cls.__module__.startswith("diffusers."):
            logger = logging.getLogger(cls.__module__)
            if not any(isinstance(f, _DropTruncationWarning) for f in logger.filters):
                logger.addFilter(_DropTruncationWarning())


def long_prompts_note(pipe, prompts: Sequence[str] | None, what: str = "prompts") -> str | None:
    """Silence the per-call truncation warning of ``pipe`` and say once how many ``prompts`` its tokenizer cuts.

    Args:
        pipe: a prompted pipeline (one without a tokenizer gets no note).
        prompts: the prompts or captions training will encode.
        what: how the note names them (``"prompts"``, ``"captions"``).

    Returns:
        One line for stderr, or None when every prompt fits.
    """
    quiet_truncation_warnings(pipe)
    tokenizer = getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)
    if tokenizer is None or not prompts:
        return None
    limit = int(tokenizer.model_max_length)
    unique = set(prompts)
    cut = sum(len(tokenizer(p, truncation=False, verbose=False).input_ids) > limit for p in unique)
    if not cut:
        return None
    return (f"note: {cut} of {len(unique)} distinct {what} are longer than the tokenizer's maximum of {limit} "
            "tokens and are truncated to it (diffusers' per-step truncation warning is silenced)")


class PromptEncoder:
    """Captions -> the U-Net's text inputs, exactly as the pipeline builds them (frozen encoders, no grad).

    SD: ``encoder_hidden_states``. SDXL: also ``added_cond_kwargs`` ``text_embeds`` (pooled) and ``time_ids``,
    SDXL's micro-conditioning ``original_size + crop_top_left + target_size`` per sample: each training image's
    real size and crop when given (:meth:`~qualityguide.train.data.ImageFolderDataset.micro_conditions`), else a
    square of ``resolution`` px taken whole. The target size is always ``(resolution, resolution)``. The dropped
    caption is the pipeline's own unconditional input (the empty prompt, or zeros where an SDXL pipeline forces them)
    with the same micro-conditioning: the image is the same.
    """

    def __init__(self, pipe, resolution: int):
        self.pipe = pipe
        self.resolution = resolution
        self.xl = is_sdxl(pipe)
        self._uncond = None
        quiet_truncation_warnings(pipe)  # encoded every step: one long caption would repeat its text every step

    @torch.no_grad()
    def _encode(self, captions: list[str], device, micro: dict | None = None) -> tuple[torch.Tensor, dict]:
        pipe = self.pipe
        if not self.xl:
            embeds, _ = pipe.encode_prompt(captions, device, 1, False)
            return embeds, {}
        embeds, _, pooled, _ = pipe.encode_prompt(captions, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        return embeds, self._added(pooled, embeds.dtype, micro)

    def _added(self, pooled: torch.Tensor, dtype: torch.dtype, micro: dict | None = None) -> dict:
        """SDXL's ``text_embeds`` and ``time_ids``, one row each: ``micro``'s ``original_size`` and ``crop_top_left``
        (``[B,2]`` each) or a whole square of ``resolution`` px, and the target size ``(resolution, resolution)``."""
        r = self.resolution
        micro = micro or {}
        original, crop = micro.get("original_size", (r, r)), micro.get("crop_top_left", (0, 0))
        return sdxl_added_conditions(self.pipe.unet, pooled, original, crop, (r, r),
                                     text_encoder_2=self.pipe.text_encoder_2, dtype=dtype)

    @torch.no_grad()
    def uncond(self, batch: int, device, micro: dict | None = None) -> tuple[torch.Tensor, dict]:
        if self._uncond is None:
            pipe = self.pipe
            if not self.xl:
                _, neg = pipe.encode_prompt([""], device, 1, True)
                self._uncond = (neg, {})
            else:
                pos, neg, pooled, neg_pooled = pipe.encode_prompt([""], device=device, num_images_per_prompt=1,
                                                                  do_classifier_free_guidance=True)
                self._uncond = (neg, {"text_embeds": neg_pooled})
        neg, extra = self._uncond
        out = {k: v.expand(batch, *v.shape[1:]) for k, v in extra.items()}
        if self.xl:
            out = self._added(out["text_embeds"], neg.dtype, micro)
        return neg.expand(batch, *neg.shape[1:]), out

    def __call__(self, captions: list[str], device, drop: torch.Tensor | None = None,
                 original_size: torch.Tensor | None = None, crop_top_left: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, dict]:
        """Text inputs for ``captions``; rows where ``drop`` is true get the unconditional input.

        Args:
            captions: one per sample.
            device: where the embeddings go.
            drop: rows that get the unconditional input.
            original_size, crop_top_left: SDXL's micro-conditioning per sample, ``[B,2]`` (height, width) and (top,
                left) (:meth:`~qualityguide.train.data.ImageFolderDataset.micro_conditions`); None: a whole square
                of ``resolution`` px. Ignored by SD.
        """
        micro = {k: v for k, v in (("original_size", original_size), ("crop_top_left", crop_top_left))
                 if v is not None}
        embeds, extra = self._encode(list(captions), device, micro)
        if drop is not None and bool(drop.any()):
            u_embeds, u_extra = self.uncond(len(captions), device, micro)
            keep = (~drop).to(device)
            embeds = torch.where(keep.view(-1, 1, 1), embeds, u_embeds.to(embeds.dtype))
            extra = {k: torch.where(keep.view(-1, *[1] * (v.dim() - 1)), v, u_extra[k].to(v.dtype))
                     for k, v in extra.items()}
        return embeds, extra

