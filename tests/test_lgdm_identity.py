"""LGDM caches and heads are bound to the backbone weights by content; the scorer leaves shared modules alone;
head folders load from disk or a Hugging Face cache."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from qualityguide import load_pipeline, load_scorer
from qualityguide.cli import main
from qualityguide.errors import InputError, WeightsNotFoundError
from qualityguide.scorers.features import ImagePsi
from qualityguide.identity import IDENTITY_FILE, WeightsMismatchError
from qualityguide.lgdm import LGDM, LGDMConfig, LGDMHead, LGDMScorer, HeadConfig

TARGET = "unet.up_blocks.1.resnets.0.conv1.weight"
FLAGS = ["--image-size", "32", "--num-steps", "2", "--t-max", "20", "--psi", "none", "--device", "cpu", "--quiet"]


def perturb(pipe, seed=1):
    """A 1% random change of one decoder matrix (a fine-tune of the up blocks, in miniature)."""
    with torch.no_grad():
        w = pipe.unet.up_blocks[1].resnets[0].conv1.weight
        w.mul_(1 + 0.01 * torch.randn(w.shape, generator=torch.Generator().manual_seed(seed)))
    return pipe


def write_dataset(root, n=6):
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "mos.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "mos", "content"])
        for i in range(n):
            array = np.clip(rng.normal(128, 10 + 15 * i, (40, 44, 3)), 0, 255).astype("uint8")
            Image.fromarray(array).save(root / f"im{i}.png")
            writer.writerow([f"im{i}.png", float(i), f"c{i}"])
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A backbone folder, the same weights re-saved elsewhere (fp32 and fp16), and a 1%-perturbed copy."""
    root = tmp_path_factory.mktemp("models")
    base = load_pipeline("tiny:sd")
    base.save_pretrained(root / "base")
    load_pipeline(str(root / "base")).save_pretrained(root / "copy")
    load_pipeline(str(root / "base"), dtype="fp16").save_pretrained(root / "copy16")
    perturb(load_pipeline(str(root / "base"))).save_pretrained(root / "tuned")
    return root


def test_cli_extract_refuses_other_weights_and_accepts_the_same_weights_elsewhere(folders, tmp_path, capsys):
    data, cache = write_dataset(tmp_path / "data"), tmp_path / "cache"
    extract = ["lgdm", "extract", "--dataset", str(data), "--cache", str(cache), *FLAGS]
    assert main([*extract, "--model", str(folders / "base")]) == 0
    assert (cache / IDENTITY_FILE).is_file()
    assert json.loads((cache / "manifest.json").read_text())["weights_identity"] == IDENTITY_FILE
    capsys.readouterr()
    assert main([*extract, "--model", str(folders / "tuned")]) == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # (above it: diffusers' loading progress bars)
    assert "Traceback" not in err and line.startswith("qualityguide lgdm: error: feature cache")
    assert "other backbone weights" in line and f"{TARGET}: " in line and "sampled values differ" in line
    for copy in ("copy", "copy16"):  # fp16 weights loaded into fp32 modules: the same precision key, same weights
        assert main([*extract, "--model", str(folders / copy), "--dtype", "fp32"]) == 0
        summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        assert summary["cached_before"] == 6 and summary["extracted"] == 0, copy


def test_head_refuses_other_weights_cli_and_python(folders, tmp_path, capsys):
    data, cache, head = write_dataset(tmp_path / "data"), tmp_path / "cache", tmp_path / "head"
    model = tmp_path / "model"
    shutil.copytree(folders / "base", model)
    assert main(["lgdm", "extract", "--dataset", str(data), "--cache", str(cache), "--model", str(model), *FLAGS]) == 0
    assert main(["lgdm", "fit", "--cache", str(cache), "--dataset", str(data), "--out", str(head), "--max-epochs", "3",
                 "--quiet"]) == 0
    assert sorted(p.name for p in head.iterdir()) == ["README.md", "config.json", "fit.json", "model.safetensors",
                                                     IDENTITY_FILE]
    from huggingface_hub import ModelCard

    card = ModelCard.load(head / "README.md").data.qualityguide  # the fit's settings and validation SRCC
    fit = json.loads((head / "fit.json").read_text())
    assert card["kind"] == "lgdm_scorer" and card["settings"]["train_images"] == fit["train"]
    assert card["settings"]["max_epochs"] == 3 and card["validation"]["val_srcc"] == fit["val_srcc"]
    scores = tmp_path / "scores.csv"
    images = [str(data / "im0.png"), str(data / "im1.png")]
    assert main(["score", *images, "--scorer", f"lgdm:{head}", "-o", str(scores), "--quiet"]) == 0
    with pytest.raises(WeightsMismatchError, match=rf"LGDM head .* other backbone weights .*{TARGET}"):
        load_scorer(f"lgdm:{head}", model=str(folders / "tuned"))
    assert load_scorer(f"lgdm:{head}", model=str(folders / "copy16")).lgdm.backbone_spec == str(folders / "copy16")
    shutil.rmtree(model)
    shutil.copytree(folders / "tuned", model)  # the folder the head points to now holds other weights
    capsys.readouterr()
    assert main(["score", *images, "--scorer", f"lgdm:{head}", "-o", str(tmp_path / "s2.csv"), "--quiet"]) == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err and line.startswith("qualityguide score: error: LGDM head")
    assert f"{TARGET}: " in line and "Fix: load the backbone" in line


