"""Validation grids and the held-out guard: ACPO's labelled base-vs-tuned grid with each image's scores, the
testing: scorer pair, the guard's warning, and which checkpoint --keep_best held_out spares."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from PIL import Image

from qualityguide import load_scorer
from qualityguide.finetune import add_lora
from qualityguide.finetune.validation import ACPOValidation, ValidationSettings, validation_images
from qualityguide.testing import tiny_sd
from qualityguide.train.checkpoints import FORMAT, MARKER, CheckpointManager
from qualityguide.train.held_out import (HeldOutGuard, KeepBestCheckpoint, RewardHackingWarning, best_of,
                                         checkpoint_validations, held_out_key, validated_checkpoints,
                                         validation_values)

SETTINGS = ValidationSettings("a red apple", num_images=2, resolution=32, num_inference_steps=2, seed=3)


def test_testing_scorers_are_known_by_hand():
    images = torch.rand(3, 3, 16, 16)
    bright, dark = load_scorer("testing:brightness"), load_scorer("testing:darkness")
    assert torch.allclose(bright(images), images.mean((1, 2, 3)))
    assert torch.allclose(dark(images), -images.mean((1, 2, 3)))
    assert bright.name == "testing:brightness" and dark.name == "testing:darkness"
    with pytest.raises(Exception, match="testing:brightness, testing:darkness"):
        load_scorer("testing:contrast")


def test_values_name_the_held_out_scorers_and_their_gap():
    assert validation_values(2.0, {"niqe": 0.5, "b": 3.0}) == {
        "validation/quality": 2.0, "validation/held_out/niqe": 0.5, "validation/guiding_minus_held_out/niqe": 1.5,
        "validation/held_out/b": 3.0, "validation/guiding_minus_held_out/b": -1.0}
    assert validation_values(None, {"niqe": 0.5}) == {"validation/held_out/niqe": 0.5}


def test_guard_warns_when_guiding_rises_and_held_out_falls_below_its_best():
    guard, key = HeldOutGuard(), held_out_key("niqe")
    assert guard.observe(0, {"validation/quality": 1.0, key: 5.0}) == []
    assert guard.observe(2, {"validation/quality": 2.0, key: 6.0}) == []  # both rise: fine
    assert guard.observe(4, {"validation/quality": 1.5, key: 5.5}) == []  # both fall: not hacking
    found = guard.observe(6, {"validation/quality": 2.5, key: 5.9})  # above step 2's guiding, below its held-out
    assert len(found) == 1 and "step 2" in found[0] and "niqe fell from 6 to 5.9" in found[0]
    assert HeldOutGuard().observe(0, {"validation/quality": 1.0}) == []  # no held-out scorer: nothing to say
    resumed = HeldOutGuard([(4, {"validation/quality": 2.0, key: 5.0})])  # read back from a checkpoint
    resumed.remember(0, {"validation/quality": 1.0, key: 6.0})  # then the base: a reference, never judged
    assert [s for s, _ in resumed.history] == [0, 4]
    assert "since step 0" in resumed.observe(6, {"validation/quality": 2.5, key: 5.5})[0]


def _fake_checkpoint(out, step, values):
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / MARKER).write_text(json.dumps({"format": FORMAT, "step": step, "extra": {"validation": values},
                                             "num_processes": 1}))
    return folder


def test_keep_best_spares_the_best_held_out_checkpoint_from_the_total_limit(tmp_path):
    key = held_out_key("testing:darkness")
    for step, value in ((2, -0.4), (4, -0.2), (6, -0.5), (8, float("nan")), (10, -0.3)):
        _fake_checkpoint(tmp_path, step, {key: value} if step != 8 else {})
    assert [s for s, _, _ in validated_checkpoints(tmp_path, key)] == [2, 4, 6, 10]
    assert best_of([(s, p, v) for s, p, v in validated_checkpoints(tmp_path, key)])[0] == 4
    assert best_of([(2, None, 1.0), (4, None, 1.0)])[0] == 2  # equal: the least fine-tuned
    assert [s for s, _ in checkpoint_validations(tmp_path, 6)] == [2, 4, 6]
    manager = CheckpointManager(tmp_path, total_limit=2, keep=KeepBestCheckpoint(tmp_path, key))
    manager._prune()
    assert [s for s, _ in manager.checkpoints()] == [4, 8, 10]  # the 2 newest, and the best beside them
    CheckpointManager(tmp_path, total_limit=2)._prune()
    assert [s for s, _ in CheckpointManager(tmp_path).checkpoints()] == [8, 10]


def test_acpo_grid_holds_base_and_tuned_rows_with_each_images_scores(tmp_path):
    pipe = tiny_sd()
    base_images = validation_images(pipe, SETTINGS)  # the reference: the model before its LoRA
    add_lora(pipe.unet, rank=2, init_lora_weights=False)  # random LoRA weights: the tuned model differs
    tuned_images = validation_images(pipe, SETTINGS)
    assert (tuned_images - base_images).abs().max() > 1e-3
    bright = load_scorer("testing:brightness")
    validate = ACPOValidation(pipe, SETTINGS, tmp_path, bright, {"testing:darkness": load_scorer("testing:darkness")})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RewardHackingWarning)  # a random LoRA moves both scores
        values = validate(5)
    mean = float(tuned_images.mean())
    assert values["validation/quality"] == pytest.approx(mean, abs=1e-6)
    assert values["validation/held_out/testing:darkness"] == pytest.approx(-mean, abs=1e-6)
    assert values["validation/guiding_minus_held_out/testing:darkness"] == pytest.approx(2 * mean, abs=1e-6)
    record = json.loads((tmp_path / "validation" / "step-5" / "scores.json").read_text())
    assert [s["testing:brightness"] for s in record["base_scores"]] == pytest.approx(
        base_images.mean((1, 2, 3)).tolist(), abs=1e-6)
    assert [s["testing:darkness"] for s in record["scores"]] == pytest.approx(
        (-tuned_images.mean((1, 2, 3))).tolist(), abs=1e-6)
    with Image.open(tmp_path / "validation" / "step-5" / "grid.png") as grid:
        assert grid.width > 2 * 32 and grid.height > 2 * 32 + 20  # two rows of two, label bands and captions
        assert len(set(grid.convert("L").getdata())) > 10  # drawn, not blank
        band = grid.convert("L").crop((0, 0, grid.width, 10))  # the column labels ("seed 0", ...) above the images
        assert min(band.getdata()) < 100 < max(band.getdata())  # dark text on a light band: readable
        assert grid.width >= 2 * 160  # 32 px images enlarged so that their captions fit under them


def _perturb(unet, scale):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * scale)


def test_guard_warning_comes_from_the_validation(tmp_path):
    pipe = tiny_sd()
    add_lora(pipe.unet, rank=2)  # zero-initialised: starts as the base model
    base = float(validation_images(pipe, SETTINGS).mean())
    _perturb(pipe.unet, 0.5)
    brighter = float(validation_images(pipe, SETTINGS).mean()) > base
    assert float(validation_images(pipe, SETTINGS).mean()) != pytest.approx(base, abs=1e-4)
    _perturb(pipe.unet, 0.0)
    # guide with the scorer the perturbation raises; hold out its mirror image, which then falls
    guiding, held_out = ("testing:brightness", "testing:darkness") if brighter else ("testing:darkness",
                                                                                        "testing:brightness")
    validate = ACPOValidation(pipe, SETTINGS, tmp_path, load_scorer(guiding), {held_out: load_scorer(held_out)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        validate(1)  # the base model itself: nothing parted
        assert not [w for w in caught if w.category is RewardHackingWarning]
        _perturb(pipe.unet, 0.5)
        validate(2)
    moved = [str(w.message) for w in caught if w.category is RewardHackingWarning]
    assert len(moved) == 1 and moved[0].startswith("step 2:") and f"held-out {held_out} fell" in moved[0]


def _adapter_pipe(names):
    from qualityguide.adapter import IQAAdapter, ScoreQuantiles

    pipe = tiny_sd()
    torch.manual_seed(0)
    adapter = IQAAdapter.for_unet(pipe.unet, names)
    adapter.set_quantiles(ScoreQuantiles.fit({n: torch.linspace(0, 1, 16) for n in names}))
    adapter.attach(pipe, scale=20.0)  # a random adapter barely moves the tiny model; louder, the targets show
    return pipe, adapter


def test_adapter_grid_is_prompts_by_targets_with_measured_scores(tmp_path, capsys):
    from qualityguide.adapter.validation import AdapterValidation, AdapterValidationSettings, target_columns

    names = ["lgdm:/no/such/head", "testing:brightness"]  # the measured column second: its sweep is columns 3-5
    pipe, adapter = _adapter_pipe(names)
    settings = AdapterValidationSettings(("a red apple", "a blue car"), resolution=32, num_inference_steps=2)
    validate = AdapterValidation(pipe, adapter, settings, tmp_path)
    assert capsys.readouterr().err.count("without 'lgdm:/no/such/head' scores") == 1  # said once, at the start
    columns = target_columns(names, settings.percentiles)
    assert [label for label, _ in columns] == [f"{n} p{p}" for n in names for p in (10, 50, 90)]
    assert columns[5][1] == {"testing:brightness": 0.9, "lgdm:/no/such/head": 0.5}
    values = validate(3)
    assert capsys.readouterr().err == ""  # not repeated per validation
    # an independent reference: each target generated on its own, one image per call
    expected = {}
    for p in (0.1, 0.5, 0.9):
        embeds = adapter.embeds(percentiles={"testing:brightness": p, "lgdm:/no/such/head": 0.5})
        means = [float(pipe(prompt, height=32, width=32, num_inference_steps=2, ip_adapter_image_embeds=embeds,
                            generator=torch.Generator().manual_seed(seed), output_type="pt").images.mean())
                 for prompt, seed in zip(settings.prompts, settings.seeds())]
        expected[f"validation/testing:brightness/p{round(100 * p)}"] = sum(means) / len(means)
    assert values == pytest.approx({**expected, "validation/testing:brightness/spread":
                                    expected["validation/testing:brightness/p90"]
                                    - expected["validation/testing:brightness/p10"]}, abs=1e-6)  # targets move it ~1e-4
    assert len(set(values.values())) == len(values)  # the targets change the images
    record = json.loads((tmp_path / "validation" / "step-3" / "scores.json").read_text())
    assert record["unmeasured"] == ["lgdm:/no/such/head"] and len(record["scores"]) == 2 * 6
    with Image.open(tmp_path / "validation" / "step-3" / "grid.png") as grid:
        assert grid.width > 6 * 32 and grid.height > 2 * 32


def test_adapter_grid_rows_share_their_noise(tmp_path):
    from qualityguide.adapter.validation import AdapterValidation, AdapterValidationSettings

    pipe, adapter = _adapter_pipe(["testing:brightness"])
    adapter.set_scale(0.0)  # the adapter off: a row's images differ only by their noise, which must be shared
    settings = AdapterValidationSettings(("a red apple", "a blue car"), resolution=32, num_inference_steps=2)
    images = AdapterValidation(pipe, adapter, settings, tmp_path).images()
    assert images.shape == (6, 3, 32, 32)
    assert torch.equal(images[0], images[2]) and torch.equal(images[3], images[5])
    assert not torch.equal(images[0], images[3])  # rows: their own seeds and prompts
