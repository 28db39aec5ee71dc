"""The toy task's judge: a small classifier that knows the truth by construction.

The toy's crops carry their condition (clean, or blur / noise / JPEG at level 1-3, :data:`~.crops.CONDITIONS`)
because :mod:`.crops` made them, so a classifier trained on them judges a sample without the scorer that guides
or labels it: P(clean) and the predicted distortion level and type. It is a second held-out check beside NIQE
for reward hacking (a sample that pleases BRISQUE by turning purple is not judged cleaner for it).

The classifier is small on purpose, so it trains in a second on a CPU and needs no cache: fixed statistics
that each distortion moves (:func:`distortion_features`: derivative energy and kurtosis at three scales, a
noise-floor estimate, JPEG's 8 px blockiness, chroma detail, contrast), standardised, then a one-hidden-layer
MLP over the ten conditions. :func:`judge_crops` makes its training set (each photo's clean crop in all ten
conditions, so the condition is the only thing that tells the classes apart); :meth:`ToyJudge.fit` trains on
part of the photos and reports the accuracy on the rest (held out by photo, never by crop, so no scene is seen
in both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qualityguide.errors import InputError
from qualityguide.train import derive_seed

from .crops import CONDITIONS, DISTORTIONS, Crops, build_crops, distort

CONDITION_LEVEL = torch.tensor([level for _, level in CONDITIONS], dtype=torch.float32)  # 0 clean, 1-3
CONDITION_KIND = torch.tensor([DISTORTIONS.index(kind) for kind, _ in CONDITIONS])  # index into DISTORTIONS
CONDITION_NAMES = [f"{kind}-{level}" if level else kind for kind, level in CONDITIONS]
SCALES = (1, 2, 4)  # derivative statistics of the luma at full, half and quarter resolution
JPEG_BLOCK = 8
JUDGE_PHOTOS = 300  # photos of the default training set (3000 crops)
CHUNK = 256  # images per feature pass (bounds memory for any batch)


@dataclass
class JudgeConfig:
    """The judge's classifier and its training.

    Args:
        crop: image side (px) it judges; other sizes are refused (distortion statistics depend on scale).
        hidden: width of the MLP's hidden layer.
        steps, lr, weight_decay: full-batch AdamW steps, learning rate (cosine decay to zero), decoupled decay.
        held_out: share of the *photos* whose crops are kept out of training and measure the accuracy.
        seed: initial weights and the held-out photos.
    """

    crop: int = 48
    hidden: int = 64
    steps: int = 1000
    lr: float = 1e-2
    weight_decay: float = 1e-2
    held_out: float = 0.25
    seed: int = 0

    def __post_init__(self):
        for name in ("crop", "hidden", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"JudgeConfig.{name}={value!r}: a positive whole number")
        if self.crop < 2 * JPEG_BLOCK:
            raise InputError(f"JudgeConfig.crop={self.crop}: at least {2 * JPEG_BLOCK} px (two JPEG blocks)")
        for name, minimum in (("lr", 1e-12), ("weight_decay", 0.0)):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= minimum):
                raise InputError(f"JudgeConfig.{name}={value!r}: a finite number {'> 0' if minimum else '>= 0'}, "
                                 "e.g. 1e-2")
        if not (isinstance(self.held_out, (int, float)) and 0 < self.held_out < 1):
            raise InputError(f"JudgeConfig.held_out={self.held_out!r}: a share of the photos in (0, 1), e.g. 0.25")


def _log_energy(d: torch.Tensor) -> torch.Tensor:
    return torch.log(d.pow(2).mean(dim=1) + 1e-2)


def _log_kurtosis(d: torch.Tensor) -> torch.Tensor:
    """log(E d^4 / (E d^2)^2): heavy-tailed (sparse edges) for natural images, 3 for Gaussian noise."""
    m2 = d.pow(2).mean(dim=1)
    return torch.log((d.pow(4).mean(dim=1) + 1e-2) / (m2.pow(2) + 1e-2))


def _diffs(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical first differences of ``[B,H,W]``, ``[B,H,W-1]`` and ``[B,H-1,W]``."""
    return z[..., :, 1:] - z[..., :, :-1], z[..., 1:, :] - z[..., :-1, :]


