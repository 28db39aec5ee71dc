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
