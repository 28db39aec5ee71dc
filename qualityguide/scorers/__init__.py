"""Scorers behind one contract, built from a spec string by :func:`load_scorer`.

Specs: ``"niqe"``, ``"niqe-embedded"``, ``"brisque"``, ``"pyiqa:<name>"`` (any pyiqa NR metric),
``"lgdm:<dir>"`` (a trained LGDM head folder; its backbone is loaded from the spec stored there; registered by
the package root, see :func:`register_scorer_prefix`, so this layer imports no capability above it), each
optionally followed by ``@<size>`` (score after resizing the short side to that many pixels).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import InputError, QualityGuideError, closest
from ..runtime import check_device
from .base import SIZE_SEP, QualityScorer, Resized, check_scoring_size, split_size
from .nss import BRISQUEScorer, NIQEScorer, weights_env_var

__all__ = ["QualityScorer", "Resized", "NIQEScorer", "BRISQUEScorer", "load_scorer", "split_size", "scorer_table",
           "BUILTIN_SCORERS", "DEFAULT_SCORER", "weights_env_var", "SCORER_PREFIXES", "register_scorer_prefix"]

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


@dataclass(frozen=True)
class PrefixEntry:
    """A family of scorers named ``<prefix>:<argument>``, built by a layer above this one."""

    load: Callable[..., QualityScorer]  # load(argument, device=..., **kwargs)
    argument: str  # how ``known_specs`` shows the argument: ``lgdm:<dir>``
    description: str
    weights_refusal: str  # why ``weights=`` makes no sense for it (the spec itself names the weights)


# Filled by the layers above (``qualityguide/__init__.py`` registers ``lgdm:``), so this layer imports none of them.
SCORER_PREFIXES: dict[str, PrefixEntry] = {}


def register_scorer_prefix(prefix: str, load: Callable[..., QualityScorer], description: str, argument: str = "dir",
                           weights_refusal: str = "the spec names its weights") -> None:
    """Let :func:`load_scorer` build ``<prefix>:<argument>`` specs with ``load``.

    Args:
        prefix: the spec prefix without its colon (``"lgdm"``).
        load: ``load(argument, device=None, **kwargs) -> QualityScorer``; it may import its layer on first use.
        description: one line for listings.
        argument: the argument's name in the list of known specs.
        weights_refusal: the reason given when ``weights=`` is passed too.
    """
    if not prefix or ":" in prefix or prefix == "pyiqa" or prefix in BUILTIN_SCORERS:
        raise InputError(f"scorer prefix {prefix!r}: must be non-empty, hold no ':' and not be 'pyiqa' or a builtin "
                         f"scorer ({', '.join(BUILTIN_SCORERS)}); pick another name")
    SCORER_PREFIXES[prefix] = PrefixEntry(load, argument, description, weights_refusal)


def load_scorer(spec: str, weights: str | os.PathLike | None = None, device: str | torch.device | None = None,
                size: int | None = None, **kwargs) -> QualityScorer:
    """Build a scorer from a spec string.

    A spec is a scorer, optionally followed by ``@<size>``: ``"niqe-embedded@192"`` scores images after
    resizing their short side to 192 px (:class:`~qualityguide.scorers.base.Resized`), the same as
    ``load_scorer("niqe-embedded", size=192)``. Every scorer's ``name`` is a spec that rebuilds it; the
    name does not carry ``weights``, ``device`` or ``**kwargs``, so pass the same ones again.

    Args:
        spec: ``"niqe"``, ``"niqe-embedded"``, ``"brisque"``, ``"pyiqa:<metric>"`` or ``"lgdm:<head dir>"``,
            each optionally with ``@<size>``.
        weights: local weights/parameter file (else ``$QUALITYGUIDE_<NAME>_WEIGHTS``, else caches).
        device: where to put the scorer (default: stays on the CPU; nothing picks CUDA silently). A device this
            machine does not have (``cuda:7`` on two GPUs, ``cuda`` without CUDA, ``meta``) is refused first.
        size: resize the short side of every image to this many pixels before scoring (the spec's
            ``@<size>``; give it one way, not both).
        **kwargs: scorer-specific options (``lgdm:``: ``pipeline=``, ``model=``, ``dtype=``).

    Returns:
        A :class:`QualityScorer` in eval mode.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"scorer spec must be a non-empty string, got {spec!r}; known: {', '.join(known_specs())}")
    spec = spec.strip()
    if device is not None:
        device = check_device(device)
    base, spec_size = split_size(spec)
    if size is not None:
        size = check_scoring_size(size)
        if spec_size is not None:
            raise InputError(f"scorer {spec!r} already has a size (@{spec_size}) and size={size} was given too; give "
                             f"the size once: load_scorer({base!r}, size={size}) or load_scorer('{base}@{size}')")
    size = spec_size if size is None else size
    if base.startswith("pyiqa:"):
        from .pyiqa_scorer import PyIQAScorer

        scorer: QualityScorer = PyIQAScorer(base.split(":", 1)[1], weights=weights, **kwargs)
    elif base.split(":", 1)[0] in SCORER_PREFIXES and ":" in base:
        prefix, argument = base.split(":", 1)
        entry = SCORER_PREFIXES[prefix]
        if weights is not None:
            raise InputError(f"scorer {spec!r}: {entry.weights_refusal}; drop --weights")
        scorer = entry.load(argument, device=device, **kwargs)
    elif base in BUILTIN_SCORERS:
        scorer = BUILTIN_SCORERS[base].build(weights=weights, **kwargs)
    else:
        guess = suggest(base)
        hint = f" Did you mean {guess + (f'@{size}' if size else '')!r}?" if guess else ""
        raise InputError(f"unknown scorer {spec!r}.{hint} Known: {', '.join(known_specs())}, each optionally with "
                         f"{SIZE_SEP}<size> (`qualityguide scorers` lists every pyiqa metric)")
    scorer.eval()
    if device is not None:
        scorer.to(device)
    return Resized(scorer, size) if size is not None else scorer


