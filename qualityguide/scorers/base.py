"""The one scorer contract: images ``[B,3,H,W]`` in [0,1] -> scores ``[B]``, higher is better."""

from __future__ import annotations

import math

import torch
from torch import nn

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

    def native(self, images: torch.Tensor) -> torch.Tensor:
        """Scores ``[B]`` in the metric's own units and direction (input as for ``forward``)."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Scores ``[B]``, higher is better.

        Args:
            images: float tensor ``[B,3,H,W]`` in [0,1], RGB, on this module's device.
        """
        return self.score_with_native(images)[0]

    def score_with_native(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated ``(scores, native)`` from one metric evaluation (reports need both)."""
        check_batch(images, f"{self.name} input", self.min_side)
        native = self.native(images)
        return self.to_higher_better(native), native

    def to_higher_better(self, native_scores: torch.Tensor) -> torch.Tensor:
        """Map native scores to the contract's direction (negate lower-better metrics)."""
        return -native_scores if self.native_lower_better else native_scores

    def extra_repr(self) -> str:
        direction = "lower" if self.native_lower_better else "higher"
        return (f"name={self.name!r}, differentiable={self.differentiable}, "
                f"native_range={self.native_range}, native {direction} is better, min_side={self.min_side}")


class Resized(QualityScorer):
    """A scorer applied after resizing the short side to ``size`` (bilinear, antialiased when shrinking).

    For images smaller than a metric's minimum (tiny test models make 64 px images; NIQE needs 192)
    or to score at a fixed resolution. Differentiable when the wrapped scorer is.

    Args:
        scorer: any :class:`QualityScorer`.
        size: the short side, in pixels, the wrapped scorer sees.
    """

    def __init__(self, scorer: QualityScorer, size: int):
        super().__init__()
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        self.inner, self.size = scorer, size
        self.name = f"{scorer.name}@{size}px"
        self.differentiable = scorer.differentiable
        self.native_lower_better = scorer.native_lower_better
        self.native_range = scorer.native_range

    def native(self, images: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        h, w = images.shape[-2:]
        factor = self.size / min(h, w)
        target = (max(1, round(h * factor)), max(1, round(w * factor)))
        resized = F.interpolate(images, size=target, mode="bilinear", align_corners=False, antialias=factor < 1)
        return self.inner.score_with_native(resized.clamp(0, 1))[1]
