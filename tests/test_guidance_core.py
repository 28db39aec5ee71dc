"""x0_step and the schedule maths, checked against diffusers' own DDIM scheduler and closed forms."""

import warnings

import pytest
import torch

from qualityguide.errors import InputError
from qualityguide.diffusion import alpha_bar, clean_estimate, ddim_sigma, ddim_update, per_sample_norm, x0_step


def _ddim(prediction_type):
    from diffusers import DDIMScheduler

    s = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=False, prediction_type=prediction_type)
    s.set_timesteps(100)  # stride 10: step(t) goes to t - 10
    return s


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_clean_estimate_and_ddim_update_match_diffusers(prediction_type):
    sched = _ddim(prediction_type)
    g = torch.Generator().manual_seed(0)
    sample, output = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = 500
    ref = sched.step(output, t, sample, eta=0.0)
    a_t, a_prev = alpha_bar(sched, t, sample), alpha_bar(sched, t - 10, sample)
    x0, eps = clean_estimate(output, sample, a_t, prediction_type)
    torch.testing.assert_close(x0, ref.pred_original_sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ddim_update(x0, eps, a_prev), ref.prev_sample, rtol=1e-5, atol=1e-5)


def test_ddim_sigma_matches_diffusers_variance():
    sched = _ddim("epsilon")
    a_t, a_prev = alpha_bar(sched, 500, torch.zeros(1)), alpha_bar(sched, 490, torch.zeros(1))
    expected = sched._get_variance(500, 490).sqrt()
    torch.testing.assert_close(ddim_sigma(a_t, a_prev, 1.0), expected.float(), rtol=1e-5, atol=1e-7)
    assert float(ddim_sigma(a_t, a_prev, 0.0)) == 0.0


def test_clean_estimate_rejects_unknown_prediction_type():
    with pytest.raises(InputError, match="v_prediction"):
        clean_estimate(torch.zeros(1), torch.zeros(1), torch.tensor(0.5), "flow")


def test_x0_step_ascends_and_normalises():
    x0 = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    target = torch.zeros_like(x0)

    def objective(x):  # minus squared distance to 0: gradient is -2x
        return -(x - target).pow(2).flatten(1).sum(1)

    raw = x0_step(x0, objective, 0.1)
    torch.testing.assert_close(raw.delta, -0.2 * x0)
    assert torch.all(objective(raw.x0) > objective(x0))
    unit = x0_step(x0, objective, 0.5, normalize="unit")
    torch.testing.assert_close(per_sample_norm(unit.delta).flatten(), torch.full((3,), 0.5))
    rms = x0_step(x0, objective, 0.5, normalize="rms")
    torch.testing.assert_close(rms.delta.pow(2).flatten(1).mean(1).sqrt(), torch.full((3,), 0.5))
    capped = x0_step(x0, objective, 10.0, max_norm=0.25)
    assert torch.all(per_sample_norm(capped.delta).flatten() <= 0.25 + 1e-6)
    scales = x0_step(x0, objective, torch.tensor([0.0, 0.1, 0.2]))
    assert torch.equal(scales.x0[0], x0[0])


def test_x0_step_skips_non_finite_samples_with_warning():
    x0 = torch.ones(3, 2)

    def objective(x):
        out = x.sum(1)
        return torch.cat([out[:1], out[1:2] * torch.tensor(float("nan")), out[2:]])

    with pytest.warns(RuntimeWarning, match=r"sample\(s\) \[1\]"):
        step = x0_step(x0, objective, 1.0)
    assert torch.equal(step.x0[1], x0[1]) and bool(step.skipped[1]) and not bool(step.skipped[0])
    assert torch.isfinite(step.x0).all() and torch.equal(step.x0[0], x0[0] + 1.0)


def test_x0_step_correction_is_constant_unless_create_graph():
    x0 = torch.randn(2, 3, requires_grad=True)

    def objective(x):
        return -(x**2).sum(1)

    plain = x0_step(x0, objective, 0.25)  # x + const: d/dx = 1
    (grad,) = torch.autograd.grad(plain.x0.sum(), x0)
    torch.testing.assert_close(grad, torch.ones_like(grad))
    second = x0_step(x0, objective, 0.25, create_graph=True)  # x - 0.5 x = 0.5 x
    (grad2,) = torch.autograd.grad(second.x0.sum(), x0)
    torch.testing.assert_close(grad2, torch.full_like(grad2, 0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x0_step(x0.detach(), objective, 0.1)


def test_x0_step_bad_arguments():
    with pytest.raises(InputError, match="normalize"):
        x0_step(torch.zeros(1, 2), lambda x: x.sum(1), 1.0, normalize="l3")
    with pytest.raises(InputError, match="one value per sample"):
        x0_step(torch.zeros(2, 2), lambda x: x.sum(), 1.0)
    with pytest.raises(InputError, match="max_norm"):
        x0_step(torch.zeros(1, 2), lambda x: x.sum(1), 1.0, max_norm=0)


def test_timed_is_a_median_of_repeats():
    from qualityguide.runtime import timed

    calls = []
    value = timed(lambda: calls.append(1), "cpu", repeats=3, warmup=2)
    assert len(calls) == 5 and 0 <= value < 1.0
