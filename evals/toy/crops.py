"""The toy task's data: crops of real photos (BIQ2021), one of ten conditions each (clean, or Gaussian blur /
Gaussian noise / JPEG at levels 1-3), stored at 8 bits as a photo would be."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from qualityguide.evaluation.datasets import DATA_ENV, shared_data_dir
from qualityguide.errors import InputError
from qualityguide.images import IMAGE_EXTENSIONS
from qualityguide.train import derive_seed

DISTORTIONS = ("clean", "blur", "noise", "jpeg")
# Level k (1..3) of each distortion, at the crop's own resolution: blur sigma (px), noise std (of [0,1] values),
# JPEG quality. Chosen so that each level lowers BRISQUE on most crops (measured by ``python -m evals.toy_task``).
LEVELS = {"blur": (0.8, 1.4, 2.2), "noise": (0.04, 0.08, 0.14), "jpeg": (30, 15, 6)}
CONDITIONS = [("clean", 0)] + [(d, k) for d in ("blur", "noise", "jpeg") for k in range(1, 4)]
SCENE_FRACTION = 0.375  # crop side / downscaled photo's short side (48 px crops of 128 px photos)
MIN_TEXTURE = 0.04  # luma std a crop should reach (flat crops have undefined NSS statistics)
CROP_TRIES = 20


def resolve_data_dir(data: str | os.PathLike | None) -> Path:
    """The folder holding ``biq2021/`` and ``params/``.

    Args:
        data: that folder, or None for :func:`qualityguide.evaluation.datasets.shared_data_dir`
            (``$QUALITYGUIDE_DATA`` or ``../shared/data`` beside the checkout).
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
