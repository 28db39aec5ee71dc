"""Validation in the recipes: the held-out guard end to end on tiny:sd (ACPO: a scorer pair whose scores move apart
warns, and --keep_best held_out exports the best checkpoint), the adapter's prompts x targets grid, the curves, and
the refusals of the new flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qualityguide.finetune import add_lora, load_lora
from qualityguide.finetune.training import LORA_STATE_NAME
from qualityguide.testing import tiny_sd
from qualityguide.train import read_marker
from qualityguide.train.log import read_log

from helpers import load_script, reset_accelerate

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
HELD = "validation/held_out/testing:darkness"


def acpo_args(tmp_path, steps, extra=()):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\na blue car\n", encoding="utf-8")
    return ["--model", "tiny:sd", "--prompts", str(prompts), "--num_self_samples", "4", "--resolution", "32",
            "--num_inference_steps", "2", "--scorer", "testing:brightness", "--w_quality", "5",
            "--quality_fraction", "0.5", "--train_batch_size", "2", "--max_train_steps", str(steps),
            "--learning_rate", "1e-2", "--checkpointing_steps", "2", "--validation_prompt", "a red apple",
            "--num_validation_images", "2", "--output_dir", str(tmp_path / "run"), "--cache_dir",
            str(tmp_path / "cache"), "--report_to", "none", *extra]


def _lora_state(directory):
    """The peft state of a tiny:sd U-Net that loaded the LoRA ``save_lora`` wrote to ``directory``."""
    from peft.utils import get_peft_model_state_dict

    unet = tiny_sd().unet
    load_lora(unet, directory)
    return get_peft_model_state_dict(unet)


def test_held_out_guard_warns_and_keep_best_exports_the_best_checkpoint(tmp_path):
    # a subprocess: the testing: scorers must be reachable by spec from a recipe's command line
    result = subprocess.run([sys.executable, str(ROOT / "recipes" / "train_acpo_lora.py"),
                             *acpo_args(tmp_path, 6, ["--held_out_scorer", "testing:darkness", "--keep_best",
                                                      "held_out", "--checkpoints_total_limit", "1"])],
                            env=ENV, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "run"
    # brightness guides, darkness (its mirror image) is held out: any gain of the one is a loss of the other
    assert "RewardHackingWarning" in result.stderr and "held-out testing:darkness fell" in result.stderr
    validated = {r["step"] + 1: r for r in read_log(out) if HELD in r}
    assert sorted(validated) == [2, 4, 6]
    for record in validated.values():
        assert record[HELD] == pytest.approx(-record["validation/quality"])
        assert record["validation/guiding_minus_held_out/testing:darkness"] == pytest.approx(
            2 * record["validation/quality"])
    best = max(sorted(validated), key=lambda s: validated[s][HELD])  # the first of equal bests
    kept = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert kept == sorted({best, 6}) if best != 6 else kept == [6]  # the newest, and the best spared beside it
    assert read_marker(out / f"checkpoint-{best}")["extra"]["validation"][HELD] == validated[best][HELD]
    assert best != 6, "the scorers did not part on this machine: the export test below would compare equals"
    exported, last = _lora_state(out), _lora_state(out / "last")
    expected = load_file(str(out / f"checkpoint-{best}" / LORA_STATE_NAME))
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[k], expected[k]) for k in expected)  # the best checkpoint's LoRA, exactly
    assert any(not torch.equal(last[k], expected[k]) for k in expected)  # not the last step's
    assert f"step {best}" in result.stdout and "last" in result.stdout
    from qualityguide.train.curves import curve_series

    assert (out / "training_curves.png").is_file()  # and the gap is one of its panels:
    assert list(curve_series(read_log(out))["guiding minus held-out (validation)"]) == [
        "validation/guiding_minus_held_out/testing:darkness"]


def run_acpo(argv, expect=0):
    reset_accelerate()
    try:
        assert load_script("recipes/train_acpo_lora.py").cli(argv) == expect
    finally:
        reset_accelerate()


@pytest.mark.parametrize("extra, match", [
    (["--keep_best", "held_out"], "--keep_best held_out ranks checkpoints by a held-out score"),
    (["--held_out_scorer", "testing:brightness"], "is given twice or is the guiding --scorer"),
    (["--held_out_scorer", "testing:darkness", "--held_out_scorer", "testing:darkness"], "given twice"),
    (["--held_out_scorer", "niqe-embedded"], "'niqe-embedded' needs images of at least 192 px, the validation "
     "images are 32 px; score them resized with niqe-embedded@192"),
])
def test_held_out_flags_are_refused_with_the_fix(tmp_path, capsys, extra, match):
    run_acpo(acpo_args(tmp_path, 2, extra), expect=2)
    assert match in capsys.readouterr().err


def test_held_out_scorer_needs_validation(tmp_path, capsys):
    argv = acpo_args(tmp_path, 2, ["--held_out_scorer", "testing:darkness"])
    at = argv.index("--validation_prompt")
    del argv[at:at + 2]
    run_acpo(argv, expect=2)
    assert "--held_out_scorer scores the validation images: pass --validation_prompt" in capsys.readouterr().err


@pytest.fixture(scope="module")
def scored_folder(tmp_path_factory):
    """Twelve images whose score column is named by the scorer that labelled it (as `qualityguide label` writes)."""
    import csv

    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("adapter_validation_data")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        pixels = rng.uniform(0, 255, (64, 64, 3)) * rng.uniform(0.2, 1.0)
        Image.fromarray(pixels.astype(np.uint8)).save(root / f"{i:02d}.png")
        rows.append({"file_name": f"{i:02d}.png", "text": f"photo {i}",
                     "testing:brightness": f"{pixels.mean() / 255:.6f}", "lgdm:/no/such/head": f"{i / 12:.4f}"})
    with open(root / "metadata.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def run_adapter(folder, out, extra, expect=0):
    reset_accelerate()
    argv = ["--model", "tiny:sd", "--dataset", str(folder), "--resolution", "32", "--train_batch_size", "2",
            "--max_train_steps", "4", "--learning_rate", "1e-3", "--checkpointing_steps", "2", "--output_dir",
            str(out), "--cache_dir", str(out.parent / "cache"), "--num_inference_steps", "2", *extra]
    try:
        assert load_script("recipes/train_iqa_adapter.py").cli(argv) == expect
    finally:
        reset_accelerate()


def test_adapter_recipe_validates_prompts_by_targets_at_each_checkpoint(scored_folder, tmp_path, capfd):
    from qualityguide.train.curves import curve_series

    prompt_file = tmp_path / "validation.txt"
    prompt_file.write_text("a blue car\n", encoding="utf-8")
    out = tmp_path / "run"
    run_adapter(scored_folder, out, ["--score_columns", "testing:brightness", "lgdm:/no/such/head",
                                     "--validation_prompt", "a red apple", "--validation_prompt_file",
                                     str(prompt_file), "--validation_percentiles", "0.2", "0.8",
                                     "--num_validation_images", "2", "--report_to", "tensorboard"])
    assert capfd.readouterr().err.count("without 'lgdm:/no/such/head' scores") == 1
    log = read_log(out)
    validated = [r for r in log if "validation/testing:brightness/spread" in r]
    assert [r["step"] + 1 for r in validated] == [2, 4]  # each checkpoint; the last is also the end
    for record in validated:
        step = record["step"] + 1
        saved = json.loads((out / "validation" / f"step-{step}" / "scores.json").read_text())
        assert saved["prompts"] == ["a red apple", "a red apple", "a blue car", "a blue car"]  # 2 seeds each
        assert len(set(saved["seeds"])) == 4
        assert saved["columns"] == [f"{n} p{p}" for n in ("testing:brightness", "lgdm:/no/such/head")
                                    for p in (20, 80)]
        bright = [s["testing:brightness"] for s in saved["scores"]]  # 4 rows x 4 columns, row-major
        p20, p80 = sum(bright[0::4]) / 4, sum(bright[1::4]) / 4
        assert record["validation/testing:brightness/p20"] == pytest.approx(p20)
        assert record["validation/testing:brightness/spread"] == pytest.approx(p80 - p20)
        assert read_marker(out / f"checkpoint-{step}")["extra"]["validation"] == {
            k: v for k, v in record.items() if k.startswith("validation/")}
        assert (out / "validation" / f"step-{step}" / "grid.png").is_file()
    assert "validation scores" in curve_series(log) and (out / "training_curves.png").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((out / "logs").rglob("events.out.tfevents.*"))
    tags = EventAccumulator(str(events[0].parent)).Reload().Tags()
    assert {"loss", "lr", "grad_norm", "validation/testing:brightness/spread"} <= set(tags["scalars"])
    assert "validation" in tags["images"]


def test_adapter_validation_flags_are_refused_with_the_fix(scored_folder, tmp_path, capsys):
    run_adapter(scored_folder, tmp_path / "a", ["--reference", "brisque", "--validation_prompt", "x"], expect=2)
    assert "drop --validation_prompt, or train with --score_columns" in capsys.readouterr().err
    run_adapter(scored_folder, tmp_path / "b", ["--score_columns", "testing:brightness", "--validation_steps", "2"],
                expect=2)
    assert "--validation_steps needs the grid's rows" in capsys.readouterr().err
    run_adapter(scored_folder, tmp_path / "c", ["--score_columns", "testing:brightness", "--validation_prompt", "x",
                                                 "--validation_percentiles", "90"], expect=2)
    assert "--validation_percentiles [90.0]: pass percentiles in [0, 1]" in capsys.readouterr().err


def test_two_processes_validate_once_with_the_held_out_guard(tmp_path):
    import shutil

    launcher = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
    argv = acpo_args(tmp_path, 4, ["--held_out_scorer", "testing:darkness", "--keep_best", "held_out",
                                   "--train_batch_size", "1"])
    result = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no",
                             str(ROOT / "recipes" / "train_acpo_lora.py"), *argv],
                            env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=900,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "run"
    assert read_marker(out / "checkpoint-2")["num_processes"] == 2
    assert [r["step"] + 1 for r in read_log(out) if HELD in r] == [2, 4]
    assert read_marker(out / "checkpoint-2")["extra"]["validation"][HELD] == next(
        r[HELD] for r in read_log(out) if r["step"] == 1)  # the main process's values, in the shared marker
    assert result.stdout.count("saved the ACPO LoRA with the best held-out score") == 1
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-2", "step-4"]


def test_resumed_run_with_validation_repeats_the_losses_and_keeps_the_best_over_both_parts(tmp_path):
    import warnings

    from qualityguide.train.held_out import RewardHackingWarning

    keep = ["--held_out_scorer", "testing:darkness", "--keep_best", "held_out", "--checkpoints_total_limit", "1"]
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    for d in (full_dir, part_dir):
        d.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RewardHackingWarning)
        run_acpo(acpo_args(full_dir, 6, keep))
        run_acpo(acpo_args(part_dir, 4, keep))
        run_acpo(acpo_args(part_dir, 6, [*keep, "--resume_from_checkpoint", "latest"]))
    full, part = read_log(full_dir / "run"), read_log(part_dir / "run")
    assert full == part  # validation (sampling, scoring) leaves training untouched: the same losses, bit for bit
    validated = {r["step"] + 1: r[HELD] for r in part if HELD in r}
    best = max(sorted(validated), key=validated.get)
    out = part_dir / "run"
    assert sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")) == sorted({best, 6})
    expected = load_file(str(out / f"checkpoint-{best}" / LORA_STATE_NAME))
    exported = _lora_state(out)
    assert all(torch.equal(exported[k], expected[k]) for k in expected)
