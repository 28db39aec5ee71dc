"""Tiled NIQE/BRISQUE maths against the whole-image computation they replace (pyiqa's own functions).

Tolerances, from what differs between the two computations:
- NIQE: every map is computed with the same floating-point operations as pyiqa's, in an order that
  does not depend on the tile; what remains are one-ulp differences of lgamma/exp between
  vectorised and scalar lanes (which lane a block lands on depends on how many blocks a tile holds),
  amplified by the pseudo-inverse of the block covariance: 1e-10 relative on the score.
- BRISQUE: pyiqa sums up to ~10^6 float32 values in float32; the tiles sum them in float64. The
  means differ by ~1e-7 relative (float32 rounding of long sums), so features agree to 1e-5
  relative, and scores to ~1e-5 on the 0..100 scale, except where the two sums straddle a midpoint
  of the 0.001 shape grid: one shape then moves one step, which moves the score by up to 0.005
  (seen once in 210 BIQ2021 photos and crops), far inside the calibration tolerance of 8% / 0.5.
"""

import math

import numpy as np
import pytest
import torch
from conftest import blur, noise

from qualityguide.images import load_image
from qualityguide.scorers.niqe_fit import DEMO_PHOTOS, bundled_photo
from qualityguide.scorers.nss import EMBEDDED_NIQE_PARAMS, brisque_features, load_brisque_params, load_niqe_params
from qualityguide.scorers.nss_maths import (
    aggd_betas,
    aggd_fit,
    half_size,
    local_mean_var,
    moments,
    mscn,
    nearest_index,
    shape_grid,
)
from qualityguide.scorers.nss_tiled import (
    brisque_feature_vector,
    half_region,
    luma_region,
    niqe_feature_grid,
    niqe_score,
    plan_tiles,
)

NIQE_RTOL = 1e-10
BRISQUE_FEATURE_RTOL = 1e-5
BRISQUE_SCORE_ATOL = 5e-3


def _photos():
    """Bundled photographs at sizes that are not multiples of anything (odd, prime), plus distortions."""
    astronaut = load_image(bundled_photo(*DEMO_PHOTOS[0]))
    coffee = load_image(bundled_photo(*DEMO_PHOTOS[1]))
    return {
        "astronaut 512x512": astronaut,
        "coffee 397x577": coffee[:, 3:400, 11:588],
        "blurred 301x263": blur(astronaut[None, :, 100:401, 50:313], 2.0)[0],
        "noisy 211x389": noise(coffee[None, :, :211, 100:489], 0.1)[0],
    }


