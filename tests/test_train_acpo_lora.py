"""recipes/train_acpo_lora.py end to end on tiny models: the export loads into a fresh pipeline, kill-and-resume
repeats an uninterrupted run, non-finite losses stop the run, changed settings and bad input are refused, two
processes complete."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qualityguide.errors import InputError
from qualityguide.finetune import add_lora, load_lora
from qualityguide.finetune.training import LORA_STATE_NAME, LoraCheckpointing
from qualityguide.scorers import QualityScorer
from qualityguide.testing import tiny_ddpm, tiny_sd
from qualityguide.train import read_marker
from qualityguide.train.log import read_log

from helpers import cosine_with_warmup, load_script, log_killed_at, reset_accelerate

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "train_acpo_lora.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def load_recipe():
    return load_script("recipes/train_acpo_lora.py")


class NaNAfter(QualityScorer):
    """Mean brightness, then NaN from its ``after``-th call on (a scorer that breaks mid-run)."""

    name, differentiable = "test-nan-after", True

    def __init__(self, after: int):
        super().__init__()
        self.after, self.calls = after, 0

    def native(self, x):
        self.calls += 1
        score = x.mean((1, 2, 3))
        return score * float("nan") if self.calls >= self.after else score


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("acpo_prompts") / "prompts.txt"
    path.write_text("a red apple\na blue car\n\nsunset over the sea\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One self-sample + latent cache shared by the tiny:sd runs (they use the same settings)."""
    return tmp_path_factory.mktemp("acpo_cache")


def sd_args(prompts, cache, out, steps, extra=()):
    return ["--model", "tiny:sd", "--prompts", str(prompts), "--num_self_samples", "4", "--resolution", "32",
            "--num_inference_steps", "2", "--scorer", "niqe-embedded@192", "--w_quality", "0.05",
            "--quality_fraction", "0.5", "--train_batch_size", "2", "--max_train_steps", str(steps),
            "--learning_rate", "3e-3", "--checkpointing_steps", "2", "--output_dir", str(out), "--cache_dir",
            str(cache), *extra]


def run(argv, patch=None, expect=0):
    reset_accelerate()
    recipe = load_recipe()
    if patch is not None:
        patch(recipe)
    try:
        assert recipe.cli(argv) == expect
    finally:
        reset_accelerate()


def images(pipe, seed=0):
    return pipe("a red apple", height=32, width=32, num_inference_steps=2, output_type="pt",
                generator=torch.Generator().manual_seed(seed)).images


def test_end_to_end_export_loads_into_a_fresh_pipeline(prompts, cache, tmp_path):
    out = tmp_path / "run"
    run(sd_args(prompts, cache, out, 4, ["--validation_steps", "4", "--validation_prompt", "a red apple",
                                         "--num_validation_images", "2",
                                         "--lora_target_modules", "to_q,to_v,to_out.0", "--rank", "2",
                                         "--lora_alpha", "4"]))
    log = read_log(out)
    assert [r["step"] for r in log] == [0, 1, 2, 3]
    terms = {"step", "lr", "grad_norm", "loss", "diffusion", "anchor", "quality"}
    assert all(set(r) == terms for r in log[:3]) and set(log[3]) == terms | {"validation/quality"}  # at the end
    assert all(r["grad_norm"] > 0 for r in log)
    assert log[0]["anchor"] == 0.0 and log[-1]["anchor"] > 0  # starts at the base model, then drifts
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (out / "validation" / "step-4" / "grid.png").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((out / "logs").rglob("events.out.tfevents.*"))  # tensorboard (installed): the default tracker
    tags = EventAccumulator(str(events[0].parent)).Reload().Tags()
    assert {"loss", "diffusion", "anchor", "quality", "lr", "grad_norm", "validation/quality"} <= set(tags["scalars"])
    assert "validation" in tags["images"]
    assert len(list((cache / "self_samples").glob("*.png"))) == 4

    fresh = tiny_sd()
    before = images(fresh)
    fresh.load_lora_weights(str(out))  # diffusers' own loader, from the folder
    after = images(fresh)
    assert (after - before).abs().max() > 1e-3  # the LoRA changes the images

    trained = tiny_sd()  # the trained U-Net, rebuilt from the last checkpoint's LoRA state (not the export)
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    add_lora(trained.unet, rank=2, alpha=4, target_modules=["to_q", "to_v", "to_out.0"])
    result = set_peft_model_state_dict(trained.unet, load_file(str(out / "checkpoint-4" / LORA_STATE_NAME)))
    assert not [k for k in result.missing_keys if "lora_" in k]
    assert torch.allclose(images(trained), after, atol=1e-5)


