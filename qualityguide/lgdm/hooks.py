"""Hyperfeature capture: forward hooks on the U-Net decoder that pool each map as soon as it exists.

Only the pooled vectors are kept (``[B, C]`` or ``[B, 2C]`` per map), so memory does not grow
with the spatial size or the number of steps beyond those vectors.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def pool(feature_map: torch.Tensor, pooling: str) -> torch.Tensor:
    """Per-channel spatial mean (then population standard deviation for ``mean_std``), in float32."""
    x = feature_map.float().flatten(2)
    mean = x.mean(-1)
    if pooling == "mean":
        return mean
    var = (x - mean.unsqueeze(-1)).pow(2).mean(-1)
    return torch.cat([mean, var.clamp_min(1e-12).sqrt()], dim=-1)  # clamp: finite gradient at zero variance


def decoder_layers(unet: nn.Module, layers: str) -> list[tuple[str, nn.Module]]:
    """The U-Net decoder modules whose outputs are hyperfeatures, in forward order."""
    if not hasattr(unet, "up_blocks"):
        raise TypeError(f"{type(unet).__name__} has no up_blocks; LGDM needs a diffusers UNet2DConditionModel-like U-Net")
    if layers == "up_blocks":
        return [(f"up_blocks.{i}", block) for i, block in enumerate(unet.up_blocks)]
    return [(f"up_blocks.{i}.resnets.{j}", resnet) for i, block in enumerate(unet.up_blocks)
            for j, resnet in enumerate(block.resnets)]


def layer_channels(unet: nn.Module, layers: str) -> list[int]:
    """Output channels of each hyperfeature layer (read off the modules, no forward pass)."""
    out = []
    for _, module in decoder_layers(unet, layers):
        if hasattr(module, "out_channels"):
            out.append(int(module.out_channels))
        else:  # an up block: its last resnet sets the width
            out.append(int(module.resnets[-1].out_channels))
    return out


class HyperfeatureRecorder:
    """Hooks the decoder layers of a U-Net; inside :meth:`capture` every forward appends one pooled row.

    Args:
        unet: a diffusers U-Net with ``up_blocks``.
        layers: ``"up_blocks"`` or ``"up_resnets"``.
        pooling: ``"mean_std"`` or ``"mean"``.
    """

    def __init__(self, unet: nn.Module, layers: str = "up_blocks", pooling: str = "mean_std"):
        named = decoder_layers(unet, layers)
        self.names = [name for name, _ in named]
        self._modules = [module for _, module in named]
        self.channels = layer_channels(unet, layers)
        self.pooling = pooling
        self._handles: list = []
        self._pending: list[torch.Tensor] | None = None

    @property
    def dims(self) -> list[int]:
        """Pooled width of each layer."""
        return [c * (2 if self.pooling == "mean_std" else 1) for c in self.channels]

    def _hook(self, module, inputs, output):
        if self._pending is not None:
            tensor = output[0] if isinstance(output, tuple) else output
            self._pending.append(pool(tensor, self.pooling))

    @contextmanager
    def attached(self):
        """Hooks installed for the duration of the block, removed afterwards whatever happens."""
        self._handles = [m.register_forward_hook(self._hook) for m in self._modules]
        try:
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []
            self._pending = None

    def call(self, fn, *args, **kwargs):
        """Run one U-Net forward ``fn(*args, **kwargs)`` (inside :meth:`attached`); returns ``(output, row)``
        where ``row`` is ``[B, sum(dims)]``: the pooled layers in forward order."""
        if not self._handles:
            raise RuntimeError("HyperfeatureRecorder.call outside `with recorder.attached():`")
        self._pending = []
        try:
            output = fn(*args, **kwargs)
            got = self._pending
        finally:
            self._pending = None
        if len(got) != len(self.names):
            raise RuntimeError(f"expected {len(self.names)} hooked layer outputs per forward, got {len(got)}")
        return output, torch.cat(got, dim=-1)
