"""IQA-Adapter: wiring through diffusers' IP-Adapter path, targets, save/load, gradients, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qualityguide.adapter import AdapterCallError, IQAAdapter, ReferenceIQAAdapter, ScoreQuantiles
from qualityguide.errors import InputError
from qualityguide.testing import tiny_sd, tiny_sdxl

NAMES = ["pyiqa:topiq_nr", "niqe-embedded"]
BUILDERS = {"sd": tiny_sd, "sdxl": tiny_sdxl}


def quantiles():
    g = torch.Generator().manual_seed(3)
    return ScoreQuantiles.fit({"pyiqa:topiq_nr": torch.rand(200, generator=g),
                               "niqe-embedded": -10 * torch.rand(200, generator=g) - 2})


def trained_like(adapter: IQAAdapter, seed: int = 1) -> IQAAdapter:
    """Move the weights away from their initialisation, as training would, so targets matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return adapter


def make(kind: str):
    pipe = BUILDERS[kind]()
    adapter = trained_like(IQAAdapter.for_unet(pipe.unet, NAMES, quantiles=quantiles()))
    return pipe, adapter


def generate(pipe, latents=None, n: int = 1, **kwargs) -> torch.Tensor:
    if latents is None:
        latents = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return pipe("a red house", num_inference_steps=3, output_type="pt", height=64, width=64, latents=latents,
                num_images_per_prompt=latents.shape[0], **kwargs).images


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_targets_change_images_and_scale_zero_and_detach_are_bit_identical(kind):
    pipe, adapter = make(kind)
    base = generate(pipe)
    adapter.attach(pipe)
    high = generate(pipe, ip_adapter_image_embeds=adapter.embeds(percentiles={n: 0.95 for n in NAMES}))
    low = generate(pipe, ip_adapter_image_embeds=adapter.embeds(percentiles={n: 0.05 for n in NAMES}))
    assert (high - low).abs().max() > 1e-3
    top = adapter.embeds(percentiles={n: 0.95 for n in NAMES})
    pipe.set_ip_adapter_scale(0.0)
    assert torch.equal(generate(pipe, ip_adapter_image_embeds=top), base)
    pipe.set_ip_adapter_scale(1.0)
    assert torch.equal(generate(pipe, ip_adapter_image_embeds=top), high)
    processors = {k: v for k, v in pipe.unet.attn_processors.items() if k.endswith("attn1.processor")}
    adapter.detach(pipe)
    assert torch.equal(generate(pipe), base)
    assert pipe.unet.encoder_hid_proj is None and pipe.unet.config.encoder_hid_dim_type is None
    assert all(pipe.unet.attn_processors[k] is v for k, v in processors.items())  # self-attention untouched
    assert "encoder_hid_dim_type" not in pipe.unet.config or pipe.unet.config["encoder_hid_dim_type"] is None


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_per_image_targets_in_one_batch_equal_one_at_a_time(kind):
    pipe, adapter = make(kind)
    adapter.attach(pipe)
    targets = [0.1, 0.5, 0.9]
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    batched = generate(pipe, latents, ip_adapter_image_embeds=adapter.embeds(
        percentiles={NAMES[0]: targets, NAMES[1]: [0.5, 0.5, 0.5]}))
    singles = torch.cat([generate(pipe, latents[i:i + 1], ip_adapter_image_embeds=adapter.embeds(
        percentiles={NAMES[0]: t, NAMES[1]: 0.5})) for i, t in enumerate(targets)])
    torch.testing.assert_close(batched, singles, atol=2e-5, rtol=0)
    assert (singles[0] - singles[2]).abs().max() > 1e-3  # the test can tell the targets apart


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_save_load_and_diffusers_own_loader_give_identical_images(kind, tmp_path):
    pipe, adapter = make(kind)
    adapter.attach(pipe)
    embeds = adapter.embeds(scores={NAMES[0]: 0.7, NAMES[1]: -4.0}, negative="invert")
    reference = generate(pipe, ip_adapter_image_embeds=embeds, guidance_scale=5.0)
    adapter.save_pretrained(tmp_path)
    adapter.detach(pipe)
    payload = json.loads((tmp_path / "config.json").read_text())
    assert payload["diffusers_layout"] == "diffusers/ip_adapter.safetensors"

    loaded = IQAAdapter.from_pretrained(tmp_path).attach(pipe)
    assert loaded.quantiles.table == adapter.quantiles.table
    reloaded_embeds = loaded.embeds(scores={NAMES[0]: 0.7, NAMES[1]: -4.0}, negative="invert")
    torch.testing.assert_close(reloaded_embeds[0], embeds[0], atol=0, rtol=0)
    assert torch.equal(generate(pipe, ip_adapter_image_embeds=reloaded_embeds, guidance_scale=5.0), reference)
    loaded.detach(pipe)

    pipe.load_ip_adapter(str(tmp_path), subfolder="diffusers", weight_name="ip_adapter.safetensors",
                         image_encoder_folder=None)
    assert torch.equal(generate(pipe, ip_adapter_image_embeds=embeds, guidance_scale=5.0), reference)
    with pytest.raises(InputError, match="unload_ip_adapter"):
        adapter.attach(pipe)  # refuse to stack on an IP-Adapter loaded by diffusers


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_img2img_variants(kind):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    pipe, adapter = make(kind)
    cls = StableDiffusionImg2ImgPipeline if kind == "sd" else StableDiffusionXLImg2ImgPipeline
    img2img = cls(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    image = torch.linspace(0, 1, 3 * 64 * 64).reshape(1, 3, 64, 64)

    def run(**kwargs):
        return img2img("a red house", image=image, strength=0.8, num_inference_steps=4, output_type="pt",
                       generator=torch.Generator().manual_seed(0), **kwargs).images

    base = run()
    adapter.attach(img2img)
    high = run(ip_adapter_image_embeds=adapter.embeds(percentiles={n: 0.95 for n in NAMES}))
    low = run(ip_adapter_image_embeds=adapter.embeds(percentiles={n: 0.05 for n in NAMES}))
    assert (high - low).abs().max() > 1e-3
    adapter.detach(img2img)
    assert torch.equal(run(), base)


def test_embeds_shapes_and_values():
    adapter = IQAAdapter(NAMES, cross_attention_dim=32, quantiles=quantiles())
    one = adapter.embeds(percentiles={NAMES[0]: 0.25, NAMES[1]: 0.75})
    assert isinstance(one, list) and one[0].shape == (2, 1, 3)
    torch.testing.assert_close(one[0][1, 0], torch.tensor([0.25, 0.75, 1.0]))
    torch.testing.assert_close(one[0][0, 0], torch.zeros(3))  # "zero": the dropped condition
    inv = adapter.embeds(percentiles={NAMES[0]: 0.25, NAMES[1]: 0.75}, negative="invert")[0]
    torch.testing.assert_close(inv[0, 0], torch.tensor([0.75, 0.25, 1.0]))
    sweep = adapter.embeds(percentiles={NAMES[0]: torch.linspace(0, 1, 8), NAMES[1]: [0.5] * 8}, do_cfg=False)[0]
    assert sweep.shape == (1, 8, 3)
    # scores= go through the training quantiles: the score at the 30th percentile has rank 0.3
    q = adapter.quantiles
    s = float(q.score_at(NAMES[1], 0.3)[0])
    got = adapter.embeds(scores={NAMES[0]: float(q.score_at(NAMES[0], 0.6)[0]), NAMES[1]: s})[0][1, 0]
    torch.testing.assert_close(got, torch.tensor([0.6, 0.3, 1.0]), atol=1e-6, rtol=0)


def test_quantile_ranks_match_scipy():
    from scipy.stats import percentileofscore

    data = np.random.default_rng(0).normal(size=5000)
    q = ScoreQuantiles.fit({"s": data}, levels=1001)
    points = np.array([-2.0, -0.7, 0.0, 0.3, 1.9])
    expected = np.array([percentileofscore(data, x, kind="mean") / 100 for x in points])
    np.testing.assert_allclose(q.rank("s", points), expected, atol=2e-3)
    np.testing.assert_allclose(q.score_at("s", [0.5]), [np.median(data)], atol=1e-9)


def test_embeds_bad_input():
    adapter = IQAAdapter(NAMES, cross_attention_dim=32, quantiles=quantiles())
    with pytest.raises(InputError, match="did you mean 'pyiqa:topiq_nr'"):
        adapter.embeds(percentiles={"pyiqa:topiq": 0.5, NAMES[1]: 0.5})
    with pytest.raises(InputError, match="no value for \\['niqe-embedded'\\]"):
        adapter.embeds(percentiles={NAMES[0]: 0.5})
    with pytest.raises(InputError, match="outside \\[0, 1\\]"):
        adapter.embeds(percentiles={NAMES[0]: 99, NAMES[1]: 0.5})
    with pytest.raises(InputError, match="outside the training range"):
        adapter.embeds(scores={NAMES[0]: 5.0, NAMES[1]: -4.0})
    with pytest.raises(InputError, match="same number of targets"):
        adapter.embeds(percentiles={NAMES[0]: [0.1, 0.2], NAMES[1]: [0.1, 0.2, 0.3]})
    with pytest.raises(InputError, match="exactly one of"):
        adapter.embeds(scores={NAMES[0]: 0.5, NAMES[1]: -4.0}, percentiles={NAMES[0]: 0.5, NAMES[1]: 0.5})
    with pytest.raises(InputError, match="negative="):
        adapter.embeds(percentiles={NAMES[0]: 0.5, NAMES[1]: 0.5}, negative="opposite")
    with pytest.raises(InputError, match="not a number"):
        adapter.embeds(percentiles={NAMES[0]: "high", NAMES[1]: 0.5})
    with pytest.raises(InputError, match="quantiles"):
        IQAAdapter(NAMES, cross_attention_dim=32).embeds(scores={NAMES[0]: 0.5, NAMES[1]: -4.0})
    for bad in ([], ["a", "a"], "topiq"):
        with pytest.raises(InputError, match="score_names"):
            IQAAdapter(bad, cross_attention_dim=32)
    with pytest.raises(InputError, match="projection"):
        IQAAdapter(NAMES, projection="conv")


def test_pipeline_calls_with_missing_or_misshapen_embeds_get_clear_errors():
    pipe, adapter = make("sd")
    adapter.attach(pipe)
    with pytest.raises(AdapterCallError, match="no image embeddings"):
        generate(pipe)
    one = adapter.embeds(percentiles={n: 0.5 for n in NAMES})[0]  # [2, 1, 3]
    rows = torch.cat([one[:1]] * 2 + [one[1:]] * 2)  # [2B, 1, k]: diffusers would run with 2x the tokens
    with pytest.raises(AdapterCallError, match="cover 8 samples but the U-Net batch has 4"):
        generate(pipe, n=2, ip_adapter_image_embeds=[rows])
    three = adapter.embeds(percentiles={NAMES[0]: [0.1, 0.2, 0.3], NAMES[1]: [0.5] * 3})
    with pytest.raises(AdapterCallError, match="3 per-image targets for a U-Net batch of 4"):
        generate(pipe, n=2, ip_adapter_image_embeds=three)
    with pytest.raises(AdapterCallError, match="embeddings must be"):
        generate(pipe, ip_adapter_image_embeds=[torch.zeros(2, 1, 5)])
    adapter.detach(pipe)
    generate(pipe)  # detached: no embeddings needed


def test_layout_mismatch_names_both_models():
    sd, sdxl = tiny_sd(), tiny_sdxl()
    adapter = IQAAdapter.for_unet(sd.unet, NAMES)
    with pytest.raises(InputError, match=r"built for a U-Net with 6 cross-attention layers.*cross_attention_dim 32; "
                                         r"this U-Net has 12.*cross_attention_dim 64"):
        adapter.attach(sdxl)
    loose = IQAAdapter(NAMES, cross_attention_dim=768)
    with pytest.raises(InputError, match="cross_attention_dim=768.*takes \\[32\\]"):
        loose.attach(sd)
    with pytest.raises(InputError, match="cannot attach"):
        adapter.attach(torch.nn.Linear(2, 2))
    # Cross-attention in the self-attention slot (only_cross_attention): diffusers' IP path feeds it the
    # (text, image tokens) tuple and fails mid-forward with an AttributeError; refused up front instead.
    from diffusers import UNet2DConditionModel

    odd = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4,
                               out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                               norm_num_groups=8, only_cross_attention=True)
    with pytest.raises(InputError, match="attn1; built with only_cross_attention=True"):
        IQAAdapter.for_unet(odd, NAMES)
    with pytest.raises(InputError, match="only_cross_attention=True"):
        adapter.attach(odd)


