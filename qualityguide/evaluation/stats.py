"""IQA evaluation statistics and split protocol.

SRCC/PLCC/KRCC as in the IQA literature (VQEG, 2000/2003): PLCC is reported raw and after the
standard four-parameter logistic mapping of predictions to MOS, signed by the mapping's direction (a
falling mapping, an anti-correlated predictor, gives a negative PLCC, as its SRCC is). Splits are content-disjoint:
images that share a ``content`` (a source/reference image) never straddle train and test.

Ranks and correlations are ``scipy.stats`` (``spearmanr``, ``kendalltau`` tau-b, ``pearsonr``). A
constant prediction or MOS vector has no defined correlation: every coefficient is then NaN, without
scipy's ``ConstantInputWarning``, and :func:`bootstrap_ci` drops such resamples.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable, Sequence

import numpy as np
from scipy import stats

from ..errors import InputError


def _pair(pred: Sequence[float], mos: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(pred, dtype=np.float64).ravel()
    y = np.asarray(mos, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise InputError(f"predictions ({x.size}) and MOS ({y.size}) must have the same length")
    if x.size < 3:
        raise InputError(f"correlations need at least 3 pairs, got {x.size}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise InputError("predictions and MOS must be finite; drop failed images first")
    return x, y


def _constant(x: np.ndarray, y: np.ndarray) -> bool:
    return bool(np.ptp(x) == 0 or np.ptp(y) == 0)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    return float("nan") if _constant(x, y) else float(stats.pearsonr(x, y).statistic)


def srcc(pred: Sequence[float], mos: Sequence[float]) -> float:
    """Spearman rank-order correlation (ties get their average rank); NaN if either input is constant."""
    x, y = _pair(pred, mos)
    return float("nan") if _constant(x, y) else float(stats.spearmanr(x, y).statistic)


def krcc(pred: Sequence[float], mos: Sequence[float]) -> float:
    """Kendall's tau-b (ties in either variable reduce the denominator); NaN if either input is constant."""
    x, y = _pair(pred, mos)
    return float("nan") if _constant(x, y) else float(stats.kendalltau(x, y, variant="b").statistic)


def logistic4(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """Four-parameter logistic (VQEG): ``(b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2``."""
    with np.errstate(over="ignore"):  # exp overflows to inf far from the step: the limit (b2) is right
        return (b1 - b2) / (1.0 + np.exp(-(x - b3) / (np.abs(b4) + 1e-12))) + b2


def fit_logistic(pred: Sequence[float], mos: Sequence[float]) -> np.ndarray:
    """Least-squares fit of :func:`logistic4` mapping predictions to MOS; returns ``[b1, b2, b3, b4]``."""
    from scipy.optimize import OptimizeWarning, curve_fit

    x, y = _pair(pred, mos)
    # Fit on standardised predictions (well-conditioned whatever the metric's units), then map back.
    centre, spread = float(x.mean()), float(x.std()) or 1.0
    z = (x - centre) / spread
    increasing = _pearson(x, y) >= 0
    init = [y.max(), y.min(), 0.0, 1.0] if increasing else [y.min(), y.max(), 0.0, 1.0]
    try:
        with warnings.catch_warnings():  # "covariance could not be estimated": only the parameters are used
            warnings.simplefilter("ignore", OptimizeWarning)
            params, _ = curve_fit(logistic4, z, y, p0=init, maxfev=20000)
    except RuntimeError:  # no convergence: keep the initial (monotone) guess
        params = np.asarray(init, dtype=np.float64)
    b1, b2, b3, b4 = params
    return np.asarray([b1, b2, b3 * spread + centre, abs(b4) * spread], dtype=np.float64)


def plcc(pred: Sequence[float], mos: Sequence[float], fit: str = "logistic") -> float:
    """Pearson linear correlation, raw (``fit="none"``) or after the 4-parameter logistic (``"logistic"``).

    The logistic may fall or rise (whichever fits), but its correlation carries the mapping's direction:
    predictions are higher-is-better, so a predictor whose fitted mapping falls reports ``-r``, with the sign of
    its SRCC, instead of the ``+r`` a free-direction fit alone would give.
    """
    x, y = _pair(pred, mos)
    if fit == "none":
        return _pearson(x, y)
    if fit != "logistic":
        raise InputError(f"fit must be 'none' or 'logistic', got {fit!r}")
    params = fit_logistic(x, y)
    mapped = logistic4(x, *params)
    if not np.all(np.isfinite(mapped)) or np.std(mapped) <= 1e-12 * (np.abs(mapped).max() + 1.0):
        # A degenerate (flat) fit: no monotone relation for the logistic to find; the linear map is the
        # best member of the family left, so report the raw correlation instead of NaN.
        return _pearson(x, y)
    direction = 1.0 if params[0] >= params[1] else -1.0  # logistic4 rises in x exactly when b1 > b2
    return direction * _pearson(mapped, y)


def correlations(pred: Sequence[float], mos: Sequence[float]) -> dict[str, float]:
    """SRCC, KRCC, raw PLCC and logistic PLCC in one dict."""
    return {"srcc": srcc(pred, mos), "krcc": krcc(pred, mos), "plcc_raw": plcc(pred, mos, "none"),
            "plcc": plcc(pred, mos, "logistic")}


def bootstrap_ci(pred: Sequence[float], mos: Sequence[float], statistic: Callable[[np.ndarray, np.ndarray], float],
                 n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(pred, mos)`` over images resampled with replacement."""
    x, y = _pair(pred, mos)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, x.size, x.size)
        value = statistic(x[idx], y[idx])
        if np.isfinite(value):
            values.append(value)
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1.0 - alpha))


def content_disjoint_split(contents: Sequence[str] | None, n: int | None = None,
                           ratios: tuple[float, float, float] = (0.7, 0.1, 0.2),
                           seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train/val/test indices such that no content appears in two parts.

    Args:
        contents: one content label per image (None: every image is its own content; then pass ``n``).
        ratios: target fractions of *images* per part; contents are shuffled and assigned greedily.
        seed: the split's seed (the protocol uses seeds 0..9).
    """
    if contents is None:
        if n is None:
            raise InputError("content_disjoint_split: pass contents or n")
        contents = [str(i) for i in range(n)]
    if len(ratios) != 3 or any(r < 0 for r in ratios) or not np.isclose(sum(ratios), 1.0):
        raise InputError(f"ratios must be three non-negative fractions summing to 1, got {ratios}")
    labels = np.asarray([str(c) for c in contents])
    unique, inverse = np.unique(labels, return_inverse=True)
    if unique.size < 3:
        raise InputError(f"need at least 3 distinct contents to split, got {unique.size}")
    order = np.random.default_rng(seed).permutation(unique.size)
    counts = np.bincount(inverse, minlength=unique.size)
    bounds = np.cumsum(ratios)[:2] * labels.size
    part_of_content = np.empty(unique.size, dtype=np.int64)
    seen = 0
    for content in order:
        centre = seen + counts[content] / 2.0  # assign by where the content's middle falls
        part_of_content[content] = 0 if centre <= bounds[0] else (1 if centre <= bounds[1] else 2)
        seen += counts[content]
    parts = part_of_content[inverse]
    return tuple(np.flatnonzero(parts == k) for k in range(3))  # type: ignore[return-value]


def summarize(values: Iterable[float]) -> dict[str, float]:
    """Median, mean, standard deviation, min and max of repeated-split results."""
    arr = np.asarray(list(values), dtype=np.float64)
    return {"median": float(np.median(arr)), "mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1
            else 0.0, "min": float(arr.min()), "max": float(arr.max()), "n": int(arr.size)}
