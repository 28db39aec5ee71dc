"""Both training recipes on diffusers' data flags: random crops and flips with an LR schedule resume bit for bit,
``--dataset_name`` tables feed captions and scores, SDXL's micro-conditioning reaches the U-Net from each image's
real size and crop, and the adapter recipe itself resumes exactly under two processes."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qualityguide.adapter import IQAAdapter
from qualityguide.train import draw_variants
from qualityguide.train.latents import LatentCache
from qualityguide.train.log import StepLog, read_log

from helpers import ROOT, load_script, reset_accelerate

SIZES = [(48, 40), (40, 56), (64, 36), (36, 36), (56, 44), (44, 60), (40, 40), (72, 48)]  # (width, height)
AUGMENT = ["--random_crop", "--crop_positions", "2", "--random_flip"]
SCHEDULE = ["--lr_scheduler", "cosine", "--lr_warmup_steps", "2"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Eight noise images of different shapes with captions and a score, as a folder and as a Parquet table."""
    from datasets import Dataset
    from datasets import Image as ImageFeature

    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    rows = []
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"photo {i}", "sharpness": f"{rng.uniform():.6f}"})
    with open(root / "metadata.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = {"photo": [{"bytes": (root / r["file_name"]).read_bytes(), "path": r["file_name"]} for r in rows],
             "prompt": [r["text"] for r in rows], "sharpness": [float(r["sharpness"]) for r in rows]}
    parquet = tmp_path_factory.mktemp("table") / "train.parquet"
    Dataset.from_dict(table).cast_column("photo", ImageFeature()).to_parquet(str(parquet))
    return root, parquet


def killed_at(step: int):
    """Patch ``StepLog.write`` to raise KeyboardInterrupt when asked to write ``step`` (a kill after the previous
    step's line), whichever module of the recipe writes the log."""
    real = StepLog.write

    def write(self, at, values):
        if at == step:
            raise KeyboardInterrupt
        real(self, at, values)

    return write


def run(recipe_path: str, argv, expect=0, kill_at=None, monkeypatch=None):
    reset_accelerate()
    recipe = load_script(recipe_path)
    try:
        if kill_at is not None:
            with monkeypatch.context() as patch:
                patch.setattr(StepLog, "write", killed_at(kill_at))
                assert recipe.cli(argv) == expect
        else:
            assert recipe.cli(argv) == expect
    finally:
        reset_accelerate()


def adapter_args(data, out, steps, extra=()):
    return ["--pretrained_model_name_or_path", "tiny:sd", *data, "--score_columns", "sharpness", "--resolution", "32",
            "--train_batch_size", "2", "--max_train_steps", str(steps), "--learning_rate", "1e-3",
            "--checkpointing_steps", "2", "--output_dir", str(out), "--cache_dir", str(out.parent / "cache"),
            "--p_text", "0.3", "--p_quality", "0.2", "--p_both", "0.2", "--report_to", "none", *extra]


def acpo_args(data, out, steps, extra=()):
    return ["--pretrained_model_name_or_path", "tiny:sd", *data, "--resolution", "32", "--scorer",
            "niqe-embedded@192", "--w_quality", "0.05", "--quality_fraction", "0.5", "--train_batch_size", "2",
            "--max_train_steps", str(steps), "--learning_rate", "3e-3", "--checkpointing_steps", "2",
            "--num_inference_steps", "2", "--output_dir", str(out), "--cache_dir", str(out.parent / "cache"),
            "--report_to", "none", *extra]


def spy_variants(monkeypatch):
    """Record the (indices, variants) every latent read of the adapter recipe asks for."""
    seen, real = [], LatentCache.latents

    def latents(self, indices, generator=None, variants=None):
        seen.append((torch.as_tensor(indices).tolist(), torch.as_tensor(variants).tolist()))
        return real(self, indices, generator, variants)

    monkeypatch.setattr(LatentCache, "latents", latents)
    return seen