def test_only_adapter_parameters_get_gradients_with_and_without_lora():
    from peft import LoraConfig

    from qualityguide.adapter.training import AdapterTrainer

    for lora in (None, "before", "after"):
        pipe = tiny_sd()
        lora_config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        if lora == "before":
            pipe.unet.add_adapter(lora_config)
        adapter = IQAAdapter.for_unet(pipe.unet, NAMES, quantiles=quantiles()).attach(pipe, dtype=torch.float32)
        if lora == "after":
            pipe.unet.add_adapter(lora_config)  # peft freezes everything it did not add, the adapter included
        trainer = AdapterTrainer(adapter, pipe.unet, pipe.scheduler)
        z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        text = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
        cond = adapter.condition(torch.tensor([[0.2, -5.0], [0.9, -3.0]]))
        trainer(z0, text, cond, generator=torch.Generator().manual_seed(2))["loss"].backward()
        mine = {id(p) for p in adapter.parameters()}
        for name, p in pipe.unet.named_parameters():
            if id(p) in mine:
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
            else:
                assert p.grad is None, (lora, name)
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
        if lora:
            assert any("lora" in n for n, _ in pipe.unet.named_parameters())


def test_training_loss_equals_hand_computation_and_one_step_lowers_it():
    from diffusers import DDPMScheduler

    from qualityguide.adapter.training import AdapterTrainer

    pipe = tiny_sd()
    adapter = IQAAdapter.for_unet(pipe.unet, NAMES, quantiles=quantiles()).attach(pipe, dtype=torch.float32)
    trainer = AdapterTrainer(adapter, pipe.unet, pipe.scheduler)
    z0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(4, 77, 32, generator=torch.Generator().manual_seed(1))
    cond = adapter.condition(torch.tensor([[0.1, -11.0], [0.4, -7.0], [0.6, -5.0], [0.9, -3.0]]))
    loss = trainer(z0, text, cond, generator=torch.Generator().manual_seed(7))["loss"]

    g = torch.Generator().manual_seed(7)  # the same draws, in the documented order: timesteps, then noise
    t = torch.randint(0, 1000, (4,), generator=g)
    noise = torch.randn(z0.shape, generator=g)
    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
    noisy = ddpm.add_noise(z0, noise, t)
    with torch.no_grad():
        out = pipe.unet(noisy, t, encoder_hidden_states=text,
                        added_cond_kwargs={"image_embeds": [cond[:, None]]}).sample
    torch.testing.assert_close(loss.detach(), torch.mean((out - noise) ** 2), rtol=1e-5, atol=1e-7)

    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-3, weight_decay=1e-2)
    losses = []
    for _ in range(2):
        opt.zero_grad()
        value = trainer(z0, text, cond, generator=torch.Generator().manual_seed(7))["loss"]
        value.backward()
        opt.step()
        losses.append(value.item())
    assert losses[1] < losses[0]