def _blockiness(d: torch.Tensor) -> torch.Tensor:
    """log of mean |difference| across 8 px block edges over that inside blocks, for differences along the last
    axis (``d[..., j]`` = pixel ``j+1`` minus pixel ``j``): JPEG's grid shows as a ratio above 1."""
    edge = (torch.arange(d.shape[-1]) % JPEG_BLOCK) == JPEG_BLOCK - 1
    a = d.abs()
    return torch.log((a[..., edge].mean(dim=(-2, -1)) + 0.1) / (a[..., ~edge].mean(dim=(-2, -1)) + 0.1))


def distortion_features(images: torch.Tensor) -> torch.Tensor:
    """Statistics ``[B, 19]`` of images ``[B,3,H,W]`` in [0,1] that blur, noise and JPEG move (8-bit units):

    - luma derivative energy (horizontal, vertical) and kurtosis at :data:`SCALES` (blur removes fine energy;
      noise adds it and makes derivatives Gaussian);
    - the noise floor: log median |diagonal Haar detail| at full resolution (Donoho's robust noise estimate);
    - JPEG blockiness across the 8 px grid, horizontal and vertical;
    - chroma (B-Y, R-Y) derivative energy and log variance (JPEG subsamples and quantises chroma);
    - log luma variance (the contrast the others are relative to).
    """
    x = images.float() * 255
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    features = []
    for scale in SCALES:
        z = luma if scale == 1 else torch.nn.functional.avg_pool2d(luma[:, None], scale)[:, 0]
        dh, dv = _diffs(z)
        features += [_log_energy(dh.flatten(1)), _log_energy(dv.flatten(1)),
                     _log_kurtosis(torch.cat([dh.flatten(1), dv.flatten(1)], dim=1))]
    even = luma[:, : luma.shape[1] // 2 * 2, : luma.shape[2] // 2 * 2]
    hh = (even[:, 0::2, 0::2] - even[:, 0::2, 1::2] - even[:, 1::2, 0::2] + even[:, 1::2, 1::2]) / 2
    features.append(torch.log(hh.abs().flatten(1).median(dim=1).values + 0.1))
    dh, dv = _diffs(luma)
    features += [_blockiness(dh), _blockiness(dv.transpose(-2, -1))]
    for chroma in (x[:, 2] - luma, x[:, 0] - luma):
        ch, cv = _diffs(chroma)
        features += [_log_energy(ch.flatten(1)), _log_energy(cv.flatten(1)),
                     torch.log(chroma.flatten(1).var(dim=1) + 1e-2)]
    features.append(torch.log(luma.flatten(1).var(dim=1) + 1e-2))
    return torch.stack(features, dim=1)


class JudgeNet(torch.nn.Module):
    """:func:`distortion_features`, standardised with the training set's mean and std (buffers), then an MLP with
    one hidden layer to the ten :data:`~.crops.CONDITIONS`' logits."""

    def __init__(self, hidden: int, n_features: int = 19):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.mlp = torch.nn.Sequential(torch.nn.Linear(n_features, hidden), torch.nn.GELU(),
                                       torch.nn.Linear(hidden, len(CONDITIONS)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, 10]`` of :func:`distortion_features` ``[B, F]``."""
        return self.mlp((features - self.mean) / self.std)


def condition_index(crops: Crops) -> torch.Tensor:
    """Each crop's index into :data:`~.crops.CONDITIONS` (``[N]`` long)."""
    index = {condition: i for i, condition in enumerate(CONDITIONS)}
    try:
        return torch.tensor([index[(kind, int(level))] for kind, level in zip(crops.distortion, crops.level)])
    except KeyError as exc:
        raise InputError(f"crop condition {exc.args[0]} is not one of {CONDITIONS}") from None


def split_by_source(sources: list[str], held_out: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train, held_out)`` crop indices: a seeded share ``held_out`` of the distinct photos (at least one) and
    every crop of them held out, so no scene is in both.

    Args:
        sources: per crop, the photo it was cut from.
        held_out: share of the photos to hold out, in (0, 1).
        seed: which photos.
    """
    photos = sorted(set(sources))
    if len(photos) < 2:
        raise InputError(f"{len(photos)} distinct photo(s): the held-out split needs crops of at least two photos")
    rng = np.random.default_rng(derive_seed("toy.judge.split", seed))
    count = min(len(photos) - 1, max(1, round(held_out * len(photos))))
    kept_out = {photos[i] for i in rng.permutation(len(photos))[:count]}
    train = [i for i, s in enumerate(sources) if s not in kept_out]
    return train, [i for i, s in enumerate(sources) if s in kept_out]


def judge_crops(biq_dir: Path | None, n_photos: int = JUDGE_PHOTOS, crop: int = 48, seed: int = 1) -> Crops:
    """The judge's training set: one textured clean crop of each of ``n_photos`` photos
    (:func:`~.crops.build_crops`) in all ten conditions (:func:`all_conditions`).

    Args:
        biq_dir: the BIQ2021 folder (None: the shared data's).
        n_photos: how many photos.
        crop: crop side (px), that of the samples to judge.
        seed: the photos, crop positions and noise draws (default 1: mostly other photos than those the toy's
            seed-0 base is trained on).
    """
    return all_conditions(build_crops(biq_dir, n_photos, crop, seed=seed, distortions=("clean",)), seed)


def all_conditions(clean: Crops, seed: int = 0) -> Crops:
    """Each crop of ``clean`` in all ten :data:`~.crops.CONDITIONS` (:func:`~.crops.distort`), ``10 * N`` crops,
    each keeping its ``source`` (for :func:`split_by_source`).

    Args:
        clean: undistorted crops.
        seed: the noise draws.
    """
    images, kinds, levels, sources = [], [], [], []
    for i, (image, source) in enumerate(zip(clean.images, clean.source)):
        for c, (kind, level) in enumerate(CONDITIONS):
            images.append(distort(image, kind, level, seed=derive_seed("toy.judge.noise", seed, i, c)))
            kinds.append(kind)
            levels.append(level)
            sources.append(source)
    return Crops(torch.stack(images).float().contiguous(), kinds, torch.tensor(levels, dtype=torch.long), sources)


class ToyJudge:
    """A trained :class:`JudgeNet` and what it measured on held-out photos.

    Args:
        net: the classifier (eval mode, no gradients).
        config: how it was trained.
        held_out: :func:`evaluate`'s report on the held-out photos' crops.
    """

    def __init__(self, net: JudgeNet, config: JudgeConfig, held_out: dict):
        self.net = net.eval().requires_grad_(False)
        self.config, self.held_out = config, held_out

    @classmethod
    def fit(cls, crops: Crops, config: JudgeConfig | None = None) -> ToyJudge:
        """Train on the crops of all but ``config.held_out`` of the photos (full batch); measure on the rest.

        Deterministic given the crops and the config (the global RNG is left as it was).

        Args:
            crops: labelled crops (:func:`judge_crops`, or any :class:`~.crops.Crops` of ``config.crop`` px).
            config: the classifier and its training (default :class:`JudgeConfig`).
        """
        config = JudgeConfig() if config is None else config
        _check_size(crops.images, config.crop, "training crops")
        target = condition_index(crops)
        train, test = split_by_source(crops.source, config.held_out, config.seed)
        features = features_of(crops.images)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            net = JudgeNet(config.hidden, features.shape[1])
        net.mean.copy_(features[train].mean(dim=0))
        net.std.copy_(features[train].std(dim=0).clamp_min(1e-6))
        optimizer = torch.optim.AdamW(net.mlp.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
        for _ in range(config.steps):
            loss = torch.nn.functional.cross_entropy(net(features[train]), target[train])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        judge = cls(net, config, {})
        judge.held_out = evaluate(judge, crops.images[test], target[test], [crops.source[i] for i in test])
        judge.held_out["train_crops"] = len(train)
        return judge

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 10]`` probabilities of the :data:`~.crops.CONDITIONS` for images ``[B,3,S,S]`` in [0,1]."""
        _check_size(images, self.config.crop, "images")
        with torch.no_grad():
            return self.net(features_of(images)).softmax(dim=1)

    def __call__(self, images: torch.Tensor) -> dict:
        """The judgement of each image ``[B,3,S,S]`` in [0,1].

        Returns:
            ``p_clean`` ``[B]``: the probability of the clean condition; ``level`` ``[B]``: the expected distortion
            level (0 clean ... 3, over all types); ``kind_probs`` ``[B, 4]``: the probability of each of
            :data:`~.crops.DISTORTIONS`; ``kind``: per image, the most probable of them; ``probs`` ``[B, 10]``.
        """
        probs = self.probabilities(images)
        kind_probs = torch.zeros(len(probs), len(DISTORTIONS)).index_add_(1, CONDITION_KIND, probs)
        return {"p_clean": probs[:, 0], "level": probs @ CONDITION_LEVEL, "kind_probs": kind_probs,
                "kind": [DISTORTIONS[i] for i in kind_probs.argmax(dim=1).tolist()], "probs": probs}

    def summary(self, images: torch.Tensor) -> dict:
        """Means over images ``[B,3,S,S]``: ``p_clean``, ``level``, and ``kind_share`` (the share of images judged
        to be each of :data:`~.crops.DISTORTIONS`), with ``n`` the number of images."""
        verdict = self(images)
        kinds = verdict["kind"]
        return {"n": len(kinds), "p_clean": float(verdict["p_clean"].mean()), "level": float(verdict["level"].mean()),
                "kind_share": {k: kinds.count(k) / len(kinds) for k in DISTORTIONS}}


def features_of(images: torch.Tensor) -> torch.Tensor:
    """:func:`distortion_features` in chunks of :data:`CHUNK` images (memory stays bounded for any batch)."""
    with torch.no_grad():
        return torch.cat([distortion_features(chunk) for chunk in images.split(CHUNK)])


def evaluate(judge: ToyJudge, images: torch.Tensor, target: torch.Tensor, sources: list[str]) -> dict:
    """The judge on labelled crops: ``accuracy`` (of the ten conditions; chance 0.1), ``kind_accuracy`` (of the
    four types; chance 0.25 on balanced crops), ``clean_accuracy`` (P(clean) > 0.5 exactly for the clean crops;
    0.9 by always saying "distorted"), ``level_mae`` (expected level against the true one),
    ``p_clean_by_condition`` (mean P(clean) per condition, ``"blur-2"`` style), and the number of ``crops`` and
    ``photos``."""
    verdict = judge(images)
    predicted = verdict["probs"].argmax(dim=1)
    return {"crops": len(target), "photos": len(set(sources)),
            "accuracy": float((predicted == target).float().mean()),
            "kind_accuracy": float((CONDITION_KIND[predicted] == CONDITION_KIND[target]).float().mean()),
            "clean_accuracy": float(((verdict["p_clean"] > 0.5) == (target == 0)).float().mean()),
            "level_mae": float((verdict["level"] - CONDITION_LEVEL[target]).abs().mean()),
            "p_clean_by_condition": {CONDITION_NAMES[c]: float(verdict["p_clean"][target == c].mean())
                                     for c in range(len(CONDITIONS)) if (target == c).any()}}


def _check_size(images: torch.Tensor, crop: int, what: str) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (crop, crop):
        raise InputError(f"{what} are {tuple(images.shape)}; the judge takes [B,3,{crop},{crop}] (its crop size): "
                         f"judge samples of the size it was trained at, or fit one with JudgeConfig(crop=...)")
