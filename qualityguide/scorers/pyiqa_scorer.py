"""Any pyiqa no-reference metric behind the scorer contract (``"pyiqa:<name>"``).

The network is built with pyiqa's own registry and default options, on the CPU; the module's
``.to()`` moves it (pyiqa's ``create_metric`` would pick CUDA by itself). Weights come from
``weights=`` (pyiqa's ``pretrained_model_path``), ``$QUALITYGUIDE_PYIQA_<NAME>_WEIGHTS`` or pyiqa's
cache; offline, a missing file gives one error naming the file and where to put it.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
from pathlib import Path

import torch

from ..errors import InputError, WeightsNotFoundError, closest
from .base import QualityScorer
from .nss import pyiqa_cache_dir, weights_env_var
from .safe_load import sanitized_checkpoint

# Distribution metrics and text-conditioned ones do not score single images against the contract.
_NOT_SINGLE_IMAGE = {"fid", "sfid", "fid_dinov2", "inception_score", "clipscore"}
# Metrics built on hard histograms, thresholds or non-differentiable feature extraction.
NON_DIFFERENTIABLE = {"entropy", "nrqm", "pi", "piqe"}


def pyiqa_nr_metrics() -> list[str]:
    """Names of pyiqa's no-reference, single-image metrics."""
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    return sorted(name for name, cfg in DEFAULT_CONFIGS.items()
                  if cfg.get("metric_mode") == "NR" and name not in _NOT_SINGLE_IMAGE)


def _parse_range(text: str | None) -> tuple[float, float]:
    if not text:
        return (-math.inf, math.inf)
    parts = [p.strip().lstrip("~") for p in str(text).split(",")]
    values = []
    for i, part in enumerate(parts[:2]):
        try:
            values.append(float(part))
        except ValueError:
            values.append(-math.inf if i == 0 else math.inf)
    return (values[0], values[1]) if len(values) == 2 else (-math.inf, math.inf)


class PyIQAScorer(QualityScorer):
    """A pyiqa NR metric.

    Args:
        metric: pyiqa metric name (``pyiqa.list_models(metric_mode="NR")``).
        weights: local weights file (pyiqa's ``pretrained_model_path``); optional when pyiqa's
            cache already holds the default weights.
        **options: other pyiqa network options (override pyiqa's defaults).
    """

    min_side = 32

    def __init__(self, metric: str, weights: str | os.PathLike | None = None, **options):
        super().__init__()
        from pyiqa.archs import build_network
        from pyiqa.default_model_configs import DEFAULT_CONFIGS

        known = pyiqa_nr_metrics()
        if metric not in known:
            guess = closest(metric, known)
            hint = f"; did you mean 'pyiqa:{guess}'?" if guess else ""
            raise InputError(f"scorer 'pyiqa:{metric}': {metric!r} is not a pyiqa no-reference metric{hint} "
                             f"Known: {', '.join(known)}")
        config = DEFAULT_CONFIGS[metric]
        self.name = f"pyiqa:{metric}"
        self.metric = metric
        self.native_lower_better = bool(config.get("lower_better", False))
        self.native_range = _parse_range(config.get("score_range"))
        self.differentiable = metric not in NON_DIFFERENTIABLE
        opts = dict(config["metric_opts"])
        opts.update(options)
        env = weights_env_var(self.name)
        if weights is None and os.environ.get(env):
            weights = os.environ[env]
        if weights is not None:
            if not Path(weights).expanduser().is_file():
                raise WeightsNotFoundError(f"{self.name}: weights file {weights} does not exist; pass an existing "
                                           f"file with weights=/--weights or {env}")
            self.source = str(Path(weights).expanduser())
        messages = io.StringIO()
        with contextlib.ExitStack() as stack:
            if weights is not None:  # pyiqa unpickles without restrictions: give it a copy of a safe load
                opts["pretrained_model_path"] = stack.enter_context(sanitized_checkpoint(self.source, self.name))
            try:
                with contextlib.redirect_stdout(messages):
                    self.net = build_network(opts)
            except Exception as exc:
                raise self._weights_error(messages.getvalue(), exc, env) from None
        self.net.eval()

    def _weights_error(self, printed: str, exc: Exception, env: str) -> Exception:
        match = re.search(r'Downloading: "([^"]+)" to (\S+)', printed)
        if match:
            url, target = match.groups()
            return WeightsNotFoundError(
                f"{self.name}: weights {Path(target).name} are not on this machine and could not be downloaded "
                f"({type(exc).__name__}: {exc}). Fix: download {url} on a machine with internet and copy it to "
                f"{target} (pyiqa's cache, {pyiqa_cache_dir()}), or pass weights=/--weights FILE, or set {env}")
        return WeightsNotFoundError(
            f"{self.name}: building the pyiqa network failed ({type(exc).__name__}: {exc}). If this is a missing "
            f"download, fetch the weights on a machine with internet (pyiqa caches them in {pyiqa_cache_dir()}) "
            f"or pass weights=/--weights FILE or set {env}")

    def native(self, images: torch.Tensor) -> torch.Tensor:
        scores = self.net(images)
        if isinstance(scores, (tuple, list)):
            scores = scores[0]
        return scores.reshape(images.shape[0], -1)[:, 0]
