"""Any pyiqa no-reference metric behind the scorer contract (``"pyiqa:<name>"``).

Built with pyiqa's public ``create_metric(name, as_loss=True, loss_reduction="none", device="cpu")``:
``as_loss`` keeps the autograd graph (pyiqa otherwise scores under ``no_grad``) and disables nothing
else that matters here (pyiqa neither negates nor weights a metric's output; ``loss_reduction="none"``
keeps one score per image, in the metric's own units). The device is given explicitly because
``create_metric`` picks CUDA by itself otherwise; the module's ``.to()`` moves it afterwards.

Weights come from ``weights=`` (pyiqa's ``pretrained_model_path``), ``$QUALITYGUIDE_PYIQA_<NAME>_WEIGHTS``
or pyiqa's cache, which pyiqa fills from the network on first use. The files a metric loads by
default are known before building it (the URLs in its architecture module's ``default_model_urls``),
so a missing file is explained up front: in offline mode (``HF_HUB_OFFLINE=1``) nothing is attempted
and the error names the file, the cache folder and how to pass weights instead.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import sys
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..errors import InputError, QualityGuideError, WeightsNotFoundError, closest, printable
from .base import QualityScorer
from .nss import pyiqa_cache_dir, weights_env_var
from .safe_load import check_checkpoint, sanitized_checkpoint, weights_file

# Distribution metrics and text-conditioned ones do not score single images against the contract.
_NOT_SINGLE_IMAGE = {"fid", "sfid", "fid_dinov2", "inception_score", "clipscore"}
# Metrics built on hard histograms, thresholds or non-differentiable feature extraction.
NON_DIFFERENTIABLE = {"entropy", "nrqm", "pi", "piqe"}
# pyiqa metrics that are pure image statistics (constructible offline, tested).
NO_WEIGHTS = {"piqe", "entropy"}
# Environment variables that put the Hugging Face stack (which hosts pyiqa's weights) offline, and their true values.
OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = {"1", "ON", "YES", "TRUE"}


def pyiqa_nr_metrics() -> list[str]:
    """Names of pyiqa's no-reference, single-image metrics."""
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    return sorted(name for name, cfg in DEFAULT_CONFIGS.items()
                  if cfg.get("metric_mode") == "NR" and name not in _NOT_SINGLE_IMAGE)


def offline_mode() -> bool:
    """Whether ``$HF_HUB_OFFLINE`` (or ``$TRANSFORMERS_OFFLINE``) is set, read now (not at import)."""
    return any(os.environ.get(name, "").strip().upper() in _TRUE for name in OFFLINE_ENV)


def _arch_module(arch: str) -> str | None:
    from pyiqa.archs import ARCH_REGISTRY, _lazy_import_arch  # pyiqa registers architectures on first use

    try:
        if arch not in ARCH_REGISTRY:
            _lazy_import_arch(arch)
        return ARCH_REGISTRY.get(arch).__module__
    except Exception:  # an arch whose module needs an optional dependency: unknown
        return None


def default_weight_urls(metric: str, options: dict | None = None) -> tuple[list[str], bool] | None:
    """The URLs of the weights pyiqa loads by default for ``metric`` (with ``options`` over its defaults).

    Read from the architecture module's ``default_model_urls``: the entries named by the metric's options
    (``pretrained="koniq10k"``, ``model_name="cfanet_nr_koniq_res50"``, ...) or by the metric itself.

    Returns:
        ``(urls, exact)``: ``exact`` is False when the options do not say which entry is used (then any one
        of ``urls`` may be the one); ``([], True)`` when nothing is loaded by default; None when the
        architecture cannot be imported here (unknown).
    """
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    opts = {**DEFAULT_CONFIGS[metric]["metric_opts"], **(options or {})}
    if opts.get("pretrained_model_path") is not None or opts.get("pretrained", True) in (None, False):
        return [], True
    module = _arch_module(opts["type"])
    if module is None:
        return None
    urls = {k: v for k, v in getattr(importlib.import_module(module), "default_model_urls", {}).items()
            if isinstance(v, str)}
    named = [urls[v] for v in opts.values() if isinstance(v, str) and v in urls]
    if named:
        return named, True
    if metric in urls:
        return [urls[metric]], True
    return sorted(set(urls.values())), not urls


