"""Perceptual feature extractors psi(x): images ``[B,3,H,W]`` in [0,1] -> ``[B,D]``.

Used by LGDM's perceptual-consistency term G2 (docs/design.md section 4) and available to the adapter:
NSS vectors (``"brisque"``, ``"niqe"``) or a pyiqa network's penultimate activations
(``"pyiqa:<metric>"``). LGDM's ``psi="sd"`` (the U-Net's own pooled decoder features of a clean
latent) lives with the U-Net in :mod:`qualityguide.lgdm`.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn

from ..errors import InputError


class ImagePsi(nn.Module):
    """psi on images: ``[B,3,H,W]`` in [0,1] -> ``[B,D]``.

    Args:
        name: the spec (``"brisque"``, ``"niqe"``, ``"pyiqa:<metric>"``).
        fn: the feature function.
        module: a module ``fn`` depends on (registered so ``.to()`` moves it).
    """

    domain = "image"

    def __init__(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor], module: nn.Module | None = None):
        super().__init__()
        self.name = name
        self.fn = fn
        self.module = module

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fn(images).flatten(1).float()


class _PenultimateHook:
    """Captures the input of a network's last ``nn.Linear`` (its penultimate representation)."""

    def __init__(self, net: nn.Module, label: str):
        linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise InputError(f"psi={label!r}: the network has no nn.Linear layer to read a penultimate feature from; "
                             "use psi='sd', 'brisque' or 'niqe'")
        self.value: torch.Tensor | None = None
        linears[-1].register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.value = inputs[0]


def build_image_psi(spec: str, weights: str | os.PathLike | None = None) -> ImagePsi:
    """psi for ``"brisque"``, ``"niqe"`` or ``"pyiqa:<metric>"``."""
    if spec == "brisque":
        from .nss import brisque_features

        return ImagePsi(spec, brisque_features)
    if spec == "niqe":
        from .nss import niqe_features

        return ImagePsi(spec, niqe_features)
    if spec.startswith("pyiqa:"):
        from .pyiqa_scorer import PyIQAScorer

        scorer = PyIQAScorer(spec.split(":", 1)[1], weights=weights)
        hook = _PenultimateHook(scorer.net, spec)

        def penultimate(images: torch.Tensor) -> torch.Tensor:
            hook.value = None
            scorer.net(images)
            if hook.value is None:
                raise InputError(f"psi={spec!r}: the last linear layer did not run; this metric has no usable "
                                 "penultimate feature")
            value, hook.value = hook.value, None  # do not keep the activation (and its graph) alive
            return value.reshape(images.shape[0], -1)

        return ImagePsi(spec, penultimate, module=scorer)
    raise InputError(f"psi={spec!r} is not an image-domain feature map; allowed: brisque, niqe, pyiqa:<metric>")