# ------------------------------------------------------------------------------------------------------ resume
def test_adapter_resumes_bit_for_bit_with_crops_flips_and_a_schedule(photos, tmp_path, monkeypatch):
    folder, _ = photos
    data = ["--train_data_dir", str(folder), *AUGMENT]
    with monkeypatch.context() as patch:
        seen = spy_variants(patch)
        run("recipes/train_iqa_adapter.py", adapter_args(data, tmp_path / "full", 6, SCHEDULE))
    # each step's variants are the pure draw of (seed, step, process): 2 windows x 2 orientations
    assert [v for _, v in seen] == [draw_variants(4, 2, 0, s, 0).tolist() for s in range(6)]
    drawn = [v for _, vs in seen for v in vs]
    assert {v // 2 for v in drawn} == {0, 1} and {v % 2 for v in drawn} == {0, 1}  # both windows, both orientations
    full = read_log(tmp_path / "full")

    part = tmp_path / "part"  # killed after checkpoint-4, with step 4 logged
    run("recipes/train_iqa_adapter.py", adapter_args(data, part, 6, SCHEDULE), expect=130, kill_at=5,
        monkeypatch=monkeypatch)
    assert [r["step"] for r in read_log(part)] == [0, 1, 2, 3, 4]
    run("recipes/train_iqa_adapter.py", adapter_args(data, part, 6, [*SCHEDULE, "--resume_from_checkpoint", "latest"]))
    assert read_log(part) == full  # lr and loss of every step, bit for bit
    a, b = IQAAdapter.from_pretrained(tmp_path / "full"), IQAAdapter.from_pretrained(part)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

    # resuming without the augmentation is another run: refused, naming the field
    run("recipes/train_iqa_adapter.py", adapter_args(["--train_data_dir", str(folder)], part, 6,
                                                     [*SCHEDULE, "--resume_from_checkpoint", "latest", "--cache_dir",
                                                      str(tmp_path / "plain-cache")]), expect=2)


def test_acpo_resumes_bit_for_bit_with_crops_flips_and_a_schedule(photos, tmp_path, monkeypatch):
    folder, _ = photos
    from qualityguide.finetune.training import TrainingSamples

    data = ["--train_data_dir", str(folder), *AUGMENT]
    seen, real = [], TrainingSamples.batch

    def batch(self, indices, device, dtype=None, variants=None):
        seen.append(torch.as_tensor(variants).tolist())
        return real(self, indices, device, dtype, variants)

    with monkeypatch.context() as patch:
        patch.setattr(TrainingSamples, "batch", batch)
        run("recipes/train_acpo_lora.py", acpo_args(data, tmp_path / "full", 6, SCHEDULE))
    assert seen == [draw_variants(4, 2, 0, s, 0).tolist() for s in range(6)]  # (seed, micro-step, process) alone
    full = read_log(tmp_path / "full")
    part = tmp_path / "part"
    run("recipes/train_acpo_lora.py", acpo_args(data, part, 6, SCHEDULE), expect=130, kill_at=5,
        monkeypatch=monkeypatch)
    assert [r["step"] for r in read_log(part)] == [0, 1, 2, 3, 4]
    run("recipes/train_acpo_lora.py", acpo_args(data, part, 6, [*SCHEDULE, "--resume_from_checkpoint", "latest"]))
    assert read_log(part) == full  # every loss term and the lr, bit for bit
    plain = tmp_path / "plain"  # the same run without augmentation trains on other latents
    run("recipes/train_acpo_lora.py", acpo_args(["--image_dir", str(folder)], plain, 2,  # the old flag still works
                                                ["--cache_dir", str(tmp_path / "plain-cache")]))
    assert [r["loss"] for r in read_log(plain)] != [r["loss"] for r in full[:2]]


# ------------------------------------------------------------------------------------------------------ SDXL
def _expected_time_ids(pipe, folder, resolution, indices, variants):
    from qualityguide.train import load_image_folder

    ds = load_image_folder(folder, resolution, center_crop=False, random_flip=True, crop_positions=2, progress=False)
    rows = []
    for i, v in zip(indices, variants):
        top, left, _ = ds.windows(i)[v]
        width, height = SIZES[i]
        rows.append(pipe._get_add_time_ids((height, width), (top, left), (resolution, resolution), torch.float32,
                                           text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)[0])
    return torch.stack(rows)


def test_sdxl_recipes_condition_on_each_images_size_and_crop_from_a_table(photos, tmp_path, monkeypatch):
    """``--dataset_name`` (a Parquet table with image bytes, its own column names) on tiny:sdxl: the time ids the
    U-Net gets are diffusers' ``_get_add_time_ids`` of each sample's real size and drawn crop, in both recipes; the
    adapter's quantiles come from the table's score column."""
    from qualityguide.adapter.training import AdapterTrainer
    from qualityguide.finetune import ACPOLoss
    from qualityguide.pipelines import load_pipeline

    folder, parquet = photos
    pipe = load_pipeline("tiny:sdxl")
    data = ["--dataset_name", str(parquet), "--image_column", "photo", "--caption_column", "prompt", *AUGMENT,
            "--seed", "3"]  # seed 3: two of the first four samples are cut at another window than variant 0's
    sdxl = ["--pretrained_model_name_or_path", "tiny:sdxl"]
    recorded = []
    real_forward, real_loss = AdapterTrainer.forward, ACPOLoss.__call__

    def forward(self, latents, text, condition, added=None, drop_quality=None, generator=None):
        recorded.append(added["time_ids"].detach().float().clone())
        return real_forward(self, latents, text, condition, added, drop_quality, generator)

    def loss(self, clean, conditioning=None, *args, **kwargs):
        recorded.append(conditioning["added_cond_kwargs"]["time_ids"].detach().float().clone())
        return real_loss(self, clean, conditioning, *args, **kwargs)

    with monkeypatch.context() as patch:
        seen = spy_variants(patch)
        patch.setattr(AdapterTrainer, "forward", forward)
        run("recipes/train_iqa_adapter.py", [*sdxl, *adapter_args(data, tmp_path / "adapter", 2)[2:]])
    assert len(seen) == len(recorded) == 2
    for (indices, variants), time_ids in zip(seen, recorded):
        torch.testing.assert_close(time_ids, _expected_time_ids(pipe, folder, 32, indices, variants), rtol=0, atol=0)
    moved = [not torch.equal(_expected_time_ids(pipe, folder, 32, i, v), _expected_time_ids(pipe, folder, 32, i,
                                                                                              [0] * len(i)))
             for i, v in seen]
    assert any(moved)  # the check tells the drawn crop from variant 0's
    adapter = IQAAdapter.from_pretrained(tmp_path / "adapter")
    table = sorted(float(r["sharpness"]) for r in csv.DictReader(open(folder / "metadata.csv")))
    levels = np.linspace(0, 1, len(adapter.quantiles.table["sharpness"]))
    np.testing.assert_allclose(adapter.quantiles.table["sharpness"], np.quantile(table, levels), rtol=1e-6)

    recorded.clear()
    with monkeypatch.context() as patch:
        patch.setattr(ACPOLoss, "__call__", loss)
        run("recipes/train_acpo_lora.py", [*sdxl, *acpo_args(data, tmp_path / "acpo", 2)[2:]])
    assert len(recorded) == 2
    for step, time_ids in enumerate(recorded):
        from qualityguide.train import batch_indices

        indices = batch_indices(len(SIZES), 2, step, 3)
        variants = draw_variants(4, 2, 3, step, 0).tolist()
        torch.testing.assert_close(time_ids, _expected_time_ids(pipe, folder, 32, indices, variants), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------ two processes
KILLER = '''import sys
sys.path.insert(0, {tests!r})
from helpers import load_script
from qualityguide.train.log import StepLog
real = StepLog.write
def write(self, at, values):
    if at == {step}:
        raise KeyboardInterrupt
    real(self, at, values)
StepLog.write = write
sys.exit(load_script("recipes/train_iqa_adapter.py").cli())
'''


def test_two_process_adapter_recipe_resumes_exactly_after_a_kill(photos, tmp_path):
    """``accelerate launch --num_processes 2`` on the recipe itself: killed after checkpoint-2 (step 3 logged) and
    rerun with ``--resume_from_checkpoint latest``, it logs the uninterrupted two-process run's losses bit for bit."""
    folder, _ = photos
    launcher = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    killer = tmp_path / "killed_recipe.py"
    killer.write_text(KILLER.format(tests=str(ROOT / "tests"), step=3))

    def launch(script, out, extra=()):
        argv = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                "no", "--dynamo_backend", "no", str(script),
                *adapter_args(["--train_data_dir", str(folder), *AUGMENT], out, 4, [*SCHEDULE, *extra])]
        argv[argv.index("--train_batch_size") + 1] = "1"  # 8 images: 4 steps of 2 processes x 1 without a repeat
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)

    recipe = ROOT / "recipes" / "train_iqa_adapter.py"
    result = launch(recipe, tmp_path / "full")
    assert result.returncode == 0, result.stderr[-3000:]
    full = read_log(tmp_path / "full")
    assert [r["step"] for r in full] == [0, 1, 2, 3]
    part = tmp_path / "part"
    result = launch(killer, part)
    assert result.returncode != 0 and (part / "checkpoint-2").is_dir() and not (part / "checkpoint-4").exists()
    assert [r["step"] for r in read_log(part)] == [0, 1, 2]
    result = launch(recipe, part, ["--resume_from_checkpoint", "latest"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_log(part) == full  # lr and loss (the mean over both processes) of every step, bit for bit
    a, b = IQAAdapter.from_pretrained(tmp_path / "full"), IQAAdapter.from_pretrained(part)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_bad_data_flags_exit_2_with_one_line(photos, tmp_path, capsys):
    """A missing column names the columns there are; augmenting self samples and two sources are refused."""
    folder, parquet = photos
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\n")
    cases = [("recipes/train_iqa_adapter.py", adapter_args(["--dataset_name", str(parquet), "--image_column", "img"],
                                                           tmp_path / "a", 2),
              "missing column(s) ['img']; found ['photo', 'prompt', 'sharpness']"),
             ("recipes/train_acpo_lora.py", acpo_args(["--prompts", str(prompts), "--random_flip"], tmp_path / "b", 2),
              "--random_crop / --random_flip augment training images"),
             ("recipes/train_acpo_lora.py", acpo_args(["--image_dir", str(folder), "--dataset_name", str(parquet)],
                                                      tmp_path / "c", 2), "exclude each other")]
    for recipe, argv, expected in cases:
        capsys.readouterr()
        run(recipe, argv, expect=2)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and expected in errors[0] and "Traceback" not in err, errors
