"""recipes/train_iqa_adapter.py end to end on tiny SD: training, exact resume, two processes, bad input."""

from __future__ import annotations

import csv
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

from qualityguide.adapter import IQAAdapter
from qualityguide.train.log import read_log

from helpers import cosine_with_warmup, load_script, log_killed_at, reset_accelerate

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "train_iqa_adapter.py"


def load_recipe():
    return load_script("recipes/train_iqa_adapter.py")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter_data")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        smooth = rng.uniform(0, 1) > 0.5
        pixels = rng.uniform(0, 255, (72, 80, 3))
        if smooth:
            pixels = np.full_like(pixels, pixels.mean())
        Image.fromarray(pixels.astype(np.uint8)).save(root / f"{i:02d}.png")
        rows.append({"file_name": f"{i:02d}.png", "text": f"photo {i}", "sharpness": f"{pixels.std() / 255:.6f}",
                     "other": f"{float(i):.1f}"})
    with open(root / "metadata.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def run(dataset, out, steps, extra=(), patch=None):
    reset_accelerate()
    recipe = load_recipe()
    if patch is not None:
        patch(recipe)
    argv = ["--model", "tiny:sd", "--dataset", str(dataset), "--score_columns", "sharpness", "other",
            "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", str(steps), "--learning_rate", "1e-3",
            "--checkpointing_steps", "2", "--output_dir", str(out), "--cache_dir", str(out.parent / "cache"),
            "--p_text", "0.3", "--p_quality", "0.2", "--p_both", "0.2", *extra]
    assert recipe.main(argv) == 0
    reset_accelerate()
    return read_log(out)


def test_train_resume_exactly_and_the_result_conditions_generation(dataset, tmp_path):
    full = run(dataset, tmp_path / "full", 6)
    assert [r["step"] for r in full] == list(range(6))
    part = tmp_path / "part"
    run(dataset, part, 4, ["--gradient_accumulation_steps", "1"])
    shutil.rmtree(part / "checkpoint-4")  # as if killed after logging steps 4.. but before saving 4
    resumed = run(dataset, part, 6, ["--resume_from_checkpoint", "latest"])
    assert [r["step"] for r in resumed] == list(range(6))  # no duplicate, no gap
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]  # bit for bit

    a = IQAAdapter.from_pretrained(tmp_path / "full")
    b = IQAAdapter.from_pretrained(part)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert a.score_names == ["sharpness", "other"] and a.quantiles.count == 12
    assert (tmp_path / "full" / "diffusers" / "ip_adapter.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "full").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4",
                                                                              "checkpoint-6"]

    from qualityguide.testing import tiny_sd

    pipe = tiny_sd()
    a.attach(pipe)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    images = [pipe("photo", latents=latents, num_inference_steps=2, output_type="pt", ip_adapter_image_embeds=a.embeds(
        percentiles={"sharpness": p, "other": 0.5})).images for p in (0.05, 0.95)]
    assert (images[0] - images[1]).abs().max() > 0  # trained weights respond to the target


def test_resume_refuses_another_dataset_or_adapter(dataset, tmp_path):
    from qualityguide.errors import InputError

    out = tmp_path / "run"
    run(dataset, out, 2)
    with pytest.raises(InputError, match="saved for other settings"):
        run(dataset, out, 4, ["--resume_from_checkpoint", "latest", "--num_tokens", "2"])
    reset_accelerate()


def test_resume_from_a_damaged_checkpoint_is_refused_naming_it(dataset, tmp_path):
    from qualityguide.errors import InputError

    out = tmp_path / "run"
    run(dataset, out, 4)  # checkpoints 2 and 4
    weights = out / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut short, as by a full disk
    with pytest.raises(InputError, match=r"checkpoint-4 is damaged: it cannot be read.*delete .*checkpoint-4 and "
                                         r"resume from the previous checkpoint \(checkpoint-2\)"):
        run(dataset, out, 6, ["--resume_from_checkpoint", "latest"])
    reset_accelerate()
    shutil.rmtree(out / "checkpoint-4")
    assert [r["step"] for r in run(dataset, out, 6, ["--resume_from_checkpoint", "latest"])] == list(range(6))


