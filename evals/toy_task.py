"""The shared small task with known quality: crops of real photos at graded distortion levels, and a tiny
pixel-space diffusion model trained briefly on them (CPU, minutes). Used by ``evals/adapter_control.py``
(IQA-Adapter control) and ``evals/acpo_toy.py`` (ACPO fine-tuning).

1. **Crops** (:func:`build_crops`): ``n_images`` BIQ2021 photos, each downscaled so its short side is
   ``crop / SCENE_FRACTION`` px (128 for 48 px crops, so a crop holds a good part of the scene and the
   downscaling removes most of the photo's own blur and noise), one random textured crop per photo, and one
   of ten conditions per crop (balanced): clean, or Gaussian blur / Gaussian noise / JPEG at levels 1-3
   (:data:`LEVELS`). Every crop is stored at 8 bits, as a photo would be.
2. **Labels**: a scorer of this library, :data:`TOY_SCORER` (BRISQUE with the original LIVE SVR from
   ``<data>/params``), which tracks the distortion level on these crops (``main`` measures and reports it).
   :data:`HELD_OUT_SCORER` (official NIQE from ``<data>/params``, after upsizing to 192 px, the least NIQE
   accepts) is a second, independent scorer for reward-hacking checks.
3. **Base model** (:func:`load_or_train_base`): a tiny ``UNet2DConditionModel`` (null text condition; the
   IQA-Adapter needs cross-attention) or ``UNet2DModel`` (ACPO's pixel path), trained with the plain
   epsilon MSE of :mod:`qualityguide.diffusion` on every crop (all distortion levels) and cached.

    python evals/toy_task.py                        # conditional base (what adapter_control.py trains on)
    python evals/toy_task.py --kind unconditional   # the UNet2DModel base (acpo_toy.py)
    python evals/toy_task.py --n-images 16 --steps 20 --samples 4 --sample-steps 5   # a quick look

Writes ``evals/results/toy_task/<kind>/{summary.json, results.md, labels.png, crops.png, samples.png}``
and prints the JSON. Random crops of real photos, a model trained for minutes: the samples show whether the
mechanics work, not what a real model reaches.
"""

from __future__ import annotations

import argparse
import hashlib
import io
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
from qualityguide.data import DATA_ENV, shared_data_dir
from qualityguide.diffusion import add_noise, noise_prediction_loss, sample_timesteps, training_target
from qualityguide.errors import InputError, QualityGuideError
from qualityguide.images import IMAGE_EXTENSIONS
from qualityguide.runtime import quiet_third_party
from qualityguide.scorers import load_scorer, split_size
from qualityguide.train import batch_indices, check_finite, derive_seed, step_generator

HERE = Path(__file__).resolve().parent

TOY_SCORER = "brisque"
HELD_OUT_SCORER = "niqe@192"
# The parameter file each classical scorer reads from <data>/params (see /work/shared/data/params/README.md).
PARAM_FILES = {"brisque": "brisque_live_svm.pth", "niqe": "niqe_pristine.mat"}

DISTORTIONS = ("clean", "blur", "noise", "jpeg")
# Level k (1..3) of each distortion, at the crop's own resolution: blur sigma (px), noise std (of [0,1] values),
# JPEG quality. Chosen so that each level lowers BRISQUE on most crops (measured by `main`).
LEVELS = {"blur": (0.8, 1.4, 2.2), "noise": (0.04, 0.08, 0.14), "jpeg": (30, 15, 6)}
CONDITIONS = [("clean", 0)] + [(d, k) for d in ("blur", "noise", "jpeg") for k in range(1, 4)]
SCENE_FRACTION = 0.375  # crop side / downscaled photo's short side (48 px crops of 128 px photos)
MIN_TEXTURE = 0.04  # luma std a crop should reach (flat crops have undefined NSS statistics)
CROP_TRIES = 20
KINDS = ("conditional", "unconditional")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TASK_VERSION = 1  # part of every cache key: bump when the training procedure changes