def test_validation_prompt_alone_validates_at_every_checkpoint_and_at_the_end(prompts, cache, tmp_path):
    validate = ["--validation_prompt", "a red apple", "--num_validation_images", "1"]
    alone = tmp_path / "alone"  # the README's command: no --validation_steps
    run(sd_args(prompts, cache, alone, 3, validate))  # checkpoints every 2 steps
    assert sorted(p.name for p in (alone / "validation").iterdir()) == ["step-2", "step-3"]
    assert json.loads((alone / "validation" / "step-3" / "scores.json").read_text())["prompt"] == "a red apple"
    period = tmp_path / "period"  # --validation_steps sets the period instead of the checkpoints
    run(sd_args(prompts, cache, period, 3, [*validate, "--validation_steps", "2", "--checkpointing_steps", "1"]))
    assert sorted(p.name for p in (period / "validation").iterdir()) == ["step-2", "step-3"]
    assert sorted(p.name for p in period.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]


def test_scorer_size_flag_is_gone():
    with pytest.raises(SystemExit) as info:
        load_recipe().parse_args(["--model", "tiny:sd", "--max_train_steps", "1", "--scorer_size", "192"])
    assert info.value.code == 2
    assert "scorer_size" not in vars(load_recipe().parse_args(["--model", "m", "--max_train_steps", "1"]))


def test_a_long_prompt_is_noted_once_not_printed_every_step(tmp_path, capfd):
    long = tmp_path / "long.txt"
    long.write_text("a red apple\n" + "a very long prompt about a lighthouse " * 200 + "\n", encoding="utf-8")
    capfd.readouterr()
    run(sd_args(long, tmp_path / "cache", tmp_path / "out", 3, ["--checkpointing_steps", "3"]))
    err = capfd.readouterr().err
    assert err.count("note: 1 of 2 distinct prompts are longer than the tokenizer's maximum of 77 tokens") == 1
    assert "lighthouse" not in err and len(err) < 20_000, len(err)  # was ~8 kB of prompt per encoder call
    huge = tmp_path / "huge.txt"
    huge.write_text("a red apple\n" + "x" * 1_000_000 + "\n", encoding="utf-8")
    run(sd_args(huge, tmp_path / "cache2", tmp_path / "out2", 1), expect=2)
    lines = capfd.readouterr().err.splitlines()
    expected = (f"error: prompts file {huge}, line 2: 1000000 characters, more than 10000 (a text encoder reads only "
                "its first 77 tokens, a few hundred characters); shorten that line (is it really one prompt per line?)")
    assert [line for line in lines if line.startswith("error: ")] == [expected]
    assert not (tmp_path / "cache2" / "self_samples").exists()


