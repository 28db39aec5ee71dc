"""The library pieces of the ACPO recipe: self samples, LoRA preparation, training samples, LoRA-only checkpoints,
validation, and the checks that refuse settings before training. Compared with independent computations: the
pipeline called directly with the documented seeds, the VAE encoder and text encoder called by hand, a hand-made
grid."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from qualityguide.diffusion import encode_images
from qualityguide.errors import InputError
from qualityguide.finetune import ACPOConfig, lora_parameters
from qualityguide.finetune.training import (BASE_IDENTITY_NAME, LORA_STATE_NAME, LoraCheckpointing, TrainingSamples,
                                            caption_dropout, check_scorer, make_optimizer, prepare_lora_unet)
from qualityguide.finetune.validation import ValidationSettings, run_validation
from qualityguide.images import make_grid
from qualityguide.train.run import identity_difference
from qualityguide.train.setup import check_mixed_precision, check_report_to
from qualityguide.identity import WeightIdentity, WeightsMismatchError
from qualityguide.testing import tiny_ddpm, tiny_sd, tiny_sdxl
from qualityguide.train import CheckpointManager, PromptEncoder, step_generator
from qualityguide.train import self_samples as ss
from qualityguide.train.self_samples import SelfSampleSettings, read_prompts

from helpers import Brightness, Frozen

PROMPTS = ["a red apple", "a blue car, at night", "sea"]


@pytest.fixture(scope="module")
def sd():
    return tiny_sd()


def settings_for(pipe, prompts=PROMPTS, num=5, resolution=32, steps=2, seed=3):
    return SelfSampleSettings.for_pipeline(pipe, prompts, num, resolution, steps, 5.0, seed, model="tiny:sd")


def png_of(image):
    return (image.permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ self samples
def test_self_samples_are_the_pipelines_images_for_their_seeds(sd, tmp_path):
    settings = settings_for(sd)
    folder = tmp_path / "self"
    assert ss.generate_self_samples(sd, settings, folder, batch_size=2, progress=False) == 5
    for i in (0, 4):  # prompt i % 3, seed derived from (seed, i), called directly
        expected = sd(PROMPTS[i % 3], height=32, width=32, num_inference_steps=2, guidance_scale=5.0,
                      generator=torch.Generator().manual_seed(ss.derive_seed("qualityguide.self_sample", 3, i)),
                      output_type="pt").images[0]
        stored = np.asarray(Image.open(folder / f"{i:06d}.png"))
        assert np.abs(stored.astype(int) - png_of(expected).astype(int)).max() <= 1
    dataset = ss.load_self_samples(sd, settings, folder, progress=False)
    assert dataset.captions == [PROMPTS[i % 3] for i in range(5)] and len(dataset) == 5
    assert dataset.resolution == 32
    manifest = json.loads((folder / ss.MANIFEST).read_text())
    assert manifest["prompts"] == PROMPTS and manifest["num_inference_steps"] == 2
    assert manifest["scheduler"]["class"] == "DDIMScheduler"


def test_self_samples_resume_after_a_kill_and_match_an_uninterrupted_run(sd, tmp_path, monkeypatch):
    settings = settings_for(sd)
    whole = tmp_path / "whole"
    ss.generate_self_samples(sd, settings, whole, batch_size=2, progress=False)

    real, calls = ss.sample_images, []

    def killed_on_second_batch(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    part = tmp_path / "part"
    monkeypatch.setattr(ss, "sample_images", killed_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        ss.generate_self_samples(sd, settings, part, batch_size=2, progress=False)
    monkeypatch.setattr(ss, "sample_images", real)
    assert sorted(p.name for p in part.glob("*.png")) == ["000000.png", "000001.png"]
    with pytest.raises(InputError, match="3 of 5 images are missing"):
        ss.load_self_samples(sd, settings, part, progress=False)
    (part / ".000002.png.tmp-99").write_bytes(b"half")  # a kill during a write
    before = (part / "000000.png").stat().st_mtime_ns
    assert ss.generate_self_samples(sd, settings, part, batch_size=2, progress=False) == 3  # only the rest
    assert (part / "000000.png").stat().st_mtime_ns == before and not list(part.glob(".*tmp*"))
    for i in range(5):
        assert np.array_equal(np.asarray(Image.open(part / f"{i:06d}.png")),
                              np.asarray(Image.open(whole / f"{i:06d}.png")))


def test_self_sample_cache_refuses_other_settings_and_weights(sd, tmp_path):
    folder = tmp_path / "self"
    settings = settings_for(sd, num=2)
    ss.generate_self_samples(sd, settings, folder, progress=False)
    for changed, field in ((settings_for(sd, prompts=["another"], num=2), "prompts"),
                           (settings_for(sd, num=2, resolution=64), "resolution"),
                           (settings_for(sd, num=3), "num_samples"),
                           (settings_for(sd, num=2, steps=3), "num_inference_steps")):
        with pytest.raises(InputError, match=f"generated with {field}=.*this run has {field}="):
            ss.generate_self_samples(sd, changed, folder, progress=False)
    with pytest.raises(WeightsMismatchError, match="generated by other weights"):
        ss.generate_self_samples(tiny_sd(seed=1), settings, folder, progress=False)
    assert sorted(p.name for p in folder.glob("*.png")) == ["000000.png", "000001.png"]  # nothing overwritten
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a self-sample cache"):
        ss.open_self_samples(sd, settings, other)


def test_unconditional_self_samples_and_prompt_rules(tmp_path):
    ddpm = tiny_ddpm()
    with pytest.raises(InputError, match="unconditional"):
        SelfSampleSettings.for_pipeline(ddpm, PROMPTS, 2, 32, 2, 1.0, 0)
    with pytest.raises(InputError, match="prompted"):
        SelfSampleSettings.for_pipeline(tiny_sd(), None, 2, 32, 2, 1.0, 0)
    settings = SelfSampleSettings.for_pipeline(ddpm, None, 2, 32, 2, 7.5, 0)
    ss.generate_self_samples(ddpm, settings, tmp_path / "u", progress=False)
    seed = ss.derive_seed("qualityguide.self_sample", 0, 1)
    expected = ddpm(batch_size=1, generator=torch.Generator().manual_seed(seed), num_inference_steps=2,
                    output_type="pt").images[0]
    stored = np.asarray(Image.open(tmp_path / "u" / "000001.png")).astype(int)
    assert np.abs(stored - png_of(expected).astype(int)).max() <= 1
    dataset = ss.load_self_samples(ddpm, settings, tmp_path / "u", progress=False)
    assert dataset.captions is None
    with pytest.raises(InputError, match="use --resolution 32"):
        ss.generate_self_samples(ddpm, SelfSampleSettings.for_pipeline(ddpm, None, 2, 64, 2, 1.0, 0), tmp_path / "v",
                                 progress=False)


def test_read_prompts(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("  one \n\n two\n", encoding="utf-8")
    assert read_prompts(path) == ["one", "two"]
    with pytest.raises(InputError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(InputError, match="holds no prompt"):
        read_prompts(tmp_path / "empty.txt")
    (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin1"))
    with pytest.raises(InputError, match="not UTF-8"):
        read_prompts(tmp_path / "latin.txt")



def test_read_prompts_refuses_an_absurd_line_by_its_number(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("one\n\n" + "x" * ss.MAX_PROMPT_CHARS + "\n" + "y" * (ss.MAX_PROMPT_CHARS + 1) + "\n",
                    encoding="utf-8")
    with pytest.raises(InputError, match=rf"p.txt, line 4: {ss.MAX_PROMPT_CHARS + 1} characters, more than "
                                         rf"{ss.MAX_PROMPT_CHARS}") as info:
        read_prompts(path)
    assert len(str(info.value)) < 500  # the line itself is not repeated
    path.write_text("one\n" + "x" * ss.MAX_PROMPT_CHARS + "\n", encoding="utf-8")
    assert [len(p) for p in read_prompts(path)] == [3, ss.MAX_PROMPT_CHARS]


def test_long_prompts_are_counted_once_and_diffusers_stops_repeating_them(sd, capfd):
    from qualityguide.train import long_prompts_note

    long = "a lighthouse on a cliff " * 40  # far over 77 tokens
    assert long_prompts_note(sd, ["a red apple", "a blue car"]) is None
    note = long_prompts_note(sd, ["a red apple", long, long])
    assert note.startswith("note: 1 of 2 distinct prompts are longer than the tokenizer's maximum of 77 tokens")
    capfd.readouterr()
    for _ in range(3):
        PromptEncoder(sd, 32)([long, "a red apple"], "cpu")
    assert "truncated" not in capfd.readouterr().err
    import logging

    logger = logging.getLogger(type(sd).__module__)
    assert sum(type(f).__name__ == "_DropTruncationWarning" for f in logger.filters) == 1  # installed once
    other = logging.LogRecord(logger.name, logging.WARNING, "", 0, "another warning", None, None)
    assert logger.filter(other)  # other diffusers warnings still pass


# ------------------------------------------------------------------------------------------------ LoRA and data
def test_prepare_lora_unet_is_seeded_float32_and_checks_targets(sd):
    a, b = copy.deepcopy(sd.unet).to(torch.bfloat16), copy.deepcopy(sd.unet).to(torch.bfloat16)
    state = torch.random.get_rng_state()
    config = prepare_lora_unet(a, rank=2, alpha=4, target_modules=["to_q", "to_v"], gradient_checkpointing=True,
                               seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    prepare_lora_unet(b, rank=2, alpha=4, target_modules=["to_q", "to_v"], seed=5)
    pa, pb = lora_parameters(a), lora_parameters(b)
    assert all(torch.equal(x, y) for x, y in zip(pa, pb)) and all(p.dtype == torch.float32 for p in pa)
    assert {n for n, p in a.named_parameters() if p.requires_grad} == {n for n, _ in a.named_parameters()
                                                                       if "lora_" in n}
    assert a.is_gradient_checkpointing and not b.is_gradient_checkpointing
    assert config.r == 2 and config.lora_alpha == 4 and set(config.target_modules) == {"to_q", "to_v"}
    with pytest.raises(InputError, match=r"\['to_qq'\] match no module.*Did you mean 'to_q'"):
        prepare_lora_unet(copy.deepcopy(sd.unet), target_modules=["to_q", "to_qq"])


def test_training_samples_equal_direct_encoding_and_prompt_embeddings(sd, tmp_path):
    settings = settings_for(sd, num=3)
    folder = tmp_path / "self"
    ss.generate_self_samples(sd, settings, folder, progress=False)
    dataset = ss.load_self_samples(sd, settings, folder, progress=False)
    samples = TrainingSamples.encode(sd, dataset, tmp_path / "latents", "self_samples", progress=False)
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(folder / f"{i:06d}.png"), dtype=np.float32) / 255)
                          .permute(2, 0, 1) for i in range(3)])
    with torch.no_grad():
        direct = encode_images(sd.vae, pixels)
    assert torch.allclose(samples.batch([2, 0], "cpu"), direct[[2, 0]], atol=1e-5)
    assert samples.identity["source"] == "self_samples" and samples.identity["count"] == 3
    cond = samples.conditioning([1, 2], PromptEncoder(sd, 32), "cpu")
    expected, _ = sd.encode_prompt([PROMPTS[1], PROMPTS[2]], "cpu", 1, False)
    assert set(cond) == {"encoder_hidden_states"} and torch.equal(cond["encoder_hidden_states"], expected)

    ddpm = tiny_ddpm()
    pixel_settings = SelfSampleSettings.for_pipeline(ddpm, None, 2, 32, 2, 1.0, 0)
    ss.generate_self_samples(ddpm, pixel_settings, tmp_path / "pix", progress=False)
    pixel_data = ss.load_self_samples(ddpm, pixel_settings, tmp_path / "pix", progress=False)
    pixel_samples = TrainingSamples.encode(ddpm, pixel_data, tmp_path / "unused", "self_samples", progress=False)
    assert torch.equal(pixel_samples.batch([1], "cpu")[0], pixel_data.get(1)["pixels"] * 2 - 1)
    assert pixel_samples.captions is None and pixel_samples.conditioning([0], None, "cpu") is None
    assert not (tmp_path / "unused").exists()


def test_caption_dropout_rows_get_the_empty_prompt_and_the_others_their_caption(sd):
    captions = ["a red apple", "a blue car, at night", "sea", "a dog on a beach", "fog", "two cups"]
    samples = TrainingSamples(torch.zeros(len(captions), 4, 4, 4), captions, {})
    drop = caption_dropout(6, 0.5, step_generator(0, 11))
    assert torch.equal(drop, torch.rand(6, generator=step_generator(0, 11)) < 0.5)  # one draw per sample, in order
    assert 0 < int(drop.sum()) < 6  # this step drops some rows and keeps others
    index = [5, 0, 3, 1, 4, 2]
    cond = samples.conditioning(index, PromptEncoder(sd, 32), "cpu", drop)["encoder_hidden_states"]
    empty, _ = sd.encode_prompt([""], "cpu", 1, False)
    for row, i in enumerate(index):
        expected = empty[0] if drop[row] else sd.encode_prompt([captions[i]], "cpu", 1, False)[0][0]
        torch.testing.assert_close(cond[row], expected, rtol=0, atol=1e-6)
    undropped = samples.conditioning(index, PromptEncoder(sd, 32), "cpu", torch.zeros(6, dtype=torch.bool))
    torch.testing.assert_close(undropped["encoder_hidden_states"][~drop], cond[~drop], rtol=0, atol=0)

    xl = tiny_sdxl()  # SDXL's pipeline forces zeros for the empty prompt: the unconditional input CFG uses there
    xl_samples = TrainingSamples(torch.zeros(2, 4, 4, 4), captions[:2], {})
    cond = xl_samples.conditioning([0, 1], PromptEncoder(xl, 32), "cpu", torch.tensor([True, False]))
    plain = xl_samples.conditioning([0, 1], PromptEncoder(xl, 32), "cpu")
    assert not cond["encoder_hidden_states"][0].any() and not cond["added_cond_kwargs"]["text_embeds"][0].any()
    assert torch.equal(cond["encoder_hidden_states"][1], plain["encoder_hidden_states"][1])
    assert torch.equal(cond["added_cond_kwargs"]["time_ids"], plain["added_cond_kwargs"]["time_ids"])


def test_caption_dropout_share_and_bad_values():
    steps, p = 2000, 0.1
    share = torch.cat([caption_dropout(1, p, step_generator(0, s)) for s in range(steps)]).float().mean().item()
    assert abs(share - p) <= 2 * 3 * (p * (1 - p) / steps) ** 0.5, share  # 2x a 3-sigma binomial tolerance
    assert not caption_dropout(64, 0.0, step_generator(0, 0)).any() and caption_dropout(64, 1.0).all()
    for bad in (1.5, -0.1, float("nan"), True, "0.1"):
        with pytest.raises(InputError, match="--caption_dropout .*share in \\[0, 1\\]"):
            caption_dropout(4, bad)


def test_checkpoints_hold_only_the_lora_and_restore_it(sd, tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        unet = copy.deepcopy(sd.unet)
        identity = WeightIdentity.of({"unet": unet})
        prepare_lora_unet(unet, rank=2, seed=0)
        accelerator = Accelerator(cpu=True)
        optimizer = make_optimizer(lora_parameters(unet), 1e-3)
        LoraCheckpointing(unet, identity).register(accelerator)
        prepared, optimizer = accelerator.prepare(unet, optimizer)
        for p in lora_parameters(unet):
            p.grad = torch.ones_like(p)
        optimizer.step()
        saved = [p.detach().clone() for p in lora_parameters(unet)]
        manager = CheckpointManager(tmp_path)
        path = manager.save(accelerator, 1)
        names = sorted(p.name for p in path.iterdir())
        assert LORA_STATE_NAME in names and BASE_IDENTITY_NAME in names
        assert not [n for n in names if n.startswith(("model", "pytorch_model"))]  # no whole U-Net
        assert (path / LORA_STATE_NAME).stat().st_size < 200_000
        with torch.no_grad():
            for p in lora_parameters(unet):
                p.add_(1.0)
        manager.load(accelerator, path)
        assert all(torch.equal(p, q) for p, q in zip(lora_parameters(unet), saved))
        LoraCheckpointing.check_base(path, sd.unet)  # the base weights: accepted
        with pytest.raises(WeightsMismatchError, match="another base U-Net"):
            LoraCheckpointing.check_base(path, tiny_sd(seed=1).unet)
        del prepared
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


# ------------------------------------------------------------------------------------------------ validation
def test_validation_grid_and_scores_match_direct_calls(sd, tmp_path):
    settings = ValidationSettings("a lighthouse", num_images=3, resolution=32, num_inference_steps=2,
                                  guidance_scale=3.0, seed=7)
    values = run_validation(sd, settings, 4, tmp_path, scorer=Brightness())
    direct = torch.cat([sd("a lighthouse", height=32, width=32, num_inference_steps=2, guidance_scale=3.0,
                           generator=torch.Generator().manual_seed(s), output_type="pt").images
                        for s in settings.seeds()])
    grid = np.asarray(Image.open(tmp_path / "validation" / "step-4" / "grid.png"))
    assert grid.shape == (64, 64, 3)  # 3 images in a 2x2 grid, the fourth cell black
    assert np.abs(grid[:32, 32:].astype(int) - png_of(direct[1]).astype(int)).max() <= 1
    assert np.abs(grid[32:, :32].astype(int) - png_of(direct[2]).astype(int)).max() <= 1
    assert (grid[32:, 32:] == 0).all()
    record = json.loads((tmp_path / "validation" / "step-4" / "scores.json").read_text())
    assert np.allclose(record["scores"], direct.mean((1, 2, 3)).tolist(), atol=1e-5)
    assert values["validation/quality"] == pytest.approx(float(direct.mean()), abs=1e-5)


def test_make_grid_layout():
    images = torch.stack([torch.full((3, 2, 2), v) for v in (0.0, 0.5, 1.0, 0.25, 0.75)])
    grid = np.asarray(make_grid(images, columns=2))
    assert grid.shape == (6, 4, 3)
    assert grid[0, 2, 0] == 128 and grid[2, 0, 0] == 255 and grid[4, 1, 0] == 191 and grid[4, 3, 0] == 0


# ------------------------------------------------------------------------------------------------ checks
def test_settings_that_cannot_work_are_refused_first():
    with pytest.raises(InputError, match="fp16 on a CPU"):
        check_mixed_precision("fp16", "cpu")
    assert check_mixed_precision("bf16", "cpu") is torch.bfloat16 and check_mixed_precision("no", "cpu") is None
    with pytest.raises(InputError, match="not differentiable"):
        check_scorer(Frozen(), ACPOConfig(w_quality=0.5))
    check_scorer(Frozen(), ACPOConfig(w_quality=0.0))
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(InputError, match="needs a CUDA device"):
        make_optimizer(params, 1e-4, use_8bit_adam=True, device="cpu")
    with pytest.raises(InputError, match="learning_rate"):
        make_optimizer(params, 0.0)
    assert isinstance(make_optimizer(params, 1e-4), torch.optim.AdamW)


def test_a_scorer_too_large_for_the_images_suggests_spec_at_size():
    class Big(Brightness):
        name, min_side = "niqe-embedded", 192

    with pytest.raises(InputError, match="needs images of at least 192 px.*SPEC@SIZE: --scorer niqe-embedded@192") \
            as info:
        check_scorer(Big(), ACPOConfig(), 32)
    assert "--scorer_size" not in str(info.value)  # removed: @SIZE is the one way to ask for a size


def test_report_to_trackers_are_checked():
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    assert check_report_to("none") is None
    assert check_report_to(None) == (["tensorboard"] if "tensorboard" in available else None)
    assert check_report_to("tensorboard") == ["tensorboard"]
    with pytest.raises(InputError, match="Did you mean 'tensorboard'"):
        check_report_to("tensorbord")
    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    missing = sorted(set(LOGGER_TYPE_TO_CLASS) - available)
    if missing:
        with pytest.raises(InputError, match=f"the {missing[0]} package is not installed"):
            check_report_to(missing[0])


def test_identity_difference_names_the_field():
    current = {"lora": {"rank": 4}, "acpo": {"w_anchor": 1.0}}
    assert identity_difference(current, current) is None
    assert identity_difference({"lora": {"rank": 8}, "acpo": {"w_anchor": 1.0}}, current).startswith("lora=")
    assert identity_difference(None, current).startswith("lora=null there")
