"""QualityGuidance's maths against diffusers itself: the rebuilt clean estimate equals each scheduler's own, a guided
run equals a hand-written guided loop, unsupported schedulers are refused, history keeps one run."""

import diffusers
import pytest
import torch

from qualityguide import load_pipeline
from qualityguide.diffusion import SUPPORTED_SCHEDULERS
from qualityguide.errors import InputError
from qualityguide.guidance import QualityGuidance

PROMPT = "a photo of a lighthouse"
CFG = 7.5


def brightness(images: torch.Tensor) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


class RecordingGuidance(QualityGuidance):
    """The real callback, keeping every clean estimate it guides with (in step order) and its levels."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.estimates = []

    def clean_estimate(self, call, levels, batch):
        x0 = super().clean_estimate(call, levels, batch)
        self.estimates.append((levels, x0.detach().clone()))
        return x0


@pytest.fixture(scope="module")
def pipes():
    return {p: load_pipeline("tiny:sd", prediction_type=p) for p in ("epsilon", "v_prediction")}


def use_scheduler(pipe, name: str, prediction_type: str, **options):
    """Swap in ``name``, built from Stable Diffusion's scheduler config (kept from the pipeline's first one)."""
    config = pipe.__dict__.setdefault("_sd_scheduler_config", pipe.scheduler.config)
    cls = getattr(diffusers, name)
    if name.startswith("EDM"):  # EDM schedulers have their own config (Playground v2.5: sigma_data 0.5)
        pipe.scheduler = cls(sigma_data=0.5, prediction_type=prediction_type, **options)
    else:
        pipe.scheduler = cls.from_config(config, prediction_type=prediction_type, **options)
    return pipe


# ---------------------------------------------------------------- diffusers' own clean estimate, per scheduler
def _ddim_reference(scheduler):
    """PNDM and TCD keep their clean estimate to themselves: DDIM's pred_original_sample from the same alphas_cumprod,
    U-Net output and sample is diffusers' own Tweedie estimate at that timestep."""
    ddim = diffusers.DDIMScheduler.from_config(scheduler.config, clip_sample=False, thresholding=False)
    ddim.set_timesteps(10)  # pred_original_sample depends on alphas_cumprod[t] only

    def reference(out, model_output, timestep, sample):
        return ddim.step(model_output, timestep, sample).pred_original_sample

    return reference


def _reference_fn(scheduler):
    """``(step output, model_output, timestep, sample) -> x0`` as the scheduler itself computed it."""
    name = type(scheduler).__name__
    if name in ("PNDMScheduler", "TCDScheduler"):
        return _ddim_reference(scheduler)
    if name == "LCMScheduler":
        return lambda out, *_: out.denoised
    if name == "DEISMultistepScheduler":  # keeps its noise prediction; x0 from its own alpha_t, sigma_t tables
        def deis(out, model_output, timestep, sample):
            alpha_t, sigma_t = scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas[scheduler.step_index - 1])
            return (sample - sigma_t * scheduler.model_outputs[-1]) / alpha_t
        return deis
    if hasattr(scheduler, "model_outputs"):  # DPM-Solver(++), UniPC, EDM DPM-Solver++: the x0 they integrate
        return lambda *_: scheduler.model_outputs[-1]
    return lambda out, *_: out.pred_original_sample


def _capture(scheduler):
    """Wrap ``scheduler.step`` so every call also stores the scheduler's own clean estimate."""
    references, step, reference = [], scheduler.step, _reference_fn(scheduler)

    def wrapped(model_output, timestep, sample, *args, return_dict=True, **kwargs):
        out = step(model_output, timestep, sample, *args, return_dict=True, **kwargs)
        references.append(reference(out, model_output, timestep, sample).clone())
        return out if return_dict else out.to_tuple()

    scheduler.step = wrapped
    return references


