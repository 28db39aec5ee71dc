"""LGDM configuration: every gap Algorithm 1 leaves open (Saini et al. 2025) is a field here."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Literal

from ..errors import InputError, closest
from ..files import json_sha256
from ..scorers.safe_load import check_fields

LAYERS = ("up_blocks", "up_resnets")
POOLINGS = ("mean_std", "mean")
NORMS = ("l2",)
PSI_BUILTIN = ("none", "sd", "brisque", "niqe")
# The largest square side images are resized to (8x SDXL's 1024): a config from a head folder cannot make every
# image a gigapixel tensor. image_size=None scores at native size instead.
MAX_IMAGE_SIZE = 8192


@dataclass
class LGDMConfig:
    """How hyperfeatures are extracted under Perceptual Manifold Guidance.

    Args:
        num_steps: DDIM steps; timesteps ``t_max, t_max - t_max/num_steps, ..., t_max/num_steps``.
        t_max: the first (noisiest) timestep; ``z_T = sqrt(a_T) E(x) + sqrt(1-a_T) eps``.
        eta: DDIM stochasticity (0: deterministic).
        zeta1: weight of the data-consistency gradient ``G1 = ||D(z0|t) - x||_2`` ([-1,1] pixels).
        zeta2: weight of the perceptual-consistency gradient ``G2 = ||psi(D(z0|t)) - psi(x)||_2``.
        psi: perceptual feature map: ``"none"`` (no G2), ``"sd"`` (the U-Net's own pooled decoder
            features of a clean latent), ``"brisque"``/``"niqe"`` (NSS feature vectors) or
            ``"pyiqa:<name>"`` (input of the metric's last linear layer).
        psi_timestep: the timestep at which ``psi="sd"`` runs the U-Net on the clean latent.
        layers: hyperfeature maps: ``"up_blocks"`` (one per decoder block) or ``"up_resnets"``
            (every decoder resnet, as in Diffusion Hyperfeatures).
        pooling: ``"mean_std"`` (per-channel spatial mean, then population std) or ``"mean"``.
        image_size: resize the short side to this and centre-crop a square (None: native size cropped
            to a multiple the VAE and U-Net accept).
        max_upscale: refuse images whose short side would be enlarged more than this (upscaling
            invents the blur LGDM is meant to measure).
        prompt: the text condition (the paper uses the empty prompt, no CFG).
        norm: the distance in G1/G2 (``"l2"``: per-image Euclidean norm, safe at zero).
        seed: seed of the fixed noise probe (initial noise and eta>0 step noise), the same for every
            image so features are a deterministic function of the image, independent of batching.
    """

    num_steps: int = 10
    t_max: int = 100
    eta: float = 0.0
    zeta1: float = 1.0
    zeta2: float = 0.2
    psi: str = "sd"
    psi_timestep: int = 0
    layers: Literal["up_blocks", "up_resnets"] = "up_blocks"
    pooling: Literal["mean_std", "mean"] = "mean_std"
    image_size: int | None = 512
    max_upscale: float = 4.0
    prompt: str = ""
    norm: Literal["l2"] = "l2"
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise InputError(f"num_steps must be a positive integer, got {self.num_steps!r}")
        if not isinstance(self.t_max, int) or self.t_max < self.num_steps:
            raise InputError(f"t_max must be an integer >= num_steps ({self.num_steps}), got {self.t_max!r}")
        if self.t_max % self.num_steps:
            nearest = self.num_steps * (self.t_max // self.num_steps)
            raise InputError(f"t_max ({self.t_max}) must be a multiple of num_steps ({self.num_steps}) so the "
                             f"timesteps are evenly spaced integers; e.g. t_max={nearest}")
        if not 0.0 <= self.eta <= 1.0:
            raise InputError(f"eta must be in [0, 1], got {self.eta!r}")
        for name in ("zeta1", "zeta2"):
            if not getattr(self, name) >= 0 or not math.isfinite(getattr(self, name)):  # NaN fails both
                raise InputError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if not isinstance(self.psi, str) or not (self.psi in PSI_BUILTIN or
                                                 (self.psi.startswith("pyiqa:") and len(self.psi) > 6)):
            guess = closest(str(self.psi), list(PSI_BUILTIN))
            raise InputError(f"psi={self.psi!r} is not known; allowed: {', '.join(PSI_BUILTIN)} or 'pyiqa:<metric>'"
                             + (f". Did you mean {guess!r}?" if guess else ""))
        if self.psi_timestep < 0:
            raise InputError(f"psi_timestep must be >= 0, got {self.psi_timestep!r}")
        for name, allowed in (("layers", LAYERS), ("pooling", POOLINGS), ("norm", NORMS)):
            if getattr(self, name) not in allowed:
                raise InputError(f"{name}={getattr(self, name)!r} is not allowed; use one of {', '.join(allowed)}")
        if self.image_size is not None and (not isinstance(self.image_size, int) or
                                            not 8 <= self.image_size <= MAX_IMAGE_SIZE):
            raise InputError(f"image_size must be an integer in [8, {MAX_IMAGE_SIZE}] or None (native size), got "
                             f"{self.image_size!r}")
        if not 1.0 <= self.max_upscale < math.inf:  # NaN fails too
            raise InputError(f"max_upscale must be a finite number >= 1, got {self.max_upscale!r}")

    @property
    def timesteps(self) -> list[int]:
        """Sampling order, noisiest first: ``t_max, ..., t_max/num_steps``."""
        stride = self.t_max // self.num_steps
        return [self.t_max - k * stride for k in range(self.num_steps)]

    @property
    def guided(self) -> bool:
        return self.zeta1 > 0 or (self.zeta2 > 0 and self.psi != "none")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, what: str = "LGDM config",
                  fix: str = "use a config written by this version of qualityguide") -> "LGDMConfig":
        """A config from its fields as read from a file; unknown fields and values of the wrong type are refused.

        Args:
            what: how messages name the source, e.g. ``"LGDM head config DIR/config.json"``.
            fix: appended to every message.
        """
        if not isinstance(data, dict):
            raise InputError(f"{what}: the LGDM config must be a JSON object of fields, got {type(data).__name__}; "
                             f"{fix}")
        check_fields(data, [f.name for f in fields(cls)], what, fix)
        try:
            return cls(**data)
        except TypeError as exc:  # a value of the wrong type met a comparison, e.g. eta="0"
            raise InputError(f"{what}: a field has a value of the wrong type ({exc}); {fix}") from None


def stable_hash(payload: dict) -> str:
    """SHA-256 of a JSON document with sorted keys (what cache keys are built from)."""
    return json_sha256(payload)
