"""Scoring many images of possibly different sizes with one scorer: batches of same-size images bounded by
pixels (so memory does not grow with the batch size), a failing batch retried image by image (so an image that
is refused or does not fit in memory fails alone). Shared by ``qualityguide score``/``label``, ``label_dataset``
and the evals.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import QualityGuideError
from .base import QualityScorer


# Images per batch are bounded by their pixel count, so memory does not grow with --batch-size: 8 phone
# photos (12 MP each) are 8 batches, 8 thumbnails one. A larger image is a batch of its own (NIQE and
# BRISQUE then bound their own memory by tiling).
BATCH_PIXELS = 16 * 2**20


def batches_by_pixels(shapes: Sequence[tuple[int, ...]], max_pixels: int | None = None,
                      pixels: Sequence[int] | None = None) -> list[list[int]]:
    """Indices of same-size images grouped into batches of at most ``max_pixels`` pixels (default
    :data:`BATCH_PIXELS`; at least one image).

    Args:
        shapes: each image's shape (``[..., H, W]``); only same shapes share a batch.
        pixels: what each image costs against the budget (default ``H * W``; a resizing scorer costs
            what it computes on, :func:`image_cost`).
    """
    max_pixels = BATCH_PIXELS if max_pixels is None else max_pixels
    groups: dict[tuple, list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(i)
    batches = []
    for shape, indices in groups.items():
        cost = shape[-2] * shape[-1] if pixels is None else pixels[indices[0]]
        per_batch = max(1, max_pixels // max(1, cost))
        batches.extend(indices[start:start + per_batch] for start in range(0, len(indices), per_batch))
    return batches


def image_cost(scorer: QualityScorer, height: int, width: int, name: str = "images") -> int:
    """Pixels an image costs in a batch: its own or those the scorer computes on (``@SIZE`` may enlarge it),
    whichever is more; the scorer's :class:`ImageError` if it would compute on too many."""
    scored = scorer.scored_size(height, width, name)
    return max(height * width, scored[0] * scored[1])


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (CPU: MemoryError, or torch's RuntimeError "not enough memory" /
    "can't allocate memory"; CUDA: torch.OutOfMemoryError), which is one image's problem, not the run's."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    messages = ("not enough memory", "can't allocate memory", "out of memory")  # torch's CPU allocator, CUDA
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in messages)


def score_tensors(scorer: QualityScorer, images: list[torch.Tensor], device: torch.device,
                  max_pixels: int | None = None) -> list[tuple[float, float] | Exception]:
    """Score images of possibly different sizes in batches of same-size images of at most ``max_pixels``
    pixels as the scorer computes on them (:func:`batches_by_pixels`, :func:`image_cost`); a failing batch
    is retried one by one, so an image that is refused or does not fit in memory fails alone."""
    results: list[tuple[float, float] | Exception] = [None] * len(images)  # type: ignore[list-item]
    costs: dict[int, int] = {}
    for i, image in enumerate(images):
        try:
            costs[i] = image_cost(scorer, image.shape[-2], image.shape[-1], f"{scorer.name} input")
        except QualityGuideError as exc:
            results[i] = exc
    order = list(costs)
    for batch in batches_by_pixels([images[i].shape for i in order], max_pixels, [costs[i] for i in order]):
        indices = [order[j] for j in batch]
        if _try_group(scorer, images, indices, device, results) or len(indices) == 1:
            continue
        for i in indices:
            _try_group(scorer, images, [i], device, results)
    return results


def _try_group(scorer, images, indices, device, results) -> bool:
    """Score one batch into ``results``; False if it failed (recorded for a single image)."""
    try:
        _score_group(scorer, images, indices, device, results)
        return True
    except (QualityGuideError, MemoryError, RuntimeError) as exc:
        if not isinstance(exc, QualityGuideError) and not _out_of_memory(exc):
            raise
        if not isinstance(exc, QualityGuideError):
            exc = _memory_error(images[indices[0]], device)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # give the failed batch's blocks back before the next one
        if len(indices) == 1:
            results[indices[0]] = exc
        return False


def _score_group(scorer, images, indices, device, results) -> None:
    if len(indices) == 1:
        batch = images[indices[0]][None].to(device)  # a view: a big photo is not copied
    else:
        batch = torch.stack([images[i] for i in indices]).to(device)
    with torch.no_grad():
        scores, native = scorer.score_with_native(batch)
    for j, i in enumerate(indices):
        results[i] = (float(scores[j]), float(native[j]))


def _memory_error(image: torch.Tensor, device: torch.device) -> QualityGuideError:
    height, width = image.shape[-2:]
    return QualityGuideError(f"not enough memory on {device} to score this {width}x{height} px image; free memory, "
                             "score it on another device, or with a smaller @SIZE")
