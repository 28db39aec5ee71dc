"""The toy task's base model: a tiny U-Net trained briefly with the plain epsilon (or v) MSE on every crop, and
cached under a key of the crops and the whole training configuration."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from qualityguide.adapter.conditions import null_condition as adapter_null
from qualityguide.adapter.training import DropoutConfig, dropout_masks
from qualityguide.diffusion import add_noise, noise_prediction_loss, sample_timesteps, training_target
from qualityguide.errors import InputError
from qualityguide.train import batch_indices, step_generator
from qualityguide.train.run import train_step

from .crops import Crops

KINDS = ("conditional", "unconditional")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TASK_VERSION = 1  # part of every cache key: bump when the training procedure changes


@dataclass
class BaseConfig:
    """The tiny base model and its training (saved with the cached weights; every field is in the cache key).

    Args:
        crop: image side (px); a multiple of ``2 ** (len(block_out_channels) - 1)``.
        steps, batch_size, lr: optimiser steps, crops per step, peak AdamW learning rate.
        warmup: linear warm-up steps, then cosine decay to ``lr / 10``.
        ema: decay of the exponential moving average of the weights that is saved as the model (0: the last
            weights). A short run's averaged weights sample with much less leftover noise.
        seed: initial weights, batches, timesteps, noise and flips.
        kind: ``"conditional"`` (``UNet2DConditionModel`` with a null text condition) or ``"unconditional"``
            (``UNet2DModel``).
        block_out_channels, layers_per_block, norm_num_groups: the U-Net's widths.
        attention: per block, whether it has attention (cross-attention for the conditional kind, where the
            IQA-Adapter attaches; self-attention for the unconditional kind). Kept off the 48/24 px levels: on a
            CPU, attention over 576+ tokens costs more than the rest of the network.
        attention_head_dim: channels per head.
        cross_attention_dim: width of the (null) text condition and so of the adapter's tokens.
        num_train_timesteps: DDPM schedule length (linear betas, x0 clipped to [-1,1]).
        prediction_type: what the U-Net predicts, ``"epsilon"`` or ``"v_prediction"`` (Salimans & Ho 2022).
        flip: random horizontal flips.
    """

    crop: int = 48
    steps: int = 800
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 40
    ema: float = 0.995
    seed: int = 0
    kind: str = "conditional"
    block_out_channels: tuple[int, ...] = (16, 32, 64, 64)
    layers_per_block: int = 1
    attention: tuple[bool, ...] = (False, False, True, True)
    attention_head_dim: int = 8
    cross_attention_dim: int = 32
    norm_num_groups: int = 8
    num_train_timesteps: int = 1000
    flip: bool = True
    prediction_type: str = "epsilon"

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        self.attention = tuple(bool(a) for a in self.attention)
        if self.kind not in KINDS:
            raise InputError(f"kind={self.kind!r}: allowed {', '.join(KINDS)}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise InputError(f"prediction_type={self.prediction_type!r}: allowed {', '.join(PREDICTION_TYPES)}")
        for name in ("crop", "steps", "batch_size", "layers_per_block", "attention_head_dim", "cross_attention_dim",
                     "norm_num_groups", "num_train_timesteps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"BaseConfig.{name}={value!r}: a positive whole number")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise InputError(f"BaseConfig.warmup={self.warmup!r}: a whole number of steps >= 0")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"BaseConfig.lr={self.lr!r}: a positive learning rate, e.g. 1e-3")
        if not (isinstance(self.ema, (int, float)) and 0 <= self.ema < 1):
            raise InputError(f"BaseConfig.ema={self.ema!r}: a decay in [0, 1), e.g. 0.995 (0: no averaging)")
        if len(self.attention) != len(self.block_out_channels) or not self.block_out_channels:
            raise InputError(f"attention={self.attention} needs one flag per block of block_out_channels="
                             f"{self.block_out_channels}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups or c % self.attention_head_dim]
        if bad:
            raise InputError(f"block_out_channels {bad} are not multiples of norm_num_groups={self.norm_num_groups} "
                             f"and attention_head_dim={self.attention_head_dim}")
        factor = 2 ** (len(self.block_out_channels) - 1)
        if self.crop % factor:
            fix = self.crop // factor * factor or factor
            raise InputError(f"crop={self.crop} is not a multiple of {factor} (the U-Net halves it "
                             f"{len(self.block_out_channels) - 1} times); use e.g. {fix}")


def build_unet(config: BaseConfig) -> torch.nn.Module:
    """A freshly initialised U-Net for ``config`` (seeded with ``config.seed``)."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    torch.manual_seed(config.seed)
    common = dict(sample_size=config.crop, in_channels=3, out_channels=3, block_out_channels=config.block_out_channels,
                  layers_per_block=config.layers_per_block, attention_head_dim=config.attention_head_dim,
                  norm_num_groups=config.norm_num_groups)
    if config.kind == "conditional":
        down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.attention)
        up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.attention))
        return UNet2DConditionModel(down_block_types=down, up_block_types=up,
                                    cross_attention_dim=config.cross_attention_dim, **common)
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in config.attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.attention))
    return UNet2DModel(down_block_types=down, up_block_types=up, **common)