def test_dropout_masks_frequencies_and_exclusivity():
    from qualityguide.adapter.training import DropoutConfig, dropout_masks

    text, quality = dropout_masks(200_000, DropoutConfig(0.05, 0.01, 0.01), torch.Generator().manual_seed(0))
    both = (text & quality).float().mean()
    assert abs(float(both) - 0.01) < 0.002
    assert abs(float((text & ~quality).float().mean()) - 0.05) < 0.003
    assert abs(float((quality & ~text).float().mean()) - 0.01) < 0.002
    with pytest.raises(InputError, match="exclusive"):
        DropoutConfig(0.6, 0.3, 0.2)
    with pytest.raises(InputError, match="p_text"):
        DropoutConfig(-0.1)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_prompt_encoder_matches_what_the_pipeline_feeds_the_unet(kind):
    from qualityguide.adapter.training import PromptEncoder

    pipe = BUILDERS[kind]()
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    generate(pipe, guidance_scale=5.0)
    handle.remove()
    kw = seen[0]  # [negative, positive] halves under CFG
    enc = PromptEncoder(pipe, resolution=64)
    embeds, extra = enc(["a red house", "a red house"], "cpu", drop=torch.tensor([True, False]))
    torch.testing.assert_close(embeds, kw["encoder_hidden_states"], rtol=0, atol=0)
    if kind == "sdxl":
        for key in ("text_embeds", "time_ids"):
            # batch of 2 here vs 1 there: float summation order differs by ~1e-7
            torch.testing.assert_close(extra[key], kw["added_cond_kwargs"][key].to(extra[key].dtype), rtol=0, atol=1e-6)