def weight_file(url: str) -> Path:
    """Where pyiqa keeps the download of ``url`` (its ``load_file_from_url`` names files after the URL)."""
    return pyiqa_cache_dir() / os.path.basename(urlparse(url).path)


def missing_weights(metric: str, options: dict | None = None) -> tuple[list[str], bool]:
    """URLs of default weights of ``metric`` that are not in pyiqa's cache, and whether that list is exact.

    For an inexact list (any one of several files may be the one), all of them when none is cached, else none.
    """
    found = default_weight_urls(metric, options)
    if not found:
        return [], True
    urls, exact = found
    missing = [u for u in urls if not weight_file(u).is_file()]
    return (missing if exact or len(missing) == len(urls) else []), exact


def pyiqa_offline_status(metric: str) -> dict:
    """Cheap check (no network, no weight loading): can ``pyiqa:<metric>`` be built offline now, and why."""
    env = weights_env_var(f"pyiqa:{metric}")
    if os.environ.get(env):  # the file must be a checkpoint that loads safely; whether it fits shows when built
        try:
            check_checkpoint(weights_file(os.environ[env], f"${env}={Path(os.environ[env]).expanduser()}",
                                          f"point it at {metric}'s checkpoint{_default_files(metric)}"), f"${env}")
        except QualityGuideError as exc:
            return {"offline": False, "reason": str(exc)}
        return {"offline": True, "reason": f"${env} (a checkpoint that loads safely)"}
    if metric in NO_WEIGHTS:
        return {"offline": True, "reason": "needs no weights"}
    found = default_weight_urls(metric)
    if found is None or not found[0]:
        return {"offline": None, "reason": "weights are fetched by the network's own code; build it once to know"}
    missing, exact = missing_weights(metric)
    if missing:
        return {"offline": False, "reason": f"{_files(missing, exact)} not in {pyiqa_cache_dir()} "
                                            f"(pass --weights or set ${env})"}
    return {"offline": True, "reason": f"cached in {pyiqa_cache_dir()}"}


def _files(urls: list[str], exact: bool) -> str:
    names = [weight_file(u).name for u in urls]
    return ", ".join(names) if exact or len(names) == 1 else f"one of {', '.join(names)}"


def _default_files(metric: str) -> str:
    """`` (pyiqa's default: FILE from URL)`` for messages, or "" when unknown."""
    found = default_weight_urls(metric)
    if not found or not found[0]:
        return ""
    urls, exact = found
    return f" (pyiqa's default: {_files(urls, exact)}, from {' or '.join(urls[:3])})"


