"""What both recipes' validations share: scoring a batch on the scorer's device, one caption per image listing its
scores, ``OUTPUT/validation/step-N`` (``grid.png`` + ``scores.json``, each written atomically) and the trackers.

The recipes differ in what they generate (ACPO: fixed seeds before and after its LoRA; the adapter: prompts x target
percentiles) and keep that in :mod:`qualityguide.finetune.validation` and :mod:`qualityguide.adapter.validation`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..files import atomic_write

VALIDATION_DIR = "validation"
PREFIX = "validation/"


def module_device(module: nn.Module) -> torch.device:
    """Where ``module``'s first parameter or buffer lives (the CPU for one with neither)."""
    return next((t.device for t in (*module.parameters(), *module.buffers())), torch.device("cpu"))


@torch.no_grad()
def score_images(scorer: nn.Module, images: torch.Tensor) -> list[float]:
    """``scorer``'s value of each image of ``[N,3,H,W]`` in [0,1], computed on the scorer's device.

    Args:
        scorer: a :class:`~qualityguide.scorers.QualityScorer` (higher is better).
        images: the images, on any device.
    """
    return scorer(images.to(module_device(scorer), torch.float32)).float().cpu().tolist()


def too_small(scorer: nn.Module, resolution: int) -> str | None:
    """Why ``scorer`` cannot score ``resolution`` px images (its ``min_side`` is larger, with the ``@SIZE`` fix), or
    None when it can: checked when a run starts, not at its first validation.

    Args:
        scorer: a :class:`~qualityguide.scorers.QualityScorer`.
        resolution: the validation images' side.
    """
    min_side = getattr(scorer, "min_side", 1)
    if resolution >= min_side:
        return None
    name = getattr(scorer, "name", type(scorer).__name__)
    return (f"{name!r} needs images of at least {min_side} px, the validation images are {resolution} px; score "
            f"them resized with {name}@{min_side}")


def caption(scores: dict[str, float]) -> str:
    """The text under one image: one ``name value`` line per score (empty without scores)."""
    return "\n".join(f"{name} {value:.3f}" for name, value in scores.items())


def labelled_grid(images: torch.Tensor, columns: int, captions: Sequence[str], row_labels: Sequence[str],
                  column_labels: Sequence[str], min_side: int = 160):
    """A validation grid: black labels on white (:func:`qualityguide.images.make_grid`), images smaller than
    ``min_side`` enlarged by a whole factor (nearest pixel, so nothing is invented) so their captions fit under them.

    Args:
        images: ``[N,3,H,W]`` in [0,1], row-major.
        columns: images per row.
        captions: one text per image (its scores).
        row_labels: one per row; column_labels: one per column.
        min_side: the smallest image side shown.
    """
    from ..images import make_grid

    factor = -(-min_side // min(images.shape[-2:]))
    if factor > 1:
        images = torch.nn.functional.interpolate(images.float(), scale_factor=factor, mode="nearest")
    return make_grid(images, columns=columns, captions=captions, row_labels=row_labels, column_labels=column_labels,
                     padding=2, background="white", ink="black")


def validation_folder(output_dir: str | os.PathLike, step: int) -> Path:
    """``output_dir/validation/step-<step>``."""
    return Path(output_dir) / VALIDATION_DIR / f"step-{int(step)}"


def save_validation(output_dir: str | os.PathLike, step: int, sheet, record: dict, trackers: Sequence = ()) -> Path:
    """Write ``grid.png`` and ``scores.json`` into :func:`validation_folder` (each atomically: a step validated
    again replaces them whole) and send the grid to ``trackers``. Call it on the main process.

    Args:
        output_dir: the run's output folder.
        step: the optimizer steps completed.
        sheet: the labelled grid (a PIL image, :func:`qualityguide.images.make_grid`).
        record: what ``scores.json`` holds (JSON-serialisable).
        trackers: ``accelerator.trackers``; those with ``log_images`` get the grid as ``"validation"``.

    Returns:
        the folder.
    """
    folder = validation_folder(output_dir, step)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "grid.png", lambda tmp: sheet.save(tmp, format="PNG"))
    atomic_write(folder / "scores.json", json.dumps(record, indent=1))
    grid = np.asarray(sheet.convert("RGB"))  # HWC uint8, as trackers take images
    for tracker in trackers:
        if getattr(tracker, "name", None) == "tensorboard":  # SummaryWriter.add_images needs the layout
            tracker.log_images({"validation": grid[None]}, step=step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):  # wandb, comet, ...: a list of HWC arrays
            tracker.log_images({"validation": [grid]}, step=step)
    return folder