# ----------------------------------------------------------------------------------------------- data
def resolve_data_dir(data: str | os.PathLike | None) -> Path:
    """The folder holding ``biq2021/`` and ``params/``.

    Args:
        data: that folder, or None for :func:`qualityguide.data.shared_data_dir` (``$QUALITYGUIDE_DATA`` or
            ``../shared/data`` beside the checkout).
    """
    if data is None:
        path = shared_data_dir()
        if path is None:
            raise InputError(f"shared evaluation data not found (${DATA_ENV} is unset and no ../shared/data beside "
                             f"the checkout); pass --data FOLDER holding biq2021/ and params/, or set {DATA_ENV}")
    else:
        path = Path(data).expanduser()
    if not path.is_dir():
        raise InputError(f"data folder {path} does not exist; pass --data FOLDER holding biq2021/ and params/")
    missing = [name for name in ("biq2021", "params") if not (path / name).is_dir()]
    if missing:
        hint = (f"; {path} looks like the biq2021 folder itself, pass its parent {path.parent}"
                if (path / "images").is_dir() else "")
        raise InputError(f"data folder {path} has no {' or '.join(m + '/' for m in missing)}{hint}; pass --data "
                         "FOLDER holding biq2021/ (images/, mos.csv) and params/ (NIQE/BRISQUE parameter files)")
    return path


@dataclass
class Crops:
    """Crops of real photos with known distortions.

    Args:
        images: ``[N,3,S,S]`` float32 in [0,1] (8-bit values).
        distortion: per crop, one of :data:`DISTORTIONS`.
        level: ``[N]`` long, 0 for clean, 1-3 for stronger distortion.
        source: per crop, the photo's file name.
    """

    images: torch.Tensor
    distortion: list[str]
    level: torch.Tensor
    source: list[str]

    def __len__(self) -> int:
        return len(self.source)

    def fingerprint(self) -> str:
        """SHA-256 of the pixels, distortions, levels and sources: what identifies a training set."""
        digest = hashlib.sha256(self.images.detach().cpu().float().contiguous().numpy().tobytes())
        digest.update(json.dumps([self.distortion, self.level.tolist(), self.source]).encode())
        return digest.hexdigest()


def _photos(biq_dir: Path) -> list[Path]:
    folder = biq_dir / "images"
    if not folder.is_dir():
        raise InputError(f"{biq_dir} has no images/ folder; pass the BIQ2021 folder (images/, mos.csv), e.g. "
                         "<data>/biq2021")
    photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not photos:
        raise InputError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return photos


def _luma_std(array: np.ndarray) -> float:
    return float((array @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).std())