def _assert_matches_scheduler(pipe, guidance_scale=CFG, steps=3, **call_kwargs):
    references = _capture(pipe.scheduler)
    with RecordingGuidance(brightness, scale=0.1).attach(pipe) as guidance:
        pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance_scale, output_type="latent",
             generator=torch.Generator().manual_seed(0), callback_on_step_end=guidance, **call_kwargs)
    del pipe.scheduler.step  # the instance attribute: the class's step again
    guided = [h for h in guidance.history if not h["deferred"]]
    assert len(guided) == len(guidance.estimates) >= 2 and len(references) == len(guidance.history)
    for h, (levels, x0) in zip(guided, guidance.estimates):
        expected = references[h["step"]].float()
        torch.testing.assert_close(x0, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()),
                                   msg=lambda m, step=h["step"]: f"step {step}: {m}")
    # the change reaches the latents after the step scaled by their signal coefficient: 1 for x0 + sigma eps latents,
    # else the next U-Net call's sqrt(alpha_bar)
    for (levels, _), (following, _), h, h_next in zip(guidance.estimates, guidance.estimates[1:], guided, guided[1:]):
        if levels.family != "vp":
            assert levels.coefficient == 1.0
        elif h_next["step"] == h["step"] + 1:
            assert levels.coefficient == pytest.approx(following.alpha_bar ** 0.5, rel=1e-6)
    return guidance


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", SUPPORTED_SCHEDULERS)
def test_clean_estimate_equals_the_schedulers_own(pipes, name, prediction_type):
    pipe = use_scheduler(pipes[prediction_type], name, prediction_type)
    _assert_matches_scheduler(pipe, steps=4 if name == "PNDMScheduler" else 3)  # PNDM's warm-up needs 4


def test_lcm_boundary_scalings_are_part_of_the_estimate(pipes):
    """LCM's denoised sample is ``c_out x0 + c_skip z_t``; at its usual timestep_scaling (10) c_skip is ~1e-8, so a
    small scaling makes the boundary term visible to the comparison."""
    pipe = use_scheduler(pipes["epsilon"], "LCMScheduler", "epsilon", timestep_scaling=0.01)
    guidance = _assert_matches_scheduler(pipe)
    assert max(levels.boundary[0] for levels, _ in guidance.estimates) > 0.01  # c_skip


def test_clean_estimate_with_sdxl_and_the_playground_scheduler():
    """SDXL with EDM DPM-Solver++ (Playground v2.5's scheduler: sigma_data 0.5, epsilon), CFG."""
    pipe = load_pipeline("tiny:sdxl")
    pipe.scheduler = diffusers.EDMDPMSolverMultistepScheduler(sigma_data=0.5, sigma_max=80.0, sigma_min=0.002)
    guidance = _assert_matches_scheduler(pipe, guidance_scale=5.0)
    assert all(levels.family == "edm" for levels, _ in guidance.estimates)


# ---------------------------------------------------------------- a guided run equals a hand-written guided loop
def smooth_score(images: torch.Tensor) -> torch.Tensor:
    """Deterministic, differentiable, and its gradient depends on the image (so a wrong x0 gives a wrong step)."""
    ramp = torch.linspace(0.0, 2.0, images.shape[-1])
    return (torch.sin(3.0 * images) * ramp).sum(dim=(1, 2, 3)) - (images - 0.4).pow(2).sum(dim=(1, 2, 3))


