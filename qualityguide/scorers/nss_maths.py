"""Natural-scene statistics shared by NIQE and BRISQUE, as pure functions of image regions.

Every function reproduces, operation for operation, what pyiqa computes (``normalize_img_with_gauss``,
``estimate_aggd_param``, ``estimate_ggd_param``; pyiqa in turn reproduces the authors' MATLAB code),
so that a region's statistics equal the whole-image ones. Two things differ by design:

- the AGGD/GGD fits take *moments* (counts and sums), so sums over tiles give exactly the moments
  of the whole image (Mittal et al. 2012, eqs. 5-8 only need these sums);
- the shape lookup on pyiqa's 0.001 grid uses a binary search instead of an argmin over a
  ``[blocks, 9801]`` table; it returns the same index (first minimum of ``|table - value|``, tested).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

RADIUS = 3  # the 7x7 local-statistics window reaches 3 px
SIGMA = 7.0 / 6


@functools.cache
def _window_taps() -> tuple[tuple[float, ...], ...]:
    from pyiqa.matlab_utils import fspecial

    return tuple(tuple(row) for row in fspecial(2 * RADIUS + 1, SIGMA, 1)[0, 0].tolist())


def gaussian_window(like: torch.Tensor) -> torch.Tensor:
    """pyiqa's ``fspecial(7, 7/6)`` window ``[1,1,7,7]`` (float32-rounded values, as pyiqa), in ``like``'s dtype."""
    return torch.tensor(_window_taps(), dtype=torch.float32).to(like).reshape(1, 1, 2 * RADIUS + 1, -1)


def local_filter(x: torch.Tensor, padding: str) -> torch.Tensor:
    """``imfilter(x, gaussian_window, padding)`` of MATLAB/pyiqa on each channel of ``[1,C,H,W]`` (same size).

    Args:
        padding: ``"replicate"`` (NIQE) or ``"zeros"`` (BRISQUE, pyiqa's ``'same'``).
    """
    padded = F.pad(x, (RADIUS,) * 4, mode="replicate" if padding == "replicate" else "constant")
    if x.dtype != torch.float64:  # one channel at a time: the kernel pyiqa's single-channel convolution uses
        return torch.cat([F.conv2d(channel, gaussian_window(x)) for channel in padded.split(1, dim=1)], 1)
    # PyTorch's float64 CPU convolution unfolds a 49 x H x W copy of the input (the 6 GB of a
    # 12 MP photo); 49 shifted products summed in a fixed order give the same sums (exactly, for
    # 8-bit luma; in the same order as pyiqa's matrix product otherwise), 6x faster. Product and
    # sum are separate, correctly rounded steps (no fused multiply-add, which PyTorch uses only on
    # vectorised lanes), so a pixel's value does not depend on where it lies in a tile: tiles
    # equal the whole image bit for bit, and a flat area stays exactly flat.
    h, w = x.shape[-2:]
    taps = _window_taps()
    out = padded[..., :h, :w] * taps[0][0]
    reuse = not (torch.is_grad_enabled() and x.requires_grad)
    term = torch.empty_like(out) if reuse else None
    for dy in range(2 * RADIUS + 1):
        for dx in range(2 * RADIUS + 1):
            if dy or dx:
                shifted = padded[..., dy:dy + h, dx:dx + w]
                if reuse:  # one buffer for the products: fresh multi-MB tensors cost page faults
                    out.add_(torch.mul(shifted, taps[dy][dx], out=term))
                else:
                    out = out + shifted * taps[dy][dx]
    return out


def local_mean_var(y: torch.Tensor, padding: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian-weighted local mean and |variance| of ``y`` ``[1,1,H,W]`` (Mittal et al. 2012, eqs. 2-3)."""
    # both maps in one pass (half the operations; each value is computed as it would be alone)
    mu, mean_square = local_filter(torch.cat([y, y**2], 1), padding).split(1, dim=1)
    return mu, (mean_square - mu**2).abs()


def mscn(y: torch.Tensor, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Mean-subtracted contrast-normalised coefficients, C = 1 (Mittal et al. 2012, eq. 1; pyiqa's safe sqrt)."""
    return (y - mu) / (torch.sqrt(var + torch.finfo(var.dtype).eps) + 1)


RESIZE_TAPS = 10  # pyiqa's bicubic kernel, antialiased for x0.5: 4 / 0.5 + 2 taps; the two end taps weigh 0


def _half_weights(length: int, device: torch.device) -> torch.Tensor:
    """pyiqa's ``imresize(scale=0.5)`` weights ``[RESIZE_TAPS, ceil(length/2)]`` for an axis of ``length``
    (computed by pyiqa's own ``get_weight``, so they equal, bit for bit, the ones it applies)."""
    from pyiqa.matlab_utils.resize import get_weight

    size = math.ceil(length * 0.5)
    pos = torch.linspace(0, size - 1, steps=size, dtype=torch.float32, device=device)
    pos = (pos + 0.5) / 0.5 - 0.5
    base = pos.floor() - (RESIZE_TAPS // 2) + 1
    return get_weight(pos - base, RESIZE_TAPS, kernel="cubic", antialiasing_factor=0.5)


def _half_axis(x: torch.Tensor, dim: int, origin: int, length: int) -> torch.Tensor:
    count = math.ceil(x.shape[dim] / 2)
    # output i reads inputs 2i-4 .. 2i+5, mirrored at the window's ends as MATLAB does ([b a | a b ...])
    index = torch.arange(-4, 2 * count + 4, device=x.device)
    index = torch.where(index < 0, -index - 1, torch.where(index >= x.shape[dim], 2 * x.shape[dim] - index - 1, index))
    padded = x.index_select(dim, index)
    weights = _half_weights(length, x.device)[:, origin // 2:origin // 2 + count]
    shape = [1] * x.dim()
    shape[dim] = count
    taps = [slice(None)] * x.dim()
    out = None
    for k in range(RESIZE_TAPS):
        taps[dim] = slice(k, k + 2 * count, 2)
        term = padded[tuple(taps)] * weights[k].reshape(shape)
        out = term if out is None else out + term
    return out


def half_size(x: torch.Tensor, origin: tuple[int, int] = (0, 0), full: tuple[int, int] | None = None) -> torch.Tensor:
    """MATLAB's ``imresize(x, 0.5)`` (bicubic, antialiased), as pyiqa's ``imresize``: float32 maths, rows then columns.

    Computable on a window of a larger plane: ``x`` ``[1,1,h,w]`` starts at even ``origin`` of a plane of
    size ``full``; output ``i`` is output ``origin/2 + i`` of the whole plane wherever its taps lie inside
    the window or the window reaches the plane's edge. The taps are summed one after another in
    separate, correctly rounded steps, so a value does not depend on where it lies in the window
    (pyiqa's summed reduction rounds the last few values of a tensor differently).
    """
    full = full or tuple(x.shape[-2:])
    y = _half_axis(x.float(), -2, origin[0], full[0])
    return _half_axis(y, -1, origin[1], full[1]).to(x.dtype)


class Moments(NamedTuple):
    """Sums over samples of ``x`` that the AGGD/GGD fits need (reduced dims removed; float64 sums)."""

    n: int
    count_left: torch.Tensor   # #{x < 0}
    count_right: torch.Tensor  # #{x > 0}
    sumsq_left: torch.Tensor   # sum of x^2 over x < 0
    sumsq_right: torch.Tensor  # sum of x^2 over x > 0
    sum_abs: torch.Tensor      # sum of |x|
    sum_sq: torch.Tensor       # sum of x^2

    def __add__(self, other: Moments) -> Moments:  # type: ignore[override]
        return Moments(*(a + b for a, b in zip(self, other)))


def moments(x: torch.Tensor, dims: tuple[int, ...] = (-1, -2)) -> Moments:
    """Moments of ``x`` over ``dims``; squares are taken in ``x``'s dtype (as pyiqa), sums in float64."""
    left, right = x < 0, x > 0
    square = x.pow(2)
    total = lambda t: t.sum(dim=dims, dtype=torch.float64)
    n = 1
    for d in dims:
        n *= x.shape[d]
    return Moments(n, left.sum(dim=dims), right.sum(dim=dims), total(square * left), total(square * right),
                   total(x.abs()), total(square))


def shape_grid(like: torch.Tensor) -> torch.Tensor:
    """The shape parameters pyiqa searches: 0.2, 0.201, ..., 10 (float32 arange, as pyiqa), in ``like``'s dtype."""
    return torch.arange(0.2, 10 + 0.001, 0.001).to(like)


def nearest_index(table: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``(table - values[:, None]).abs().argmin(-1)`` for a strictly increasing ``table``, by binary search.

    Same index as the argmin, ties and non-finite values included (first minimum; index 0 for NaN/inf):
    the table's steps (>1e-6) are far wider than the rounding of ``|table - value|`` for values in
    the range the fits produce (<2).
    """
    flat = values.reshape(-1)
    hi = torch.searchsorted(table, flat.contiguous()).clamp(1, table.numel() - 1)
    lo = hi - 1
    nearest = torch.where((table[hi] - flat).abs() < (table[lo] - flat).abs(), hi, lo)
    return torch.where(torch.isfinite(flat), nearest, torch.zeros_like(nearest)).reshape(values.shape)


def aggd_fit(m: Moments, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric generalised Gaussian fit ``(alpha, left std, right std)`` from moments (Mittal et al. 2012, eq. 7;
    pyiqa's ``estimate_aggd_param`` step by step, computed in ``dtype``)."""
    grid = shape_grid(torch.empty(0, dtype=dtype, device=m.sum_sq.device))
    r_grid = (2 * torch.lgamma(2.0 / grid) - (torch.lgamma(1.0 / grid) + torch.lgamma(3.0 / grid))).exp()
    left_std = torch.sqrt(m.sumsq_left.to(dtype) / m.count_left.to(torch.float32))
    right_std = torch.sqrt(m.sumsq_right.to(dtype) / m.count_right.to(torch.float32))
    gammahat = left_std / right_std
    rhat = (m.sum_abs / m.n).to(dtype).pow(2) / (m.sum_sq / m.n).to(dtype)
    rhatnorm = (rhat * (gammahat.pow(3) + 1) * (gammahat + 1)) / (gammahat.pow(2) + 1).pow(2)
    alpha = grid[nearest_index(r_grid, rhatnorm)]
    return alpha, left_std, right_std


def aggd_betas(alpha: torch.Tensor, left_std: torch.Tensor,
               right_std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AGGD scale parameters ``beta_l, beta_r`` from the standard deviations (Mittal et al. 2013, NIQE eq. 8)."""
    factor = (torch.lgamma(1 / alpha) - torch.lgamma(3 / alpha)).exp().sqrt()
    return left_std * factor, right_std * factor


def ggd_fit(m: Moments, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Gaussian fit ``(alpha, sigma)`` from moments (Mittal et al. 2012, eq. 4; pyiqa's
    ``estimate_ggd_param``)."""
    grid = shape_grid(torch.empty(0, dtype=dtype, device=m.sum_sq.device))
    r_table = (torch.lgamma(1.0 / grid) + torch.lgamma(3.0 / grid) - 2 * torch.lgamma(2.0 / grid)).exp()
    sigma_sq = (m.sum_sq / m.n).to(dtype)
    rho = sigma_sq / (m.sum_abs / m.n).to(dtype) ** 2
    # a decreasing table, and one value per image: the plain argmin is cheap here
    alpha = grid[(rho.reshape(-1, 1) - r_table).abs().argmin(-1)].reshape(rho.shape)
    return alpha, sigma_sq.sqrt()


NIQE_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))


def niqe_block_features(blocks: torch.Tensor) -> torch.Tensor:
    """The 18 NIQE features of each MSCN block ``[N,1,s,s]`` (Mittal et al. 2013, section III; pyiqa's
    ``compute_feature``): AGGD shape and mean scale of the coefficients, then shape, mean, left and
    right scale of the products with the four neighbours (shifts wrap inside the block, as pyiqa)."""
    alpha, beta_l, beta_r = _aggd_of(blocks)
    features = [alpha, (beta_l + beta_r) / 2]
    for shift in NIQE_SHIFTS:
        alpha, beta_l, beta_r = _aggd_of(blocks * torch.roll(blocks, shift, dims=(2, 3)))
        mean = (beta_r - beta_l) * (torch.lgamma(2 / alpha) - torch.lgamma(1 / alpha)).exp()
        features.extend((alpha, mean, beta_l, beta_r))
    return torch.stack(features, dim=-1).reshape(blocks.shape[0], 18)


def _aggd_of(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    alpha, left_std, right_std = aggd_fit(moments(x), x.dtype)
    return (alpha, *aggd_betas(alpha, left_std, right_std))


BRISQUE_SHIFTS = ((0, 1), (1, 0), (1, 1), (-1, 1))


def brisque_scale_features(coefficients: Moments, products: list[Moments], dtype: torch.dtype) -> torch.Tensor:
    """The 18 BRISQUE features of one scale from moments of the MSCN coefficients and of their products
    with the :data:`BRISQUE_SHIFTS` neighbours (Mittal et al. 2012, section III; pyiqa's
    ``natural_scene_statistics``): GGD shape and variance, then per shift AGGD shape, mean, left and
    right variance."""
    alpha, sigma = ggd_fit(coefficients, dtype)
    features = [alpha, sigma.pow(2)]
    for m in products:
        alpha, sigma_l, sigma_r = aggd_fit(m, dtype)
        eta = (sigma_r - sigma_l) * torch.exp(
            torch.lgamma(2.0 / alpha) - (torch.lgamma(1.0 / alpha) + torch.lgamma(3.0 / alpha)) / 2)
        features.extend((alpha, eta, sigma_l.pow(2), sigma_r.pow(2)))
    return torch.stack(features, dim=-1)
