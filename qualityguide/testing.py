"""Tiny, seeded, random-weight diffusion pipelines built from configs: no network, a second or two on a CPU.

They prove mechanics (shapes, hooks, schedulers, save/load), never quality. One factory serves
tests, demos and evals, through :func:`qualityguide.load_pipeline` (``"tiny:sd"``, ``"tiny:sdxl"``,
``"tiny:ddpm"``). The CLIP tokenizer is written locally: a byte-level BPE vocabulary with no merges
(every byte is a token), ``model_max_length=77`` like CLIP's.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from .pipelines import OFFLINE_SPECS, TINY_SPECS  # the spec names live with the resolver

# Full-size architectures with random weights: real compute and memory for benchmarks, no download.
RANDOM_SPECS = tuple(spec for spec in OFFLINE_SPECS if spec not in TINY_SPECS)
TEXT_HIDDEN = 32


def _byte_unicode() -> list[str]:
    """The 256 printable stand-ins for bytes that byte-level BPE (GPT-2/CLIP) uses."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def tiny_clip_tokenizer(directory: str | Path | None = None):
    """A CLIPTokenizer whose vocabulary is every byte (with and without CLIP's end-of-word mark)."""
    from transformers import CLIPTokenizer

    directory = Path(directory or tempfile.mkdtemp(prefix="qg_tokenizer_"))
    directory.mkdir(parents=True, exist_ok=True)
    chars = _byte_unicode()
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=77,
                         pad_token="<|endoftext|>")


def _text_config(projection: bool = False):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=TEXT_HIDDEN,
                          intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2,
                          vocab_size=514, max_position_embeddings=77, projection_dim=TEXT_HIDDEN if projection else 512,
                          hidden_act="gelu")


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=4, sample_size=64, norm_num_groups=32)


# Stable Diffusion's training noise schedule, which its schedulers are configured with.
_SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def _tiny_unet(**kwargs):
    """The two-level latent U-Net (32x32 latents) of ``tiny:sd`` and ``tiny:sdxl``; ``kwargs``: their conditioning."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=32, **kwargs)


def _sd_pipeline(unet, vae, text_encoder, prediction_type: str):
    """A StableDiffusionPipeline of these parts with SD's DDIM scheduler, the tiny tokenizer and no safety checker."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(**_SD_BETAS, clip_sample=False, set_alpha_to_one=False, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tiny_clip_tokenizer(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)
    return _finish(pipe)


def tiny_sd(seed: int = 0, prediction_type: str = "epsilon"):
    """StableDiffusionPipeline: 32x32 latents (64 px images), DDIM scheduler, no safety checker."""
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = _tiny_unet(cross_attention_dim=TEXT_HIDDEN, attention_head_dim=8)
    return _sd_pipeline(unet, tiny_vae(), CLIPTextModel(_text_config()), prediction_type)


def tiny_sdxl(seed: int = 0, prediction_type: str = "epsilon"):
    """StableDiffusionXLPipeline with two tiny CLIP encoders (64 px images)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = _tiny_unet(attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
                      addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                      projection_class_embeddings_input_dim=TEXT_HIDDEN + 6 * 8, cross_attention_dim=2 * TEXT_HIDDEN)
    scheduler = EulerDiscreteScheduler(**_SD_BETAS, timestep_spacing="leading", prediction_type=prediction_type)
    pipe = StableDiffusionXLPipeline(unet=unet, vae=tiny_vae(), text_encoder=CLIPTextModel(_text_config()),
                                     text_encoder_2=CLIPTextModelWithProjection(_text_config(projection=True)),
                                     tokenizer=tiny_clip_tokenizer(), tokenizer_2=tiny_clip_tokenizer(),
                                     scheduler=scheduler, force_zeros_for_empty_prompt=True)
    return _finish(pipe)


def tiny_ddpm(seed: int = 0, prediction_type: str = "epsilon"):
    """DDPMPipeline: pixel-space UNet2DModel on 32 px images."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=3,
                       out_channels=3, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type))
    return _finish(pipe)


def random_sd15(seed: int = 0, prediction_type: str = "epsilon"):
    """Stable Diffusion 1.5's U-Net and VAE architectures (860M + 84M parameters) with random weights.

    For speed and memory benchmarks only. The text encoder is CLIP ViT-L/14's width (768) with 2 of its
    12 layers: it runs once per prompt, so it does not change per-step timings.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                        layers_per_block=2, latent_channels=4, sample_size=512, scaling_factor=0.18215)
    text_encoder = CLIPTextModel(CLIPTextConfig(bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=768,
                                                intermediate_size=3072, num_attention_heads=12, num_hidden_layers=2,
                                                vocab_size=514, max_position_embeddings=77, hidden_act="quick_gelu"))
    return _sd_pipeline(unet, vae, text_encoder, prediction_type)


def _finish(pipe):
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def build_tiny(spec: str, **kwargs):
    """Build ``tiny:sd`` / ``tiny:sdxl`` / ``tiny:ddpm`` / ``random:sd15`` (kwargs: ``seed``, ``prediction_type``)."""
    builders = {"tiny:sd": tiny_sd, "tiny:sdxl": tiny_sdxl, "tiny:ddpm": tiny_ddpm, "random:sd15": random_sd15}
    return builders[spec](**kwargs)


# --------------------------------------------------------------------------------------------- test scorers
def _test_scorers() -> dict:
    """``testing:<name>`` scorers whose values are known by hand (the mean pixel value), built on first use so this
    module imports no scorer code until one is asked for."""
    from .scorers import QualityScorer

    class BrightnessScorer(QualityScorer):
        """The mean pixel value: higher is better. Differentiable."""

        name, differentiable, native_range = "testing:brightness", True, (0.0, 1.0)

        def native(self, images):
            return images.mean((1, 2, 3))

    class DarknessScorer(BrightnessScorer):
        """The mean pixel value, lower is better: it falls exactly as ``testing:brightness`` rises (a held-out scorer
        that a brightness-guided fine-tune must fool)."""

        name, native_lower_better = "testing:darkness", True

    return {"brightness": BrightnessScorer, "darkness": DarknessScorer}


def load_test_scorer(name: str, device=None, **kwargs):
    """``load_scorer("testing:<name>")``: ``brightness`` or ``darkness``, for tests and recipe runs that need a
    scorer pair whose values are known (registered by the package root).

    Args:
        name: ``brightness`` or ``darkness``.
        device: where to put it.
    """
    from .errors import InputError

    scorers = _test_scorers()
    if name not in scorers or kwargs:
        raise InputError(f"scorer 'testing:{name}'{' with options ' + str(sorted(kwargs)) if kwargs else ''}: known "
                         f"test scorers are {', '.join('testing:' + n for n in scorers)}, without options")
    return scorers[name]().to(device) if device is not None else scorers[name]()