def hand_written_guided_loop(pipe, steps: int, scale: float, seed: int = 0) -> torch.Tensor:
    """Classifier-free guided sampling written out with diffusers' pieces, plus the documented guidance update:
    ``latents = prev_sample + coefficient * scale * grad_x0 score(decode(x0))`` with x0 the step's own
    pred_original_sample and coefficient the signal coefficient of the latents the step lands on."""
    scheduler, unet, vae = pipe.scheduler, pipe.unet, pipe.vae
    positive, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    embeddings = torch.cat([negative, positive])
    scheduler.set_timesteps(steps)
    size = unet.config.sample_size
    latents = torch.randn((1, 4, size, size), generator=torch.Generator().manual_seed(seed))
    latents = latents * scheduler.init_noise_sigma
    ddim = isinstance(scheduler, diffusers.DDIMScheduler)
    for t in scheduler.timesteps:
        with torch.no_grad():
            model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            uncond, text = unet(model_input, t, encoder_hidden_states=embeddings).sample.chunk(2)
            out = scheduler.step(uncond + CFG * (text - uncond), t, latents, **({"eta": 0.0} if ddim else {}))
        x0 = out.pred_original_sample.detach().requires_grad_(True)
        images = ((vae.decode(x0 / vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)
        (grad,) = torch.autograd.grad(smooth_score(images).sum(), x0)
        if ddim:  # z_prev = sqrt(a_prev) x0 + ..., a_prev at DDIM's own previous timestep
            prev = int(t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
            a_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
            coefficient = float(a_prev) ** 0.5
        else:  # x_next = x0 + sigma_next eps
            coefficient = 1.0
        latents = out.prev_sample + coefficient * scale * grad
    return latents


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", ["DDIMScheduler", "EulerDiscreteScheduler", "EDMEulerScheduler"])
def test_guided_run_equals_hand_written_loop(pipes, name, prediction_type):
    pipe = use_scheduler(pipes[prediction_type], name, prediction_type)
    steps, scale = 3, 0.5
    with QualityGuidance(smooth_score, scale=scale, normalize="none").attach(pipe) as guidance:
        guided = pipe(PROMPT, num_inference_steps=steps, guidance_scale=CFG, output_type="latent",
                      generator=torch.Generator().manual_seed(0), callback_on_step_end=guidance).images
    expected = hand_written_guided_loop(pipe, steps, scale)
    tolerance = 1e-5 * float(expected.abs().max())
    torch.testing.assert_close(guided, expected, rtol=0, atol=tolerance)
    # guidance moves the latents by far more than the tolerance (so the comparison can see a wrong update)
    largest_rms = max(float(h["delta_norm"][0]) for h in guidance.history) / guided.numel() ** 0.5
    assert largest_rms > 30 * tolerance, (largest_rms, tolerance)


# ---------------------------------------------------------------- schedulers whose maths the callback cannot rebuild
class _PatchedDDIM(diffusers.DDIMScheduler):
    """A user's subclass: its maths may differ from DDIM's, so it is not taken for DDIM."""


REFUSED = {
    "flow matching": (lambda c: diffusers.FlowMatchEulerDiscreteScheduler(),
                      r"FlowMatchEulerDiscreteScheduler is a flow-matching one.*supports .*DDIMScheduler"),
    "flow sigmas": (lambda c: diffusers.DPMSolverMultistepScheduler.from_config(c, use_flow_sigmas=True),
                    r"DPMSolverMultistepScheduler is a flow-matching one"),
    "flow prediction": (lambda c: diffusers.UniPCMultistepScheduler.from_config(c, prediction_type="flow_prediction"),
                        r"UniPCMultistepScheduler is a flow-matching one"),
    "unknown class": (lambda c: diffusers.IPNDMScheduler(),
                      (r"no exact clean estimate for scheduler .*IPNDMScheduler; supported: DDIMScheduler, .*"
                       r"EDMDPMSolverMultistepScheduler .*DDIMScheduler.from_config")),
    "subclass": (lambda c: _PatchedDDIM.from_config(c), r"no exact clean estimate for scheduler .*_PatchedDDIM"),
    "clipped x0": (lambda c: diffusers.DDIMScheduler.from_config(c, clip_sample=True),
                   r"DDIMScheduler\(clip_sample=True\) clips the clean estimate.*clip_sample=False"),
    "thresholding": (lambda c: diffusers.DPMSolverMultistepScheduler.from_config(c, thresholding=True),
                     r"thresholding=True"),
    "learned variance": (lambda c: diffusers.DDPMScheduler.from_config(c, variance_type="learned_range"),
                         r"variance_type='learned_range'"),
    "EDM sample prediction": (lambda c: diffusers.EDMEulerScheduler(prediction_type="sample"),
                              (r"EDMEulerScheduler\(prediction_type='sample'\) is not supported; allowed: "
                               r"epsilon, v_prediction")),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_schedulers_are_refused_at_attach(case):
    from qualityguide.diffusion import scheduler_family

    pipe = load_pipeline("tiny:sd")
    make, match = REFUSED[case]
    pipe.scheduler = make(pipe.scheduler.config)
    with pytest.raises(InputError, match=match):
        QualityGuidance(brightness, scale=0.1).attach(pipe)
    assert not pipe.unet._forward_hooks_with_kwargs  # nothing was installed
    with pytest.raises(InputError, match=match):
        scheduler_family(pipe.scheduler)


def test_scheduler_swapped_after_attach_is_refused_at_the_first_step():
    pipe = load_pipeline("tiny:sd")
    with QualityGuidance(brightness, scale=0.1).attach(pipe) as guidance:
        pipe.scheduler = diffusers.IPNDMScheduler()  # runs with SD pipelines, but no VP/EDM clean estimate
        with pytest.raises(InputError, match="IPNDMScheduler"):
            pipe(PROMPT, num_inference_steps=2, guidance_scale=1.0, output_type="latent", callback_on_step_end=guidance)


# ---------------------------------------------------------------- steps whose change the next step would drop
@pytest.mark.parametrize("name, options", [
    ("DDIMScheduler", {}), ("EulerDiscreteScheduler", {}), ("DPMSolverMultistepScheduler", {}),
    ("HeunDiscreteScheduler", {}), ("KDPM2DiscreteScheduler", {}), ("KDPM2AncestralDiscreteScheduler", {}),
    ("DPMSolverSinglestepScheduler", {"solver_order": 2, "prediction_type": "sample"}),
    ("DPMSolverSinglestepScheduler", {"solver_order": 3, "prediction_type": "sample"}),
    ("PNDMScheduler", {"skip_prk_steps": True}), ("PNDMScheduler", {"skip_prk_steps": False}),
])
def test_deferred_steps_are_those_whose_next_update_ignores_the_latents(name, options):
    """``restarts_from_saved_sample`` after step k holds exactly when diffusers' step k+1, given the same model
    output, gives the same result whatever latents it is handed (it updates from a sample it saved earlier), so a
    change made to the latents there would be lost. The model output is held fixed in the form each update
    integrates (the noise for Heun/KDPM2/PNDM, the clean sample for DPM-Solver++)."""
    import copy
    import inspect

    from qualityguide.diffusion import restarts_from_saved_sample

    scheduler = getattr(diffusers, name).from_config(load_pipeline("tiny:sd").scheduler.config, **options)
    scheduler.set_timesteps(6)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 4, 4, generator=g) * scheduler.init_noise_sigma
    outputs = [torch.randn(1, 4, 4, 4, generator=g) for _ in scheduler.timesteps]
    noisy = "generator" in inspect.signature(scheduler.step).parameters

    def step(sched, k, x, seed):
        t = sched.timesteps[k]
        sched.scale_model_input(x, t)
        kwargs = {"generator": torch.Generator().manual_seed(seed)} if noisy else {}
        return sched.step(outputs[k], t, x, **kwargs).prev_sample

    seen = []
    for k in range(len(scheduler.timesteps) - 2):  # not the last step, which lands on the clean sample itself
        sample = step(scheduler, k, sample, k)
        results = [step(copy.deepcopy(scheduler), k + 1, sample + shift, 99) for shift in (0.0, 1.0)]
        ignores_latents = torch.allclose(results[0], results[1], rtol=0, atol=1e-4)
        seen.append(ignores_latents)
        assert restarts_from_saved_sample(scheduler) == ignores_latents, (name, k)
    assert any(seen) == (name not in ("DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"))


# ---------------------------------------------------------------- history
def test_history_keeps_only_the_last_run():
    pipe = load_pipeline("tiny:sd")

    def run(guidance, steps):
        pipe(PROMPT, num_inference_steps=steps, guidance_scale=1.0, output_type="latent",
             callback_on_step_end=guidance)

    with QualityGuidance(brightness, scale=0.1).attach(pipe) as guidance:
        run(guidance, 3)
        assert [h["step"] for h in guidance.history] == [0, 1, 2]
        run(guidance, 4)
        assert [h["step"] for h in guidance.history] == [0, 1, 2, 3]
    with QualityGuidance(brightness, scale=0.1, start=0.5).attach(pipe) as guidance:  # runs start outside the window
        run(guidance, 4)
        run(guidance, 4)
        assert [h["step"] for h in guidance.history] == [2, 3]
