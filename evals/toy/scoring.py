"""The toy task's scorers: the labelling scorer, a held-out one, and scoring many crops at once."""

from __future__ import annotations

from pathlib import Path


from qualityguide.errors import InputError
from qualityguide.scorers import load_scorer, split_size

from .crops import resolve_data_dir

TOY_SCORER = "brisque"
HELD_OUT_SCORER = "niqe@192"
# The parameter file each classical scorer reads from <data>/params (BRISQUE's LIVE SVR, NIQE's pristine model).
PARAM_FILES = {"brisque": "brisque_live_svm.pth", "niqe": "niqe_pristine.mat"}


def load_toy_scorer(spec: str = TOY_SCORER, weights=None, params_dir=None):
    """A scorer for the task, its parameter file taken from ``params_dir`` (the data's ``params/``).

    Args:
        spec: a :func:`qualityguide.load_scorer` spec (``"brisque"``, ``"niqe@192"``, ...).
        weights: an explicit parameter file (overrides ``params_dir``).
        params_dir: the folder with :data:`PARAM_FILES`; None: ``resolve_data_dir(None) / "params"``.
    """
    base, _ = split_size(spec)
    if weights is None and base in PARAM_FILES:
        params_dir = resolve_data_dir(None) / "params" if params_dir is None else Path(params_dir)
        weights = params_dir / PARAM_FILES[base]
        if not weights.is_file():
            raise InputError(f"scorer {spec!r} needs {weights}; pass params_dir= (or --data) pointing at the folder "
                             f"holding {PARAM_FILES[base]}, or weights= with the file")
    return load_scorer(spec, weights=weights)