def test_bad_input_exits_with_one_line(dataset, tmp_path):
    base = [sys.executable, str(RECIPE), "--model", "tiny:sd", "--dataset", str(dataset), "--resolution", "64",
            "--max_train_steps", "1", "--output_dir", str(tmp_path / "o")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    missing = subprocess.run(base + ["--score_columns", "topiq"], capture_output=True, text=True, env=env)
    assert missing.returncode == 2 and "topiq" in missing.stderr and "Traceback" not in missing.stderr
    neither = subprocess.run(base, capture_output=True, text=True, env=env)
    assert neither.returncode == 2 and "--score_columns" in neither.stderr


def test_the_readme_flow_label_then_train_runs_verbatim(tmp_path, capfd):
    """`qualityguide label photos/ --scorer ...` writes no captions; training on its columns runs unconditionally."""
    from qualityguide.cli import main as qualityguide

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (64, 72, 3), dtype=np.uint8)).save(photos / f"{i}.png")
    assert qualityguide(["label", str(photos), "--scorer", "niqe-embedded@192"]) == 0
    with open(photos / "metadata.csv", newline="") as handle:
        assert next(csv.reader(handle)) == ["file_name", "niqe-embedded@192"]  # no caption column
    capfd.readouterr()
    out = tmp_path / "iqa-adapter"
    reset_accelerate()
    assert load_recipe().main(["--model", "tiny:sd", "--dataset", str(photos), "--score_columns", "niqe-embedded@192",
                               "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "2",
                               "--output_dir", str(out)]) == 0
    reset_accelerate()
    err = capfd.readouterr().err
    assert err.count("has no 'text' column: training without captions (empty prompt)") == 1
    assert [r["step"] for r in read_log(out)] == [0, 1]
    adapter = IQAAdapter.from_pretrained(out)
    assert adapter.score_names == ["niqe-embedded@192"] and adapter.quantiles.count == 4


def test_report_to_tensorboard_logs_the_loss(dataset, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    log = run(dataset, out, 2, ["--report_to", "tensorboard"])
    assert list((out / "logs" / "train_iqa_adapter").glob("events.out.tfevents.*"))
    scalars = EventAccumulator(str(out / "logs" / "train_iqa_adapter")).Reload().Scalars("loss")
    assert [e.step for e in scalars] == [0, 1]
    assert [e.value for e in scalars] == pytest.approx([r["loss"] for r in log], rel=1e-6)


def test_sdxl_latents_are_encoded_with_the_pipelines_vae_upcast(dataset, tmp_path, monkeypatch):
    from qualityguide.diffusion import pipeline_upcasts_vae

    seen = {}

    class Stop(Exception):
        pass

    def spy(dataset, vae, cache_dir, **kwargs):
        seen.update(kwargs, vae=vae)
        raise Stop

    recipe = load_recipe()
    monkeypatch.setattr(recipe, "cache_latents", spy)
    monkeypatch.setattr(recipe, "load_pipeline", lambda *a, **k: seen.setdefault("pipe", real_load(*a, **k)))
    from qualityguide.pipelines import load_pipeline as real_load

    reset_accelerate()
    with pytest.raises(Stop):
        recipe.main(["--model", "tiny:sdxl", "--dataset", str(dataset), "--score_columns", "sharpness",
                     "--resolution", "64", "--max_train_steps", "1", "--output_dir", str(tmp_path / "o")])
    reset_accelerate()
    assert seen["vae"].config.force_upcast and pipeline_upcasts_vae(seen["pipe"])
    assert seen["upcast"] is True  # as diffusers' SDXL scripts: an fp16 SDXL VAE encodes in float32


def test_a_dataset_smaller_than_one_batch_is_refused_before_encoding(dataset, tmp_path, monkeypatch):
    from qualityguide.errors import InputError

    recipe = load_recipe()
    encoded = []
    monkeypatch.setattr(recipe, "cache_latents", lambda *a, **k: encoded.append(1))
    reset_accelerate()
    with pytest.raises(InputError, match="12 items, fewer than one global batch.*--train_batch_size"):
        recipe.main(["--model", "tiny:sd", "--dataset", str(dataset), "--score_columns", "sharpness",
                     "--resolution", "64", "--train_batch_size", "16", "--max_train_steps", "1",
                     "--output_dir", str(tmp_path / "o")])
    reset_accelerate()
    assert not encoded  # the latents (minutes at 1024 px) were not encoded first


def test_exit_codes_match_the_acpo_recipe(monkeypatch, capsys):
    """1: the run stopped (a non-finite loss); 2: refused input; 130: interrupted (as ACPO and the CLI)."""
    from qualityguide.errors import InputError, TrainingError

    recipe = load_recipe()
    for error, code in ((TrainingError("step 3: loss term 'loss' is nan"), 1), (InputError("bad --dataset"), 2),
                        (KeyboardInterrupt(), 130)):
        def fail(argv=None, error=error):
            raise error
        monkeypatch.setattr(recipe, "main", fail)
        assert recipe.cli([]) == code
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_fp16_on_a_cpu_is_refused_before_training(dataset, tmp_path):
    from qualityguide.errors import InputError

    reset_accelerate()
    with pytest.raises(InputError, match="--mixed_precision fp16 on a CPU.*bf16 or no"):
        load_recipe().main(["--model", "tiny:sd", "--dataset", str(dataset), "--score_columns", "sharpness",
                            "--resolution", "64", "--max_train_steps", "1", "--mixed_precision", "fp16",
                            "--output_dir", str(tmp_path / "o")])
    reset_accelerate()
    assert not (tmp_path / "o" / "latent_cache").exists()  # refused before anything was encoded


@pytest.mark.slow
def test_two_processes_complete_and_save_once(dataset, tmp_path):
    launcher = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", str(RECIPE), "--model", "tiny:sd",
                             "--dataset", str(dataset), "--score_columns", "sharpness", "--resolution", "64",
                             "--train_batch_size", "2", "--max_train_steps", "3", "--checkpointing_steps", "2",
                             "--output_dir", str(out), "--lr_scheduler", "linear", "--lr_warmup_steps", "1"],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("saved the IQA-Adapter") == 1
    assert [r["step"] for r in read_log(out)] == [0, 1, 2]
    # accelerate steps a prepared schedule once per process: the lr per optimizer step is still one process's
    assert [r["lr"] for r in read_log(out)] == pytest.approx([0.0, 1e-5, 0.5e-5], rel=1e-6)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    IQAAdapter.from_pretrained(out)


