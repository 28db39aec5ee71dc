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
    assert (out / "training_curves.png").is_file()


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
