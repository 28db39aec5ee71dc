"""The shared diffusion layer against diffusers' own schedulers and hand-written formulas."""

import pytest
import torch
from diffusers import DDPMScheduler

from qualityguide.diffusion import (add_noise, alpha_bar, alpha_bar_at, call_unet, is_sdxl, noise_prediction_loss,
                                    one_step_clean, sample_timesteps, sdxl_added_conditions, sdxl_time_ids,
                                    training_target, unet_conditioning, x0_step)
from qualityguide.errors import InputError
from qualityguide.testing import tiny_ddpm, tiny_sd, tiny_sdxl


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


def test_alpha_bar_at_is_the_table_entry_per_sample_or_for_the_batch():
    table = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear").alphas_cumprod
    like, t = torch.zeros(3, 4, 2, 2), torch.tensor([0, 17, 999])
    per_sample = alpha_bar_at(table, t, like)
    assert per_sample.shape == (3, 1, 1, 1) and per_sample.dtype == torch.float32
    torch.testing.assert_close(per_sample.flatten(), table[t].float(), rtol=0, atol=0)
    torch.testing.assert_close(alpha_bar_at(table, t), table[t].float(), rtol=0, atol=0)
    assert alpha_bar_at(table, 17, like).shape == () and float(alpha_bar_at(table, 17, like)) == float(table[17])
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    assert float(alpha_bar(scheduler, 17, like)) == float(scheduler.alphas_cumprod[17])
    assert float(alpha_bar(scheduler, -1, like)) == 1.0  # the clean end
    with pytest.raises(InputError, match="999"):
        alpha_bar_at(table, torch.tensor([0, 1000, 5]), like)
    with pytest.raises(InputError, match="one per sample"):
        alpha_bar_at(table, torch.tensor([0, 1]), like)


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl()


def test_is_sdxl_reads_the_unet_of_a_pipeline_or_the_unet_itself(sdxl):
    sd, ddpm = tiny_sd(), tiny_ddpm()
    assert is_sdxl(sdxl) and is_sdxl(sdxl.unet)
    assert not any(is_sdxl(x) for x in (sd, sd.unet, ddpm, ddpm.unet, torch.nn.Linear(2, 2)))


def test_sdxl_time_ids_equal_the_pipelines_own_per_sample(sdxl):
    """Per sample, the rows diffusers' ``_get_add_time_ids`` builds, on the text_encoder_2 projection_dim path the
    SDXL pipeline takes and on the pooled-width path it takes without a second encoder."""
    original = [(1024, 768), (512, 512), (333, 1200)]
    crop = [(0, 0), (64, 8), (17, 0)]
    target = [(1024, 1024), (768, 512), (64, 64)]
    projection = sdxl.text_encoder_2.config.projection_dim
    pooled = torch.randn(3, projection, dtype=torch.float16)
    for encoder in (sdxl.text_encoder_2, None):
        added = sdxl_added_conditions(sdxl.unet, pooled, original, crop, target, text_encoder_2=encoder)
        assert added["text_embeds"] is pooled and added["time_ids"].dtype == torch.float16
        for i in range(3):
            ref = sdxl._get_add_time_ids(original[i], crop[i], target[i], dtype=torch.float16,
                                         text_encoder_projection_dim=projection)
            torch.testing.assert_close(added["time_ids"][i:i + 1], ref, rtol=0, atol=0)
    ref = sdxl._get_add_time_ids((64, 64), (0, 0), (64, 64), dtype=torch.float32,
                                 text_encoder_projection_dim=projection)
    torch.testing.assert_close(sdxl_time_ids((64, 64), (0, 0), (64, 64), batch=2), ref.repeat(2, 1), rtol=0, atol=0)


def test_sdxl_added_conditions_refuse_what_the_pipeline_refuses(sdxl):
    projection = sdxl.text_encoder_2.config.projection_dim
    with pytest.raises(ValueError, match="added time embedding"):
        sdxl._get_add_time_ids((64, 64), (0, 0), (64, 64), dtype=torch.float32,
                               text_encoder_projection_dim=projection + 1)
    with pytest.raises(InputError, match="width 9"):
        sdxl_added_conditions(sdxl.unet, torch.zeros(2, 9), (64, 64), (0, 0), (64, 64))
    with pytest.raises(InputError, match="crop_top_left must be one pair or 2 pairs"):
        sdxl_added_conditions(sdxl.unet, torch.zeros(2, projection), (64, 64), [(0, 0)] * 3, (64, 64))


def test_call_unet_is_the_direct_diffusers_call(sdxl):
    unet, g = sdxl.unet, torch.Generator().manual_seed(0)
    sample, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900])
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    added = sdxl_added_conditions(unet, torch.randn(2, sdxl.text_encoder_2.config.projection_dim, generator=g),
                                  (64, 64), (0, 0), (64, 64))
    with torch.no_grad():
        ours = call_unet(unet, sample, t, unet_conditioning(hidden, added))
        direct = unet(sample, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
        cast = call_unet(unet, sample.double(), t, unet_conditioning(hidden.double(), added), dtype=torch.float32)
    torch.testing.assert_close(ours, direct, rtol=0, atol=0)
    torch.testing.assert_close(cast, direct, rtol=0, atol=0)
    assert unet_conditioning(hidden) == {"encoder_hidden_states": hidden}
