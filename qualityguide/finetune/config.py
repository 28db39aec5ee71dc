"""ACPO configuration: the weights of the three loss terms and how the quality term sees an image."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from ..errors import InputError, closest

QUALITY_INPUTS = ("one_step", "k_step")


def _number(name: str, value: object, fix: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise InputError(f"ACPOConfig.{name}={value!r}: must be a finite number >= 0; {fix}")
    return float(value)


def _integer(name: str, value: object, low: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise InputError(f"ACPOConfig.{name}={value!r}: must be a whole number >= {low}; {fix}")
    return int(value)


@dataclass
class ACPOConfig:
    """Anchor-constrained perceptual LoRA fine-tuning (ACPO, Yang et al. 2026), docs/design.md section 7.

    ``L = w_diff * ||F_theta - target||^2 + w_anchor * ||F_theta - stopgrad(F_base)||^2 - w_quality * mean Q(D(x))``
    where ``F`` is the U-Net's output (epsilon, or v for v-prediction models, whose diffusion term regresses the v
    target and whose anchor compares v outputs) and ``x`` is the quality input of the samples with
    ``t <= t_quality_max``.

    Args:
        w_diff: weight of the ordinary diffusion loss (MSE to the scheduler's training target).
        w_anchor: weight of the anchor, the MSE between the LoRA model's output and the same U-Net's output with
            its adapters disabled (no second copy). It is computed (one extra forward without gradients) even at
            weight 0, so logs always show the drift from the base model.
        w_quality: weight of the mean quality score (subtracted: higher scores lower the loss). Its useful size
            depends on the scorer's units (NIQE spans a few units, most pyiqa metrics [0,1]).
        t_quality_max: the quality term uses only samples with ``t <= t_quality_max`` (training timesteps; near the
            clean end the one-step estimate still looks like an image, far from it a blurry mean).
        quality_fraction: the probability that a sample's timestep is drawn in the quality window, uniformly from
            ``[0, t_quality_max]``; otherwise it is drawn uniformly above the window. Each sample draws on its own
            (from the step's generator), so every batch size, 1 included, sees both windows in this proportion on
            average. Without it only ``(t_quality_max + 1) / num_train_timesteps`` of the samples would reach the
            quality term; that value gives the plain uniform draw, and 0 scores no sample. The diffusion and anchor
            terms average over this mixture. Ignored when timesteps are passed to the loss.
        quality_input: ``"one_step"``: the clean estimate ``z0|t`` of the same U-Net call the other terms use;
            ``"k_step"``: a ``k_steps`` DDIM sample (eta=0) from ``z_t`` down to the clean end with the LoRA model,
            differentiated through its last ``k_grad_steps`` steps (DRaFT-K, Clark et al. 2024).
        k_steps: DDIM steps of the ``"k_step"`` input, at timesteps ``t*(k_steps-i)//k_steps`` for
            ``i = 0..k_steps-1``, then the clean end (``k_steps=1`` equals ``"one_step"``). The first step reuses the
            shared U-Net call, so ``k_steps - 1`` extra forwards run with gradients.
        k_grad_steps: how many of the last steps carry gradients (None: all ``k_steps``); earlier ones run
            without gradients.
        snr_gamma: min-SNR-gamma weighting of the diffusion term (Hang et al. 2023); None: unweighted.
    """

    w_diff: float = 1.0
    w_anchor: float = 1.0
    w_quality: float = 0.1
    t_quality_max: int = 400
    quality_fraction: float = 0.5
    quality_input: Literal["one_step", "k_step"] = "one_step"
    k_steps: int = 4
    k_grad_steps: int | None = None
    snr_gamma: float | None = None

    def __post_init__(self) -> None:
        for name in ("w_diff", "w_anchor", "w_quality"):
            setattr(self, name, _number(name, getattr(self, name), "e.g. 1.0, or 0 to switch the term off"))
        if self.w_diff == self.w_anchor == self.w_quality == 0:
            raise InputError("ACPOConfig: w_diff, w_anchor and w_quality are all 0, so the loss is constant; give at "
                             "least one a positive weight, e.g. w_quality=0.1")
        self.t_quality_max = _integer("t_quality_max", self.t_quality_max, 0,
                                      "a training timestep, e.g. 400 of 1000")
        fraction = _number("quality_fraction", self.quality_fraction, "use a share in [0, 1], e.g. 0.5")
        if fraction > 1:
            raise InputError(f"ACPOConfig.quality_fraction={self.quality_fraction!r}: must be a share in [0, 1]; "
                             "e.g. 0.5 draws half of each batch in [0, t_quality_max]")
        self.quality_fraction = fraction
        if self.quality_input not in QUALITY_INPUTS:
            guess = closest(str(self.quality_input), list(QUALITY_INPUTS))
            raise InputError(f"ACPOConfig.quality_input={self.quality_input!r} is not known; allowed: "
                             f"{', '.join(QUALITY_INPUTS)}" + (f". Did you mean {guess!r}?" if guess else ""))
        self.k_steps = _integer("k_steps", self.k_steps, 1, "e.g. 4")
        if self.k_grad_steps is not None:
            self.k_grad_steps = _integer("k_grad_steps", self.k_grad_steps, 1, "e.g. 1, or None for all steps")
            if self.k_grad_steps > self.k_steps:
                raise InputError(f"ACPOConfig.k_grad_steps={self.k_grad_steps} exceeds k_steps={self.k_steps}; use at "
                                 f"most {self.k_steps}, or None to differentiate through every step")
        if self.snr_gamma is not None:
            self.snr_gamma = _number("snr_gamma", self.snr_gamma, "e.g. 5.0, or None for no weighting")
            if self.snr_gamma == 0:
                raise InputError("ACPOConfig.snr_gamma=0: must be positive (e.g. 5.0) or None for no weighting")

    def quality_count(self, batch: int) -> int:
        """How many samples of a batch of ``batch`` fall in the quality window on average, to the nearest whole
        number (halves rounded up): a fixed count for benchmarks that time a typical batch. Training draws the
        window per sample (:meth:`ACPOLoss.draw_timesteps <qualityguide.finetune.ACPOLoss.draw_timesteps>`)."""
        return min(batch, math.floor(self.quality_fraction * batch + 0.5))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ACPOConfig:
        """The config saved by :meth:`to_dict`; unknown keys are refused by name."""
        if not isinstance(data, dict):
            raise InputError(f"ACPOConfig.from_dict needs a dict, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            guess = closest(unknown[0], known)
            raise InputError(f"ACPOConfig: unknown field(s) {unknown}; known: {', '.join(known)}"
                             + (f". Did you mean {guess!r}?" if guess else ""))
        return cls(**data)
