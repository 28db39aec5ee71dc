"""NIQE and BRISQUE features of an image of any size in bounded memory, equal to the whole-image maths.

pyiqa computes NIQE and BRISQUE on whole images: a 12 MP photo holds dozens of full-size float64
maps at once (6 GB) and a 36 MP one does not fit in 16 GB. Both metrics are local up to sums:

- NIQE: features of 96 px blocks of MSCN maps at two scales; the second scale is a MATLAB-style
  bicubic half-size resize (pyiqa's ``imresize``), whose taps reach 4 px of the full-size image;
- BRISQUE: AGGD/GGD fits of MSCN coefficients and their neighbour products over the whole image,
  which need only sums (:class:`~.nss_maths.Moments`), accumulated tile by tile.

So each tile is computed from a window of the luma that reaches a few px past it (the filter's
:data:`~.nss_maths.RADIUS`, :data:`RESIZE_MARGIN` for the resize): MSCN values at a tile's pixels
then depend only on genuine image pixels, and where a window touches the image border, pyiqa's own
padding (replicate for NIQE, zeros for BRISQUE, MATLAB's symmetric for the resize) is applied by
the same functions, so it is the whole image's. Every operation rounds the same wherever a pixel
lies in a window, so a tiling changes no value (tested). Peak memory is set by :data:`TILE_PIXELS`,
not by the photo.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from .nss_maths import (BRISQUE_SHIFTS, RADIUS, Moments, brisque_scale_features, half_size, local_mean_var, moments,
                        mscn, niqe_block_features)

BLOCK = 96
TILE_PIXELS = 1 << 20  # ~1 MP per tile: a few hundred MB of float64 working maps
# Output i of the x0.5 antialiased bicubic resize reads inputs 2i-4 .. 2i+5 (the end taps weigh 0):
# a full-size window this many px wider (even, so windows start on even rows) makes it exact.
RESIZE_MARGIN = 6

ALL = (0, 1, 2, 3)
Rect = tuple[int, int, int, int]  # top, bottom, left, right; half-open
Region = Callable[[Rect], torch.Tensor]  # exact values of a luma plane on a rectangle, [1,1,h,w]


def plan_tiles(height: int, width: int, unit: int, max_pixels: int = TILE_PIXELS) -> list[Rect]:
    """Rectangles covering ``height x width`` with edges on multiples of ``unit`` (except the image's
    last ones), of at most ``max_pixels`` (one ``unit x unit`` cell at least); full rows when they fit."""
    round_up = lambda n: -(-n // unit) * unit
    step_w = max(unit, min(round_up(width), max_pixels // unit // unit * unit))
    step_h = max(unit, min(round_up(height), max_pixels // step_w // unit * unit))
    return [(t, min(t + step_h, height), l, min(l + step_w, width))
            for t in range(0, height, step_h) for l in range(0, width, step_w)]


def _grow(rect: Rect, by: int, size: tuple[int, int]) -> Rect:
    t, b, l, r = rect
    return max(0, t - by), min(size[0], b + by), max(0, l - by), min(size[1], r + by)


def _crop(values: torch.Tensor, origin: Rect, rect: Rect) -> torch.Tensor:
    if not (origin[0] <= rect[0] and rect[1] <= origin[1] and origin[2] <= rect[2] and rect[3] <= origin[3]):
        raise AssertionError(f"internal error: window {origin} does not hold {rect}")
    return values[..., rect[0] - origin[0]:rect[1] - origin[0], rect[2] - origin[2]:rect[3] - origin[2]]


def luma_region(image: torch.Tensor, dtype: torch.dtype) -> Region:
    """Y of YIQ x 255, rounded (differentiably), of ``image`` ``[3,H,W]`` in [0,1] (pyiqa's ``to_y_channel``)."""
    from pyiqa.utils.color_util import to_y_channel

    return lambda rect: to_y_channel(image[None, :, rect[0]:rect[1], rect[2]:rect[3]].to(dtype), 255.0, "yiq")


def half_region(region: Region, size: tuple[int, int], unit: float = 1.0) -> Region:
    """The half-size plane of a whole ``size`` plane (:func:`~.nss_maths.half_size` of ``plane / unit``, times
    ``unit``, as NIQE resizes 0..1 values and BRISQUE 0..255 ones), computed on windows."""
    def values(rect: Rect) -> torch.Tensor:
        t, b, l, r = rect
        window = (max(0, 2 * t - RESIZE_MARGIN), min(size[0], 2 * b + RESIZE_MARGIN),
                  max(0, 2 * l - RESIZE_MARGIN), min(size[1], 2 * r + RESIZE_MARGIN))
        y = region(window)
        small = half_size(y / unit, (window[0], window[2]), size) * unit if unit != 1.0 else \
            half_size(y, (window[0], window[2]), size)
        # even origin: output i of the window is output origin/2 + i of the whole plane
        return _crop(small, (window[0] // 2, window[0] // 2 + small.shape[-2], window[2] // 2,
                             window[2] // 2 + small.shape[-1]), rect)
    return values


def mscn_region(region: Region, size: tuple[int, int], rect: Rect, padding: str) -> tuple[torch.Tensor, torch.Tensor]:
    """MSCN coefficients and local |variance| of a plane on ``rect``, equal to the whole plane's."""
    window = _grow(rect, RADIUS, size)
    y = region(window)
    mu, var = local_mean_var(y, padding)
    return _crop(mscn(y, mu, var), window, rect), _crop(var, window, rect)


def _blocks(x: torch.Tensor, size: int) -> torch.Tensor:
    """``[1,1,H,W]`` -> ``[H/size, W/size, 1, size, size]`` row-major blocks."""
    return x[0, 0].unfold(0, size, size).unfold(1, size, size).unsqueeze(2)


def niqe_feature_grid(image: torch.Tensor, max_pixels: int = TILE_PIXELS) -> tuple[torch.Tensor, torch.Tensor]:
    """NIQE features of every full 96 px block and its sharpness, tile by tile (Mittal et al. 2013, section III).

    Args:
        image: ``[3,H,W]`` in [0,1]; the maths run in float64 (MATLAB's precision).
        max_pixels: tile size, which bounds the working memory.

    Returns:
        ``features [H/96, W/96, 36]`` (18 per scale) and ``sharpness [H/96, W/96]`` (mean local standard
        deviation of the block, the fit's selection criterion), float64, blocks in row-major order.
    """
    size = (image.shape[-2] // BLOCK * BLOCK, image.shape[-1] // BLOCK * BLOCK)
    if size[0] == 0 or size[1] == 0:
        raise ValueError(f"NIQE needs a {BLOCK}x{BLOCK} block, got a {image.shape[-2]}x{image.shape[-1]} image")
    luma = luma_region(image, torch.float64)
    rows = []
    for t, b, l, r in plan_tiles(*size, BLOCK, max_pixels):
        # the luma of the tile and of what the half-size MSCN around it reads, computed once
        window = _grow((t, b, l, r), 2 * RADIUS + RESIZE_MARGIN, size)
        y = luma(window)
        full = lambda rect, y=y, window=window: _crop(y, window, rect)
        half = half_region(full, size, unit=255.0)
        coeffs, var = mscn_region(full, size, (t, b, l, r), "replicate")
        coeffs2, _ = mscn_region(half, (size[0] // 2, size[1] // 2), (t // 2, b // 2, l // 2, r // 2), "replicate")
        per_scale = []
        for c, s in ((coeffs, BLOCK), (coeffs2, BLOCK // 2)):
            blocks = _blocks(c, s)
            per_scale.append(niqe_block_features(blocks.reshape(-1, 1, s, s)).reshape(*blocks.shape[:2], 18))
        sharp = torch.nn.functional.avg_pool2d(var.sqrt(), BLOCK)[0, 0]
        rows.append((t, l, torch.cat(per_scale, -1), sharp))
    return _assemble(rows)


def _assemble(tiles: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tile ``(top, left, features, sharpness)`` -> whole-image grids."""
    grid_rows: dict[int, list] = {}
    for t, l, feats, sharp in sorted(tiles, key=lambda item: item[:2]):
        grid_rows.setdefault(t, []).append((feats, sharp))
    feats = torch.cat([torch.cat([f for f, _ in row], 1) for row in grid_rows.values()], 0)
    sharp = torch.cat([torch.cat([s for _, s in row], 1) for row in grid_rows.values()], 0)
    return feats, sharp


def niqe_distance(features: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """NIQE: Mahalanobis-like distance between the pristine MVG ``(mu, cov)`` and the MVG fitted to block
    ``features [N,36]`` (Mittal et al. 2013, eq. 10; blocks with NaN features are left out, as pyiqa)."""
    from pyiqa.matlab_utils import nancov, nanmean

    feats = features[None]
    inverse = torch.linalg.pinv((cov[None] + nancov(feats)) / 2)
    diff = (mu[None] - nanmean(feats, dim=1)).unsqueeze(1)
    return torch.bmm(torch.bmm(diff, inverse), diff.transpose(1, 2)).reshape(()).sqrt()


def niqe_score(image: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor, max_pixels: int = TILE_PIXELS) -> torch.Tensor:
    """NIQE of one image ``[3,H,W]`` in [0,1] (a 0-d float64 tensor), equal to pyiqa's ``calculate_niqe``."""
    grid, _ = niqe_feature_grid(image, max_pixels)
    # pyiqa's blockproc lists blocks column by column; the order changes only the rounding of the MVG fit
    features = grid.transpose(0, 1).reshape(-1, grid.shape[-1])
    return niqe_distance(features, mu.to(features), cov.to(features))


def brisque_feature_vector(image: torch.Tensor, max_pixels: int = TILE_PIXELS) -> torch.Tensor:
    """The 36 unscaled BRISQUE features of one image ``[3,H,W]`` in [0,1], float32 (as pyiqa), tile by tile."""
    size = tuple(image.shape[-2:])
    region = luma_region(image, torch.float32)
    features = []
    for scale in range(2):
        coefficients, products = _brisque_moments(region, size, max_pixels)
        features.append(brisque_scale_features(coefficients, products, torch.float32))
        region = half_region(region, size)
        size = (math.ceil(size[0] / 2), math.ceil(size[1] / 2))
    return torch.cat(features)


def _brisque_moments(region: Region, size: tuple[int, int], max_pixels: int) -> tuple[Moments, list[Moments]]:
    """Moments of the MSCN coefficients and of their products with each shifted copy, where the shift
    wraps around the image (``torch.roll``, as pyiqa): each tile brings a one-pixel ring of neighbours."""
    height, width = size

    @functools.cache
    def line(name: str) -> torch.Tensor:
        """MSCN of the image's first/last row or column: the wrapped neighbours of border tiles."""
        rect = {"top": (0, 1, 0, width), "bottom": (height - 1, height, 0, width),
                "left": (0, height, 0, 1), "right": (0, height, width - 1, width)}[name]
        return mscn_region(region, size, rect, "zeros")[0].reshape(-1)

    coefficients, products = None, None
    for t, b, l, r in plan_tiles(height, width, 1, max_pixels):
        ring = _with_ring(region, size, (t, b, l, r), line)
        centre = ring[..., 1:-1, 1:-1]
        h, w = centre.shape[-2:]
        tile_products = [moments(centre * ring[..., 1 - dy:1 - dy + h, 1 - dx:1 - dx + w], ALL)
                         for dy, dx in BRISQUE_SHIFTS]
        tile_coefficients = moments(centre, ALL)
        if coefficients is None:
            coefficients, products = tile_coefficients, tile_products
        else:
            coefficients = coefficients + tile_coefficients
            products = [a + m for a, m in zip(products, tile_products)]
    return coefficients, products


def _with_ring(region: Region, size: tuple[int, int], rect: Rect, line: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """MSCN on ``rect`` grown by one pixel, the ring wrapping around the image's edges: ``[1,1,h+2,w+2]``."""
    height, width = size
    t, b, l, r = rect
    inner = _grow(rect, 1, size)
    values = mscn_region(region, size, inner, "zeros")[0]
    if l == 0 and r == width:  # the tile spans the image: it holds its own wrapped neighbours
        values = torch.cat([values[..., -1:], values, values[..., :1]], -1)
    else:
        rows = torch.arange(inner[0], inner[1], device=values.device)
        if l == 0:
            values = torch.cat([line("right")[rows].reshape(1, 1, -1, 1), values], -1)
        if r == width:
            values = torch.cat([values, line("left")[rows].reshape(1, 1, -1, 1)], -1)
    if t == 0 and b == height:
        values = torch.cat([values[..., -1:, :], values, values[..., :1, :]], -2)
    else:
        cols = torch.arange(l - 1, r + 1, device=values.device) % width
        if t == 0:
            values = torch.cat([line("bottom")[cols].reshape(1, 1, 1, -1), values], -2)
        if b == height:
            values = torch.cat([values, line("top")[cols].reshape(1, 1, 1, -1)], -2)
    return values