@pytest.fixture(scope="module")
def accumulated_run(dataset, tmp_path_factory):
    """Two optimizer steps of two accumulated micro-steps, recording what each micro-step hands on: the items whose
    latents it reads, the generator state its dropout draw starts from, the masks drawn, and the condition and quality
    dropout mask the trainer gets."""
    from qualityguide.adapter.training import AdapterTrainer
    from qualityguide.train.latents import LatentCache

    seen = {"items": [], "states": [], "generators": [], "masks": [], "conditions": [], "dropped": []}
    real_latents, real_forward = LatentCache.latents, AdapterTrainer.forward

    def latents(self, indices, *args, **kwargs):
        seen["items"].append(torch.as_tensor(indices).tolist())
        return real_latents(self, indices, *args, **kwargs)

    def forward(self, latents, text, condition, added=None, drop_quality=None, generator=None):
        seen["conditions"].append(condition.detach().clone())
        seen["dropped"].append(drop_quality.clone())
        assert generator is seen["generators"][-1]  # the dropout draw and the loss share the micro-step's generator
        return real_forward(self, latents, text, condition, added, drop_quality, generator)

    def patch(recipe):
        real_masks = recipe.dropout_masks

        def masks(batch, config, generator=None):
            seen["states"].append(generator.get_state().clone())
            seen["generators"].append(generator)
            seen["masks"].append(real_masks(batch, config, generator))
            return seen["masks"][-1]

        recipe.dropout_masks = masks

    out = tmp_path_factory.mktemp("accumulated") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LatentCache, "latents", latents)
        mp.setattr(AdapterTrainer, "forward", forward)
        run(dataset, out, 2, ["--gradient_accumulation_steps", "2", "--seed", "3"], patch=patch)
    return out, seen


