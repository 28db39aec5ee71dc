"""Scoring many same-size images for a report: the library's :func:`~qualityguide.cli.score.score_tensors` (batches
bounded by pixels, a failing batch retried image by image), in chunks so a progress bar can follow."""

from __future__ import annotations

import sys

import torch
from tqdm.auto import tqdm

from qualityguide.cli.score import score_tensors


def score_images(scorer, images: torch.Tensor, device: torch.device | str = "cpu", batch_size: int = 64,
                 desc: str | None = None, progress: bool = True, strict: bool = False) -> torch.Tensor:
    """Scores ``[N]`` float64 (higher is better); an image the scorer refuses (flat, non-finite statistics) gets NaN.

    Args:
        scorer: a :class:`~qualityguide.scorers.QualityScorer`.
        images: ``[N,3,H,W]`` in [0,1] (or a list of ``[3,H,W]``).
        device: where the scorer runs; each chunk is moved there.
        batch_size: images per scorer call (and per progress step).
        desc, progress: the progress bar's label, and whether to show it.
        strict: raise the first refusal instead of writing NaN (a report whose every image must score).
    """
    out = torch.full((len(images),), float("nan"), dtype=torch.float64)
    device = torch.device(device)
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=desc or f"scoring with {scorer.name}", disable=not progress, leave=False):
        chunk = list(images[start:start + batch_size])
        for i, result in enumerate(score_tensors(scorer, chunk, device, max_pixels=sys.maxsize)):
            if isinstance(result, Exception):
                if strict:
                    raise result
                continue
            out[start + i] = result[0]
    return out
