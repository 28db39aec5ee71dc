"""Sampling the toy task's models (DDIM, eta 0) and showing the samples as a grid."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from qualityguide.errors import InputError
from qualityguide.images import make_grid, to_pil

from .base import null_condition, predict


def sample(unet, scheduler, n: int, seed: int, steps: int = 25, encoder_hidden_states=None, added_cond_kwargs=None,
           progress: bool = True) -> torch.Tensor:
    """DDIM (eta 0) samples ``[n,3,S,S]`` in [0,1], from noise drawn with ``seed``.

    Args:
        unet: a ``UNet2DConditionModel`` / ``UNet2DModel``, or a wrapper with ``.config``, ``.device`` and ``.dtype``
            whose call returns an object with ``.sample``.
        scheduler: the training scheduler (a DDIM scheduler is built from its config; it is not changed).
        n, seed: how many images, and the noise.
        steps: DDIM steps.
        encoder_hidden_states: the text condition of a conditional U-Net (default: the null condition); a batch
            of 1 is expanded to ``n``.
        added_cond_kwargs: passed to a conditional U-Net (e.g. the IQA-Adapter's ``image_embeds``).
        progress: show a progress bar.
    """
    from diffusers import DDIMScheduler

    conditional = unet.config.get("cross_attention_dim") is not None
    if not conditional and (encoder_hidden_states is not None or added_cond_kwargs is not None):
        raise InputError("encoder_hidden_states / added_cond_kwargs given for an unconditional UNet2DModel; drop them")
    if conditional:
        if encoder_hidden_states is None:
            encoder_hidden_states = null_condition(unet, n)
        if encoder_hidden_states.shape[0] == 1:
            encoder_hidden_states = encoder_hidden_states.expand(n, -1, -1)
        if encoder_hidden_states.shape[0] != n:
            raise InputError(f"encoder_hidden_states has batch {encoder_hidden_states.shape[0]}; pass 1 or n={n} rows")
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    size = int(unet.config.sample_size)
    channels = int(unet.config.in_channels)
    x = torch.randn((n, channels, size, size), generator=torch.Generator().manual_seed(seed))
    x = x.to(device=unet.device, dtype=unet.dtype)
    with torch.no_grad():
        for t in tqdm(ddim.timesteps, desc="sampling", disable=not progress, leave=False):
            eps = predict(unet, x, t, encoder_hidden_states, added_cond_kwargs)
            x = ddim.step(eps, t, x, eta=0.0).prev_sample
    return (x.float().cpu() / 2 + 0.5).clamp(0, 1)


def save_grid(images: torch.Tensor, path, columns: int, scale: int = 2, captions: list[str] | None = None,
              row_labels: list[str] | None = None, column_labels: list[str] | None = None) -> None:
    """Write images ``[N,3,H,W]`` in [0,1] as one PNG, ``columns`` per row (2 px white padding), each upscaled
    ``scale`` x (nearest) before the texts are drawn, so they stay sharp: the library's
    :func:`~qualityguide.images.make_grid` with its labels.

    Args:
        images: the samples, row-major.
        path: the PNG to write (its folder is created).
        columns: images per row (at most ``N``).
        scale: upscaling of each image (1: none).
        captions: one text per image, under it (e.g. its score).
        row_labels: one text per row, on the left (e.g. the model or the target); column_labels: one per column.
    """
    cells = [to_pil(image) for image in images]
    if scale > 1:
        cells = [cell.resize((cell.width * scale, cell.height * scale), Image.Resampling.NEAREST) for cell in cells]
    image = make_grid(cells, columns=max(1, min(int(columns), len(cells))), captions=captions, row_labels=row_labels,
                      column_labels=column_labels, padding=2, background="white")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
