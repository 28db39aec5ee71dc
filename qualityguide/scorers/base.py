"""The one scorer contract: images ``[B,3,H,W]`` in [0,1] -> scores ``[B]``, higher is better."""

from __future__ import annotations

import functools
import math
import numbers
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ImageError, InputError
from ..images import check_batch


class QualityScorer(nn.Module):
    """Base class of every scorer.

    Subclasses implement :meth:`native` (the metric in its own units and direction); ``forward``
    validates the input and maps the native value so that higher is better (negation for
    lower-better metrics, so differences and gradients keep their size).

    Attributes:
        name: the spec that :func:`qualityguide.load_scorer` accepts to build this scorer.
        differentiable: whether gradients w.r.t. the input images are meaningful (tested).
        native_lower_better: the metric's own direction.
        native_range: the metric's nominal range in its own units (``math.inf`` where unbounded).
        min_side: the smallest image side (px) the metric accepts.
    """

    name: str = "scorer"
    differentiable: bool = False
    native_lower_better: bool = False
    native_range: tuple[float, float] = (-math.inf, math.inf)
    min_side: int = 1

    @property
    def settings_name(self) -> str:
        """How a scores CSV's settings name this scorer: its ``name``, unless the spec names a path whose content
        can change (``lgdm:<dir>`` is named by the head's content instead)."""
        return self.name

    def __init_subclass__(cls, **kwargs) -> None:
        """Wrap a subclass's own :meth:`native` so that it checks its input exactly as ``forward`` does: ``native``
        is public (reports and the README call it), and an unchecked ``x * 255`` would return a number."""
        super().__init_subclass__(**kwargs)
        metric = cls.__dict__.get("native")
        if metric is not None and not getattr(metric, "checks_input", False):
            cls.native = _checking(metric)

    def native(self, images: torch.Tensor) -> torch.Tensor:
        """Scores ``[B]`` in the metric's own units and direction (input as for ``forward``, checked the same way)."""
        raise NotImplementedError

    def check_input(self, images: torch.Tensor) -> None:
        """The contract's input check (:func:`~qualityguide.images.check_batch`) with this scorer's name and
        ``min_side``."""
        check_batch(images, f"{self.name} input", self.min_side)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Scores ``[B]``, higher is better.

        Args:
            images: float tensor ``[B,3,H,W]`` in [0,1], RGB, on this module's device.
        """
        return self.score_with_native(images)[0]

    def score_with_native(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated ``(scores, native)`` from one metric evaluation (reports need both)."""
        metric = self.native
        if not getattr(metric, "checks_input", False):  # e.g. a function set on the instance, not wrapped
            self.check_input(images)
        native = metric(images)
        return self.to_higher_better(native), native

    def scored_size(self, height: int, width: int, name: str = "images") -> tuple[int, int]:
        """The ``(height, width)`` the metric computes on for an image of this size (memory grows with it).

        Args:
            height, width: the image's size in pixels.
            name: how errors refer to the image.
        """
        return height, width

    def to_higher_better(self, native_scores: torch.Tensor) -> torch.Tensor:
        """Map native scores to the contract's direction (negate lower-better metrics)."""
        return -native_scores if self.native_lower_better else native_scores

    def extra_repr(self) -> str:
        direction = "lower" if self.native_lower_better else "higher"
        return (f"name={self.name!r}, differentiable={self.differentiable}, "
                f"native_range={self.native_range}, native {direction} is better, min_side={self.min_side}")


def _checking(metric: Callable[[QualityScorer, torch.Tensor], torch.Tensor]) -> Callable:
    """``metric`` (a subclass's ``native``) behind :meth:`QualityScorer.check_input`."""

    @functools.wraps(metric)
    def native(self: QualityScorer, images: torch.Tensor) -> torch.Tensor:
        self.check_input(images)
        return metric(self, images)

    native.checks_input = True  # type: ignore[attr-defined]
    return native


# A spec's size suffix: "niqe-embedded@192" is niqe-embedded on images whose short side is resized to 192 px.
SIZE_SEP = "@"
# The most pixels an image may be resized to (64 Mi px, 768 MiB as float32 RGB, below Pillow's decompression-bomb
# limit for files): a 1x20000 px strip at @192 would be 192x3840000 px, gigabytes for one small file. A size
# suffix is at most the side of a square of that many pixels.
MAX_RESIZED_PIXELS = 2**26
MAX_SCORING_SIZE = math.isqrt(MAX_RESIZED_PIXELS)


def check_scoring_size(size: object, argument: str = "size") -> int:
    """``size`` as an int if it is a positive whole number of pixels, else an :class:`InputError` naming ``argument``."""
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise InputError(f"{argument}={size!r}: the scoring size must be a positive whole number of pixels (the short "
                         f"side images are resized to before scoring), e.g. {argument}=192")
    if size > MAX_SCORING_SIZE:
        raise InputError(f"{argument}={size}: the scoring size is at most {MAX_SCORING_SIZE} px (a resized image may "
                         f"hold at most {MAX_RESIZED_PIXELS:,} px); use a smaller size, e.g. {argument}=512")
    return int(size)