def _old_niqe_features(image):
    """pyiqa's whole-image NIQE block features, as ``calculate_niqe`` computes them ``[N,36]`` (column-major blocks)."""
    from pyiqa.archs.func_util import normalize_img_with_gauss
    from pyiqa.archs.niqe_arch import compute_feature
    from pyiqa.matlab_utils import blockproc, imresize
    from pyiqa.utils.color_util import to_y_channel

    img = to_y_channel(image[None].double(), 255, "yiq")
    img = img[..., :img.shape[-2] // 96 * 96, :img.shape[-1] // 96 * 96]
    features = []
    for scale in (1, 2):
        features.append(blockproc(normalize_img_with_gauss(img, padding="replicate"), [96 // scale] * 2,
                                  fun=compute_feature))
        img = imresize(img / 255.0, scale=0.5, antialiasing=True) * 255.0
    return torch.cat(features, -1)[0]


def _old_brisque_features(image):
    from pyiqa.archs.brisque_arch import natural_scene_statistics
    from pyiqa.matlab_utils import imresize
    from pyiqa.utils.color_util import to_y_channel

    y = to_y_channel(image[None].float(), 255.0)
    features = []
    for _ in range(2):
        features.append(natural_scene_statistics(y, 7, 7 / 6))
        y = imresize(y, scale=0.5, antialiasing=True)
    return torch.cat(features, -1)[0]


def _embedded():
    return (torch.as_tensor(a) for a in load_niqe_params(EMBEDDED_NIQE_PARAMS))


@pytest.mark.parametrize("tile", [1 << 20, 3 * 96 * 96, 96 * 96])
def test_niqe_tiles_equal_pyiqa_whole_image(tile):
    from pyiqa.archs.niqe_arch import calculate_niqe

    mu, cov = _embedded()
    for name, image in _photos().items():
        old = calculate_niqe(image[None].double(), 0, True, "yiq", mu, cov).item()
        new = niqe_score(image, mu, cov, max_pixels=tile).item()
        assert new == pytest.approx(old, rel=NIQE_RTOL), (name, tile)
        grid, _ = niqe_feature_grid(image, max_pixels=tile)
        assert torch.allclose(grid.transpose(0, 1).reshape(-1, 36), _old_niqe_features(image), rtol=0, atol=1e-12), name


@pytest.mark.parametrize("tile", [1 << 20, 5000, 777])
def test_brisque_tiles_equal_pyiqa_whole_image(tile):
    for name, image in _photos().items():
        old = _old_brisque_features(image)
        new = brisque_feature_vector(image, max_pixels=tile)
        assert torch.allclose(new, old, rtol=BRISQUE_FEATURE_RTOL, atol=0), (name, tile, (new - old).abs().max())


def test_tiles_are_invisible():
    """A tiling changes no value: tiles are exact windows of the whole-image maps (not just close)."""
    image = _photos()["coffee 397x577"]
    whole_grid, whole_sharp = niqe_feature_grid(image)
    grid, sharp = niqe_feature_grid(image, max_pixels=96 * 96)
    assert torch.allclose(grid, whole_grid, rtol=0, atol=1e-13)
    assert torch.allclose(sharp, whole_sharp, rtol=0, atol=1e-12)
    luma = luma_region(image, torch.float64)
    size = (image.shape[-2], image.shape[-1] // 2 * 2)
    half = half_region(luma, size, unit=255.0)
    whole = half((0, math.ceil(size[0] / 2), 0, size[1] // 2))
    for rect in [(0, 17, 0, 288), (17, 60, 5, 101), (150, 199, 280, 288), (190, 199, 0, 1)]:
        assert torch.equal(half(rect), whole[..., rect[0]:rect[1], rect[2]:rect[3]]), rect


def test_local_statistics_do_not_depend_on_position():
    """Values at a pixel are the same whichever window computes them, for any (non-integer) values: a
    flat area stays exactly flat (the sign of its rounding noise decides NIQE's AGGD fits there)."""
    from pyiqa.archs.func_util import normalize_img_with_gauss

    g = torch.Generator().manual_seed(0)
    plane = torch.rand(1, 1, 61, 83, generator=g, dtype=torch.float64) * 255
    plane[..., 20:45, 10:70] = 100.3
    mu, var = local_mean_var(plane, "replicate")
    assert torch.equal(mu[..., 23:42, 13:67], torch.full_like(mu[..., 23:42, 13:67], float(mu[0, 0, 30, 30])))
    whole = mscn(plane, mu, var)
    # pyiqa's: equal to float64 rounding. pyiqa filters with conv2d, whose summation order depends on the CPU's
    # convolution backend (bit-equal on one machine, 1.4e-14 apart on another), so the bound is a few ulps
    assert torch.allclose(whole, normalize_img_with_gauss(plane, padding="replicate"), rtol=0, atol=1e-12)
    for top, left in [(5, 7), (11, 0), (0, 13)]:
        window = plane[..., top:top + 40, left:left + 61]
        part = mscn(window, *local_mean_var(window, "replicate"))
        assert torch.equal(part[..., 3:-3, 3:-3], whole[..., top + 3:top + 37, left + 3:left + 58])


def test_brisque_sums_make_tiling_invisible():
    """Sums are accumulated in float64, so a tiling changes the features by less than their float32 rounding."""
    image = _photos()["astronaut 512x512"]
    whole = brisque_feature_vector(image)
    for tile in (4099, 20000, 65536):
        assert torch.allclose(brisque_feature_vector(image, max_pixels=tile), whole, rtol=2.0**-23, atol=0), tile


def test_plan_tiles_cover_once():
    for height, width, unit, budget in [(384, 480, 96, 3 * 9216), (397, 577, 1, 5000), (7, 100000, 1, 1000),
                                        (96 * 5, 96 * 130, 96, 1 << 20)]:
        covered = np.zeros((height, width), dtype=int)
        for t, b, l, r in plan_tiles(height, width, unit, budget):
            assert (b - t) * (r - l) <= max(budget, unit * unit)
            covered[t:b, l:r] += 1
        assert (covered == 1).all(), (height, width)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nearest_index_is_argmin(dtype):
    grid = shape_grid(torch.empty(0, dtype=dtype))
    table = (2 * torch.lgamma(2.0 / grid) - (torch.lgamma(1.0 / grid) + torch.lgamma(3.0 / grid))).exp()
    g = torch.Generator().manual_seed(0)
    values = torch.cat([
        torch.rand(20000, generator=g, dtype=dtype) * 1.2,       # inside and beyond the table
        table[::97], (table[1:] + table[:-1])[::89] / 2,         # on entries and on midpoints (ties)
        torch.tensor([-1.0, 0.0, 5.0, math.nan, math.inf, -math.inf], dtype=dtype),
    ])
    expected = (table[None] - values[:, None]).abs().argmin(-1)
    assert torch.equal(nearest_index(table, values), expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_aggd_from_moments_equals_pyiqa(dtype):
    from pyiqa.archs.func_util import estimate_aggd_param, normalize_img_with_gauss

    y = torch.round(load_image(bundled_photo(*DEMO_PHOTOS[2]))[None, :1].to(dtype) * 255)
    coefficients = normalize_img_with_gauss(y, padding="replicate")
    blocks = coefficients[..., :288, :384].unfold(2, 96, 96).unfold(3, 96, 96).reshape(-1, 1, 96, 96)
    blocks = torch.cat([blocks, blocks * torch.roll(blocks, (1, 1), (2, 3))])
    alpha, left, right = aggd_fit(moments(blocks), dtype)
    expected = estimate_aggd_param(blocks)
    # float64 (NIQE): the same operations, bit for bit; float32 (BRISQUE): sums in float64, not float32
    tolerance = 0 if dtype == torch.float64 else 1e-6
    assert torch.equal(alpha.reshape(-1), expected[0])
    for got, want in zip(aggd_betas(alpha, left, right), expected[1:]):
        assert torch.allclose(got.reshape(-1), want, rtol=tolerance, atol=0)
    mu, var = local_mean_var(y, "replicate")
    assert torch.equal(mscn(y, mu, var), coefficients)


def test_half_size_is_pyiqa_imresize():
    from pyiqa.matlab_utils import imresize

    g = torch.Generator().manual_seed(0)
    for h, w in [(384, 480), (97, 33), (5, 8), (211, 389)]:
        y = torch.round(torch.rand(1, 1, h, w, generator=g) * 255)
        assert torch.equal(half_size(y), imresize(y, scale=0.5, antialiasing=True)), (h, w)
        # NIQE's path (0..1 values): pyiqa rounds the last few values of its summing reduction
        # differently (a few float32 ulps there); every other value is equal
        y01 = y.double() / 255
        diff = (half_size(y01) - imresize(y01, scale=0.5, antialiasing=True)).abs()
        assert diff.max() <= 4 * 2.0**-24, (h, w)


def test_gradients_equal_the_whole_image_ones():
    """The tiled maths are the same function: their gradients match autograd through pyiqa's."""
    from pyiqa.archs.niqe_arch import calculate_niqe

    mu, cov = _embedded()
    image = blur(_photos()["coffee 397x577"][None, :, :200, :300], 1.0)[0]
    old = image.clone().requires_grad_(True)
    calculate_niqe(old[None].double(), 0, True, "yiq", mu, cov).sum().backward()
    new = image.clone().requires_grad_(True)
    niqe_score(new, mu, cov, max_pixels=96 * 96).backward()
    # gradients are float32 (the input's dtype): equal to float32 rounding of the largest (measured: up to 5.3e-6
    # of it on one CPU, below 1e-6 on another; pyiqa's conv2d summation order follows the CPU's backend)
    scale = old.grad.abs().max()
    assert torch.allclose(new.grad, old.grad, rtol=0, atol=2e-5 * scale) and scale > 0
    old = image.clone().requires_grad_(True)
    _old_brisque_features(old).sum().backward()
    new = image.clone().requires_grad_(True)
    brisque_feature_vector(new, max_pixels=5000).sum().backward()
    scale = old.grad.abs().max()
    assert torch.allclose(new.grad, old.grad, rtol=0, atol=1e-5 * scale) and scale > 0


def _crops(shared_data, count=6, size=(320, 448)):
    """The calibration images and crops of BIQ2021 photos (real camera pictures)."""
    images = [load_image(p) for p in sorted((shared_data / "calibration" / "dist_dir").glob("*.bmp"))]
    for path in sorted((shared_data / "biq2021" / "images").glob("*.jpg"))[:count]:
        image = load_image(path)
        images.append(image[:, :size[0], :size[1]])
    return images


def test_scores_equal_old_scores_on_real_photos(shared_data, params):
    from pyiqa.archs.brisque_arch import rbf_kernel, scale_features
    from pyiqa.archs.niqe_arch import calculate_niqe

    mu, cov = (torch.as_tensor(a) for a in load_niqe_params(params / "niqe_pristine.mat"))
    svr = load_brisque_params(params / "brisque_live_svm.pth")

    def brisque_score(features):
        kernel = rbf_kernel(scale_features(features[None]).double(), svr["sv"].t(), svr["gamma"])
        return (kernel @ svr["sv_coef"] - svr["rho"]).item()

    for image in _crops(shared_data):
        old = calculate_niqe(image[None].double(), 0, True, "yiq", mu, cov).item()
        assert niqe_score(image, mu, cov, max_pixels=2 * 96 * 96).item() == pytest.approx(old, rel=NIQE_RTOL)
        old = brisque_score(_old_brisque_features(image))
        new = brisque_score(brisque_feature_vector(image, max_pixels=20000))
        assert new == pytest.approx(old, abs=BRISQUE_SCORE_ATOL)
    # the scorer's batch path is the same maths
    batch = torch.stack([image[:, :300, :300] for image in _crops(shared_data, count=2)])
    assert torch.equal(brisque_features(batch)[0], scale_features(brisque_feature_vector(batch[0])[None])[0])


def test_niqe_features_of_a_non_block_multiple_image_ignore_the_remainder():
    """pyiqa crops to whole blocks before any filtering: pixels past the last block change nothing."""
    image = _photos()["coffee 397x577"]
    grid, _ = niqe_feature_grid(image)
    cropped, _ = niqe_feature_grid(image[:, :384, :576].clone())
    assert grid.shape[:2] == (4, 6) and torch.equal(grid, cropped)
    # and a change inside a block changes that block's features only (local maths)
    changed = image.clone()
    changed[:, 10:20, 10:20] = 1.0
    diff = (niqe_feature_grid(changed)[0] - grid).abs().amax(-1)
    assert diff[0, 0] > 0 and (diff.flatten()[1:] == 0).all()