def test_reference_adapter_round_trip_and_per_reference_targets(tmp_path):
    pipe = tiny_sd()
    adapter = trained_like(ReferenceIQAAdapter.for_unet(pipe.unet, "brisque"))
    g = torch.Generator().manual_seed(0)
    sharp = torch.rand(1, 3, 96, 96, generator=g)
    blurred = torch.nn.functional.avg_pool2d(sharp, 5, stride=1, padding=2)
    feats = adapter.features(torch.cat([sharp, blurred]))
    assert feats.shape == (2, adapter.config.feature_dim)
    adapter.fit_feature_stats(torch.cat([feats, feats + 1]))
    adapter.attach(pipe)
    embeds = adapter.embeds_from_reference(torch.cat([sharp, blurred]))
    assert embeds[0].shape == (2, 2, adapter.input_dim)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)).repeat(2, 1, 1, 1)
    both = generate(pipe, latents, ip_adapter_image_embeds=embeds)
    assert (both[0] - both[1]).abs().max() > 1e-3
    adapter.save_pretrained(tmp_path)
    adapter.detach(pipe)
    loaded = ReferenceIQAAdapter.from_pretrained(tmp_path).attach(pipe)
    torch.testing.assert_close(loaded.feature_std, adapter.feature_std)
    assert torch.equal(generate(pipe, latents, ip_adapter_image_embeds=loaded.embeds_from_reference(
        torch.cat([sharp, blurred]))), both)
    with pytest.raises(InputError, match="ReferenceIQAAdapter.from_pretrained"):
        IQAAdapter.from_pretrained(tmp_path)


