"""Score columns for a ``datasets.Dataset`` (:func:`label_dataset`): what ``qualityguide label`` writes into an
image folder's ``metadata.csv``, for data kept as a dataset.

It is one ``Dataset.map(batched=True)``. datasets fingerprints the transform with everything it holds (the
scorers' weights and buffers included), so on a dataset backed by cache files (``load_dataset``,
``load_from_disk``) a rerun with the same scorers and arguments reads the cached result instead of scoring
again, and other weights are a new fingerprint, never a stale cache. An in-memory dataset has no cache files:
it is scored each time.
"""

from __future__ import annotations

import io
import math
from typing import Any, Mapping, Sequence, Union

import torch

from ..errors import InputError, QualityGuideError
from ..images import check_size, load_image
from ..runtime import check_device
from .base import QualityScorer
from .batching import score_tensors

ScorerLike = Union[str, QualityScorer]


def label_dataset(dataset, scorers: ScorerLike | Sequence[ScorerLike] | Mapping[str, ScorerLike], batch_size: int = 8,
                  columns: Sequence[str] | None = None, image_column: str | None = None,
                  device: str | torch.device = "cpu", overwrite: bool = False):
    """``dataset`` with one float score column per scorer (higher is better), named as ``qualityguide label``
    names them: after the scorer's spec as written (``"niqe-embedded@192"``).

    A cell is None where the image could not be scored (unreadable, smaller than the scorer's minimum, a
    non-finite score), as ``label`` leaves the cell empty; the other rows go on.

    Args:
        dataset: a ``datasets.Dataset`` (one split: pass ``dataset_dict["train"]``).
        scorers: a spec (``"niqe-embedded"``), a :class:`QualityScorer`, a list of them, or ``{column: spec or
            scorer}``. Specs are loaded with :func:`~qualityguide.load_scorer` on ``device``; a scorer object is
            named by its ``name`` (its spec) unless ``columns`` or the dict names it.
        batch_size: rows per ``map`` batch; within one, images are scored in batches bounded by pixels.
        columns: the score columns' names, one per scorer, in order (default: the specs as written).
        image_column: the column holding the images: PIL images (an ``Image`` feature), paths, or undecoded
            ``{"bytes", "path"}`` cells (default: the dataset's only ``Image`` column, else ``"image"``).
        device: where specs are loaded and images are scored (scorer objects must already be there).
        overwrite: replace existing columns of the same names; without it they are refused.
    """
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        hint = " (a DatasetDict: pass one split, e.g. dataset['train'])" if isinstance(dataset, datasets.DatasetDict) \
            else ""
        raise InputError(f"dataset must be a datasets.Dataset, got {type(dataset).__name__}{hint}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    device = check_device(device, "device")
    named = _named_scorers(scorers, columns, device)
    image_column = _image_column(dataset, image_column)
    clash = [c for c in named if c in dataset.column_names]
    if image_column in named:
        raise InputError(f"score column {image_column!r} is the image column; name the score column otherwise "
                         "(columns=[...])")
    if clash and not overwrite:
        raise InputError(f"the dataset already has column(s) {', '.join(map(repr, clash))}; pass overwrite=True to "
                         "replace them, or other names with columns=[...]")
    features = dataset.features.copy()
    for column in named:
        features[column] = datasets.Value("float64")
    return dataset.map(_score_rows, batched=True, batch_size=batch_size, features=features,
                       fn_kwargs={"scorers": named, "image_column": image_column, "device": str(device)},
                       desc=f"labelling {', '.join(named)}")


def _named_scorers(scorers, columns: Sequence[str] | None, device: torch.device) -> dict[str, QualityScorer]:
    """``{column: scorer}`` from the forms :func:`label_dataset` takes, specs loaded on ``device``."""
    from . import load_scorer

    if isinstance(scorers, Mapping):
        if columns is not None:
            raise InputError("scorers is a dict, whose keys name the columns; drop columns=, or pass a list of scorers")
        items = list(scorers.items())
    else:
        if isinstance(scorers, (str, QualityScorer)):
            scorers = [scorers]
        scorers = list(scorers)
        names = [s if isinstance(s, str) else getattr(s, "name", None) for s in scorers]
        if columns is not None:
            names = list(columns) if not isinstance(columns, str) else [columns]
            if len(names) != len(scorers):
                raise InputError(f"columns names {len(names)} column(s) for {len(scorers)} scorer(s); give one name "
                                 "per scorer, in order")
        items = list(zip(names, scorers))
    if not items:
        raise InputError("scorers is empty; pass at least one spec, e.g. 'niqe-embedded'")
    named: dict[str, QualityScorer] = {}
    for column, scorer in items:
        if not isinstance(column, str) or not column.strip() or column != column.strip():
            raise InputError(f"score column name {column!r}: must be a non-empty string without leading or trailing "
                             "spaces; use the scorer's spec, e.g. 'niqe-embedded'")
        if column in named:
            raise InputError(f"score column {column!r} is given twice; each scorer is one column: give it once")
        if isinstance(scorer, str):
            scorer = load_scorer(scorer, device=device)
        if not isinstance(scorer, QualityScorer):
            raise InputError(f"scorer for column {column!r} is a {type(scorer).__name__}, not a QualityScorer or a "
                             f"spec; pass e.g. {column!r} or qualityguide.load_scorer({column!r})")
        named[column] = scorer
    return named


def _image_column(dataset, image_column: str | None) -> str:
    import datasets

    if image_column is None:
        found = [c for c, f in dataset.features.items() if isinstance(f, datasets.Image)]
        image_column = found[0] if len(found) == 1 else "image"
    if image_column not in dataset.column_names:
        raise InputError(f"image_column {image_column!r} is not a column of the dataset (columns: "
                         f"{', '.join(dataset.column_names)}); pass image_column=the column holding images or paths")
    return image_column


def _load(cell: Any) -> torch.Tensor:
    """An image cell as ``[3,H,W]``: a PIL image, a path, or an undecoded ``{"bytes", "path"}`` cell."""
    if isinstance(cell, dict):
        if cell.get("bytes"):
            from PIL import Image

            return load_image(Image.open(io.BytesIO(cell["bytes"])), name=cell.get("path") or "image bytes")
        cell = cell.get("path")
    if cell is None:
        raise InputError("an empty image cell")
    return load_image(cell)


def _score_rows(batch: dict, scorers: dict[str, QualityScorer], image_column: str, device: str) -> dict:
    """``map`` batch -> its score columns (None where a row could not be scored)."""
    images: dict[int, torch.Tensor] = {}
    for i, cell in enumerate(batch[image_column]):
        try:
            images[i] = _load(cell)
        except (QualityGuideError, OSError):
            continue
    out = {}
    for column, scorer in scorers.items():
        rows = [i for i, image in images.items() if _fits(image, scorer)]
        values: list[float | None] = [None] * len(batch[image_column])
        for i, result in zip(rows, score_tensors(scorer, [images[i] for i in rows], torch.device(device))):
            if not isinstance(result, Exception) and math.isfinite(result[0]):
                values[i] = result[0]
        out[column] = values
    return out


def _fits(image: torch.Tensor, scorer: QualityScorer) -> bool:
    try:
        check_size(image.shape[-2], image.shape[-1], scorer.min_side, "image")
        return True
    except QualityGuideError:
        return False