def test_each_micro_step_gets_its_own_batch_generator_and_dropout(accumulated_run):
    from qualityguide.train import batch_indices, step_generator

    _, seen = accumulated_run
    assert seen["items"] == [batch_indices(12, 2, s, 3) for s in range(4)]  # s = step * accum + micro
    assert len({i for items in seen["items"] for i in items}) == 8  # one epoch of 12: no item twice
    assert len(seen["states"]) == 4
    for s, state in enumerate(seen["states"]):
        assert torch.equal(state, step_generator(3, s).get_state()), f"micro-step {s} drew from another generator"
    assert len({bytes(state.numpy()) for state in seen["states"]}) == 4
    quality = [mask[1] for mask in seen["masks"]]
    for s, (given, drawn) in enumerate(zip(seen["dropped"], quality)):  # the drawn rows, not their complement
        assert torch.equal(given, drawn), f"micro-step {s}: the trainer nulls {given.tolist()}, drawn {drawn.tolist()}"
    assert torch.cat(quality).any() and not torch.cat(quality).all()


def test_quantiles_and_conditions_come_from_each_score_column(dataset, accumulated_run):
    out, seen = accumulated_run
    with open(dataset / "metadata.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = {name: np.array([float(r[name]) for r in rows], dtype=np.float32) for name in ("sharpness", "other")}
    adapter = IQAAdapter.from_pretrained(out)
    levels = np.linspace(0, 1, len(adapter.quantiles.table["other"]))
    for name, values in columns.items():
        expected = np.quantile(values.astype(np.float64), levels)
        np.testing.assert_allclose(adapter.quantiles.table[name], expected, rtol=0, atol=0, err_msg=name)
    for items, condition in zip(seen["items"], seen["conditions"]):
        ranks = [adapter.quantiles.rank(name, columns[name][items], strict=False) for name in columns]
        np.testing.assert_allclose(condition[:, :2].numpy(), np.stack(ranks, 1), rtol=0, atol=1e-6)
        assert condition[:, 2].tolist() == [1.0] * len(items)


def test_cosine_schedule_resumes_with_the_same_lr_and_losses(dataset, tmp_path, monkeypatch, capsys):
    from qualityguide.errors import InputError

    schedule = ["--lr_scheduler", "cosine", "--lr_warmup_steps", "2"]
    full = run(dataset, tmp_path / "full", 6, schedule)
    assert [r["lr"] for r in full] == pytest.approx([cosine_with_warmup(1e-3, 2, 6, s) for s in range(6)], rel=1e-6)

    part = tmp_path / "part"  # killed after checkpoint-4, with step 4 logged
    monkeypatch.setattr("qualityguide.train.run.StepLog", log_killed_at(5))  # the run skeleton's log
    with pytest.raises(KeyboardInterrupt):
        run(dataset, part, 6, schedule)
    reset_accelerate()
    monkeypatch.undo()
    assert [r["step"] for r in read_log(part)] == [0, 1, 2, 3, 4]
    capsys.readouterr()
    resumed = run(dataset, part, 6, [*schedule, "--resume_from_checkpoint", "latest"])  # from checkpoint-4
    lines = capsys.readouterr().err  # the run skeleton's log lines, as diffusers' scripts print them
    for line in ("Running training (train_iqa_adapter)", "Num examples = 12", "Total optimization steps = 6 "
                 "(starting at step 4)", "Resuming from checkpoint-4 at step 4", "Saved checkpoint-6 (step 6)",
                 f"Outputs in {part}"):
        assert line in lines
    assert [r["step"] for r in resumed] == list(range(6))
    assert resumed == full  # lr and loss of every step, bit for bit

    for extra, field in ((["--lr_scheduler", "linear"], "lr_scheduler"), (["--lr_warmup_steps", "1"],
                                                                         "lr_warmup_steps"),
                         (["--max_train_steps", "8"], "lr_schedule_steps"), (["--max_train_samples", "8",
                         "--cache_dir", str(tmp_path / "cache8")], "max_train_samples")):
        argv = [*schedule, *extra, "--resume_from_checkpoint", "latest"]
        with pytest.raises(InputError, match=f"saved for other settings \\({field}="):
            run(dataset, part, 6, argv)
        reset_accelerate()


def test_max_train_samples_trains_on_the_first_n_items(dataset, tmp_path):
    seen = []

    def spy(recipe):
        real = recipe.cache_latents

        def cache_latents(data, *args, **kwargs):
            seen.append(list(data.files))
            return real(data, *args, **kwargs)
        recipe.cache_latents = cache_latents

    out = tmp_path / "run"
    run(dataset, out, 2, ["--max_train_samples", "5", "--cache_dir", str(tmp_path / "own_cache")], patch=spy)
    assert seen == [[f"{i:02d}.png" for i in range(5)]]  # the first five, in metadata.csv order
    assert IQAAdapter.from_pretrained(out).quantiles.count == 5  # conditions come from those five only


@pytest.mark.parametrize("extra, match", [
    (["--max_train_samples", "0"], "--max_train_samples 0: must be >= 1"),
    (["--lr_scheduler", "cosin"], "--lr_scheduler 'cosin' is not known; allowed: constant, .*Did you mean 'cosine'"),
    (["--lr_warmup_steps", "-1"], "--lr_warmup_steps -1: must be >= 0"),
    (["--model", "tiny:sd", "--revision", "main"], "revision 'main' with the offline model 'tiny:sd'"),
])
def test_bad_schedule_and_model_options_exit_2_with_one_line(dataset, tmp_path, capsys, extra, match):
    argv = ["--pretrained_model_name_or_path", "tiny:sd", "--dataset", str(dataset), "--score_columns", "sharpness",
            "--max_train_steps", "1", "--output_dir", str(tmp_path / "o"), *extra]
    reset_accelerate()
    assert load_recipe().cli(argv) == 2
    reset_accelerate()
    err = capsys.readouterr().err
    assert re.search(match, err) and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_diffusers_flag_names_parse_like_the_old_ones(dataset):
    recipe = load_recipe()
    rest = ["--dataset", str(dataset), "--score_columns", "sharpness", "--max_train_steps", "1"]
    new = recipe.parse_args(["--pretrained_model_name_or_path", "a/b", "--revision", "r1", "--variant", "fp16", *rest])
    old = recipe.parse_args(["--model", "a/b", *rest])
    assert new.model == old.model == "a/b" and (new.revision, new.variant) == ("r1", "fp16")
    assert (old.revision, old.variant, old.lr_scheduler, old.lr_warmup_steps, old.max_train_samples) == (
        None, None, "constant", 0, None)  # defaults: runs without the new flags are unchanged


def test_reference_mode_trains_and_records_its_feature_scale(tmp_path):
    """--reference brisque end to end: the saved adapter loads, records the training side, and turns a reference
    at another size to that side before its features are taken."""
    from qualityguide.adapter import ReferenceIQAAdapter

    textured = tmp_path / "textured"  # BRISQUE needs texture: a flat image has no defined statistics
    textured.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.uniform(0, 255, (72, 80, 3)).astype(np.uint8)).save(textured / f"{i}.png")
    (textured / "metadata.csv").write_text("file_name\n" + "".join(f"{i}.png\n" for i in range(6)))
    reset_accelerate()
    argv = ["--model", "tiny:sd", "--dataset", str(textured), "--reference", "brisque", "--resolution", "64",
            "--train_batch_size", "2", "--max_train_steps", "2", "--checkpointing_steps", "2",
            "--output_dir", str(tmp_path / "ref"), "--cache_dir", str(tmp_path / "cache")]
    assert load_recipe().main(argv) == 0
    reset_accelerate()
    adapter = ReferenceIQAAdapter.from_pretrained(tmp_path / "ref")
    assert adapter.feature_resolution == 64
    large = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    assert adapter.at_feature_scale(large).shape == (1, 3, 64, 64)  # values: tests/test_adapter.py


def test_reference_mode_names_a_training_image_without_features(dataset, tmp_path):
    """The scored fixture holds flat images, whose BRISQUE statistics are undefined: refused naming the file."""
    from qualityguide.errors import InputError

    reset_accelerate()
    argv = ["--model", "tiny:sd", "--dataset", str(dataset), "--reference", "brisque", "--resolution", "64",
            "--train_batch_size", "2", "--max_train_steps", "2", "--output_dir", str(tmp_path / "ref"),
            "--cache_dir", str(tmp_path / "cache")]
    with pytest.raises(InputError, match=r"brisque features of training image .*\.png: .*use another --reference"):
        load_recipe().main(argv)
    reset_accelerate()