def textured(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A smooth random texture [1,3,H,W] in [0,1] (blurred noise): local statistics a BRISQUE vector can see."""
    noise = torch.rand(1, 3, height + 4, width + 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.avg_pool2d(noise, 5, stride=1)


def pil_resized(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear, antialiased resize of [1,3,H,W] by Pillow on float channels: independent of torch's resampling."""
    from PIL import Image

    return torch.stack([torch.from_numpy(np.array(Image.fromarray(c.numpy(), mode="F").resize(
        (width, height), Image.BILINEAR))) for c in image[0]])[None].clamp(0, 1)


def reference_adapter(resolution: int | None) -> ReferenceIQAAdapter:
    adapter = ReferenceIQAAdapter("brisque", num_tokens=4, cross_attention_dim=16,
                                  layers=[["down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor", 8, 16]])
    feats = adapter.features(torch.cat([textured(48, 48, seed) for seed in range(4)]))
    adapter.fit_feature_stats(feats, resolution=resolution)
    return adapter


def reference_features(adapter: ReferenceIQAAdapter, images: torch.Tensor) -> torch.Tensor:
    """The raw features ``embeds_from_reference`` used, recovered from its (standardised) positive half."""
    positive = adapter.embeds_from_reference(images, do_cfg=False)[0][0, :, :-1]
    return positive * adapter.feature_std + adapter.feature_mean


def test_reference_at_twice_the_training_size_gives_the_features_at_training_size():
    """BRISQUE statistics depend on scale: a reference is brought to the training images' side first, with their
    transform (short side resized, centre crop)."""
    adapter = reference_adapter(resolution=48)
    assert adapter.feature_resolution == 48
    large = textured(96, 128, seed=7)  # short side 2 x 48, landscape
    # independently: Pillow resizes to 48 x 64, then the centre 48 columns (from 8) are kept
    expected = adapter.psi(pil_resized(large, 48, 64)[..., 8:56])
    torch.testing.assert_close(reference_features(adapter, large)[0], expected[0], rtol=1e-3, atol=1e-3)
    # the scale matters: the same texture's features at its own size are far from those at the training size
    raw = adapter.psi(large)
    assert (raw - expected).abs().max() > 50 * 1e-3, (raw, expected)
    # a reference already at the training size is used as it is
    small = textured(48, 48, seed=8)
    torch.testing.assert_close(reference_features(adapter, small), adapter.psi(small), rtol=1e-4, atol=1e-4)


def test_reference_scale_is_saved_and_old_adapters_keep_their_behaviour(tmp_path):
    adapter = reference_adapter(resolution=48)
    adapter.save_pretrained(tmp_path / "new")
    loaded = ReferenceIQAAdapter.from_pretrained(tmp_path / "new")
    assert loaded.feature_resolution == 48
    large = textured(96, 96, seed=3)
    torch.testing.assert_close(loaded.embeds_from_reference(large)[0], adapter.embeds_from_reference(large)[0])
    # an adapter saved before the scale was recorded: config.json without the key; it loads, and uses references
    # at their own size, as it always did
    adapter.save_pretrained(tmp_path / "old")
    config = tmp_path / "old" / "config.json"
    payload = json.loads(config.read_text())
    del payload["feature_resolution"]
    config.write_text(json.dumps(payload))
    old = ReferenceIQAAdapter.from_pretrained(tmp_path / "old")
    assert old.feature_resolution is None
    torch.testing.assert_close(reference_features(old, large), old.psi(large), rtol=1e-4, atol=1e-4)
    # fitted without a resolution: the same as before too, and saved as such
    unscaled = reference_adapter(resolution=None)
    torch.testing.assert_close(reference_features(unscaled, large), unscaled.psi(large), rtol=1e-4, atol=1e-4)
    assert ReferenceIQAAdapter.from_pretrained(unscaled.save_pretrained(tmp_path / "none")).feature_resolution is None


@pytest.mark.parametrize("value", ["48", 0, 4.5, True])
def test_a_bad_saved_reference_scale_is_refused_naming_it(tmp_path, value):
    reference_adapter(resolution=48).save_pretrained(tmp_path)
    config = tmp_path / "config.json"
    payload = json.loads(config.read_text())
    payload["feature_resolution"] = value
    config.write_text(json.dumps(payload))
    before = config.read_bytes()
    with pytest.raises(InputError, match=f"feature_resolution {value!r}: must be a whole number >= 1"):
        ReferenceIQAAdapter.from_pretrained(tmp_path)
    assert config.read_bytes() == before
    with pytest.raises(InputError, match="resolution 0: must be a whole number >= 1"):
        reference_adapter(resolution=0)


def test_mlp_and_other_token_counts_save_without_the_diffusers_layout(tmp_path):
    pipe = tiny_sd()
    adapter = trained_like(IQAAdapter.for_unet(pipe.unet, NAMES, num_tokens=2, projection="mlp", hidden_dim=16))
    adapter.attach(pipe)
    embeds = adapter.embeds(percentiles={n: 0.8 for n in NAMES})
    reference = generate(pipe, ip_adapter_image_embeds=embeds)
    adapter.save_pretrained(tmp_path)
    adapter.detach(pipe)
    payload = json.loads((tmp_path / "config.json").read_text())
    assert payload["diffusers_layout"] is None and "4 tokens" in payload["diffusers_layout_absent"]
    assert not (tmp_path / "diffusers").exists()
    loaded = IQAAdapter.from_pretrained(tmp_path).attach(pipe)
    assert torch.equal(generate(pipe, ip_adapter_image_embeds=embeds), reference)
    loaded.detach(pipe)


def test_save_and_load_refuse_foreign_folders(tmp_path):
    adapter = IQAAdapter.for_unet(tiny_sd().unet, NAMES)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(InputError, match="not written by an IQA-Adapter"):
        adapter.save_pretrained(tmp_path)
    with pytest.raises(InputError, match="not written by an IQA-Adapter"):
        IQAAdapter.from_pretrained(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        IQAAdapter.from_pretrained(tmp_path / "nowhere")
    good = tmp_path / "good"
    adapter.save_pretrained(good)
    from safetensors.torch import load_file, save_file

    state = load_file(str(good / "model.safetensors"))
    state.pop(next(iter(state)))
    save_file(state, str(good / "model.safetensors"))
    with pytest.raises(InputError, match="does not match its config.json"):
        IQAAdapter.from_pretrained(good)


def test_hub_id_offline_gives_a_one_line_error(monkeypatch):
    from qualityguide.errors import WeightsNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="HF_HUB_OFFLINE is set"):
        IQAAdapter.from_pretrained("someone/iqa-adapter-sd15")


def test_dropped_rows_get_the_null_condition_and_kept_rows_stay_untouched():
    from qualityguide.adapter.training import AdapterTrainer, DropoutConfig, dropout_masks

    config = DropoutConfig(p_text=0.2, p_quality=0.3, p_both=0.1)
    text, quality = dropout_masks(8, config, torch.Generator().manual_seed(3))
    u = torch.rand(8, generator=torch.Generator().manual_seed(3))  # the one uniform draw per row, by hand
    assert text.tolist() == [x < 0.1 or 0.1 <= x < 0.3 for x in u.tolist()]
    assert quality.tolist() == [x < 0.1 or 0.3 <= x < 0.6 for x in u.tolist()]
    assert quality.any() and not quality.all() and (text & quality).any() and (text ^ quality).any()

    pipe = tiny_sd()
    adapter = IQAAdapter.for_unet(pipe.unet, NAMES, quantiles=quantiles()).attach(pipe, dtype=torch.float32)
    trainer = AdapterTrainer(adapter, pipe.unet, pipe.scheduler)
    z0 = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    words = torch.randn(8, 77, 32, generator=torch.Generator().manual_seed(1))
    cond = adapter.condition(torch.stack([torch.linspace(0.1, 0.9, 8), torch.linspace(-11, -3, 8)], 1))
    seen = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["added_cond_kwargs"]["image_embeds"][0][:, 0].clone()), with_kwargs=True)
    loss = trainer(z0, words, cond, drop_quality=quality, generator=torch.Generator().manual_seed(2))["loss"]
    by_hand = cond.clone()
    by_hand[quality] = 0.0  # the null input: all zeros, presence flag 0
    reference = trainer(z0, words, by_hand, generator=torch.Generator().manual_seed(2))["loss"]
    handle.remove()
    assert torch.equal(seen[0], by_hand), (seen[0], by_hand)
    assert torch.equal(seen[0][~quality], cond[~quality]) and (cond[quality] != 0).any(dim=1).all()
    assert torch.equal(loss, reference)