def known_specs() -> list[str]:
    return list(BUILTIN_SCORERS) + ["pyiqa:<name>"] + [f"{p}:<{e.argument}>" for p, e in SCORER_PREFIXES.items()]


def suggest(name: str) -> str | None:
    """The existing scorer spec closest to ``name``: a builtin or ``pyiqa:<m>`` for a real pyiqa NR metric ``m``
    (matched with or without the ``pyiqa:`` prefix, so ``topiq`` finds ``pyiqa:topiq_nr``)."""
    from .pyiqa_scorer import pyiqa_nr_metrics

    candidates = {spec: spec for spec in BUILTIN_SCORERS}
    for metric in pyiqa_nr_metrics():
        candidates[f"pyiqa:{metric}"] = f"pyiqa:{metric}"
        candidates.setdefault(metric, f"pyiqa:{metric}")  # pyiqa's own niqe/brisque do not hide the builtins
    guess = closest(name, list(candidates))
    return candidates[guess] if guess else None


def scorer_table(include_pyiqa: bool = True) -> list[dict]:
    """Every scorer with whether it can be built offline on this machine now (None: unknown), and why."""
    rows = []
    for name, entry in BUILTIN_SCORERS.items():
        rows.append({"name": name, "description": entry.description, **_offline_status(name)})
    if include_pyiqa:
        from .pyiqa_scorer import pyiqa_nr_metrics, pyiqa_offline_status

        for metric in pyiqa_nr_metrics():
            rows.append({"name": f"pyiqa:{metric}", "description": "pyiqa NR metric", **pyiqa_offline_status(metric)})
    return rows


def _offline_status(name: str) -> dict:
    try:
        load_scorer(name)
    except QualityGuideError as exc:
        return {"offline": False, "reason": str(exc)}
    return {"offline": True, "reason": ""}
