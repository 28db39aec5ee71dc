import numpy as np
import pytest
import torch

from qualityguide import load_pipeline
from qualityguide.errors import InputError, WeightsNotFoundError


def _generate(pipe, spec, seed=0):
    generator = torch.Generator().manual_seed(seed)
    if spec == "tiny:ddpm":
        return pipe(batch_size=1, generator=generator, num_inference_steps=3, output_type="np").images
    return pipe("a photo of a red fox", generator=generator, num_inference_steps=3, output_type="np").images


@pytest.mark.parametrize("spec,size", [("tiny:sd", 64), ("tiny:sdxl", 64), ("tiny:ddpm", 32)])
def test_tiny_pipeline_generates_and_round_trips(tmp_path, spec, size):
    pipe = load_pipeline(spec)
    image = _generate(pipe, spec)
    assert image.shape == (1, size, size, 3) and np.isfinite(image).all()
    assert image.std() > 0  # not a constant image
    assert np.array_equal(image, _generate(load_pipeline(spec), spec))  # seeded: rebuilt pipeline, same output
    pipe.save_pretrained(tmp_path / "saved")
    reloaded = load_pipeline(str(tmp_path / "saved"))
    assert type(reloaded) is type(pipe)
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            a, b = module.state_dict(), reloaded.components[name].state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    again = _generate(reloaded, spec)
    if spec == "tiny:ddpm":
        # UNet2DModel.from_pretrained reproduces the weights bit for bit, but its attention blocks
        # run ~1e-6 apart from a freshly constructed model's (diffusers' loading path); SD/SDXL match exactly.
        assert np.allclose(again, image, atol=1e-4)
    else:
        assert np.array_equal(again, image)


def test_tiny_seeds_differ_and_tokenizer():
    a = load_pipeline("tiny:sd", seed=0)
    b = load_pipeline("tiny:sd", seed=1)
    assert not torch.equal(a.unet.conv_in.weight, b.unet.conv_in.weight)
    assert a.tokenizer.model_max_length == 77
    ids = a.tokenizer("a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == a.tokenizer.bos_token_id


def test_v_prediction_option():
    pipe = load_pipeline("tiny:sd", prediction_type="v_prediction")
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_dtype_option():
    pipe = load_pipeline("tiny:sd", dtype="bf16")
    assert pipe.unet.dtype == torch.bfloat16
    with pytest.raises(InputError, match="dtype 'half8'"):
        load_pipeline("tiny:sd", dtype="half8")


def test_bad_specs(tmp_path):
    with pytest.raises(InputError, match="Did you mean 'tiny:sd'"):
        load_pipeline("tiny:sdd")
    with pytest.raises(InputError, match="does not exist"):
        load_pipeline(str(tmp_path / "nope" / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="model_index.json"):
        load_pipeline(str(tmp_path / "empty"))
    with pytest.raises(WeightsNotFoundError, match="could not be loaded"):
        load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")


def _with_tiny_safety_checker(pipe):
    """tiny:sd plus a tiny random StableDiffusionSafetyChecker and its CLIP image processor (like SD 1.5's folder)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    small = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    config = CLIPConfig(text_config={**small, "vocab_size": 514, "bos_token_id": 512, "eos_token_id": 513,
                                     "pad_token_id": 513},
                        vision_config={**small, "image_size": 32, "patch_size": 8}, projection_dim=32)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return StableDiffusionPipeline(**{**pipe.components, "safety_checker": StableDiffusionSafetyChecker(config).eval(),
                                      "feature_extractor": processor}, requires_safety_checker=True)


@pytest.fixture
def library_warnings():
    """Records diffusers'/transformers' log warnings at their default level (a CLI run in this process may have
    quieted them; their own handlers hold whatever stderr was current when they were made); bars off."""
    import logging

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled())
             for lib in (diffusers_logging, transformers_logging)]
    for lib, _, _ in saved:
        lib.set_verbosity_warning()
        lib.disable_progress_bar()
        lib.get_logger().addHandler(handler)
    yield records
    for lib, verbosity, bars in saved:
        lib.get_logger().removeHandler(handler)
        lib.set_verbosity(verbosity)
        lib.enable_progress_bar() if bars else lib.disable_progress_bar()


def test_safety_checker_is_not_loaded_and_nothing_warns(tmp_path, capfd, library_warnings):
    import shutil
    import warnings

    _with_tiny_safety_checker(load_pipeline("tiny:sd")).save_pretrained(tmp_path / "sd")
    load_pipeline("tiny:sdxl").save_pretrained(tmp_path / "sdxl")
    assert (tmp_path / "sd" / "safety_checker" / "model.safetensors").is_file()
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sd = load_pipeline(str(tmp_path / "sd"))
        sdxl = load_pipeline(str(tmp_path / "sdxl"))  # declares no checker: gets no checker arguments
    assert sd.safety_checker is None and sd.feature_extractor is None
    assert not hasattr(sdxl, "safety_checker")
    assert [r.getMessage() for r in library_warnings] == [] and [str(w.message) for w in caught] == []
    assert capfd.readouterr().err == ""
    image = sd("a fox", num_inference_steps=2, output_type="np")
    assert image.nsfw_content_detected is None and np.isfinite(image.images).all()

    # A hub id reads model_index.json from the cache first; a cache without the checker's weights loads offline.
    snapshot = tmp_path / "hub" / "models--someone--tiny-sd" / "snapshots" / ("0" * 40)
    shutil.copytree(tmp_path / "sd", snapshot, ignore=shutil.ignore_patterns("safety_checker"))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    hub = load_pipeline("someone/tiny-sd", cache_dir=str(tmp_path / "hub"))
    assert hub.safety_checker is None and hub.feature_extractor is None


def test_revision_and_variant_reach_from_pretrained(tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    original = load_pipeline("tiny:sd")
    original.save_pretrained(tmp_path / "sd", variant="fp16")  # *.fp16.safetensors only: loads only as that variant
    assert list((tmp_path / "sd" / "unet").glob("*.fp16.safetensors"))
    real, calls = DiffusionPipeline.from_pretrained, []

    def spy(cls, source, **kwargs):
        calls.append(kwargs)
        return real(source, **kwargs)

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(spy))
    pipe = load_pipeline(str(tmp_path / "sd"), revision="v1", variant="fp16")
    assert calls[0]["revision"] == "v1" and calls[0]["variant"] == "fp16"
    for (name, a), (_, b) in zip(original.unet.state_dict().items(), pipe.unet.state_dict().items()):
        assert torch.equal(a, b), name  # the variant's files were read
    load_pipeline(str(tmp_path / "sd"), variant="fp16")
    assert "revision" not in calls[1]  # not given: diffusers' own default


@pytest.mark.parametrize("option", ["revision", "variant"])
def test_offline_specs_refuse_a_revision_or_variant(option):
    with pytest.raises(InputError, match=f"{option} 'x' with the offline model 'tiny:sd'.*drop the {option}"):
        load_pipeline("tiny:sd", **{option: "x"})