def test_unconditional_ddpm_trains_on_an_image_folder(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    with open(folder / "metadata.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name"])
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            writer.writerow([f"{i}.png"])
    out = tmp_path / "ddpm"
    run(["--model", "tiny:ddpm", "--image_dir", str(folder), "--scorer", "niqe-embedded@192", "--max_train_steps",
         "3", "--train_batch_size", "2", "--learning_rate", "1e-2", "--checkpointing_steps", "3",
         "--validation_steps", "3", "--num_validation_images", "1", "--num_inference_steps", "2",
         "--output_dir", str(out)])
    assert [r["step"] for r in read_log(out)] == [0, 1, 2]
    assert (out / "adapter_model.safetensors").is_file() and (out / "validation" / "step-3" / "grid.png").is_file()
    base, adapted = tiny_ddpm().unet, tiny_ddpm().unet
    load_lora(adapted, out)
    x, t = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([10])
    with torch.no_grad():
        assert (adapted(x, t).sample - base(x, t).sample).abs().max() > 1e-4


def test_kill_during_a_save_then_resume_repeats_the_uninterrupted_run(prompts, cache, tmp_path, monkeypatch):
    args = ["--gradient_accumulation_steps", "2", "--quality_input", "k_step", "--k_steps", "2"]
    full = tmp_path / "full"
    run(sd_args(prompts, cache, full, 6, args))

    real, saves = LoraCheckpointing.save, []

    def killed_at_the_second_save(self, directory):
        saves.append(directory)
        if len(saves) == 2:
            raise KeyboardInterrupt  # killed inside accelerator.save_state of checkpoint-4
        real(self, directory)

    part = tmp_path / "part"
    with monkeypatch.context() as patch:
        patch.setattr(LoraCheckpointing, "save", killed_at_the_second_save)
        run(sd_args(prompts, cache, part, 6, args), expect=130)  # Ctrl-C: the resume hint, exit 130
    assert (part / "checkpoint-4.tmp-partial").is_dir() and not (part / "checkpoint-4").exists()
    assert [r["step"] for r in read_log(part)] == [0, 1, 2, 3]
    run(sd_args(prompts, cache, part, 6, [*args, "--resume_from_checkpoint", "latest"]))  # from checkpoint-2
    assert not list(part.glob("*.tmp-*"))
    expected, resumed = read_log(full), read_log(part)
    assert [r["step"] for r in resumed] == list(range(6))  # no duplicate, no gap
    assert resumed == expected  # every term, bit for bit
    from safetensors.torch import load_file

    a, b = load_file(str(full / "pytorch_lora_weights.safetensors")), load_file(str(part / "pytorch_lora_weights."
                                                                                     "safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_with_exit_1_and_keeps_the_last_checkpoint(prompts, cache, tmp_path, capsys):
    out = tmp_path / "nan"
    # the scorer sees one batch per step (quality_fraction 1 puts every sample below t_quality_max)
    run(sd_args(prompts, cache, out, 6, ["--scorer", "test", "--quality_fraction", "1"]), expect=1,
        patch=lambda recipe: setattr(recipe, "load_scorer", lambda *a, **k: NaNAfter(after=4)))
    err = capsys.readouterr().err
    assert "step 3: loss term 'loss' is nan" in err and "'quality' is nan" in err and "Traceback" not in err
    assert [r["step"] for r in read_log(out)] == [0, 1, 2]
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    marker = read_marker(out / "checkpoint-2")
    assert marker["step"] == 2
    from safetensors.torch import load_file

    state = load_file(str(out / "checkpoint-2" / LORA_STATE_NAME))
    assert all(torch.isfinite(v).all() for v in state.values())


def test_resume_refuses_other_settings(prompts, cache, tmp_path):
    out = tmp_path / "run"
    run(sd_args(prompts, cache, out, 2))
    for extra, field in ((["--rank", "8"], "lora"), (["--w_anchor", "2"], "acpo"),
                         (["--scorer", "niqe-embedded@224"], "scorer"),
                         (["--self_sample_guidance_scale", "3", "--cache_dir", str(tmp_path / "other_cache")], "data"),
                         (["--caption_dropout", "0.2"], "caption_dropout"),
                         (["--lr_scheduler", "linear"], "lr_scheduler"),
                         (["--lr_warmup_steps", "1"], "lr_warmup_steps"),
                         (["--max_train_samples", "3", "--cache_dir", str(tmp_path / "cache3")], "max_train_samples")):
        reset_accelerate()
        with pytest.raises(InputError, match=f"saved for other settings \\({field}="):
            load_recipe().main(sd_args(prompts, cache, out, 4, [*extra, "--resume_from_checkpoint", "latest"]))
    reset_accelerate()


@pytest.mark.parametrize("case, match", [
    ("missing_prompts", "prompts file .* does not exist"),
    ("empty_folder", "has no metadata.csv"),
    ("unknown_scorer", "unknown scorer 'niqe-embeded'"),
    ("non_differentiable", "'pyiqa:piqe' is not differentiable"),
    ("fp16_cpu", "fp16 on a CPU"),
    ("targets", r"\['to_kk'\] match no module"),
    ("no_data", "pass --prompts FILE"),
    ("validation_prompt", "needs --validation_prompt"),
    ("scorer_size", "needs images of at least 192 px.*--scorer niqe-embedded@192"),
])
def test_bad_input_exits_2_with_one_line(prompts, cache, tmp_path, capsys, case, match):
    (tmp_path / "empty").mkdir()
    base = sd_args(prompts, cache, tmp_path / "o", 1)
    extra = {"missing_prompts": ["--prompts", str(tmp_path / "nope.txt")],
             "empty_folder": ["--prompts", None, "--image_dir", str(tmp_path / "empty")],
             "unknown_scorer": ["--scorer", "niqe-embeded"],
             "non_differentiable": ["--scorer", "pyiqa:piqe"],
             "fp16_cpu": ["--mixed_precision", "fp16"],
             "targets": ["--lora_target_modules", "to_q,to_kk"],
             "no_data": ["--prompts", None],
             "validation_prompt": ["--validation_steps", "1"],
             "scorer_size": ["--scorer", "niqe-embedded"]}[case]
    argv = list(base)
    for flag, value in zip(extra[::2], extra[1::2]):
        if value is None:  # drop the flag
            i = argv.index(flag)
            del argv[i:i + 2]
        elif flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    run(argv, expect=2)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and re.search(match, lines[0]), lines


def test_command_line_exit_codes(prompts, tmp_path):
    base = [sys.executable, str(RECIPE), "--model", "tiny:sd", "--max_train_steps", "1", "--output_dir",
            str(tmp_path / "o")]
    fp16 = subprocess.run(base + ["--prompts", str(prompts), "--mixed_precision", "fp16"], check=False,
                          capture_output=True, text=True, env={**ENV, "CUDA_VISIBLE_DEVICES": ""})
    assert fp16.returncode == 2 and "fp16 on a CPU" in fp16.stderr and "Traceback" not in fp16.stderr
    both = subprocess.run(base + ["--prompts", str(prompts), "--image_dir", str(tmp_path)], check=False,
                          capture_output=True, text=True, env=ENV)
    assert both.returncode == 2 and "exclude each other" in both.stderr


def test_two_processes_complete_and_save_once(prompts, tmp_path):
    launcher = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
    out = tmp_path / "ddp"
    result = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", str(RECIPE),
                             *sd_args(prompts, tmp_path / "cache", out, 3)],
                            env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=900,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("saved the ACPO LoRA") == 1
    assert [r["step"] for r in read_log(out)] == [0, 1, 2]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert read_marker(out / "checkpoint-2")["num_processes"] == 2  # really distributed, not two single runs
    assert len(list((tmp_path / "cache" / "self_samples").glob("*.png"))) == 4  # both shares generated
    fresh = tiny_sd()
    fresh.load_lora_weights(str(out))


def test_each_micro_step_gets_its_own_batch_and_generator(prompts, tmp_path, monkeypatch):
    """With gradient accumulation, micro-step ``micro`` of optimizer step ``step`` is global micro-step
    ``s = step * accum + micro``: the run feeds the loss ``batch_indices(..., s, ...)`` and ``step_generator(seed, s)``
    (recorded where the recipe hands them to the loss), so no two micro-batches share noise or repeat items."""
    from qualityguide.finetune import ACPOLoss
    from qualityguide.finetune.training import TrainingSamples, caption_dropout
    from qualityguide.train import batch_indices, step_generator

    used, states = [], []
    real_batch, real_loss = TrainingSamples.batch, ACPOLoss.__call__

    def recorded_batch(self, indices, *args, **kwargs):
        used.append((len(self), list(indices)))
        return real_batch(self, indices, *args, **kwargs)

    def recorded_loss(self, *args, generator=None, **kwargs):
        states.append(generator.get_state().clone())
        return real_loss(self, *args, generator=generator, **kwargs)

    monkeypatch.setattr(TrainingSamples, "batch", recorded_batch)
    monkeypatch.setattr(ACPOLoss, "__call__", recorded_loss)
    # its own cache: self samples are keyed by the seed, and the shared cache holds seed 0's
    run(sd_args(prompts, tmp_path / "cache", tmp_path / "run", 2,
                ["--gradient_accumulation_steps", "2", "--seed", "5"]))
    assert len(used) == len(states) == 4  # 2 optimizer steps x 2 micro-steps
    size = used[0][0]
    assert [u[1] for u in used] == [batch_indices(size, 2, s, 5) for s in range(4)]
    for epoch in (used[:2], used[2:]):  # 4 samples, batch 2: two micro-steps make one epoch, no item twice
        assert sorted(epoch[0][1] + epoch[1][1]) == list(range(size))
    for s, state in enumerate(states):
        expected = step_generator(5, s)
        caption_dropout(2, 0.1, expected)  # the step's generator draws the dropped captions first (default 0.1)
        assert torch.equal(state, expected.get_state()), f"micro-step {s} drew from another generator"
    assert len({bytes(state.numpy()) for state in states}) == 4


def test_self_samples_at_guidance_1_and_caption_dropout_from_the_step_generator(prompts, tmp_path, monkeypatch,
                                                                                 capsys):
    """Issue 21: self samples are the model's own conditional distribution (guidance 1, not the validation CFG),
    a cache made at another scale is refused untouched, and --caption_dropout rows come from the step generator."""
    from qualityguide.finetune.training import TrainingSamples, caption_dropout
    from qualityguide.train import step_generator
    from qualityguide.train.self_samples import MANIFEST

    old = tmp_path / "old_cache"  # what the recipe made before: self samples at the validation CFG, 7.5
    run(sd_args(prompts, old, tmp_path / "old", 1, ["--self_sample_guidance_scale", "7.5"]))
    before = {p.name: p.read_bytes() for p in (old / "self_samples").iterdir()}
    capsys.readouterr()
    run(sd_args(prompts, old, tmp_path / "new", 1), expect=2)
    err = capsys.readouterr().err
    assert re.search(r"generated with guidance_scale=7\.5 .*this run has guidance_scale=1\.0", err), err
    assert "Traceback" not in err and not (tmp_path / "new" / "pytorch_lora_weights.safetensors").exists()
    assert {p.name: p.read_bytes() for p in (old / "self_samples").iterdir()} == before

    drops, real = [], TrainingSamples.conditioning

    def recorded(self, indices, encoder, device, drop=None):
        drops.append(drop.clone())
        return real(self, indices, encoder, device, drop)

    monkeypatch.setattr(TrainingSamples, "conditioning", recorded)
    cache = tmp_path / "cache"
    run(sd_args(prompts, cache, tmp_path / "run", 4, ["--caption_dropout", "0.5", "--guidance_scale", "3"]))
    manifest = json.loads((cache / "self_samples" / MANIFEST).read_text())
    assert manifest["guidance_scale"] == 1.0  # --guidance_scale is the validation images' alone
    assert [d.tolist() for d in drops] == [caption_dropout(2, 0.5, step_generator(0, s)).tolist() for s in range(4)]
    assert any(d.any() for d in drops) and not all(d.all() for d in drops)


def test_cosine_schedule_resumes_with_the_same_lr_and_losses(prompts, cache, tmp_path, monkeypatch):
    schedule = ["--lr_scheduler", "cosine", "--lr_warmup_steps", "2"]
    full = tmp_path / "full"
    run(sd_args(prompts, cache, full, 6, schedule))
    expected = read_log(full)
    assert [r["lr"] for r in expected] == pytest.approx([cosine_with_warmup(3e-3, 2, 6, s) for s in range(6)], rel=1e-6)
    part = tmp_path / "part"  # killed after checkpoint-4, with step 4 logged
    monkeypatch.setattr("qualityguide.train.run.StepLog", log_killed_at(5))  # the run skeleton's log
    run(sd_args(prompts, cache, part, 6, schedule), expect=130)
    monkeypatch.undo()
    assert [r["step"] for r in read_log(part)] == [0, 1, 2, 3, 4]
    run(sd_args(prompts, cache, part, 6, [*schedule, "--resume_from_checkpoint", "latest"]))  # from checkpoint-4
    assert read_log(part) == expected  # lr and every loss term, bit for bit


def test_max_train_samples_trains_on_the_first_n_samples(prompts, tmp_path, monkeypatch):
    from qualityguide.finetune.training import TrainingSamples

    real, seen = TrainingSamples.encode, []

    def encode(pipe, dataset, *args, **kwargs):
        seen.append(list(dataset.files))
        return real(pipe, dataset, *args, **kwargs)

    monkeypatch.setattr(TrainingSamples, "encode", encode)
    own = tmp_path / "cache"
    run(sd_args(prompts, own, tmp_path / "run", 1, ["--max_train_samples", "3"]))
    with open(own / "self_samples" / "metadata.csv", newline="") as handle:
        listed = [row["file_name"] for row in csv.DictReader(handle)]
    assert len(listed) == 4 and seen == [listed[:3]]  # the first three, in the cache's order


def test_diffusers_flag_names_parse_like_the_old_ones(prompts):
    recipe = load_recipe()
    rest = ["--prompts", str(prompts), "--max_train_steps", "1"]
    new = recipe.parse_args(["--pretrained_model_name_or_path", "a/b", "--revision", "r1", "--variant", "fp16", *rest])
    old = recipe.parse_args(["--model", "a/b", *rest])
    assert new.model == old.model == "a/b" and (new.revision, new.variant) == ("r1", "fp16")
    assert (old.revision, old.variant, old.lr_scheduler, old.lr_warmup_steps, old.max_train_samples) == (
        None, None, "constant", 0, None)  # defaults: runs without the new flags are unchanged


@pytest.mark.parametrize("extra, match", [
    (["--variant", "fp16"], "variant 'fp16' with the offline model 'tiny:sd'"),
    (["--lr_scheduler", "cosine_restarts"], "allowed: constant, .*Did you mean 'cosine_with_restarts'"),
    (["--max_train_samples", "-2"], "--max_train_samples -2: must be >= 1"),
    (["--caption_dropout", "1.5"], r"--caption_dropout 1\.5: must be a share in \[0, 1\]"),
    (["--caption_dropout", "nan"], r"--caption_dropout nan: must be a share in \[0, 1\]"),
])
def test_bad_schedule_and_model_options_exit_2_with_one_line(prompts, cache, tmp_path, capsys, extra, match):
    argv = sd_args(prompts, cache, tmp_path / "o", 1, extra)
    argv[argv.index("--model")] = "--pretrained_model_name_or_path"
    run(argv, expect=2)
    err = capsys.readouterr().err
    assert re.search(match, err) and "Traceback" not in err and len(err.strip().splitlines()) == 1
