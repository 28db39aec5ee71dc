"""What the IQA-Adapter's projection sees: one vector per image, ``[condition..., 1]``, or all zeros.

Score targets are given to the projection as **percentile ranks** in the training set's score
distribution (IQA-Adapter conditions on percentiles, Abud et al. 2025, section 3.2): a rank lies in
[0,1] whatever the scorer's native range, is uniform over the training data, and does not let a few
outlying scores squeeze everyone else into a corner of the input. The table of quantiles that maps
a score to its rank (and back) is fitted once from the labelled training set and saved with the
adapter (``quantiles.json``).

The last input is a presence flag: 1 for a real condition, 0 for "no quality condition". The
all-zeros vector is the dropped condition of training (quality dropout), so it can serve as the
negative half of classifier-free guidance; the flag keeps it distinct from the lowest score, which
would otherwise also be a zero.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..scorers.safe_load import read_json_object

QUANTILE_LEVELS = 101  # 0%, 1%, ..., 100%
QUANTILES_FILE = "quantiles.json"


def _unknown_name(name: str, known: Sequence[str], what: str) -> InputError:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return InputError(f"{what} {name!r} is not one this adapter was trained on{hint}; its score names are "
                      f"{', '.join(map(repr, known))}")


@dataclass
class ScoreQuantiles:
    """Quantiles of each score over the training set: ``table[name][i]`` is the score at level ``i/(L-1)``.

    Args:
        table: score name -> ``L`` non-decreasing floats (the scorer's own units, higher is better).
        count: how many training images they were fitted from.
    """

    table: dict[str, list[float]]
    count: int = 0

    def __post_init__(self):
        for name, values in self.table.items():
            v = np.asarray(values, dtype=np.float64)
            if v.ndim != 1 or len(v) < 2 or not np.isfinite(v).all() or (np.diff(v) < 0).any():
                raise InputError(f"quantiles of {name!r} must be at least 2 finite, non-decreasing numbers; "
                                 "refit them with ScoreQuantiles.fit(...) from the training labels")

    @classmethod
    def fit(cls, scores: Mapping[str, Sequence[float] | torch.Tensor | np.ndarray],
            levels: int = QUANTILE_LEVELS) -> "ScoreQuantiles":
        """Fit from the training labels (one sequence of scores per name)."""
        table, count = {}, None
        for name, values in scores.items():
            v = np.asarray(torch.as_tensor(values, dtype=torch.float64).cpu(), dtype=np.float64).reshape(-1)
            if len(v) < 2:
                raise InputError(f"scores of {name!r}: need at least 2 labelled images to fit quantiles, got {len(v)}")
            if not np.isfinite(v).all():
                raise InputError(f"scores of {name!r}: {int((~np.isfinite(v)).sum())} are not finite; relabel the "
                                 "dataset (`qualityguide label`) or drop those rows")
            count = len(v) if count is None else count
            if len(v) != count:
                raise InputError(f"score columns have different lengths ({count} and {len(v)} for {name!r})")
            table[name] = np.quantile(v, np.linspace(0, 1, levels)).tolist()
        return cls(table, count or 0)

    @property
    def names(self) -> list[str]:
        return list(self.table)

    def _table(self, name: str) -> np.ndarray:
        if name not in self.table:
            raise _unknown_name(name, self.names, "score")
        return np.asarray(self.table[name], dtype=np.float64)

    def rank(self, name: str, scores, strict: bool = True) -> np.ndarray:
        """Percentile rank in [0,1] of each score (piecewise-linear between the stored quantiles).

        Args:
            strict: refuse scores outside the training range (an adapter has never seen them); with
                ``False`` they are clamped (training inputs, which lie inside by construction).
        """
        q = self._table(name)
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        if not np.isfinite(s).all():
            raise InputError(f"scores[{name!r}] = {s.tolist()}: every target must be a finite number")
        if strict and ((s < q[0]) | (s > q[-1])).any():
            raise InputError(f"scores[{name!r}] = {s.tolist()} lies outside the training range [{q[0]:.6g}, "
                             f"{q[-1]:.6g}] of this adapter; pass a score inside it, or percentiles={{{name!r}: p}} "
                             "with p in [0, 1]")
        levels = np.linspace(0, 1, len(q))
        # np.interp needs increasing x; repeated quantiles (ties) are resolved to the middle of their levels.
        unique, inverse = np.unique(q, return_inverse=True)
        if len(unique) == 1:
            return np.full_like(s, 0.5)
        mid = np.array([levels[inverse == i].mean() for i in range(len(unique))])
        return np.interp(s, unique, mid)

    def score_at(self, name: str, percentiles) -> np.ndarray:
        """The score at each percentile (inverse of :meth:`rank`)."""
        q = self._table(name)
        p = np.asarray(percentiles, dtype=np.float64).reshape(-1)
        return np.interp(p, np.linspace(0, 1, len(q)), q)

    def to_json(self) -> str:
        return json.dumps({"count": self.count, "quantiles": self.table}, indent=1)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ScoreQuantiles":
        path = Path(directory, QUANTILES_FILE)
        try:
            payload = read_json_object(path, "IQA-Adapter quantiles", "save the adapter again (save_pretrained)")
            return cls({str(k): [float(x) for x in v] for k, v in payload["quantiles"].items()}, int(payload["count"]))
        except FileNotFoundError:
            raise InputError(f"{path} is missing: an IQA-Adapter folder holds the score quantiles it was trained "
                             "with; save the adapter again with save_pretrained(...)") from None
        except InputError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"{path} is not a quantiles file written by IQAAdapter.save_pretrained ({exc})") from None


def values_per_name(values: Mapping[str, object] | None, names: Sequence[str], argument: str) -> tuple[np.ndarray, int]:
    """``{name: float | sequence}`` -> ``[M, k]`` float64 in ``names`` order; every name given, same length M."""
    if values is None:
        raise InputError(f"{argument} is None; pass {argument}={{name: value}} for each of {list(names)}")
    if not isinstance(values, Mapping):
        raise InputError(f"{argument} must be a dict {{score name: value or list of values}}, got "
                         f"{type(values).__name__}")
    for name in values:
        if name not in names:
            raise _unknown_name(str(name), names, f"{argument} key")
    missing = [n for n in names if n not in values]
    if missing:
        raise InputError(f"{argument} has no value for {missing}; this adapter needs one for each of {list(names)}")
    columns, length = [], None
    for name in names:
        raw = values[name]
        if isinstance(raw, torch.Tensor):
            raw = raw.detach().cpu().double().numpy()
        try:
            column = np.asarray(raw, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise InputError(f"{argument}[{name!r}] = {raw!r} is not a number or a list of numbers") from None
        if column.size == 0:
            raise InputError(f"{argument}[{name!r}] is empty; give one value, or one per image")
        if length is not None and column.size != length:
            raise InputError(f"{argument} gives {length} values for one name and {column.size} for {name!r}; give "
                             "every name the same number of targets (one, or one per image)")
        length = column.size
        columns.append(column)
    return np.stack(columns, axis=1), int(length)


def check_unit_range(values: np.ndarray, names: Sequence[str], argument: str) -> None:
    """Percentiles (and ranks) must be finite and in [0,1]."""
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise InputError(f"{argument}[{names[col]!r}] = {values[row, col]!r} is outside [0, 1]; percentiles are "
                         "fractions of the training distribution (0.99 = the 99th percentile)")


def with_presence(condition: torch.Tensor) -> torch.Tensor:
    """``[M, k]`` -> ``[M, k + 1]`` with the presence flag 1 appended."""
    return torch.cat([condition, torch.ones_like(condition[:, :1])], dim=1)


def null_condition(count: int, width: int, like: torch.Tensor | None = None, dtype=torch.float32,
                   device=None) -> torch.Tensor:
    """The dropped / unconditional input: ``[count, width]`` zeros (presence flag 0)."""
    if like is not None:
        dtype, device = like.dtype, like.device
    return torch.zeros(count, width, dtype=dtype, device=device)


def pack_embeds(positive: torch.Tensor, negative: torch.Tensor | None) -> list[torch.Tensor]:
    """diffusers' ``ip_adapter_image_embeds`` from ``[M, d]`` inputs: one target (``M == 1``) becomes
    ``[1(+1), 1, d]``, which the pipeline repeats for every image; ``M`` targets become ``[1(+1), M, d]``,
    one per image, which :mod:`qualityguide.adapter.wiring` hands to image ``i`` of the batch as its own
    target. The negative half comes first, as diffusers expects under classifier-free guidance."""
    halves = [positive] if negative is None else [negative, positive]
    return [torch.stack(halves, dim=0)]


def finite_or_raise(tensor: torch.Tensor, argument: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise InputError(f"{argument} contains NaN or infinite values; check the reference images / features")