def test_every_backbone_module_is_part_of_the_cache_identity(tmp_path):
    from qualityguide.lgdm import FeatureCache, cache_manifest

    sdxl = load_pipeline("tiny:sdxl")
    model = LGDM.from_pipeline(sdxl, LGDMConfig(image_size=32, num_steps=2, t_max=20, psi="none"))
    manifest = cache_manifest(model)
    FeatureCache(tmp_path / "c", manifest, create=True, weights=model.backbone_modules())
    names = FeatureCache(tmp_path / "c").weights_identity().names
    assert {n.split(".")[0] for n in names} == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert len(names) == sum(len(list(m.parameters())) for m in model.backbone_modules().values())
    for component, parameter in [("vae", "decoder.conv_out.weight"), ("text_encoder", "final_layer_norm.weight"),
                                 ("text_encoder_2", "text_model.encoder.layers.0.mlp.fc2.weight")]:
        other = load_pipeline("tiny:sdxl")
        with torch.no_grad():
            getattr(other, component).get_parameter(parameter).mul_(1.02)
        changed = LGDM.from_pipeline(other, LGDMConfig(image_size=32, num_steps=2, t_max=20, psi="none"))
        with pytest.raises(WeightsMismatchError, match=rf"1 of {len(names)} parameters differ.*{component}\.{parameter}: "):
            FeatureCache(tmp_path / "c", manifest, weights=changed.backbone_modules())


# ----------------------------------------------------------------------------- the scorer and the user's modules

@pytest.fixture()
def head_dir(tmp_path):
    pipe = load_pipeline("tiny:sd")
    model = LGDM.from_pipeline(pipe, LGDMConfig(image_size=32, num_steps=2, t_max=20, psi="none"))
    head = LGDMHead(HeadConfig(num_steps=2, layer_dims=model.recorder.dims, hidden=(16, 8)))
    torch.nn.init.normal_(head.mlp[-1].weight, std=0.5)
    LGDMScorer(model, head).save_pretrained(tmp_path / "head")
    return tmp_path / "head"


def _state(pipe):
    return {name: (module.training, {(p.device, p.dtype) for p in module.parameters(recurse=False)})
            for component in ("unet", "vae", "text_encoder") for name, module in
            getattr(pipe, component).named_modules(prefix=component)}


def test_loading_with_a_pipeline_leaves_its_modules_alone(head_dir):
    pipe = load_pipeline("tiny:sd")
    pipe.unet.train()  # a user in the middle of training, with a bf16 VAE
    pipe.vae.to(torch.bfloat16)
    before = _state(pipe)
    scorer = load_scorer(f"lgdm:{head_dir}", pipeline=pipe, device="cpu")  # load_scorer calls .eval() and .to()
    assert scorer.lgdm.unet is pipe.unet and not scorer.training
    # LGDM's own psi network (a pyiqa net with psi="pyiqa:<name>"; a stand-in here) is LGDM's, not the pipeline's
    scorer.lgdm.psi = ImagePsi("stand-in", lambda x: x.mean((2, 3)), torch.nn.Linear(3, 2))
    scorer.to(torch.float64)
    scorer.train()
    assert scorer.lgdm.psi.training
    scorer.eval()
    assert _state(pipe) == before
    assert scorer.head.feature_mean.dtype == torch.float64  # the scorer's own state did follow ...
    assert scorer.lgdm.psi.module.weight.dtype == torch.float64 and not scorer.lgdm.psi.training  # ... and psi
    head_keys = {f"head.{k}" for k in scorer.head.state_dict()}
    assert set(scorer.state_dict()) == head_keys
    assert sum(p.numel() for p in scorer.parameters()) == sum(p.numel() for p in scorer.head.parameters())


