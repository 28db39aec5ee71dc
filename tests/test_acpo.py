"""ACPO loss and LoRA helpers (qualityguide.finetune) on tiny SD, SDXL and pixel-space DDPM U-Nets.

Every term is compared with an independent computation: diffusers' own scheduler (add_noise, get_velocity,
step().pred_original_sample, DDIMScheduler.step for the K-step input), a copy of the U-Net taken before the
adapter was added, a hand-written MSE and the scorer on a hand-decoded image.
"""

import ast
import copy
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from qualityguide.errors import InputError
from qualityguide.finetune import (ACPOConfig, ACPOLoss, adapters_disabled, add_lora, ddim_to_clean, load_lora,
                                   lora_parameters, save_lora, tuner_layers)
from qualityguide.scorers import QualityScorer
from qualityguide.testing import tiny_ddpm, tiny_sd, tiny_sdxl

from helpers import Brightness, Frozen


class Smoothness(QualityScorer):
    """Minus a weighted squared total variation: nonlinear, differentiable, with a parameter that must stay frozen."""

    name, differentiable, native_lower_better = "test-tv", True, True

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(2.0))

    def native(self, x):
        return self.weight * ((x[..., 1:, :] - x[..., :-1, :]).pow(2).mean((1, 2, 3))
                              + (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean((1, 2, 3)))


@pytest.fixture(scope="module")
def pipes():
    return {"sd": tiny_sd(), "sdxl": tiny_sdxl(), "ddpm": tiny_ddpm()}


def setup(pipes, kind, prediction_type="epsilon", init=True, rank=4, batch=3, seed=0, alpha=None):
    """(adapted unet, base copy, training scheduler, vae, clean batch, conditioning) for a fresh U-Net."""
    pipe = pipes[kind]
    base = copy.deepcopy(pipe.unet)
    unet = copy.deepcopy(pipe.unet)
    torch.manual_seed(seed)
    add_lora(unet, rank=rank, alpha=alpha, init_lora_weights=init)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type, clip_sample=False)
    g = torch.Generator().manual_seed(seed)
    if kind == "ddpm":
        return unet, base, scheduler, None, torch.rand(batch, 3, 16, 16, generator=g) * 2 - 1, None
    width = pipe.unet.config.cross_attention_dim
    cond = {"encoder_hidden_states": torch.randn(batch, 8, width, generator=g)}
    if kind == "sdxl":
        cond["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 32, generator=g),
                                     "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]]).repeat(batch, 1)}
    return unet, base, scheduler, pipe.vae, torch.randn(batch, 4, 16, 16, generator=g), cond


def call(unet, z, t, cond):
    return unet(z, t, **(cond or {})).sample


def hand_decode(vae, clean):
    if vae is None:
        return ((clean + 1) / 2).clamp(0, 1)
    return ((vae.decode(clean / vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)


@pytest.mark.parametrize("kind, prediction_type", [("sd", "epsilon"), ("sd", "v_prediction"),
                                                   ("sdxl", "epsilon"), ("ddpm", "v_prediction")])
def test_each_term_equals_an_independent_computation(pipes, kind, prediction_type):
    unet, base, scheduler, vae, z0, cond = setup(pipes, kind, prediction_type, init=False)
    config = ACPOConfig(w_diff=0.7, w_anchor=1.3, w_quality=0.4, t_quality_max=400)
    loss = ACPOLoss(unet, scheduler, Smoothness(), config, vae=vae)
    t = torch.tensor([50, 700, 300])
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1))
    out = loss(z0, cond, timesteps=t, noise=noise)
    with torch.no_grad():
        z_t = scheduler.add_noise(z0, noise, t)
        target = noise if prediction_type == "epsilon" else scheduler.get_velocity(z0, noise, t)
        lora_out, base_out = call(unet, z_t, t, cond), call(base, z_t, t, cond)
        diffusion = ((lora_out - target) ** 2).mean()
        anchor = ((lora_out - base_out) ** 2).mean()
        picked = [0, 2]  # t <= t_quality_max
        x0 = torch.cat([scheduler.step(lora_out[i:i + 1], int(t[i]), z_t[i:i + 1]).pred_original_sample
                        for i in picked])
        quality = Smoothness()(hand_decode(vae, x0)).mean()
    assert anchor > 1e-6 and out["quality_samples"] == 2
    torch.testing.assert_close(out["diffusion"], diffusion, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["anchor"], anchor, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["quality"], quality, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["loss"], 0.7 * diffusion + 1.3 * anchor - 0.4 * quality, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["sd", "sdxl", "ddpm"])
def test_anchor_is_exactly_zero_at_initialisation(pipes, kind):
    unet, _, scheduler, vae, z0, cond = setup(pipes, kind)
    loss = ACPOLoss(unet, scheduler, Smoothness(), ACPOConfig(w_diff=1.0, w_anchor=5.0, w_quality=0.3), vae=vae)
    out = loss(z0, cond, generator=torch.Generator().manual_seed(0))
    assert out["anchor"].item() == 0.0
    assert out["quality_samples"] >= 2  # quality_fraction 0.5 of 3, rounded up, plus chance
    assert torch.equal(out["loss"], 1.0 * out["diffusion"] - 0.3 * out["quality"])


@pytest.mark.parametrize("kind, quality_input", [("sd", "one_step"), ("sdxl", "one_step"), ("ddpm", "one_step"),
                                                 ("sd", "k_step")])
def test_gradients_reach_only_lora_parameters(pipes, kind, quality_input):
    unet, _, scheduler, vae, z0, cond = setup(pipes, kind, init=False)
    scorer = Smoothness()
    loss = ACPOLoss(unet, scheduler, scorer, ACPOConfig(quality_input=quality_input, k_steps=2), vae=vae)
    out = loss(z0, cond, timesteps=torch.tensor([10, 800, 200]))
    out["loss"].backward()
    lora = {id(p) for p in lora_parameters(unet)}
    others = [(n, p) for m in (unet, vae, scorer) if m is not None for n, p in m.named_parameters()
              if id(p) not in lora]
    assert others and all(p.grad is None for _, p in others), [n for n, p in others if p.grad is not None][:3]
    for p in lora_parameters(unet):
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert all(p.requires_grad for p in lora_parameters(unet))  # restored after the base forward


def test_one_forward_with_gradients_and_one_base_forward_without(pipes):
    unet, _, scheduler, vae, z0, cond = setup(pipes, "sd", init=False)
    calls = []
    unet.register_forward_pre_hook(lambda m, a: calls.append((torch.is_grad_enabled(),
                                                              tuner_layers(m)[0].disable_adapters)))
    for quality_input, k_steps, expected in [("one_step", 1, [(False, True), (True, False)]),
                                             ("k_step", 3, [(False, True)] + [(True, False)] * 3)]:
        calls.clear()
        ACPOLoss(unet, scheduler, Smoothness(), ACPOConfig(quality_input=quality_input, k_steps=k_steps),
                 vae=vae)(z0, cond, timesteps=torch.tensor([5, 900, 100]))
        assert calls == expected


def test_adapters_are_restored_when_the_base_forward_raises(pipes):
    unet, base, scheduler, vae, z0, cond = setup(pipes, "sd", init=False)
    frozen_one = lora_parameters(unet)[0]
    frozen_one.requires_grad_(False)

    def boom(module, args):
        if tuner_layers(unet)[0].disable_adapters:
            raise RuntimeError("boom in the base forward")

    handle = unet.down_blocks[1].register_forward_pre_hook(boom)
    loss = ACPOLoss(unet, scheduler, Smoothness(), vae=vae)
    with pytest.raises(RuntimeError, match="boom"):
        loss(z0, cond)
    handle.remove()
    assert not any(layer.disable_adapters for layer in tuner_layers(unet))
    assert not frozen_one.requires_grad and all(p.requires_grad for p in lora_parameters(unet)[1:])
    t = torch.tensor([10, 10, 10])
    with torch.no_grad():
        assert not torch.allclose(call(unet, z0, t, cond), call(base, z0, t, cond), atol=1e-4)
        with adapters_disabled(unet):
            torch.testing.assert_close(call(unet, z0, t, cond), call(base, z0, t, cond))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_k_step_input_matches_diffusers_ddim(pipes, prediction_type):
    unet, _, _, _, z0, cond = setup(pipes, "sd", init=False, batch=2)
    ddim = DDIMScheduler.from_config(pipes["sd"].scheduler.config, prediction_type=prediction_type)
    t, k = torch.tensor([400, 200]), 4
    z_t = ddim.add_noise(z0, torch.randn(z0.shape, generator=torch.Generator().manual_seed(3)), t)
    seen = []

    def predict(z, tau):
        seen.append(z.detach().clone())
        return call(unet, z, tau, cond)

    with torch.no_grad():
        ours = ddim_to_clean(call(unet, z_t, t, cond), z_t, t, predict, ddim.alphas_cumprod, prediction_type, k)
        for i in range(2):  # diffusers, one sample at a time: step size t/k is 1000 // num_inference_steps
            ddim.set_timesteps(1000 // (int(t[i]) // k))
            z, c = z_t[i:i + 1], {"encoder_hidden_states": cond["encoder_hidden_states"][i:i + 1]}
            for j, tau in enumerate(range(int(t[i]), 0, -int(t[i]) // k)):
                if j > 0:
                    torch.testing.assert_close(seen[j - 1][i:i + 1], z, rtol=1e-4, atol=1e-5)
                step = ddim.step(call(unet, z, torch.tensor([tau]), c), tau, z)
                z = step.prev_sample
            torch.testing.assert_close(ours[i:i + 1], step.pred_original_sample, rtol=1e-4, atol=1e-5)
        assert len(seen) == k - 1
        one = ddim_to_clean(call(unet, z_t, t, cond), z_t, t, predict, ddim.alphas_cumprod, prediction_type, 1)
        step = ddim.step(call(unet, z_t[:1], t[:1], {"encoder_hidden_states": cond["encoder_hidden_states"][:1]}),
                         400, z_t[:1])
        torch.testing.assert_close(one[:1], step.pred_original_sample, rtol=1e-4, atol=1e-5)


def test_k_grad_steps_truncates_the_gradient_path(pipes):
    unet, _, scheduler, _, z0, cond = setup(pipes, "sd", init=False, batch=2)
    t = torch.tensor([300, 120])
    z_t = scheduler.add_noise(z0, torch.randn_like(z0), t)
    for k_grad_steps, reaches_first in [(None, True), (3, True), (2, False), (1, False)]:
        first = call(unet, z_t, t, cond).detach().requires_grad_(True)
        x0 = ddim_to_clean(first, z_t, t, lambda z, tau: call(unet, z, tau, cond), scheduler.alphas_cumprod,
                           "epsilon", 3, k_grad_steps)
        x0.square().sum().backward()
        assert (first.grad is not None) == reaches_first, k_grad_steps


def test_no_sample_below_t_quality_max_gives_an_exact_zero_that_still_backpropagates(pipes):
    unet, _, scheduler, _, z0, _ = setup(pipes, "ddpm")
    loss = ACPOLoss(unet, scheduler, Brightness(), ACPOConfig(w_diff=0, w_anchor=0, w_quality=1, t_quality_max=100))
    out = loss(z0, timesteps=torch.tensor([101, 500, 999]))
    assert out["quality"].item() == 0.0 and out["quality_samples"] == 0 and out["loss"].item() == 0.0
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in lora_parameters(unet))


def _train(pipes, w_anchor: float, steps: int = 10):
    """Quality-driven Adam steps on one fixed batch (fixed timesteps and noise) of the pixel U-Net, brightness as the
    score; returns the loss's terms on that batch before and after."""
    unet, _, scheduler, _, _, _ = setup(pipes, "ddpm")
    z0 = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) - 0.5
    t, noise = torch.tensor([50, 300]), torch.randn(z0.shape, generator=torch.Generator().manual_seed(1))
    config = ACPOConfig(w_diff=0, w_anchor=w_anchor, w_quality=1.0, t_quality_max=400)
    loss = ACPOLoss(unet, scheduler, Brightness(), config)
    opt = torch.optim.Adam(lora_parameters(unet), lr=3e-2)
    with torch.no_grad():
        before = loss(z0, timesteps=t, noise=noise)
    for _ in range(steps):
        opt.zero_grad()
        loss(z0, timesteps=t, noise=noise)["loss"].backward()
        opt.step()
    with torch.no_grad():
        return before, loss(z0, timesteps=t, noise=noise)


@pytest.fixture(scope="module")
def quality_only_run(pipes):
    return _train(pipes, w_anchor=0.0)


def test_quality_only_run_raises_the_score_on_a_fixed_batch(quality_only_run):
    before, after = quality_only_run
    assert after["quality"] > before["quality"] + 0.005, (before["quality"], after["quality"])
    assert after["anchor"] > 0 and before["anchor"] == 0


def test_a_larger_anchor_weight_limits_drift(pipes, quality_only_run):
    free = quality_only_run[1]["anchor"]
    _, anchored = _train(pipes, w_anchor=10.0)
    assert anchored["anchor"] < 0.1 * free, (anchored["anchor"], free)
    assert anchored["quality"] < quality_only_run[1]["quality"]  # the anchor also holds the score back


def test_draw_timesteps_puts_the_quality_fraction_in_range(pipes):
    unet, _, scheduler, _, _, _ = setup(pipes, "ddpm")
    loss = ACPOLoss(unet, scheduler, Brightness(), ACPOConfig(t_quality_max=99, quality_fraction=0.25))
    t = torch.cat([loss.draw_timesteps(8, torch.Generator().manual_seed(i)).view(1, -1) for i in range(400)])
    assert t.shape == (400, 8) and t.dtype == torch.long
    inside = t <= 99
    n, share = inside.numel(), inside.float().mean().item()
    assert abs(share - 0.25) <= 2 * 3 * (0.25 * 0.75 / n) ** 0.5, share  # 2x a 3-sigma binomial tolerance
    assert int(t[inside].min()) == 0 and int(t[inside].max()) == 99
    rest = t[~inside].float()
    assert int(rest.min()) == 100 and int(rest.max()) == 999 and abs(rest.mean().item() - 549.5) < 25  # above it
    assert torch.equal(loss.draw_timesteps(8, torch.Generator().manual_seed(5)),
                       loss.draw_timesteps(8, torch.Generator().manual_seed(5)))
    assert [ACPOConfig(quality_fraction=f).quality_count(b) for f, b in [(0.5, 1), (0.5, 3), (0, 4), (1, 4)]] == \
        [1, 2, 0, 4]
    whole = ACPOLoss(unet, scheduler, None, ACPOConfig(w_quality=0.0, t_quality_max=999, quality_fraction=0.25))
    assert abs(whole.draw_timesteps(4000, torch.Generator().manual_seed(0)).float().mean().item() - 499.5) < 25


@pytest.mark.parametrize("fraction", [0.5, 0.2])
def test_batch_1_sees_both_windows_in_the_configured_proportion(pipes, fraction):
    """Issue 21: a per-batch count rounded 0.5 * 1 up, so batch 1 only ever trained on t <= t_quality_max. The
    window is drawn per sample from the recipe's step generator, in a hand-checked order."""
    from qualityguide.train import step_generator

    unet, _, scheduler, _, _, _ = setup(pipes, "ddpm")
    loss = ACPOLoss(unet, scheduler, Brightness(), ACPOConfig(t_quality_max=400, quality_fraction=fraction))
    steps = 2000
    drawn = torch.cat([loss.draw_timesteps(1, step_generator(3, s)) for s in range(steps)])
    share = (drawn <= 400).float().mean().item()
    assert abs(share - fraction) <= 2 * 3 * (fraction * (1 - fraction) / steps) ** 0.5, share
    for s in range(50):  # the same draw by hand: window flag, then a candidate in each window
        g = step_generator(3, s)
        inside = torch.rand(1, generator=g) < fraction
        low, high = torch.randint(0, 401, (1,), generator=g), torch.randint(401, 1000, (1,), generator=g)
        assert torch.equal(drawn[s:s + 1], torch.where(inside, low, high)), s
    out = loss(torch.zeros(1, 3, 16, 16), generator=step_generator(3, 7))
    assert torch.equal(out["timesteps"], drawn[7:8])  # the loss draws its timesteps this way
    assert out["quality_samples"] == int(drawn[7] <= 400)


@pytest.mark.parametrize("field, value", [("w_diff", -1.0), ("w_anchor", float("nan")), ("w_quality", "0.1"),
                                          ("t_quality_max", 2.5), ("t_quality_max", -1), ("quality_fraction", 1.5),
                                          ("quality_input", "one-step"), ("k_steps", 0), ("k_grad_steps", 9),
                                          ("snr_gamma", 0.0), ("k_steps", True)])
def test_bad_config_values_are_refused_by_name(field, value):
    with pytest.raises(InputError, match=field):
        ACPOConfig(**{field: value})


def test_config_round_trip_and_unknown_fields():
    config = ACPOConfig(w_quality=0.5, quality_input="k_step", k_steps=3, k_grad_steps=1, snr_gamma=5.0)
    assert ACPOConfig.from_dict(config.to_dict()) == config
    with pytest.raises(InputError, match="w_anchr.*w_anchor"):
        ACPOConfig.from_dict({"w_anchr": 1.0})
    with pytest.raises(InputError, match="all 0"):
        ACPOConfig(w_diff=0, w_anchor=0, w_quality=0)


def test_the_loss_refuses_unusable_setups(pipes):
    unet, _, scheduler, vae, z0, cond = setup(pipes, "sd")
    with pytest.raises(InputError, match="not differentiable"):
        ACPOLoss(unet, scheduler, Frozen(), vae=vae)
    ACPOLoss(unet, scheduler, Frozen(), ACPOConfig(w_quality=0), vae=vae)  # logging only: allowed
    with pytest.raises(InputError, match="needs a scorer"):
        ACPOLoss(unet, scheduler, None, vae=vae)
    with pytest.raises(InputError, match="vae=pipe.vae"):
        ACPOLoss(unet, scheduler, Brightness())
    with pytest.raises(InputError, match="t_quality_max=1000"):
        ACPOLoss(unet, scheduler, Brightness(), ACPOConfig(t_quality_max=1000), vae=vae)
    with pytest.raises(InputError, match="no LoRA"):
        ACPOLoss(copy.deepcopy(pipes["sd"].unet).requires_grad_(False), scheduler, Brightness(), vae=vae)
    thawed = copy.deepcopy(unet).requires_grad_(True)
    with pytest.raises(InputError, match="non-LoRA U-Net parameters require gradients"):
        ACPOLoss(thawed, scheduler, Brightness(), vae=vae)
    loss = ACPOLoss(unet, scheduler, Brightness(), vae=vae)
    with pytest.raises(InputError, match="encoder_hidden_states"):
        loss(z0, None)
    with pytest.raises(InputError, match="batch 2, the latents 3"):
        loss(z0, {"encoder_hidden_states": cond["encoder_hidden_states"][:2]})
    with pytest.raises(InputError, match="timesteps must be 3 values in \\[0, 999\\]"):
        loss(z0, cond, timesteps=torch.tensor([1, 2, 1000]))
    xl_unet, _, xl_scheduler, xl_vae, xl_z0, xl_cond = setup(pipes, "sdxl")
    with pytest.raises(InputError, match="added_cond_kwargs"):
        ACPOLoss(xl_unet, xl_scheduler, Brightness(), vae=xl_vae)(xl_z0, {"encoder_hidden_states":
                                                                           xl_cond["encoder_hidden_states"]})
    px_unet, _, px_scheduler, _, px_z0, _ = setup(pipes, "ddpm")
    with pytest.raises(InputError, match="unconditional"):
        ACPOLoss(px_unet, px_scheduler, Brightness())(px_z0, cond)


@pytest.mark.parametrize("kind", ["sd", "ddpm"])
def test_add_lora_adapts_the_attention_projections_and_starts_at_the_base(pipes, kind):
    unet = copy.deepcopy(pipes[kind].unet)
    config = add_lora(unet, rank=2)
    adapted = {n.rsplit(".", 1)[-1] if not n.endswith("to_out.0") else "to_out.0"
               for n, m in unet.named_modules() if m in tuner_layers(unet)}
    assert adapted == {"to_q", "to_k", "to_v", "to_out.0"} and config.r == 2 and config.lora_alpha == 2
    assert all(("lora_" in n) == p.requires_grad for n, p in unet.named_parameters())
    assert all(p.abs().sum() == 0 for n, p in unet.named_parameters() if "lora_B" in n)
    with pytest.raises(InputError, match="target_modules"):
        add_lora(copy.deepcopy(pipes[kind].unet), target_modules=["query"])
    with pytest.raises(InputError, match="rank=0"):
        add_lora(copy.deepcopy(pipes[kind].unet), rank=0)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_saved_lora_loads_into_a_fresh_pipeline(pipes, kind, tmp_path):
    build = {"sd": tiny_sd, "sdxl": tiny_sdxl}[kind]
    # "trained": random non-zero B; alpha != rank, so the scale alpha / rank must travel with the weights too
    unet, base, _, _, z0, cond = setup(pipes, kind, batch=2, init=False, alpha=8)
    path = save_lora(unet, tmp_path)
    assert path == tmp_path / "pytorch_lora_weights.safetensors" and path.is_file()
    fresh = build(seed=0)
    t = torch.tensor([30, 600])
    with torch.no_grad():
        before = call(fresh.unet, z0, t, cond)
        fresh.load_lora_weights(tmp_path)
        loaded, trained = call(fresh.unet, z0, t, cond), call(unet, z0, t, cond)
    torch.testing.assert_close(before, call(base, z0, t, cond))
    torch.testing.assert_close(loaded, trained, rtol=1e-5, atol=1e-6)
    assert (loaded - before).abs().max() > 1e-2
    other = copy.deepcopy(base)
    load_lora(other, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(call(other, z0, t, cond), trained, rtol=1e-5, atol=1e-6)


def test_pixel_unet_lora_round_trips_through_peft_format(pipes, tmp_path):
    unet, base, _, _, z0, _ = setup(pipes, "ddpm", batch=2, init=False)
    path = save_lora(unet, tmp_path)
    assert path.name == "adapter_model.safetensors" and (tmp_path / "adapter_config.json").is_file()
    fresh = copy.deepcopy(base)
    load_lora(fresh, tmp_path)
    t = torch.tensor([30, 600])
    with torch.no_grad():
        torch.testing.assert_close(call(fresh, z0, t, None), call(unet, z0, t, None))
        assert (call(fresh, z0, t, None) - call(base, z0, t, None)).abs().max() > 1e-3


def test_pixel_unet_lora_loads_in_plain_peft_with_the_output_of_load_lora(pipes, tmp_path):
    from peft import PeftModel

    unet, base, _, _, z0, _ = setup(pipes, "ddpm", batch=2, init=False)
    save_lora(unet, tmp_path)
    ours, plain = copy.deepcopy(base), copy.deepcopy(base)
    load_lora(ours, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(plain, tmp_path)
    assert not [w for w in caught if "missing" in str(w.message).lower()]  # the old files: every key missing
    t = torch.tensor([30, 600])
    with torch.no_grad():
        expected, got = call(ours, z0, t, None), peft_model(z0, t).sample
        assert torch.equal(got, expected)  # bit-identical, not close
        assert (got - call(base, z0, t, None)).abs().max() > 1e-3  # the adapter really was applied
    # frozen like peft's inference load; trainable=True keeps them trainable (e.g. to fine-tune further)
    assert not any(p.requires_grad for n, p in ours.named_parameters() if "lora_" in n)
    again = copy.deepcopy(base)
    load_lora(again, tmp_path, trainable=True)
    assert all(p.requires_grad for n, p in again.named_parameters() if "lora_" in n)


def test_pixel_lora_files_without_peft_key_prefix_still_load(pipes, tmp_path):
    from safetensors.torch import load_file, save_file

    from qualityguide.finetune.lora import PEFT_KEY_PREFIX

    unet, base, _, _, z0, _ = setup(pipes, "ddpm", batch=2, init=False)
    path = save_lora(unet, tmp_path)
    state = load_file(str(path))
    assert state and all(k.startswith(PEFT_KEY_PREFIX) for k in state)
    # the layout earlier versions wrote: bare module names
    save_file({k[len(PEFT_KEY_PREFIX):]: v for k, v in state.items()}, str(path), metadata={"format": "pt"})
    old = copy.deepcopy(base)
    load_lora(old, tmp_path, trainable=True)  # trainable like the trained U-Net it is compared with, bit for bit
    t = torch.tensor([30, 600])
    with torch.no_grad():
        assert torch.equal(call(old, z0, t, None), call(unet, z0, t, None))


def test_finetune_imports_nothing_above_it():
    package = Path(__file__).resolve().parents[1] / "qualityguide" / "finetune"
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            # train: the shared training kit (below us); files, runtime, images: the bottom layer, beside errors
            if isinstance(node, ast.ImportFrom) and node.level == 2:
                assert node.module.split(".")[0] in ("diffusion", "errors", "files", "runtime", "images", "scorers",
                                                     "identity", "train"), (path.name, node.module)
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert not node.module.startswith("qualityguide"), (path.name, node.module)


def test_from_pipeline_picks_the_decoder_and_encodes_images(pipes):
    for kind in ("sd", "ddpm"):
        pipe = copy.copy(pipes[kind])
        pipe.unet = copy.deepcopy(pipe.unet)
        add_lora(pipe.unet)
        loss = ACPOLoss.from_pipeline(pipe, Brightness())
        assert loss.unet is pipe.unet and not tuner_layers(pipes[kind].unet)  # the shared pipeline is untouched
        images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            clean = loss.denoiser.encode(images)
            if kind == "ddpm":
                assert loss.vae is None and torch.equal(clean, images * 2 - 1)
                torch.testing.assert_close(loss.denoiser.decode(clean), images)
            else:
                assert loss.vae is pipe.vae and clean.shape == (1, 4, 16, 16)
                mean = pipe.vae.encode(images * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
                torch.testing.assert_close(clean, mean)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_the_reward_gradient_reaches_the_lora_through_the_vae_decoder(pipes, kind):
    """With the diffusion and anchor terms off, the only path from the loss to the LoRA runs through the decoded image
    (U-Net -> clean latent -> VAE decoder -> scorer): a latent cut before decoding leaves every LoRA gradient zero."""
    unet, _, scheduler, vae, z0, cond = setup(pipes, kind, init=False)
    config = ACPOConfig(w_diff=0, w_anchor=0, w_quality=1.0, t_quality_max=999)
    out = ACPOLoss(unet, scheduler, Brightness(), config, vae=vae)(z0, cond, timesteps=torch.tensor([10, 300, 700]))
    assert out["quality_samples"] == 3
    out["loss"].backward()
    grads = [p.grad for p in lora_parameters(unet)]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    zero = sum(int(g.abs().sum() == 0) for g in grads)
    assert zero == 0, f"{zero} of {len(grads)} LoRA tensors got a zero gradient from the quality term"