def build_scheduler(config: BaseConfig):
    """The training schedule: DDPM, linear betas, ``config.prediction_type``, clean estimates clipped to [-1,1]."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule="linear",
                         prediction_type=config.prediction_type, clip_sample=True)


def null_condition(unet, n: int) -> torch.Tensor | None:
    """The null text condition ``[n, 1, cross_attention_dim]`` (zeros) of a conditional U-Net; None for a
    ``UNet2DModel`` (``unet`` may be a wrapper with ``.config``, ``.device`` and ``.dtype``)."""
    width = unet.config.get("cross_attention_dim")
    if width is None:
        return None
    return torch.zeros(n, 1, int(width), device=unet.device, dtype=unet.dtype)


def predict(unet, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states, added_cond_kwargs) -> torch.Tensor:
    """The U-Net's output at ``x``, ``t``: an unconditional ``UNet2DModel`` takes no condition arguments."""
    if encoder_hidden_states is None:
        return unet(x, t).sample
    return unet(x, t, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs).sample


def train_base(crops: Crops, config: BaseConfig, progress: bool = True, adapter=None, labels=None,
               p_quality: float = 0.1):
    """Train a fresh U-Net on every crop with the plain noise-prediction MSE (no caching: see
    :func:`load_or_train_base`).

    Args:
        crops: the training images (``config.crop`` px).
        config: the model and its training; every random draw comes from ``config.seed``.
        progress: show a progress bar.
        adapter, labels: train *jointly* with a quality condition from the first step: an unattached
            ``IQAAdapter`` (fitted quantiles) is attached to the new U-Net and trained with it on ``labels`` ``[N]``
            (quality dropout ``p_quality``): the same architecture and budget as base + adapter, with nothing
            frozen (an upper bound for what a frozen-base adapter can learn). Detached again before returning.
    Returns:
        ``(unet, DDPMScheduler, losses)``: the U-Net holds the averaged weights (``config.ema``), in eval mode with
        ``requires_grad=False``; ``losses`` has one float per step.
    """
    if crops.images.shape[-1] != config.crop or crops.images.shape[-2] != config.crop:
        raise InputError(f"crops are {tuple(crops.images.shape[-2:])} px but BaseConfig.crop={config.crop}; build the "
                         "crops with the same crop size")
    if (adapter is None) != (labels is None) or (adapter is not None and config.kind != "conditional"):
        raise InputError("joint training needs both adapter and labels, and a conditional base")
    unet = build_unet(config).train()
    scheduler = build_scheduler(config)
    alphas = scheduler.alphas_cumprod.float()
    if adapter is not None:
        if len(labels) != len(crops):
            raise InputError(f"{len(labels)} labels for {len(crops)} crops")
        adapter.attach(unet, dtype=torch.float32)
        adapter.requires_grad_(True)
        dropout = DropoutConfig(p_text=0.0, p_quality=p_quality, p_both=0.0)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=1e-2)  # with the adapter's, if any

    def factor(step: int) -> float:  # linear warm-up, then cosine decay to a tenth
        if step < config.warmup:
            return (step + 1) / config.warmup
        done = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))

    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    x0_all = crops.images * 2 - 1
    params = list(unet.parameters())
    averaged = [p.detach().clone() for p in params]
    losses = []
    bar = tqdm(range(config.steps), desc=f"training the {config.kind} base", disable=not progress)
    for step in bar:
        def micro_step(micro: int, step: int = step) -> dict:
            index = batch_indices(len(crops), min(config.batch_size, len(crops)), step, config.seed)
            generator = step_generator(config.seed, step)
            x0 = x0_all[index]
            if config.flip:
                flip = torch.rand(len(index), generator=generator) < 0.5
                x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)
            t = sample_timesteps(len(index), config.num_train_timesteps, generator=generator)
            noise = torch.randn(x0.shape, generator=generator)
            noisy = add_noise(x0, noise, t, alphas)
            added = None
            if adapter is not None:
                condition = adapter.condition(labels[index][:, None]).float()
                _, drop = dropout_masks(len(index), dropout, generator)
                condition = torch.where(drop.view(-1, 1),
                                        adapter_null(len(index), condition.shape[1], like=condition), condition)
                added = {"image_embeds": [condition.unsqueeze(1)]}
            output = predict(unet, noisy, t, null_condition(unet, len(index)), added)
            return {"loss": noise_prediction_loss(output, training_target(x0, noise, t, alphas,
                                                                          config.prediction_type))}

        # the recipes' step (qualityguide.train.run.train_step): guard, no clipping, then the optimizer step
        values = train_step(None, unet, optimizer, lr_schedule, params, micro_step, max_grad_norm=None, step=step)
        with torch.no_grad():  # the decay ramps up, so early weights do not linger (as diffusers' EMAModel does)
            torch._foreach_lerp_(averaged, [p.detach() for p in params], 1 - min(config.ema, (1 + step) / (10 + step)))
        losses.append(values["loss"])
        if step % 25 == 0 or step == config.steps - 1:
            bar.set_postfix(loss=f"{np.mean(losses[-25:]):.4f}")
    with torch.no_grad():
        for p, a in zip(params, averaged):
            p.copy_(a)
    if adapter is not None:
        adapter.detach(unet)
        adapter.eval().requires_grad_(False)
    return unet.eval().requires_grad_(False), scheduler, losses


