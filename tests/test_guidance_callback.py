"""QualityGuidance on tiny pipelines: every scheduler, prediction type, CFG, SDXL, img2img, multi-callbacks."""

import warnings

import numpy as np
import pytest
import torch
from diffusers.callbacks import MultiPipelineCallbacks, SDCFGCutoffCallback

from qualityguide import load_pipeline
from qualityguide.errors import InputError
from qualityguide.guidance import QualityGuidance

SCHEDULERS = ["DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
              "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"]
PROMPT = "a photo of a lighthouse"


def brightness(images: torch.Tensor) -> torch.Tensor:
    """A scorer with a known optimum: mean brightness (higher is better)."""
    return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def sd():
    return load_pipeline("tiny:sd")


def swap_scheduler(pipe, name, prediction_type="epsilon"):
    import diffusers

    cls = getattr(diffusers, name)
    pipe.scheduler = cls.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    return pipe


def generate(pipe, callback=None, seed=0, steps=6, guidance_scale=1.0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    out = pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
               output_type="pt", callback_on_step_end=callback, **kwargs)
    return out.images


def guided(pipe, scale, **kwargs):
    generate_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in ("guidance_scale", "steps", "seed",
                                                                         "num_images_per_prompt")}
    with QualityGuidance(brightness, scale=scale, **kwargs).attach(pipe) as guidance:
        images = generate(pipe, guidance, **generate_kwargs)
    return images, guidance


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_scheduler_gains_and_gain_grows_with_scale(name):
    pipe = swap_scheduler(load_pipeline("tiny:sd"), name)
    base = brightness(generate(pipe))
    small, g_small = guided(pipe, 0.05)
    large, _ = guided(pipe, 0.2)
    gain_small, gain_large = brightness(small) - base, brightness(large) - base
    assert float(gain_small) > 0, name
    assert float(gain_large) > float(gain_small), name
    assert len(g_small.history) == len(pipe.scheduler.timesteps)  # every pipeline iteration guided
    assert not any(h["skipped"].any() for h in g_small.history if not h["deferred"])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", ["DDIMScheduler", "EulerDiscreteScheduler"])
def test_v_prediction_and_cfg(name, prediction_type):
    pipe = swap_scheduler(load_pipeline("tiny:sd", prediction_type=prediction_type), name, prediction_type)
    for cfg in (1.0, 5.0):
        base = brightness(generate(pipe, guidance_scale=cfg))
        images, _ = guided(pipe, 0.1, guidance_scale=cfg)
        assert float(brightness(images) - base) > 0, (name, prediction_type, cfg)


def test_scale_zero_is_bit_identical_and_detach_restores(sd):
    base = generate(sd, guidance_scale=3.0)
    zero, _ = guided(sd, 0.0, guidance_scale=3.0)
    assert torch.equal(zero, base)
    guidance = QualityGuidance(brightness, scale=0.1).attach(sd)
    moved = generate(sd, guidance)
    guidance.detach()
    assert not torch.equal(moved, generate(sd))
    assert torch.equal(generate(sd, guidance_scale=3.0), base)  # pipeline exactly as before
    assert not sd.unet._forward_hooks and not sd.unet._forward_hooks_with_kwargs
    assert all(p.requires_grad for p in sd.unet.parameters())


def test_steps_outside_window_are_untouched(sd):
    record = {}

    def spy(pipe, i, t, kwargs):
        record[i] = kwargs["latents"].clone()
        return kwargs

    unguided_latents = {}

    def spy_base(pipe, i, t, kwargs):
        unguided_latents[i] = kwargs["latents"].clone()
        return kwargs

    generate(sd, spy_base, steps=8)
    guidance = QualityGuidance(brightness, scale=0.1, start=0.5, end=0.75).attach(sd)
    generate(sd, MultiPipelineCallbacks([guidance, _FnCallback(spy)]), steps=8)
    guidance.detach()
    guided_steps = [h["step"] for h in guidance.history]
    assert guided_steps == [4, 5]
    for i in range(4):
        assert torch.equal(record[i], unguided_latents[i]), i  # before the window: identical
    assert not torch.equal(record[4], unguided_latents[4])
    every = QualityGuidance(brightness, scale=0.1, every=3).attach(sd)
    generate(sd, every, steps=8)
    every.detach()
    assert [h["step"] for h in every.history] == [0, 3, 6]


class _FnCallback:
    """Wraps a function as a PipelineCallback-like object for MultiPipelineCallbacks."""

    tensor_inputs = ["latents"]

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, pipe, i, t, kwargs):
        return self.fn(pipe, i, t, kwargs)


def test_non_finite_gradient_is_skipped_with_warning(sd):
    def broken(images):
        return images.mean(dim=(1, 2, 3)) * torch.tensor(float("nan"))

    base = generate(sd)
    guidance = QualityGuidance(broken, scale=0.1).attach(sd)
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        images = generate(sd, guidance)
    guidance.detach()
    assert torch.equal(images, base) and all(h["skipped"].all() for h in guidance.history if not h["deferred"])