def split_size(spec: str) -> tuple[str, int | None]:
    """Split a spec into its scorer and its size: ``"niqe@192"`` -> ``("niqe", 192)``, ``"niqe"`` -> ``("niqe", None)``.

    The size is whatever follows the last ``@``. A head folder may hold an ``@`` in its path: for ``lgdm:``
    specs, an ``@`` followed by a path separator belongs to the path (``"lgdm:runs/a@b/head"`` has no size).
    """
    base, sep, tail = spec.rpartition(SIZE_SEP)
    if not sep or (base.startswith("lgdm:") and any(c in tail for c in "/\\")):
        return spec, None
    if not base:
        raise InputError(f"scorer {spec!r}: nothing before {SIZE_SEP!r}; write SPEC{SIZE_SEP}SIZE, e.g. niqe-embedded@192")
    if not (tail.isascii() and tail.isdigit()) or int(tail) < 1:
        raise InputError(f"scorer {spec!r}: the size after {SIZE_SEP!r} must be a positive whole number of pixels, got "
                         f"{tail!r}; write e.g. {base}{SIZE_SEP}192")
    if int(tail) > MAX_SCORING_SIZE:
        raise InputError(f"scorer {spec!r}: the size after {SIZE_SEP!r} is at most {MAX_SCORING_SIZE} px (a resized "
                         f"image may hold at most {MAX_RESIZED_PIXELS:,} px), got {tail}; write e.g. "
                         f"{base}{SIZE_SEP}512")
    if SIZE_SEP in base and not base.startswith("lgdm:"):
        first = base.split(SIZE_SEP)[0]
        raise InputError(f"scorer {spec!r}: one size per spec, found several {SIZE_SEP!r}; write e.g. "
                         f"{first}{SIZE_SEP}{tail}")
    return base, int(tail)


class Resized(QualityScorer):
    """A scorer applied after resizing the short side to ``size`` (bilinear, antialiased when shrinking).

    For images smaller than a metric's minimum (tiny test models make 64 px images; NIQE needs 192)
    or to score at a fixed resolution. Differentiable when the wrapped scorer is. Its ``name`` is
    ``"<scorer name>@<size>"``, the spec :func:`qualityguide.load_scorer` builds it from (also
    ``load_scorer(spec, size=N)``).

    Args:
        scorer: any :class:`QualityScorer` that is not itself resized.
        size: the short side, in pixels, the wrapped scorer sees; at least the scorer's ``min_side``.
    """

    def __init__(self, scorer: QualityScorer, size: int):
        super().__init__()
        if isinstance(scorer, Resized):
            raise InputError(f"{scorer.name!r} is already resized (to {scorer.size} px); resize once: "
                             f"Resized(scorer.inner, {size!r}) or load_scorer({scorer.inner.name!r}, size={size!r})")
        size = check_scoring_size(size)
        if size < scorer.min_side:
            raise InputError(f"size={size} is below {scorer.name}'s minimum side of {scorer.min_side} px; use a size "
                             f">= {scorer.min_side}, e.g. {scorer.name}{SIZE_SEP}{scorer.min_side}")
        self.inner, self.size = scorer, size
        self.name = f"{scorer.name}{SIZE_SEP}{size}"
        self.differentiable = scorer.differentiable
        self.native_lower_better = scorer.native_lower_better
        self.native_range = scorer.native_range

    @property
    def settings_name(self) -> str:
        return f"{getattr(self.inner, 'settings_name', self.inner.name)}{SIZE_SEP}{self.size}"

    def scored_size(self, height: int, width: int, name: str = "images") -> tuple[int, int]:
        """The resized ``(height, width)``; an :class:`ImageError` if it would exceed :data:`MAX_RESIZED_PIXELS`
        (an extreme aspect ratio), before anything is allocated."""
        factor = self.size / min(height, width)
        target = (max(1, round(height * factor)), max(1, round(width * factor)))
        if target[0] * target[1] > MAX_RESIZED_PIXELS:
            raise ImageError(name, f"resizing its {width}x{height} px to a short side of {self.size} px would give "
                             f"{target[1]}x{target[0]} = {target[0] * target[1]:,} px, over the limit of "
                             f"{MAX_RESIZED_PIXELS:,} px for a resized image", "crop it to a less extreme aspect "
                             f"ratio, or score it with a smaller @SIZE than {self.size}")
        return target

    def native(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        factor = self.size / min(h, w)
        target = self.scored_size(h, w, f"{self.name} input")
        # fp16/bf16 are resized in float32 (CPU has no half antialiasing kernel) and handed on in their own dtype.
        work = images if images.dtype in (torch.float32, torch.float64) else images.float()
        resized = F.interpolate(work, size=target, mode="bilinear", align_corners=False, antialias=factor < 1)
        return self.inner.score_with_native(resized.clamp(0, 1).to(images.dtype))[1]
