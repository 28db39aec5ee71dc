"""Both training recipes: --push_to_hub/--hub_model_id/--hub_token checked before training, the output folder's
model card, and exactly what would be uploaded (the two network calls replaced by a recorder)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import HfApi, ModelCard
from PIL import Image

from qualityguide.adapter import IQAAdapter

from helpers import load_script, reset_accelerate

TOKEN = "hf_not_a_real_token_0123"


@pytest.fixture()
def recorder(hub_recorder):
    """The push's network calls recorded (conftest's ``hub_recorder``)."""
    return hub_recorder


def _cli(recipe: str, argv: list[str], patch=None) -> int:
    reset_accelerate()
    module = load_script(f"recipes/{recipe}")
    if patch is not None:
        patch(module)
    try:
        return module.cli(argv)
    finally:
        reset_accelerate()


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("hub_prompts") / "prompts.txt"
    path.write_text("a red apple\na blue car\n", encoding="utf-8")
    return path


def acpo_args(prompts, out, extra=()):
    return ["--model", "tiny:sd", "--prompts", str(prompts), "--num_self_samples", "4", "--resolution", "32",
            "--num_inference_steps", "2", "--scorer", "niqe-embedded@192", "--w_quality", "0.05",
            "--train_batch_size", "2", "--max_train_steps", "2", "--checkpointing_steps", "2",
            "--validation_prompt", "a red apple", "--num_validation_images", "1", "--output_dir", str(out), *extra]


def _every_file(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_acpo_recipe_checks_the_hub_first_writes_its_card_and_pushes_the_output(prompts, tmp_path, recorder):
    out = tmp_path / "acpo"
    seen_at_create = []

    def watch(module):  # what existed when the repository was created: nothing trained yet
        original = HfApi.create_repo

        def create_repo(self, repo_id, **kwargs):
            seen_at_create.append(out.exists() and sorted(p.name for p in out.iterdir()))
            return original(self, repo_id, **kwargs)

        HfApi.create_repo = create_repo  # undone by the recorder fixture's monkeypatch

    argv = acpo_args(prompts, out, ["--push_to_hub", "--hub_model_id", "someone/acpo-tiny", "--hub_token", TOKEN])
    assert _cli("train_acpo_lora.py", argv, watch) == 0
    assert seen_at_create == [False]
    assert [c["call"] for c in recorder] == ["create_repo", "upload_folder"]
    create, upload = recorder
    assert create["repo_id"] == upload["repo_id"] == "someone/acpo-tiny" and create["exist_ok"] is True
    assert create["token"] == upload["token"] == TOKEN and upload["folder"] == out
    files = set(upload["files"])
    assert {"README.md", "pytorch_lora_weights.safetensors", "train_log.jsonl", "validation/step-2/grid.png",
            "validation/step-2/scores.json"} <= files
    local = set(_every_file(out))
    # everything but the checkpoints and the caches goes up; nothing else is dropped
    assert files == {n for n in local if not re.match(r"(checkpoint-\d+|cache)/", n)}
    assert any(n.startswith("checkpoint-2/") for n in local) and any(n.startswith("cache/") for n in local)
    assert not [n for n, data in _every_file(out).items() if TOKEN.encode() in data]  # never logged or written

    data = ModelCard.load(out / "README.md").data
    ours = data.qualityguide
    assert data.library_name == "qualityguide" and data.base_model is None and "random-weights" in data.tags
    assert ours["kind"] == "acpo_lora" and ours["base_model_spec"] == "tiny:sd" and ours["random_weights"] is True
    settings = ours["settings"]
    assert settings["acpo"]["w_quality"] == 0.05 and settings["max_train_steps"] == 2 and settings["seed"] == 0
    assert settings["scorer"]["spec"].startswith("niqe-embedded") and re.fullmatch(
        r"[0-9a-f]{64}", settings["scorer"]["weights_sha256"])
    assert settings["data"]["count"] == 4 and settings["lora"]["rank"] == 4
    assert ours["validation"]["step"] == 2 and "quality" in ours["validation"]
    assert ours["validation_grid"] == "validation/step-2/grid.png"
    assert "someone/acpo-tiny" in ModelCard.load(out / "README.md").text  # the loading snippets name the repo


@pytest.mark.parametrize("flags, match", [
    (["--push_to_hub", "--hub_model_id", "someone//bad id"], r"--hub_model_id 'someone//bad id' is not a hub "
                                                              r"repository name.*pass owner/name"),
    (["--hub_model_id", "someone/acpo"], r"--hub_model_id someone/acpo / --hub_token given without --push_to_hub"),
])
def test_a_bad_hub_flag_is_refused_before_training(prompts, tmp_path, recorder, capsys, flags, match):
    out = tmp_path / "refused"
    assert _cli("train_acpo_lora.py", acpo_args(prompts, out, flags)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert re.search(match, err[-1]) and "Traceback" not in "\n".join(err)
    assert recorder == [] and not out.exists()


def test_an_unreachable_hub_is_refused_before_training(prompts, tmp_path, monkeypatch, capsys):
    def offline(self, repo_id, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(HfApi, "create_repo", offline)
    out = tmp_path / "offline"
    assert _cli("train_acpo_lora.py", acpo_args(prompts, out, ["--push_to_hub"])) == 2
    assert re.search(r"--hub_model_id offline: the hub repository could not be created or reached \(OSError: no "
                     r"network\).*drop --push_to_hub", capsys.readouterr().err)
    assert not out.exists()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub_adapter_data")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        Image.fromarray(rng.uniform(0, 255, (64, 64, 3)).astype(np.uint8)).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"photo {i}", "sharpness": f"{rng.uniform():.6f}"})
    with open(root / "metadata.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_adapter_recipe_writes_its_card_and_pushes_the_output(dataset, tmp_path, recorder):
    out = tmp_path / "adapter"
    argv = ["--model", "tiny:sd", "--dataset", str(dataset), "--score_columns", "sharpness", "--resolution", "64",
            "--train_batch_size", "2", "--max_train_steps", "2", "--checkpointing_steps", "1", "--output_dir",
            str(out), "--push_to_hub"]
    assert _cli("train_iqa_adapter.py", argv) == 0
    create, upload = recorder
    assert create["repo_id"] == upload["repo_id"] == "adapter"  # the --output_dir folder's name by default
    assert create["token"] is None  # the saved login
    files = set(upload["files"])
    assert {"README.md", "config.json", "model.safetensors", "quantiles.json", "diffusers/ip_adapter.safetensors",
            "train_log.jsonl"} <= files
    assert files == {n for n in _every_file(out) if not re.match(r"(checkpoint-\d+|latent_cache)/", n)}
    ours = ModelCard.load(out / "README.md").data.qualityguide
    assert ours["kind"] == "iqa_adapter" and ours["random_weights"] is True
    assert ours["settings"]["score_columns"] == {"sharpness": None}  # not written by `qualityguide label`
    assert ours["settings"]["data"]["size"] == 8
    assert ours["settings"]["max_train_steps"] == 2 and ours["settings"]["dropout"]["p_text"] == 0.05
    assert IQAAdapter.from_pretrained(out).score_names == ["sharpness"]


def test_pixel_lora_run_card_says_how_plain_peft_loads_it(dataset, tmp_path):
    import torch
    from peft import PeftModel

    from qualityguide.finetune import load_lora
    from qualityguide.testing import tiny_ddpm

    out = tmp_path / "ddpm"
    argv = ["--model", "tiny:ddpm", "--image_dir", str(dataset), "--scorer", "niqe-embedded@192", "--max_train_steps",
            "2", "--train_batch_size", "2", "--learning_rate", "1e-2", "--checkpointing_steps", "2",
            "--num_inference_steps", "2", "--output_dir", str(out)]
    assert _cli("train_acpo_lora.py", argv) == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.qualityguide["kind"] == "pixel_lora" and "peft" in card.data.tags
    assert "PeftModel.from_pretrained" in card.text and "validation" not in card.data.qualityguide  # none was run
    ours, plain = tiny_ddpm().unet, tiny_ddpm().unet
    load_lora(ours, out)
    x, t = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([10])
    with torch.no_grad():
        assert torch.equal(PeftModel.from_pretrained(plain, out)(x, t).sample, ours(x, t).sample)


def test_adapter_card_records_how_label_scored_each_column(dataset, tmp_path):
    """A column `qualityguide label` wrote goes into the card with the settings that scored it (the scorer and its
    weights' hash), read from the folder's label record."""
    import json
    import shutil

    from qualityguide.cli.commands import main as qualityguide_cli

    folder = tmp_path / "labelled"
    shutil.copytree(dataset, folder)
    assert qualityguide_cli(["label", str(folder), "--scorer", "niqe-embedded@192"]) == 0
    record = json.loads((folder / ".qualityguide" / "labels" / "columns.json").read_text())["columns"]
    out = tmp_path / "adapter"
    argv = ["--model", "tiny:sd", "--train_data_dir", str(folder), "--score_columns", "niqe-embedded@192",
            "--resolution", "64",
            "--train_batch_size", "2", "--max_train_steps", "1", "--output_dir", str(out)]
    assert _cli("train_iqa_adapter.py", argv) == 0
    ours = ModelCard.load(out / "README.md").data.qualityguide
    assert ours["settings"]["score_columns"] == {"niqe-embedded@192": record["niqe-embedded@192"]}
    assert "niqe" in json.dumps(record["niqe-embedded@192"])
