"""Validation images during ACPO training: the pipeline with its current LoRA and its base (the LoRA off), fixed
seeds, a labelled PNG grid per step with each image's guiding and held-out scores, and the same grid and mean scores
sent to accelerate's trackers."""

from __future__ import annotations

import numbers
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..train.data import derive_seed
from ..train.held_out import HeldOutGuard, RewardHackingWarning, validation_values
from ..train.validation import caption, labelled_grid, save_validation, score_images
from .lora import adapters_disabled, tuner_layers
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


class ACPOValidation:
    """The ACPO recipe's ``validate(step)``: the fixed-seed validation images of the tuned model, and once those of
    the base model (its LoRA switched off), in one labelled grid (rows base / step N, columns seeds, each image's
    scores under it), the guiding and held-out scorers' means, and the held-out guard's warnings. Call it on the main
    process only.

    Args:
        pipe: the pipeline whose U-Net carries the LoRA being trained.
        settings: prompt, seeds and sampler settings.
        output_dir: the run's output folder (``validation/step-N`` goes there).
        scorer: the guiding scorer; None: no scores.
        held_out: ``{name: scorer}`` scored beside it (``--held_out_scorer``); names as the user gave the specs.
        trackers: accelerate trackers for the grids.
        guard: the held-out guard (a resumed run's carries the earlier validations); None: a fresh one.
    """

    def __init__(self, pipe, settings: ValidationSettings, output_dir: str | os.PathLike,
                 scorer: nn.Module | None = None, held_out: dict[str, nn.Module] | None = None, trackers=(),
                 guard: HeldOutGuard | None = None):
        self.pipe, self.settings, self.output_dir = pipe, settings, Path(output_dir)
        self.scorer, self.held_out, self.trackers = scorer, dict(held_out or {}), trackers
        self.guard = guard if guard is not None else HeldOutGuard()
        self._base: tuple[torch.Tensor, list[dict[str, float]]] | None = None

    def _scores(self, images: torch.Tensor) -> list[dict[str, float]]:
        """Each image's ``{scorer name: score}``: the guiding scorer first, then the held-out ones."""
        named = ([(getattr(self.scorer, "name", "quality"), self.scorer)] if self.scorer is not None else []) + \
            list(self.held_out.items())
        columns = {name: score_images(scorer, images) for name, scorer in named}
        return [{name: values[i] for name, values in columns.items()} for i in range(len(images))]

    def _values(self, scores: list[dict[str, float]]) -> dict[str, float]:
        guiding = getattr(self.scorer, "name", "quality") if self.scorer is not None else None
        mean = {name: float(np.mean([s[name] for s in scores])) for name in (scores[0] if scores else {})}
        return validation_values(mean.get(guiding), {name: mean[name] for name in self.held_out})

    def base(self) -> tuple[torch.Tensor, list[dict[str, float]]] | None:
        """The base model's validation images and scores (made once), or None when the U-Net has no LoRA."""
        if self._base is None and tuner_layers(self.pipe.unet):
            with adapters_disabled(self.pipe.unet):
                images = validation_images(self.pipe, self.settings)
            self._base = images, self._scores(images)
            self.guard.remember(0, self._values(self._base[1]))  # step 0: the base model, the first reference
        return self._base

    @torch.no_grad()
    def __call__(self, step: int) -> dict[str, float]:
        """Validate after ``step`` optimizer steps: write ``validation/step-<step>`` (``grid.png``, ``scores.json``),
        send the grid to the trackers, warn when a held-out score falls while the guiding one rises.

        Returns:
            ``{"validation/quality": ..., "validation/held_out/<name>": ...,
            "validation/guiding_minus_held_out/<name>": ...}`` (means over the images; empty without scorers).
        """
        base = self.base()
        images = validation_images(self.pipe, self.settings)
        scores = self._scores(images)
        rows = ([("base", base[0], base[1])] if base is not None else []) + [(f"step {step}", images, scores)]
        sheet = labelled_grid(torch.cat([r[1] for r in rows]), len(images), [caption(s) for r in rows for s in r[2]],
                              [r[0] for r in rows], [f"seed {i}" for i in range(len(images))])
        values = self._values(scores)
        record = {"step": step, "prompt": self.settings.prompt, "seeds": self.settings.seeds(),
                  "scores": scores, "base_scores": base[1] if base is not None else None, "values": values}
        save_validation(self.output_dir, step, sheet, record, self.trackers)
        # stacklevel 1: attributed to this module; the caller is torch's no_grad wrapper, whose warnings a recipe's
        # quiet_third_party drops
        for line in self.guard.observe(step, values):
            warnings.warn(line, RewardHackingWarning, stacklevel=1)
        return values


@torch.no_grad()
def run_validation(pipe, settings: ValidationSettings, step: int, output_dir: str | os.PathLike,
                   scorer: nn.Module | None = None, trackers=()) -> dict[str, float]:
    """One validation of ``pipe`` without memory of earlier ones (:class:`ACPOValidation` for a run): write
    ``output_dir/validation/step-<step>/grid.png`` and ``scores.json``, log the grid to ``trackers``.

    Returns:
        ``{"validation/quality": mean score}`` (empty without a scorer).
    """
    return ACPOValidation(pipe, settings, output_dir, scorer, trackers=trackers)(step)