def test_a_backbone_the_scorer_loaded_itself_follows_it(head_dir):
    scorer = LGDMScorer.from_pretrained(head_dir)  # loads tiny:sd itself
    assert scorer.lgdm.owns_backbone and not scorer.lgdm.unet.training
    scorer.train()
    assert scorer.lgdm.unet.training and scorer.lgdm.vae.training
    scorer.to(torch.float64)
    assert scorer.lgdm.unet.dtype == torch.float64 and scorer.lgdm.text_encoder.dtype == torch.float64
    assert set(scorer.state_dict()) == {f"head.{k}" for k in scorer.head.state_dict()}


def test_device_and_dtype_with_a_pipeline_are_honoured_or_refused(head_dir, monkeypatch):
    pipe = load_pipeline("tiny:sd")
    assert LGDMScorer.from_pretrained(head_dir, pipeline=pipe, device="cpu", dtype="fp32").lgdm.unet is pipe.unet
    with pytest.raises(InputError, match=r"dtype='fp16' but the shared pipeline's U-Net is torch.float32.*pipe\.to"):
        LGDMScorer.from_pretrained(head_dir, pipeline=pipe, dtype="fp16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # "cuda" exists here; the mismatch is the point
    with pytest.raises(InputError, match=r"device='cuda' but the shared pipeline's U-Net is on cpu.*pipe\.to\('cuda'\)"):
        load_scorer(f"lgdm:{head_dir}", pipeline=pipe, device="cuda")
    with pytest.raises(InputError, match=r"model, variant only apply when the scorer loads its own backbone"):
        LGDMScorer.from_pretrained(head_dir, pipeline=pipe, model="tiny:sd", variant="fp16")
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in pipe.unet.parameters())
    half = load_pipeline("tiny:sd", dtype="bf16")
    assert LGDMScorer.from_pretrained(head_dir, pipeline=half, dtype="bf16").lgdm.unet.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- head folders: names, legacy, hub

def test_head_folders_old_names_and_hub_ids(head_dir, tmp_path, monkeypatch):
    import huggingface_hub

    pipe = load_pipeline("tiny:sd")
    x = torch.rand(2, 3, 40, 44, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = LGDMScorer.from_pretrained(head_dir, pipeline=pipe)(x)
    # A folder written before the conventional names (and before identities) still loads, with a warning.
    legacy = tmp_path / "legacy"
    shutil.copytree(head_dir, legacy)
    (legacy / "config.json").rename(legacy / "head_config.json")
    (legacy / "model.safetensors").rename(legacy / "head.safetensors")
    (legacy / IDENTITY_FILE).unlink()
    with pytest.warns(UserWarning, match="cannot be checked"), torch.no_grad():
        torch.testing.assert_close(LGDMScorer.from_pretrained(legacy, pipeline=pipe)(x), expected)
    # lgdm:<hub id> through huggingface_hub, offline, from a Hugging Face cache holding the head's files.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "models--someone--tiny-lgdm"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(head_dir, repo / "snapshots" / commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    with torch.no_grad():
        hub = load_scorer("lgdm:someone/tiny-lgdm", pipeline=pipe)
        torch.testing.assert_close(hub(x), expected)
    with pytest.raises(WeightsMismatchError, match=TARGET):
        load_scorer("lgdm:someone/tiny-lgdm", pipeline=perturb(load_pipeline("tiny:sd")))
    with pytest.raises(WeightsNotFoundError, match=r"'someone/missing' is neither a local folder nor a hub"):
        load_scorer("lgdm:someone/missing", pipeline=pipe)
    with pytest.raises(InputError, match="does not exist"):
        load_scorer("lgdm:./no/such/folder", pipeline=pipe)
    # A local folder of the same name wins over the hub.
    local = tmp_path / "someone" / "tiny-lgdm"
    shutil.copytree(head_dir, local)
    head = LGDMHead.from_pretrained(local)
    with torch.no_grad():
        head.mlp[-1].bias.add_(1.0)
    head.save_pretrained(local)  # the metadata it was loaded with travels along
    with torch.no_grad():
        torch.testing.assert_close(load_scorer("lgdm:someone/tiny-lgdm", pipeline=pipe)(x), expected + 1.0)