def test_quantiles_are_fitted_from_each_score_column_alone():
    g = torch.Generator().manual_seed(4)
    columns = {"a": torch.rand(300, generator=g), "b": 50 + 20 * torch.randn(300, generator=g) ** 3}
    fitted = ScoreQuantiles.fit(columns, levels=11)
    assert fitted.names == ["a", "b"] and fitted.count == 300
    for name, values in columns.items():
        expected = np.quantile(values.double().numpy(), np.linspace(0, 1, 11))
        np.testing.assert_allclose(fitted.table[name], expected, rtol=0, atol=0, err_msg=name)
    assert fitted.table["a"] != fitted.table["b"]


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_ip_key_and_value_weights_start_as_each_layers_own_key_and_value(kind):
    """IP-Adapter's initialisation: every layer's ``to_k_ip``/``to_v_ip`` is a bitwise copy of that layer's
    ``to_k``/``to_v`` (not another layer's, not random), both when built for a U-Net and when attached later."""
    pipe = BUILDERS[kind]()
    built = IQAAdapter.for_unet(pipe.unet, NAMES)
    late = IQAAdapter(NAMES, cross_attention_dim=pipe.unet.config.cross_attention_dim)
    late.attach(pipe.unet, dtype=torch.float32)
    assert built.config.layers == late.config.layers and len(built.layers) == len(late.layers) > 1
    for adapter in (built, late):
        for (name, _, _), proc in zip(adapter.config.layers, adapter.layers):
            attn = pipe.unet.get_submodule(name[: -len(".processor")])
            assert torch.equal(proc.to_k_ip[0].weight, attn.to_k.weight), f"{name} to_k_ip"
            assert torch.equal(proc.to_v_ip[0].weight, attn.to_v.weight), f"{name} to_v_ip"
