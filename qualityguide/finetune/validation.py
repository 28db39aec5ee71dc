"""Validation images during ACPO training: the pipeline with its current LoRA, fixed seeds, a PNG grid per step,
the scorer's values, and the same images and values sent to accelerate's trackers."""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..images import make_grid
from ..train.data import derive_seed
from ..train.self_samples import is_conditional, sample_images


@dataclass(frozen=True)
class ValidationSettings:
    """What the validation images of every step share, so steps can be compared image by image.

    Args:
        prompt: the prompt (``--validation_prompt``); None for an unconditional model.
        num_images: images per validation (``--num_validation_images``).
        resolution: image side in pixels.
        num_inference_steps: sampler steps.
        guidance_scale: classifier-free guidance scale.
        seed: image ``i`` always uses ``derive_seed("qualityguide.validation", seed, i)``.
    """

    prompt: str | None
    num_images: int = 4
    resolution: int = 512
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("num_images", 1), ("resolution", 8), ("num_inference_steps", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise InputError(f"--{name.replace('num_images', 'num_validation_images')} {value!r}: must be a "
                                 f"whole number >= {low}")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise InputError(f"--validation_prompt must be a string, got {type(self.prompt).__name__}")

    def seeds(self) -> list[int]:
        return [derive_seed("qualityguide.validation", int(self.seed), i) for i in range(self.num_images)]


def validation_images(pipe, settings: ValidationSettings) -> torch.Tensor:
    """The validation images of ``pipe`` as it is now (with its LoRA): ``[N,3,R,R]`` float32 in [0,1], CPU."""
    if is_conditional(pipe) and settings.prompt is None:
        raise InputError("validation of a prompted model needs --validation_prompt TEXT")
    prompts = [settings.prompt] * settings.num_images if is_conditional(pipe) else None
    return sample_images(pipe, prompts, settings.seeds(), settings.resolution, settings.num_inference_steps,
                         settings.guidance_scale)


@torch.no_grad()
def run_validation(pipe, settings: ValidationSettings, step: int, output_dir: str | os.PathLike,
                   scorer: nn.Module | None = None, trackers=()) -> dict[str, float]:
    """Generate the validation images, write ``output_dir/validation/step-<step>/grid.png`` and ``scores.json``,
    and log the grid and mean score to ``trackers`` (accelerate's ``accelerator.trackers``; those with
    ``log_images``). Call it on the main process only.

    Args:
        pipe: the pipeline whose U-Net carries the current LoRA.
        settings: prompt, seeds and sampler settings.
        step: the optimizer steps completed.
        output_dir: the run's output folder.
        scorer: score the images (on the scorer's device); None: no scores.
        trackers: accelerate trackers to send the images and scores to.

    Returns:
        ``{"validation/quality": mean score}`` (empty without a scorer), for ``accelerator.log``.
    """
    images = validation_images(pipe, settings)
    folder = Path(output_dir) / "validation" / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    sheet = make_grid(images, columns=math.ceil(math.sqrt(len(images))))
    sheet.save(folder / "grid.png")
    grid = np.asarray(sheet)  # HWC uint8, as trackers take images
    values: dict[str, float] = {}
    record: dict = {"step": step, "prompt": settings.prompt, "seeds": settings.seeds()}
    if scorer is not None:
        device = next((p.device for p in scorer.parameters()), None) or next(
            (b.device for b in scorer.buffers()), torch.device("cpu"))
        scores = scorer(images.to(device)).float().cpu()
        record.update(scorer=getattr(scorer, "name", type(scorer).__name__), scores=scores.tolist())
        values["validation/quality"] = float(scores.mean())
    (folder / "scores.json").write_text(json.dumps(record, indent=1))
    for tracker in trackers:
        if getattr(tracker, "name", None) == "tensorboard":  # SummaryWriter.add_images needs the layout
            tracker.log_images({"validation": grid[None]}, step=step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):  # wandb, comet, ...: a list of HWC arrays
            tracker.log_images({"validation": [grid]}, step=step)
    return values