def _config_identity(config: BaseConfig) -> dict:
    """The config as stored and hashed; ``prediction_type`` only when not the original ``"epsilon"`` (so bases
    cached before the field existed keep their keys)."""
    identity = json.loads(json.dumps(asdict(config)))
    if identity.get("prediction_type") == "epsilon":
        del identity["prediction_type"]
    return identity


def cache_key(crops: Crops, config: BaseConfig) -> str:
    """What a cached base model is filed under: a hash of the config, the crops' content and :data:`TASK_VERSION`."""
    payload = json.dumps({"config": _config_identity(config), "crops": crops.fingerprint(), "version": TASK_VERSION},
                         sort_keys=True)
    return f"{config.kind}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def _load_cached(folder: Path, config: BaseConfig, fingerprint: str):
    from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

    info = json.loads((folder / "info.json").read_text())
    if info.get("config") != _config_identity(config) or info.get("crops") != fingerprint:
        raise InputError(f"cached base model {folder} was trained on another config or other crops than its name "
                         "says; delete that folder and run again to retrain")
    cls = UNet2DConditionModel if config.kind == "conditional" else UNet2DModel
    unet = cls.from_pretrained(folder / "unet", use_safetensors=True).eval().requires_grad_(False)
    return unet, DDPMScheduler.from_pretrained(folder / "scheduler"), info


def load_or_train_base(crops: Crops, config: BaseConfig, cache_dir, progress: bool = True):
    """The base model for ``(crops, config)``: loaded from ``cache_dir/<key>`` if there, else trained and saved.

    A model is written to a temporary folder and renamed into place when complete, so a run killed while
    saving leaves no folder that would be trusted.

    Args:
        crops: the training crops (their content is part of the key).
        config: the model and its training.
        cache_dir: where trained models are kept.
        progress: show a progress bar while training.
    Returns:
        ``(unet, DDPMScheduler, info)``, the U-Net in eval mode with ``requires_grad=False``; ``info`` holds
        ``key``, ``loaded``, ``seconds`` (training or loading), ``final_loss`` (mean of the last 50 steps) and
        ``losses``.
    """
    started = time.perf_counter()
    cache_dir = Path(cache_dir)
    key = cache_key(crops, config)
    folder = cache_dir / key
    fingerprint = crops.fingerprint()
    if (folder / "info.json").is_file():
        try:
            unet, scheduler, info = _load_cached(folder, config, fingerprint)
        except (json.JSONDecodeError, OSError) as exc:  # unreadable: never trusted, trained again below
            warnings.warn(f"cached base model {folder} cannot be read ({exc}); training it again", stacklevel=2)
        else:
            return unet, scheduler, {**info, "key": key, "loaded": True, "path": str(folder),
                                     "seconds": time.perf_counter() - started, "train_seconds": info["seconds"]}
    stale = folder.exists()  # there before training, yet not loadable: replaced
    unet, scheduler, losses = train_base(crops, config, progress)
    seconds = time.perf_counter() - started
    info = {"key": key, "config": _config_identity(config), "crops": fingerprint, "n_crops": len(crops),
            "seconds": seconds, "final_loss": float(np.mean(losses[-50:])), "losses": losses, "version": TASK_VERSION}
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".tmp-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")
        (tmp / "info.json").write_text(json.dumps(info))
        if stale and folder.exists():
            shutil.rmtree(folder)
        try:
            os.rename(tmp, folder)
        except OSError:  # another run finished the same model first: keep theirs
            if not (folder / "info.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return unet, scheduler, {**info, "loaded": False, "path": str(folder), "train_seconds": seconds}
