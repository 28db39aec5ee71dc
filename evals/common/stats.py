"""The paired gain: how much a treated arm (guided, fine-tuned) moves a score over the same prompts and seeds; and
where a trained model's statistic falls among its shuffled-label twins' (the permutation test)."""

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


def permutation_test(true: float, twins) -> dict:
    """Where ``true`` (a statistic of the model trained on the true labels) falls in the permutation distribution
    of the same statistic over its shuffled-label twins (each trained identically on another label permutation).

    One twin is one draw from the null; ``N`` twins give the one-sided permutation p-value
    ``(1 + #{twins >= true}) / (1 + N)`` (Phipson & Smyth 2010: never 0, and at least ``1 / (1 + N)``, so 8 twins
    cannot show p below 0.111). Non-finite twins are left out.

    Args:
        true: the statistic of the true-label model (larger = more of the effect tested).
        twins: the same statistic of each twin.

    Returns:
        ``statistic`` (``true``), ``twins`` (the finite twin values), ``twin_mean``, ``twin_sd`` (ddof 1; NaN below
        two twins), ``rank`` (1 = above every twin; ties count against the true model), ``of`` (twins + 1), ``p``
        and ``p_floor`` (the smallest p these twins allow). NaN ``p`` and ``rank`` 0 when ``true`` is not finite or
        no twin is.
    """
    values = np.asarray([float(v) for v in twins], dtype=np.float64)
    values = values[np.isfinite(values)]
    n = int(values.size)
    out = {"statistic": float(true), "twins": values.tolist(), "of": n + 1,
           "twin_mean": float(values.mean()) if n else float("nan"),
           "twin_sd": float(values.std(ddof=1)) if n >= 2 else float("nan"),
           "p_floor": 1 / (n + 1)}
    if not np.isfinite(true) or n == 0:
        return {**out, "rank": 0, "p": float("nan")}
    at_least = int((values >= true).sum())
    return {**out, "rank": 1 + at_least, "p": (1 + at_least) / (1 + n)}