def test_batches_multi_callbacks_and_config(sd):
    base = brightness(generate(sd, guidance_scale=4.0, num_images_per_prompt=3))
    seen = []
    guidance = QualityGuidance(brightness, scale=0.1, every=1).attach(sd)
    chain = MultiPipelineCallbacks([guidance, _FnCallback(lambda p, i, t, k: seen.append(i) or k)])
    images = generate(sd, chain, guidance_scale=4.0, num_images_per_prompt=3)
    guidance.detach()
    assert images.shape[0] == 3 and torch.all(brightness(images) > base) and seen == list(range(6))
    assert guidance.config.scale == 0.1 and guidance.config.scorer == "function"
    assert guidance.history[0]["score"].shape == (3,)
    # with diffusers' CFG cutoff running first: the step where CFG stops still combines the halves it ran with
    base = brightness(generate(sd, SDCFGCutoffCallback(cutoff_step_ratio=0.5), guidance_scale=4.0))
    guidance = QualityGuidance(brightness, scale=0.1).attach(sd)
    images = generate(sd, MultiPipelineCallbacks([SDCFGCutoffCallback(cutoff_step_ratio=0.5), guidance]),
                      guidance_scale=4.0)
    guidance.detach()
    assert float(brightness(images) - base) > 0 and len(guidance.history) == 6


def test_sdxl_and_img2img():
    from diffusers import StableDiffusionImg2ImgPipeline

    sdxl = load_pipeline("tiny:sdxl")
    base = brightness(generate(sdxl, guidance_scale=5.0))
    images, _ = guided(sdxl, 0.1, guidance_scale=5.0)
    assert float(brightness(images) - base) > 0
    sd = load_pipeline("tiny:sd")
    img2img = StableDiffusionImg2ImgPipeline(**sd.components)
    img2img.set_progress_bar_config(disable=True)
    init = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    base = brightness(generate(img2img, image=init, strength=0.6, steps=10))
    with QualityGuidance(brightness, scale=0.1).attach(img2img) as guidance:
        images = generate(img2img, guidance, image=init, strength=0.6, steps=10)
    assert float(brightness(images) - base) > 0 and len(guidance.history) == 6
    # the coefficient is the next *actual* noise level of img2img's shortened loop
    table = img2img.scheduler.alphas_cumprod
    loop = [int(t) for t in img2img.scheduler.timesteps[-6:]]
    for h, following in zip(guidance.history, loop[1:]):
        assert h["coefficient"] == pytest.approx(float(table[following]) ** 0.5, rel=1e-5)


def test_single_step_guidance_survives_pndm_and_unipc():
    for name in ("UniPCMultistepScheduler", "PNDMScheduler"):
        pipe = swap_scheduler(load_pipeline("tiny:sd"), name)
        if name == "PNDMScheduler":
            pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, skip_prk_steps=True)
        base = generate(pipe, steps=6)
        # one guided step, early: UniPC's corrector and PNDM's warm-up would drop or reverse it
        first, _ = guided(pipe, 0.2, start=0.0, end=0.1, steps=6)  # step 0 only (PNDM loops 7 times)
        second, g = guided(pipe, 0.2, start=1 / 6, end=2 / 6, steps=6)
        gain = float(brightness(second) - brightness(base))
        assert gain > 0, name
        if name == "PNDMScheduler":  # step 0's change would be overwritten by PLMS's restart: it is deferred
            _, g0 = guided(pipe, 0.2, start=0.0, end=0.1, steps=6)
            assert len(g0.history) == 1 and g0.history[0]["deferred"] and torch.equal(first, base)


def test_unet_mode_gains(sd):
    base = brightness(generate(sd))
    images, guidance = guided(sd, 0.1, mode="unet")
    assert float(brightness(images) - base) > 0


def test_niqe_guidance_improves_niqe(sd):
    """A real metric with reference parameters: guided images score better on NIQE (bigger images needed)."""
    from qualityguide import load_scorer

    scorer = load_scorer("niqe-embedded")

    def upsampled(images):  # tiny SD makes 64 px images; NIQE needs >= 192 px
        return scorer(torch.nn.functional.interpolate(images, size=192, mode="bilinear", align_corners=False))

    base = generate(sd, seed=1)
    with QualityGuidance(upsampled, scale=0.1).attach(sd) as guidance:
        images = generate(sd, guidance, seed=1)
    assert float(upsampled(images)) > float(upsampled(base))


def test_bf16_vae_decode():
    pipe = load_pipeline("tiny:sd")
    pipe.vae.to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        guidance = QualityGuidance(brightness, scale=0.1).attach(pipe)
        generator = torch.Generator().manual_seed(0)
        pipe(PROMPT, num_inference_steps=4, guidance_scale=1.0, generator=generator, output_type="latent",
             callback_on_step_end=guidance)
    guidance.detach()
    done = [h for h in guidance.history if not h["deferred"]]
    assert done and all(not h["skipped"].any() for h in done)
    assert all(torch.isfinite(h["delta_norm"]).all() and (h["delta_norm"] > 0).all() for h in done)


