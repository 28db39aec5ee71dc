"""The paired gain: how much a treated arm (guided, fine-tuned) moves a score over the same prompts and seeds."""

from __future__ import annotations

import numpy as np

from qualityguide.evaluation.stats import bootstrap_ci

MIN_PAIRS = 3  # fewer pairs leave too few distinct resamples for an interval


def paired_gain(treated: np.ndarray, base: np.ndarray, n_boot: int = 2000) -> dict:
    """Mean of ``treated - base`` over pairs (same prompt and seed) with a percentile bootstrap 95% interval.

    The interval resamples the pairs' differences with :func:`qualityguide.evaluation.stats.bootstrap_ci` (seeded, so a
    rerun writes the same numbers). A pair with a NaN score (an image a scorer refuses) is dropped.

    Args:
        treated: scores ``[N]`` of the treated arm.
        base: scores ``[N]`` of the base arm, pair by pair.
        n_boot: bootstrap resamples.

    Returns:
        ``pairs``, ``gain`` (NaN without pairs), ``gain_ci95`` (``[lo, hi]``; None below :data:`MIN_PAIRS`
        pairs), ``treated_mean``, ``base_mean`` and ``fraction_improved``.
    """
    treated, base = np.asarray(treated, dtype=np.float64), np.asarray(base, dtype=np.float64)
    keep = np.isfinite(treated) & np.isfinite(base)
    diff = treated[keep] - base[keep]
    if diff.size == 0:
        nan = float("nan")
        return {"pairs": 0, "gain": nan, "gain_ci95": None, "treated_mean": nan, "base_mean": nan,
                "fraction_improved": nan}
    ci = list(bootstrap_ci(diff, diff, lambda a, b: float(np.mean(a)), n_boot=n_boot)) if diff.size >= MIN_PAIRS \
        else None
    return {"pairs": int(diff.size), "gain": float(diff.mean()), "gain_ci95": ci,
            "treated_mean": float(treated[keep].mean()), "base_mean": float(base[keep].mean()),
            "fraction_improved": float((diff > 0).mean())}
