"""Captions -> the U-Net's text inputs for training, exactly as SD / SDXL pipelines build them."""

from __future__ import annotations

import torch


class PromptEncoder:
    """Captions -> the U-Net's text inputs, exactly as the pipeline builds them (frozen encoders, no grad).

    SD: ``encoder_hidden_states``. SDXL: also ``added_cond_kwargs`` ``text_embeds`` (pooled) and ``time_ids``
    for a centre-cropped square of ``resolution`` px. The dropped caption is the pipeline's own
    unconditional input: the empty prompt, or zeros where an SDXL pipeline forces them.
    """

    def __init__(self, pipe, resolution: int):
        self.pipe = pipe
        self.resolution = resolution
        self.xl = hasattr(pipe, "text_encoder_2")
        self._uncond = None

    @torch.no_grad()
    def _encode(self, captions: list[str], device) -> tuple[torch.Tensor, dict]:
        pipe = self.pipe
        if not self.xl:
            embeds, _ = pipe.encode_prompt(captions, device, 1, False)
            return embeds, {}
        embeds, _, pooled, _ = pipe.encode_prompt(captions, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        return embeds, {"text_embeds": pooled, "time_ids": self._time_ids(len(captions), embeds, pooled)}

    def _time_ids(self, batch: int, embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        pipe, r = self.pipe, self.resolution
        projection = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None
                      else pipe.text_encoder_2.config.projection_dim)
        ids = pipe._get_add_time_ids((r, r), (0, 0), (r, r), dtype=embeds.dtype, text_encoder_projection_dim=projection)
        return ids.to(embeds.device).repeat(batch, 1)

    @torch.no_grad()
    def uncond(self, batch: int, device) -> tuple[torch.Tensor, dict]:
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
            out["time_ids"] = self._time_ids(batch, neg, extra["text_embeds"])
        return neg.expand(batch, *neg.shape[1:]), out

    def __call__(self, captions: list[str], device, drop: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Text inputs for ``captions``; rows where ``drop`` is true get the unconditional input."""
        embeds, extra = self._encode(list(captions), device)
        if drop is not None and bool(drop.any()):
            u_embeds, u_extra = self.uncond(len(captions), device)
            keep = (~drop).to(device)
            embeds = torch.where(keep.view(-1, 1, 1), embeds, u_embeds.to(embeds.dtype))
            extra = {k: torch.where(keep.view(-1, *[1] * (v.dim() - 1)), v, u_extra[k].to(v.dtype))
                     for k, v in extra.items()}
        return embeds, extra
