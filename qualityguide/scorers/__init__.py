"""Scorers behind one contract, built from a spec string by :func:`load_scorer`.

Specs: ``"niqe"``, ``"niqe-embedded"``, ``"brisque"``, ``"pyiqa:<name>"`` (any pyiqa NR metric),
``"lgdm:<dir>"`` (a trained LGDM head folder; its backbone is loaded from the spec stored there).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import InputError, QualityGuideError, closest
from .base import QualityScorer
from .nss import BRISQUEScorer, NIQEScorer, weights_env_var

__all__ = ["QualityScorer", "NIQEScorer", "BRISQUEScorer", "load_scorer", "scorer_table", "BUILTIN_SCORERS",
           "DEFAULT_SCORER", "weights_env_var"]

# The scorer that works on a fresh machine with no downloads (used by `qualityguide demo` and as the CLI default).
DEFAULT_SCORER = "niqe-embedded"


@dataclass(frozen=True)
class ScorerEntry:
    build: Callable[..., QualityScorer]
    description: str


def _no_weights(name: str, build: Callable[[], QualityScorer]) -> Callable[..., QualityScorer]:
    def builder(weights=None, **kwargs):
        if weights is not None:
            raise InputError(f"scorer {name!r}: takes no weights (got weights={weights!r}); drop --weights")
        if kwargs:
            raise InputError(f"scorer {name!r}: unexpected options {sorted(kwargs)}; it takes none")
        return build()
    return builder


def _with_weights(name: str, build: Callable[..., QualityScorer]) -> Callable[..., QualityScorer]:
    def builder(weights=None, **kwargs):
        if kwargs:
            raise InputError(f"scorer {name!r}: unexpected options {sorted(kwargs)}; it takes only weights=")
        return build(weights)
    return builder


BUILTIN_SCORERS: dict[str, ScorerEntry] = {
    "niqe": ScorerEntry(_with_weights("niqe", NIQEScorer.from_params),
                        "NIQE, official pristine model (pyiqa/basicsr parameters); lower-better natively"),
    "niqe-embedded": ScorerEntry(_no_weights("niqe-embedded", NIQEScorer.embedded),
                                 "NIQE with qualityguide's own pristine model fitted from bundled photographs; "
                                 "works offline everywhere"),
    "brisque": ScorerEntry(_with_weights("brisque", BRISQUEScorer.from_params),
                           "BRISQUE, original LIVE-trained SVR; lower-better natively"),
}


def load_scorer(spec: str, weights: str | os.PathLike | None = None, device: str | torch.device | None = None,
                **kwargs) -> QualityScorer:
    """Build a scorer from a spec string.

    Args:
        spec: ``"niqe"``, ``"niqe-embedded"``, ``"brisque"``, ``"pyiqa:<metric>"`` or ``"lgdm:<head dir>"``.
        weights: local weights/parameter file (else ``$QUALITYGUIDE_<NAME>_WEIGHTS``, else caches).
        device: where to put the scorer (default: stays on the CPU; nothing picks CUDA silently).
        **kwargs: scorer-specific options (``lgdm:``: ``pipeline=``, ``model=``, ``dtype=``).

    Returns:
        A :class:`QualityScorer` in eval mode.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"scorer spec must be a non-empty string, got {spec!r}; known: {', '.join(known_specs())}")
    spec = spec.strip()
    if spec.startswith("pyiqa:"):
        from .pyiqa_scorer import PyIQAScorer

        scorer: QualityScorer = PyIQAScorer(spec.split(":", 1)[1], weights=weights, **kwargs)
    elif spec.startswith("lgdm:"):
        from ..lgdm.scorer import LGDMScorer

        if weights is not None:
            raise InputError(f"scorer {spec!r}: the head folder holds the weights; drop --weights")
        scorer = LGDMScorer.from_pretrained(spec.split(":", 1)[1], device=device, **kwargs)
    elif spec in BUILTIN_SCORERS:
        scorer = BUILTIN_SCORERS[spec].build(weights=weights, **kwargs)
    else:
        known = known_specs()
        guess = closest(spec, known + [f"pyiqa:{spec}"])
        hint = f" Did you mean {guess!r}?" if guess else ""
        raise InputError(f"unknown scorer {spec!r}.{hint} Known: {', '.join(known)} "
                         "(`qualityguide scorers` lists every pyiqa metric)")
    scorer.eval()
    if device is not None:
        scorer.to(device)
    return scorer


def known_specs() -> list[str]:
    return list(BUILTIN_SCORERS) + ["pyiqa:<name>", "lgdm:<dir>"]


def scorer_table(include_pyiqa: bool = True) -> list[dict]:
    """Every scorer with whether it can be built offline on this machine now (None: unknown), and why."""
    rows = []
    for name, entry in BUILTIN_SCORERS.items():
        rows.append({"name": name, "description": entry.description, **_offline_status(name)})
    if include_pyiqa:
        from .pyiqa_scorer import pyiqa_nr_metrics

        for metric in pyiqa_nr_metrics():
            rows.append({"name": f"pyiqa:{metric}", "description": "pyiqa NR metric",
                         **_pyiqa_offline_status(metric)})
    return rows


def _offline_status(name: str) -> dict:
    try:
        load_scorer(name)
    except QualityGuideError as exc:
        return {"offline": False, "reason": str(exc)}
    return {"offline": True, "reason": ""}


# pyiqa metrics that are pure image statistics (constructible offline, tested).
NO_WEIGHTS = {"piqe", "entropy"}


def _pyiqa_offline_status(metric: str) -> dict:
    """Cheap check (no network, no weight loading): does pyiqa's cache hold the metric's default files?"""
    import importlib
    from pathlib import Path

    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    from .nss import pyiqa_cache_dir

    env = weights_env_var(f"pyiqa:{metric}")
    if os.environ.get(env):
        return {"offline": Path(os.environ[env]).is_file(), "reason": f"${env}"}
    arch = DEFAULT_CONFIGS[metric]["metric_opts"]["type"]
    module = _arch_module(arch)
    urls = getattr(importlib.import_module(module), "default_model_urls", {}) if module else {}
    if not urls:
        if metric in NO_WEIGHTS:
            return {"offline": True, "reason": "needs no weights"}
        return {"offline": None, "reason": "weights are fetched by the network's own code; build it once to know"}
    names = {os.path.basename(str(u)) for u in urls.values()}
    present = sorted(n for n in names if (pyiqa_cache_dir() / n).is_file())
    if present:
        return {"offline": True, "reason": f"cached: {', '.join(present)}"}
    return {"offline": False, "reason": f"weights not in {pyiqa_cache_dir()} (pass --weights or set ${env})"}


def _arch_module(arch: str) -> str | None:
    from pyiqa.archs import ARCH_REGISTRY, _lazy_import_arch  # pyiqa registers architectures on first use

    try:
        if arch not in ARCH_REGISTRY:
            _lazy_import_arch(arch)
        return ARCH_REGISTRY.get(arch).__module__
    except Exception:  # an arch whose module needs an optional dependency: status unknown
        return None