def _textured_crop(path: Path, crop: int, rng: np.random.Generator) -> np.ndarray:
    """A ``crop`` px crop [S,S,3] float32 of the photo downscaled to ``crop / SCENE_FRACTION`` px (short side): the
    first of up to :data:`CROP_TRIES` random positions with luma std >= :data:`MIN_TEXTURE`, else the most textured."""
    from PIL import Image

    with Image.open(path) as handle:
        image = handle.convert("RGB")
    scale = round(crop / SCENE_FRACTION) / min(image.size)
    image = image.resize((max(crop, round(image.width * scale)), max(crop, round(image.height * scale))),
                         Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    best, best_std = None, -1.0
    for _ in range(CROP_TRIES):
        y = int(rng.integers(0, array.shape[0] - crop + 1))
        x = int(rng.integers(0, array.shape[1] - crop + 1))
        candidate = array[y:y + crop, x:x + crop]
        std = _luma_std(candidate)
        if std > best_std:
            best, best_std = candidate, std
        if std >= MIN_TEXTURE:
            break
    return np.ascontiguousarray(best)


def _to_8bit(image: torch.Tensor) -> torch.Tensor:
    return torch.round(image.clamp(0, 1) * 255) / 255


def distort(image: torch.Tensor, distortion: str, level: int, seed: int = 0) -> torch.Tensor:
    """One crop ``[3,S,S]`` in [0,1] with ``distortion`` at ``level`` (:data:`LEVELS`), stored at 8 bits.

    Args:
        image: the clean crop.
        distortion: one of :data:`DISTORTIONS`.
        level: 0 (only for ``"clean"``) or 1-3.
        seed: the noise draw (``"noise"`` only).
    """
    if (distortion, level) not in CONDITIONS:
        raise InputError(f"condition ({distortion!r}, {level}) is not one of {CONDITIONS}")
    if distortion == "clean":
        return _to_8bit(image)
    strength = LEVELS[distortion][level - 1]
    if distortion == "blur":
        from torchvision.transforms.functional import gaussian_blur

        size = 2 * math.ceil(3 * strength) + 1
        return _to_8bit(gaussian_blur(image[None], [size, size], [strength, strength])[0])
    if distortion == "noise":
        noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed))
        return _to_8bit(image + strength * noise)
    from PIL import Image

    buffer = io.BytesIO()
    pixels = (_to_8bit(image) * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=int(strength))
    with Image.open(buffer) as decoded:
        return torch.from_numpy(np.asarray(decoded.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def build_crops(biq_dir: Path | None, n_images: int, crop: int = 48, seed: int = 0,
                distortions: tuple[str, ...] = DISTORTIONS) -> Crops:
    """``n_images`` crops, one per photo, each clean or distorted (the :data:`CONDITIONS` of ``distortions``,
    balanced).

    Deterministic given the arguments: the photos, crop positions, conditions and noise come from ``seed``.

    Args:
        biq_dir: the BIQ2021 folder (``images/``); None: ``resolve_data_dir(None) / "biq2021"``.
        n_images: how many photos (and crops); at most the number of photos.
        crop: crop side in px (BRISQUE needs >= 32).
        seed: the draw.
        distortions: the families drawn from (:data:`DISTORTIONS`; ``"clean"`` is the undistorted crop); all of
            them gives the original ten conditions.
    """
    unknown = [d for d in distortions if d not in DISTORTIONS]
    if unknown or not distortions or len(set(distortions)) != len(distortions):
        raise InputError(f"distortions={tuple(distortions)!r}: pick distinct families from {', '.join(DISTORTIONS)}")
    conditions_used = [c for c in CONDITIONS if c[0] in distortions]
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise InputError(f"n_images={n_images!r}: a positive whole number of photos, e.g. 256")
    if isinstance(crop, bool) or not isinstance(crop, int) or crop < 32:
        raise InputError(f"crop={crop!r}: a whole number of pixels >= 32 (BRISQUE's smallest side), e.g. 48")
    biq_dir = resolve_data_dir(None) / "biq2021" if biq_dir is None else Path(biq_dir)
    photos = _photos(biq_dir)
    if n_images > len(photos):
        raise InputError(f"n_images={n_images}: {biq_dir} holds only {len(photos)} photos; pass --n-images "
                         f"{len(photos)} or fewer")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(photos), size=n_images, replace=False)
    conditions = rng.permutation(n_images) % len(conditions_used)  # balanced over the conditions
    images, kinds, levels, sources = [], [], [], []
    for i, (index, c) in enumerate(tqdm(list(zip(chosen, conditions)), desc="cropping photos", leave=False)):
        clean = torch.from_numpy(_textured_crop(photos[index], crop, rng)).permute(2, 0, 1)
        distortion, level = conditions_used[c]
        images.append(distort(clean, distortion, level, seed=derive_seed("toy_task.noise", seed, i)))
        kinds.append(distortion)
        levels.append(level)
        sources.append(photos[index].name)
    return Crops(torch.stack(images).float().contiguous(), kinds, torch.tensor(levels, dtype=torch.long),
                 sources)


# ----------------------------------------------------------------------------------------------- scoring
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


def score_images(scorer, images: torch.Tensor, batch_size: int = 64, desc: str | None = None,
                 progress: bool = True) -> torch.Tensor:
    """Scores ``[N]`` float64 (higher is better); a batch that fails is retried image by image, and an image the
    scorer refuses (flat, non-finite statistics) gets NaN.

    Args:
        scorer: a :class:`~qualityguide.scorers.QualityScorer`.
        images: ``[N,3,H,W]`` in [0,1].
        batch_size: images per scorer call.
        desc, progress: the progress bar's label, and whether to show it.
    """
    out = torch.full((len(images),), float("nan"), dtype=torch.float64)
    starts = range(0, len(images), batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc=desc or f"scoring with {scorer.name}", disable=not progress, leave=False):
            batch = images[start:start + batch_size]
            try:
                out[start:start + len(batch)] = scorer(batch).double().cpu()
                continue
            except (QualityGuideError, RuntimeError):
                pass
            for i in range(len(batch)):
                try:
                    out[start + i] = scorer(batch[i:i + 1]).double().cpu()[0]
                except (QualityGuideError, RuntimeError):
                    pass
    return out


# ----------------------------------------------------------------------------------------------- base model
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


def _call(unet, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states, added_cond_kwargs) -> torch.Tensor:
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
            condition = torch.where(drop.view(-1, 1), adapter_null(len(index), condition.shape[1], like=condition),
                                    condition)
            added = {"image_embeds": [condition.unsqueeze(1)]}
        output = _call(unet, noisy, t, null_condition(unet, len(index)), added)
        loss = noise_prediction_loss(output, training_target(x0, noise, t, alphas, config.prediction_type))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        check_finite({"loss": loss}, step)
        optimizer.step()
        lr_schedule.step()
        with torch.no_grad():  # the decay ramps up, so early weights do not linger (as diffusers' EMAModel does)
            torch._foreach_lerp_(averaged, [p.detach() for p in params], 1 - min(config.ema, (1 + step) / (10 + step)))
        losses.append(loss.item())
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


# ----------------------------------------------------------------------------------------------- sampling
def sample(unet, scheduler, n: int, seed: int, steps: int = 25, encoder_hidden_states=None, added_cond_kwargs=None,
           progress: bool = True) -> torch.Tensor:
    """DDIM (eta 0) samples ``[n,3,S,S]`` in [0,1], from noise drawn with ``seed``.

    Args:
        unet: a ``UNet2DConditionModel`` / ``UNet2DModel``, or a wrapper with ``.config``, ``.device`` and ``.dtype``
            whose call returns an object with ``.sample``.
        scheduler: the training scheduler (a DDIM scheduler is built from its config; it is not changed).
        n, seed: how many images, and the noise.
        steps: DDIM steps.
        encoder_hidden_states: the text condition of a conditional U-Net (default: the null condition); a batch
            of 1 is expanded to ``n``.
        added_cond_kwargs: passed to a conditional U-Net (e.g. the IQA-Adapter's ``image_embeds``).
        progress: show a progress bar.
    """
    from diffusers import DDIMScheduler

    conditional = unet.config.get("cross_attention_dim") is not None
    if not conditional and (encoder_hidden_states is not None or added_cond_kwargs is not None):
        raise InputError("encoder_hidden_states / added_cond_kwargs given for an unconditional UNet2DModel; drop them")
    if conditional:
        if encoder_hidden_states is None:
            encoder_hidden_states = null_condition(unet, n)
        if encoder_hidden_states.shape[0] == 1:
            encoder_hidden_states = encoder_hidden_states.expand(n, -1, -1)
        if encoder_hidden_states.shape[0] != n:
            raise InputError(f"encoder_hidden_states has batch {encoder_hidden_states.shape[0]}; pass 1 or n={n} rows")
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    size = int(unet.config.sample_size)
    channels = int(unet.config.in_channels)
    x = torch.randn((n, channels, size, size), generator=torch.Generator().manual_seed(seed))
    x = x.to(device=unet.device, dtype=unet.dtype)
    with torch.no_grad():
        for t in tqdm(ddim.timesteps, desc="sampling", disable=not progress, leave=False):
            eps = _call(unet, x, t, encoder_hidden_states, added_cond_kwargs)
            x = ddim.step(eps, t, x, eta=0.0).prev_sample
    return (x.float().cpu() / 2 + 0.5).clamp(0, 1)


def save_grid(images: torch.Tensor, path, columns: int, scale: int = 2) -> None:
    """Write images ``[N,3,H,W]`` in [0,1] as one PNG, ``columns`` per row, upscaled ``scale`` x (nearest)."""
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid(images.detach().float().cpu().clamp(0, 1), nrow=max(1, int(columns)), padding=2, pad_value=1.0)
    pixels = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    image = Image.fromarray(pixels)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


# ----------------------------------------------------------------------------------------------- report
def level_tracking(crops: Crops, scores: torch.Tensor) -> dict:
    """How a scorer follows the distortion level: Spearman(level, score) per distortion (its crops plus every clean
    crop as level 0) and overall (negative = tracks: stronger distortion, lower score), the mean score per
    condition, and the share of NaN scores."""
    from scipy.stats import spearmanr

    s = scores.numpy()
    levels = crops.level.numpy()
    dist = np.asarray(crops.distortion)
    ok = np.isfinite(s)

    def rho(mask):
        mask = mask & ok
        return float(spearmanr(levels[mask], s[mask]).statistic) if mask.sum() > 2 else float("nan")

    per = {d: rho((dist == d) | (dist == "clean")) for d in ("blur", "noise", "jpeg")}
    means = {f"{d}{k}": float(np.nanmean(s[(dist == d) & (levels == k)])) if ((dist == d) & (levels == k) & ok).any()
             else float("nan") for d, k in CONDITIONS}
    return {"spearman_vs_level": {**per, "overall": rho(np.ones_like(ok))}, "mean_by_condition": means,
            "nan": int((~ok).sum())}


def markdown(s: dict) -> str:
    lines = [f"Toy task: {s['n_crops']} crops ({s['crop']} px) of BIQ2021 photos, ten conditions (clean; blur, noise, "
             f"JPEG at levels 1-3), seed {s['seed']}.", "",
             "Spearman(distortion level, score); negative = the scorer tracks the level (scores are higher-better):",
             "", "| scorer | blur | noise | jpeg | overall | NaN |", "|---|---|---|---|---|---|"]
    for name, r in s["scorers"].items():
        rho = r["spearman_vs_level"]
        lines.append(f"| `{name}` | " + " | ".join(f"{rho[k]:.3f}" for k in ("blur", "noise", "jpeg", "overall"))
                     + f" | {r['nan']} |")
    lines += ["", "Mean score per condition:", "", "| scorer | " + " | ".join(s["conditions"]) + " |",
              "|---|" + "---|" * len(s["conditions"])]
    for name, r in s["scorers"].items():
        lines.append(f"| `{name}` | " + " | ".join(f"{r['mean_by_condition'][c]:.2f}" for c in s["conditions"]) + " |")
    b = s["base"]
    lines += ["", f"Base model ({b['kind']}, key `{b['key']}`): {'loaded from cache' if b['loaded'] else 'trained'}; "
              f"{b['steps']} steps, final loss {b['final_loss']:.4f}, trained in {b['train_seconds']:.0f} s "
              f"({b['threads']} thread(s)). Its {b['samples']} samples ({b['sample_steps']} DDIM steps) score "
              + ", ".join(f"`{k}` {v['sample_mean']:.2f} (crops {v['crop_mean']:.2f})" for k, v in b["scores"].items())
              + " on average.", "", s["note"] + "."]
    return "\n".join(lines) + "\n"


def plot(s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(s["scorers"])
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(4.2 * (len(names) + 1), 3.6), dpi=110)
    for ax, name in zip(axes, names):
        means = s["scorers"][name]["mean_by_condition"]
        for i, d in enumerate(("blur", "noise", "jpeg")):
            ax.plot(range(4), [means["clean0"]] + [means[f"{d}{k}"] for k in (1, 2, 3)], marker="o", color=f"C{i}",
                    label=f"{d} (rho {s['scorers'][name]['spearman_vs_level'][d]:.2f})")
        ax.set_xticks(range(4))
        ax.set_xlabel("distortion level (0 = clean)")
        ax.set_ylabel(f"mean {name} (higher is better)")
        ax.legend(fontsize=7)
    losses = np.asarray(s["base"]["losses"])
    window = max(1, len(losses) // 50)
    axes[-1].plot(np.convolve(losses, np.ones(window) / window, mode="valid"))
    axes[-1].set_yscale("log")
    axes[-1].set_xlabel("step")
    axes[-1].set_ylabel("epsilon MSE (smoothed)")
    axes[-1].set_title(f"{s['base']['kind']} base model", fontsize=9)
    fig.suptitle(f"toy task: {s['n_crops']} crops of {s['crop']} px", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def crop_examples(crops: Crops, per_condition: int = 8) -> torch.Tensor:
    """Up to ``per_condition`` crops of each condition, one condition per row (missing ones left white)."""
    rows = []
    for d, k in CONDITIONS:
        index = [i for i in range(len(crops)) if crops.distortion[i] == d and int(crops.level[i]) == k][:per_condition]
        row = torch.ones(per_condition, *crops.images.shape[1:])
        if index:
            row[:len(index)] = crops.images[index]
        rows.append(row)
    return torch.cat(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, parsed and checked before anything is loaded (the tests run the docstring examples
    through it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = BaseConfig()
    parser.add_argument("--data", default=None, help="folder holding biq2021/ and params/ (default: shared data)")
    parser.add_argument("--out", default=None, help="default: evals/results/toy_task/<kind>")
    parser.add_argument("--cache", default=str(HERE / "results" / "toy_base"), help="trained base models")
    parser.add_argument("--kind", choices=KINDS, default=defaults.kind)
    parser.add_argument("--n-images", type=int, default=256)
    parser.add_argument("--crop", type=int, default=defaults.crop)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="base model training steps")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=32, help="base model samples to score and show")
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--held-out", default=HELD_OUT_SCORER, help="second scorer reported next to TOY_SCORER")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: the machine is shared)")
    args = parser.parse_args(argv)
    try:
        base_config(args)  # its checks, now rather than after the crops are built and labelled
    except InputError as exc:
        parser.error(str(exc))
    for name in ("n_images", "samples", "sample_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    return args


def base_config(args: argparse.Namespace) -> BaseConfig:
    """The base model's :class:`BaseConfig` from the command line (raises :class:`InputError` on a bad value)."""
    return BaseConfig(crop=args.crop, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      kind=args.kind)


def main(argv=None) -> dict:
    quiet_third_party()
    args = parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    started = time.perf_counter()
    data = resolve_data_dir(args.data)
    out = Path(args.out) if args.out else HERE / "results" / "toy_task" / args.kind
    out.mkdir(parents=True, exist_ok=True)

    crops = build_crops(data / "biq2021", args.n_images, args.crop, seed=args.seed)
    scorers = {spec: load_toy_scorer(spec, params_dir=data / "params") for spec in dict.fromkeys([TOY_SCORER,
                                                                                                    args.held_out])}
    labels = {spec: score_images(scorer, crops.images, desc=f"labelling with {spec}")
              for spec, scorer in scorers.items()}
    config = base_config(args)
    unet, scheduler, info = load_or_train_base(crops, config, args.cache)
    samples = sample(unet, scheduler, args.samples, seed=10_000, steps=args.sample_steps)
    sample_scores = {spec: score_images(scorer, samples, progress=False) for spec, scorer in scorers.items()}

    summary = {
        "n_crops": len(crops), "crop": args.crop, "seed": args.seed, "data": str(data),
        "conditions": [f"{d}{k}" for d, k in CONDITIONS], "levels": LEVELS,
        "scorers": {spec: level_tracking(crops, labels[spec]) for spec in scorers},
        "base": {"kind": args.kind, "key": info["key"], "loaded": info["loaded"], "path": info["path"],
                 "steps": config.steps, "batch_size": config.batch_size, "final_loss": info["final_loss"],
                 "train_seconds": info["train_seconds"], "threads": torch.get_num_threads(),
                 "parameters": sum(p.numel() for p in unet.parameters()), "samples": args.samples,
                 "sample_steps": args.sample_steps, "losses": info["losses"],
                 "scores": {spec: {"sample_mean": float(np.nanmean(sample_scores[spec].numpy())),
                                   "sample_nan": int(torch.isnan(sample_scores[spec]).sum()),
                                   "crop_mean": float(np.nanmean(labels[spec].numpy()))} for spec in scorers}},
        "seconds": time.perf_counter() - started, "load_average": os.getloadavg(),
        "note": "a tiny pixel model trained for minutes on a CPU: its samples show the mechanics, not the quality a "
                "real model reaches",
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text(markdown(summary))
    plot(summary, out / "labels.png")
    save_grid(crop_examples(crops), out / "crops.png", columns=8)
    save_grid(samples, out / "samples.png", columns=min(8, args.samples))
    printed = {**summary, "base": {k: v for k, v in summary["base"].items() if k != "losses"}}
    print(json.dumps(printed, indent=2))
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
