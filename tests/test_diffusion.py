"""The shared diffusion layer against diffusers' own schedulers and hand-written formulas."""

import pytest
import torch
from diffusers import DDPMScheduler

from qualityguide.diffusion import (add_noise, noise_prediction_loss, one_step_clean, sample_timesteps,
                                    training_target, x0_step)
from qualityguide.errors import InputError


@pytest.fixture(params=["epsilon", "v_prediction", "sample"])
def prediction_type(request):
    return request.param


def _batch(seed=0, shape=(4, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.tensor([0, 17, 500, 999])


def test_add_noise_and_targets_equal_diffusers(prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type=prediction_type)
    z0, noise, t = _batch()
    torch.testing.assert_close(add_noise(z0, noise, t, scheduler.alphas_cumprod), scheduler.add_noise(z0, noise, t))
    expected = {"epsilon": noise, "sample": z0, "v_prediction": scheduler.get_velocity(z0, noise, t)}[prediction_type]
    torch.testing.assert_close(training_target(z0, noise, t, scheduler.alphas_cumprod, prediction_type), expected)


def test_one_step_clean_equals_the_scheduler_pred_original_sample(prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type=prediction_type,
                              clip_sample=False)
    scheduler.set_timesteps(1000)
    z0, noise, t = _batch(1)
    z_t = scheduler.add_noise(z0, noise, t)
    output = torch.randn(z0.shape, generator=torch.Generator().manual_seed(2))
    ours = one_step_clean(output, z_t, t, scheduler.alphas_cumprod, prediction_type)
    for i, step in enumerate(t.tolist()):
        ref = scheduler.step(output[i:i + 1], step, z_t[i:i + 1]).pred_original_sample
        torch.testing.assert_close(ours[i:i + 1], ref, rtol=1e-4, atol=1e-4)
    # The exact target recovers z0 exactly.
    target = training_target(z0, noise, t, scheduler.alphas_cumprod, prediction_type)
    torch.testing.assert_close(one_step_clean(target, z_t, t, scheduler.alphas_cumprod, prediction_type), z0,
                               rtol=1e-3, atol=1e-3)


def test_noise_prediction_loss_min_snr_matches_a_hand_computation():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    out, target, t = _batch(3)
    mse = ((out - target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(noise_prediction_loss(out, target, reduction="none"), mse)
    a = scheduler.alphas_cumprod[t]
    snr = a / (1 - a)
    for kind, weight in (("epsilon", torch.minimum(snr, torch.tensor(5.0)) / snr),
                         ("v_prediction", torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))):
        got = noise_prediction_loss(out, target, t, scheduler.alphas_cumprod, snr_gamma=5.0, prediction_type=kind)
        torch.testing.assert_close(got, (mse * weight).mean())


def test_sample_timesteps_range_and_reproducibility():
    a = sample_timesteps(4096, 1000, generator=torch.Generator().manual_seed(0), low=0, high=200)
    b = sample_timesteps(4096, 1000, generator=torch.Generator().manual_seed(0), low=0, high=200)
    assert torch.equal(a, b) and a.dtype == torch.long and int(a.min()) == 0 and int(a.max()) == 199
    with pytest.raises(InputError, match="high"):
        sample_timesteps(2, 1000, high=1001)
    with pytest.raises(InputError, match="timesteps"):
        add_noise(torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor([0, 1000]), DDPMScheduler().alphas_cumprod)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("normalize", ["none", "unit", "rms"])
def test_x0_step_leaves_skipped_and_zero_gradient_samples_unchanged(dtype, normalize):
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    weights = torch.tensor([1.0, 0.0, float("nan")])  # sample 1: zero gradient; sample 2: NaN gradient

    def objective(x):
        return (x.float().flatten(1).sum(1) * weights.to(x.device))

    with pytest.warns(RuntimeWarning, match=r"sample\(s\) \[2\]"):
        step = x0_step(x0, objective, 0.1, normalize=normalize, max_norm=5.0)
    assert step.delta.dtype == dtype and torch.isfinite(step.delta).all()
    assert torch.equal(step.x0[1:], x0[1:]) and not bool(step.delta[1:].any())
    assert step.skipped.tolist() == [False, False, True]
    assert float(step.delta[0].float().abs().sum()) > 0