def _failed_reading(exc: BaseException, copy: str) -> bool:
    """Whether ``exc`` was raised while pyiqa read the weights file ``copy`` into its network.

    Read off the traceback: the innermost frame that holds the path as a local (pyiqa's ``load_pretrained_network``,
    or the architecture's ``__init__``) either is a loading helper rather than the constructor, raised the error
    itself, or called a ``load_state_dict`` that raised it. A failure elsewhere in a constructor (a backbone
    download) passes through the constructor without any of these.
    """
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    holding = [i for i, frame in enumerate(frames)
               if any(isinstance(v, str) and v == copy for v in frame.f_locals.values())]
    if not holding:
        return False
    last = holding[-1]
    return (frames[last].f_code.co_name != "__init__" or last == len(frames) - 1
            or any(frame.f_code.co_name == "load_state_dict" for frame in frames[last + 1:]))


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
    """A pyiqa NR metric, built by ``pyiqa.create_metric`` on the CPU; its parameters are frozen.

    ``name`` (``"pyiqa:<metric>"``) rebuilds the scorer with pyiqa's default options; it does not carry
    ``weights`` or ``**options``.

    Args:
        metric: pyiqa metric name (``pyiqa.list_models(metric_mode="NR")``).
        weights: local weights file (pyiqa's ``pretrained_model_path``); optional when pyiqa's
            cache already holds the default weights or pyiqa may download them.
        **options: other pyiqa network options (override pyiqa's defaults).
    """

    min_side = 32

    def __init__(self, metric: str, weights: str | os.PathLike | None = None, **options):
        super().__init__()
        import pyiqa
        from pyiqa.default_model_configs import DEFAULT_CONFIGS

        known = pyiqa_nr_metrics()
        if metric not in known:
            guess = closest(metric, known)
            hint = f"; did you mean 'pyiqa:{guess}'?" if guess else ""
            raise InputError(f"scorer 'pyiqa:{metric}': {metric!r} is not a pyiqa no-reference metric{hint} "
                             f"Known: {', '.join(known)}")
        config = DEFAULT_CONFIGS[metric]
        self.name = f"pyiqa:{metric}"
        self.native_lower_better = bool(config.get("lower_better", False))
        self.native_range = _parse_range(config.get("score_range"))
        self.differentiable = metric not in NON_DIFFERENTIABLE
        env = weights_env_var(self.name)
        label = "weights file"
        if weights is None and os.environ.get(env):
            weights, label = os.environ[env], f"${env}"
        if weights is not None:
            path = weights_file(weights, f"{self.name}: {label} {Path(weights).expanduser()}",
                                f"pass {metric}'s checkpoint{_default_files(metric)} with weights=/--weights or ${env}")
            self.source = str(path)
        missing, exact = missing_weights(metric, {**options, **({"pretrained_model_path": str(path)} if weights
                                                                 is not None else {})})
        if missing and offline_mode():
            raise self._missing_error(missing, exact, env, "offline mode is on (HF_HUB_OFFLINE), so nothing was downloaded")
        with contextlib.ExitStack() as stack:
            if weights is not None:  # pyiqa unpickles without restrictions: give it a copy of a safe load
                options["pretrained_model_path"] = stack.enter_context(sanitized_checkpoint(self.source, self.name))
            try:
                with contextlib.redirect_stdout(sys.stderr):  # pyiqa prints download/loading progress; stdout is for results
                    self.metric = pyiqa.create_metric(metric, as_loss=True, loss_reduction="none",
                                                      device=torch.device("cpu"), **options)
            except Exception as exc:
                if weights is not None:
                    raise self._weights_error(exc, path, options["pretrained_model_path"], env) from exc
                if missing and missing_weights(metric, options)[0]:
                    raise self._missing_error(missing, exact, env,
                                              f"downloading failed ({type(exc).__name__}: {exc})") from exc
                raise QualityGuideError(f"{self.name}: pyiqa could not build the metric ({type(exc).__name__}: "
                                        f"{exc}). If it fetches weights or a backbone of its own, run it once with "
                                        f"internet (pyiqa caches in {pyiqa_cache_dir()}) or pass weights=/--weights "
                                        "FILE") from exc
        self.metric.requires_grad_(False)  # a fixed judge; also keeps pyiqa's as_loss mode from building graphs under no_grad
        self.metric.eval()

    def _weights_error(self, exc: Exception, path: Path, copy: str, env: str) -> QualityGuideError:
        """The error for a metric that pyiqa could not build with a user's weights file: the file's fault when pyiqa
        failed while reading it into the network, else (a backbone of its own, ...) said without blaming the file."""
        metric = self.name.split(":", 1)[1]
        lines = str(exc).strip().splitlines()
        detail = f"{type(exc).__name__}: {printable(lines[0][:200]) if lines else ''}" + \
            (f" ... ({len(lines) - 1} more lines)" if len(lines) > 1 else "")
        if _failed_reading(exc, copy):
            return InputError(f"{self.name}: {path} is not weights for {metric}: pyiqa could not load it into the "
                              f"network ({detail}). Fix: pass {metric}'s own checkpoint{_default_files(metric)} with "
                              f"weights=/--weights or ${env}, or leave weights out to use pyiqa's cache")
        return QualityGuideError(f"{self.name}: pyiqa could not build the metric with weights {path} ({detail}); the "
                                 "file itself was not what failed. If the metric fetches a backbone of its own, run it "
                                 f"once with internet (pyiqa caches in {pyiqa_cache_dir()})")

    def _missing_error(self, urls: list[str], exact: bool, env: str, why: str) -> WeightsNotFoundError:
        where = " or ".join(urls)
        return WeightsNotFoundError(
            f"{self.name}: weights {_files(urls, exact)} are not in pyiqa's cache {pyiqa_cache_dir()} and {why}. "
            f"Fix: download {where} on a machine with internet into {pyiqa_cache_dir()}, or pass weights=/--weights "
            f"FILE, or set {env}=FILE")

    @property
    def net(self) -> torch.nn.Module:
        """pyiqa's network (the architecture module ``create_metric`` built)."""
        return self.metric.net

    def native(self, images: torch.Tensor) -> torch.Tensor:
        scores = self.metric(images)
        return scores.reshape(images.shape[0], -1)[:, 0]