def test_bad_arguments(sd):
    from qualityguide import load_scorer

    with pytest.raises(InputError, match="not differentiable"):
        QualityGuidance(_NotDifferentiable(), scale=1.0)
    with pytest.raises(InputError, match="start < end"):
        QualityGuidance(brightness, start=0.8, end=0.2)
    with pytest.raises(InputError, match="mode"):
        QualityGuidance(brightness, mode="pixel")
    with pytest.raises(InputError, match="scorer must be"):
        QualityGuidance(None)
    guidance = QualityGuidance(brightness, scale=0.1)
    with pytest.raises(InputError, match="not attached"):
        generate(sd, guidance)
    guidance.attach(sd)
    with pytest.raises(InputError, match="already attached"):
        guidance.attach(sd)
    guidance.detach()
    assert load_scorer("niqe-embedded").differentiable


class _NotDifferentiable:
    differentiable = False
    name = "nd"

    def __call__(self, images):
        return images.mean((1, 2, 3))


def test_lgdm_scorer_guides_with_the_pipelines_own_modules(sd):
    from qualityguide.lgdm import LGDM, HeadConfig, LGDMConfig, LGDMHead, LGDMScorer

    lgdm = LGDM.from_pipeline(sd, LGDMConfig(image_size=32, num_steps=2, t_max=20, psi="none"))
    head = LGDMHead(HeadConfig(num_steps=2, layer_dims=lgdm.recorder.dims, hidden=(16, 8)))
    scorer = LGDMScorer(lgdm, head).eval()
    assert scorer.lgdm.unet is sd.unet and scorer.lgdm.vae is sd.vae  # no second copy
    with torch.no_grad():
        base = scorer(generate(sd, steps=4))
    with QualityGuidance(scorer, scale=0.05).attach(sd) as guidance:
        images = generate(sd, guidance, steps=4)
    with torch.no_grad():
        assert float(scorer(images)) > float(base)
    assert len(guidance.history) == 4  # LGDM's own U-Net calls were not mistaken for sampler calls


def test_recipe_resumes_without_duplicates(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("guided_sampling",
                                                  Path(__file__).parents[1] / "recipes" / "guided_sampling.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# test prompts\na red fox\n\na lighthouse\nsushi on a plate\n")
    out = tmp_path / "out"
    argv = ["--model", "tiny:sd", "--prompts", str(prompts), "--scorer", "niqe-embedded@192",
            "--scale", "0.1", "--steps", "3", "--cfg", "3.0", "--out", str(out), "--device", "cpu"]
    assert recipe.main(argv) == 0
    lines = (out / "results-000.jsonl").read_text().splitlines()
    assert len(lines) == 3 and len(list((out / "images").glob("*.png"))) == 3
    first = json.loads(lines[0])
    assert first["prompt"] == "a red fox" and first["scale"] == 0.1 and np.isfinite(first["score"])
    assert json.loads((out / "settings.json").read_text())["scorer"] == first["scorer"] == "niqe-embedded@192"
    # a kill: the last image never reached disk and its record line was cut
    (out / "images" / f"{json.loads(lines[2])['key']}.png").unlink()
    (out / "results-000.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])
    assert recipe.main(argv) == 0
    from qualityguide.guidance.runner import finished

    records = finished(out)
    assert sorted(records) == sorted(json.loads(line)["key"] for line in lines) and len(records) == 3
    assert recipe.main(argv) == 0  # nothing left: no new lines
    assert sum(1 for line in (out / "results-000.jsonl").read_text().splitlines() if line.endswith("}")) == 3
    with pytest.raises(InputError, match=r"other settings \(scale: folder has 0.1, this run 0.3"):
        recipe.main([a if a != "0.1" else "0.3" for a in argv])
    # an edited prompt regenerates only that line's image
    prompts.write_text("a red fox\na lighthouse at night\nsushi on a plate\n")
    assert recipe.main(argv) == 0
    records = finished(out, recipe.make_jobs(recipe.read_prompts(prompts)))
    assert records["00001_1000"]["prompt"] == "a lighthouse at night" and len(records) == 3


def test_read_prompts_errors(tmp_path):
    from qualityguide.guidance.runner import read_prompts

    with pytest.raises(InputError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(InputError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")


@pytest.mark.slow
def test_recipe_shards_prompts_across_two_processes(tmp_path):
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    launcher = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na lighthouse\nsushi\na cabin\na tulip\n")
    out = tmp_path / "out"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no",
                          str(Path(__file__).parents[1] / "recipes" / "guided_sampling.py"), "--model", "tiny:sd",
                          "--prompts", str(prompts), "--scorer", "niqe-embedded@192",
                          "--scale", "0.1", "--steps", "2", "--cfg", "1.0", "--out", str(out), "--device", "cpu"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    per_rank = {p.name: [json.loads(line)["key"] for line in p.read_text().splitlines()]
                for p in out.glob("results-*.jsonl")}
    assert sorted(per_rank) == ["results-000.jsonl", "results-001.jsonl"]
    keys = [k for ks in per_rank.values() for k in ks]
    assert len(keys) == 5 and len(set(keys)) == 5 and len(list((out / "images").glob("*.png"))) == 5
