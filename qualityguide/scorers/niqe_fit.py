"""Fit a NIQE pristine model from photographs (Mittal et al. 2013, section IV; their computemodelparams.m).

Per image: Y channel in 0..255, 96 px blocks, 36 NSS features per block over two scales (the same
code that scores images, :func:`~.nss_tiled.niqe_feature_grid`), and the block's sharpness (mean local
standard deviation at the first scale). Blocks sharper than ``0.75 x`` the image's sharpest block
are kept; the model is the mean and covariance of the kept blocks' features.

The embedded model (``niqe-embedded``) is fitted by ``evals/fit_niqe_pristine.py`` from the
photographs in :data:`FIT_PHOTOS`, which ship inside scikit-image and matplotlib wheels. The
photographs that ``qualityguide demo`` distorts (:data:`DEMO_PHOTOS`) are held out of the fit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .nss_tiled import BLOCK

SHARPNESS_THRESHOLD = 0.75

# (package, file in that package's data folder) — natural photographs only (no text, charts or synthetic images).
FIT_PHOTOS = [
    ("skimage", "camera.png"), ("skimage", "motorcycle_left.png"), ("skimage", "motorcycle_right.png"),
    ("skimage", "grass.png"), ("skimage", "gravel.png"), ("skimage", "brick.png"), ("skimage", "moon.png"),
    ("skimage", "coins.png"), ("matplotlib", "grace_hopper.jpg"),
]
DEMO_PHOTOS = [("skimage", "astronaut.png"), ("skimage", "coffee.png"), ("skimage", "chelsea.png"),
               ("skimage", "rocket.jpg")]


def bundled_photo(package: str, filename: str) -> Path:
    """Path of a photograph shipped inside an installed package (no download)."""
    if package == "skimage":
        import skimage

        folder = Path(skimage.__file__).parent / "data"
    elif package == "matplotlib":
        import matplotlib

        folder = Path(matplotlib.get_data_path()) / "sample_data"
    else:
        raise ValueError(f"package must be 'skimage' or 'matplotlib', got {package!r}")
    path = folder / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package}; reinstall {package}")
    return path


def niqe_block_features(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NIQE features and sharpness of every full 96 px block of one image (the code that scores images).

    Args:
        image: ``[3,H,W]`` in [0,1].

    Returns:
        ``(features [N,36], sharpness [N])`` in float64. Features are listed column by column (pyiqa's
        ``blockproc`` order), sharpness row by row: the code that fitted the shipped embedded model
        paired them so, which selects blocks by another block's sharpness on images with more than
        one block row and column. Kept, so that the shipped model stays reproducible; pairing them
        (``features.transpose(0, 1)``) means refitting it with ``evals/fit_niqe_pristine.py``.
    """
    from .nss_tiled import niqe_feature_grid

    features, sharpness = niqe_feature_grid(image)
    return features.transpose(0, 1).flatten(0, 1), sharpness.flatten()


def fit_pristine(images: list[torch.Tensor], threshold: float = SHARPNESS_THRESHOLD,
                 offsets: tuple[int, ...] = (0, BLOCK // 2)) -> tuple[np.ndarray, np.ndarray, int]:
    """Fit ``(mu [36], cov [36,36], blocks used)`` from pristine images ``[3,H,W]`` in [0,1].

    Args:
        images: pristine photographs.
        threshold: keep blocks sharper than this fraction of the image's sharpest block.
        offsets: block-grid offsets (px) in each direction; half-block offsets add overlapping
            blocks, which a small photo set needs for a stable 36x36 covariance.
    """
    kept = []
    for image in images:
        feats, sharp = zip(*(niqe_block_features(image[:, dy:, dx:]) for dy in offsets for dx in offsets))
        feats, sharp = torch.cat(feats), torch.cat(sharp)
        kept.append(feats[sharp > threshold * sharp.max()])
    data = torch.cat(kept).numpy()
    data = data[np.isfinite(data).all(1)]
    return data.mean(0), np.cov(data, rowvar=False), int(data.shape[0])
