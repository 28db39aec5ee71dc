import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qualityguide.scorers.niqe_fit import FIT_PHOTOS, bundled_photo, fit_pristine
from qualityguide.scorers.nss import EMBEDDED_NIQE_PARAMS, load_niqe_params
from qualityguide.images import load_image

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "evals" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _noise_series(root, stds, mos, size, content=False):
    """The astronaut with Gaussian noise of each std, and a mos.csv (more noise, lower MOS)."""
    base = np.asarray(Image.open(bundled_photo("skimage", "astronaut.png")).convert("RGB").resize((size, size)),
                      dtype=np.float32)
    rng = np.random.default_rng(0)
    lines = ["image,mos,content" if content else "image,mos"]
    for i, (std, score) in enumerate(zip(stds, mos)):
        noisy = np.clip(base + rng.normal(0, std, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(root / f"{i}.png")
        lines.append(f"{i}.png,{score}" + (f",c{i}" if content else ""))
    (root / "mos.csv").write_text("\n".join(lines) + "\n")


def test_embedded_niqe_params_are_reproduced_by_the_fitting_code():
    mu, cov, blocks = fit_pristine([load_image(bundled_photo(*item)) for item in FIT_PHOTOS])
    shipped_mu, shipped_cov = load_niqe_params(EMBEDDED_NIQE_PARAMS)
    assert blocks > 36 * 4  # enough blocks for a stable 36x36 covariance
    assert np.allclose(mu, shipped_mu, rtol=1e-6, atol=1e-9) and np.allclose(cov, shipped_cov, rtol=1e-6, atol=1e-9)
    assert np.all(np.linalg.eigvalsh(cov) > 0)


def test_nriqa_eval_on_a_written_dataset(tmp_path):
    nriqa = _load("nriqa")
    _noise_series(tmp_path, [3.0 * i for i in range(12)], [100 - 5 * i for i in range(12)], size=256)
    out = tmp_path / "out"
    results = nriqa.evaluate(str(tmp_path), ["niqe-embedded"], {}, out, n_boot=50)
    stats = results["scorers"]["niqe-embedded"]
    assert stats["n_scored"] == 12 and stats["srcc"] > 0.9
    assert stats["srcc_ci95"][0] <= stats["srcc"] <= stats["srcc_ci95"][1] + 1e-9
    assert json.loads((out / "results.json").read_text())["n_images"] == 12
    assert "niqe-embedded" in (out / "results.md").read_text()
    assert (out / "scatter_niqe-embedded.png").stat().st_size > 1000
    # resumable: a second run reuses the score table instead of rescoring
    again = nriqa.evaluate(str(tmp_path), ["niqe-embedded"], {}, out, n_boot=50)
    assert again["scorers"]["niqe-embedded"]["srcc"] == pytest.approx(stats["srcc"])


def test_nriqa_trained_variants_learn_noise_level(tmp_path):
    """NSS features + the LGDM head on 30 images whose MOS is set by the noise level: the protocol must find it."""
    nriqa = _load("nriqa")
    levels = [i % 10 for i in range(30)]
    _noise_series(tmp_path, [4.0 * k for k in levels], [100 - 8 * k for k in levels], size=96, content=True)
    out = tmp_path / "out"
    results = nriqa.evaluate_trained(str(tmp_path), ["nss:brisque", "lgdm:psi=none"], out, model="tiny:sd",
                                     image_size=32, num_steps=2, t_max=20, repeats=3)
    nss = results["variants"]["nss:brisque"]
    assert nss["srcc"]["n"] == 3 and nss["srcc"]["median"] > 0.7
    assert "random weights" in results["variants"]["lgdm:psi=none"]["label"]
    assert "mechanics check" in (out / "trained.md").read_text()
    assert (out / "trained_srcc.png").stat().st_size > 1000


def _module(name):
    """An evals/ script as a module, registered in sys.modules (dataclasses and pickling look it up there)."""
    import sys

    if name not in sys.modules:
        sys.modules[name] = _load(name)
    return sys.modules[name]


def _tiny_sd_lora(directory, scale):
    """A LoRA for tiny:sd (seed 0): add_lora, lora_B set to ``scale`` x a seeded normal draw (0: a zero LoRA), saved."""
    import torch

    from qualityguide.finetune import add_lora, save_lora
    from qualityguide.testing import tiny_sd

    unet = tiny_sd().unet
    add_lora(unet, rank=4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    save_lora(unet, directory)
    return directory


def test_finetune_eval_smoke_on_tiny_sd(tmp_path):
    """Base vs LoRA on tiny:sd: a perturbed LoRA drifts, a zero LoRA (lora_B = 0) does not, CLIP is skipped offline."""
    finetune = _module("finetune")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# held out\na red fox in snow\na lighthouse at night\n")
    common = ["--model", "tiny:sd", "--prompts", str(prompts), "--seeds", "0", "1", "--steps", "2",
              "--scorer", "niqe-embedded@192", "--held-out-scorer", "niqe-embedded@256", "--drift-timesteps", "2",
              "--n-boot", "50"]
    runs = {}
    for name, scale in (("perturbed", 0.5), ("zero", 0.0)):
        lora = _tiny_sd_lora(tmp_path / f"lora_{name}", scale)
        runs[name] = finetune.main(common + ["--lora", str(lora), "--out", str(tmp_path / name)])
    perturbed, zero = runs["perturbed"], runs["zero"]
    assert perturbed["drift"]["mean"] > 0 and all(d > 0 for d in perturbed["drift"]["per_prompt"])
    assert zero["drift"]["mean"] == 0.0
    for role in ("guiding", "held_out"):
        gain = perturbed["gains"][role]
        assert np.isfinite(gain["gain"]) and gain["gain_ci95"][0] <= gain["gain"] <= gain["gain_ci95"][1] + 1e-9
        assert gain["gain"] == pytest.approx(gain["finetuned_mean"] - gain["base_mean"])
        assert zero["gains"][role]["gain"] == 0.0  # identical images with a zero LoRA
    assert perturbed["clip"]["skipped"] and "--clip-weights" in perturbed["clip"]["note"]
    assert zero["diversity"]["base"] == pytest.approx(zero["diversity"]["finetuned"])
    assert perturbed["prompts"] == 2 and perturbed["mechanics_only"]
    out = tmp_path / "perturbed"
    assert json.loads((out / "results.json").read_text())["drift"]["mean"] == perturbed["drift"]["mean"]
    assert "mechanics only" in (out / "results.md").read_text()
    with Image.open(out / "grid.png") as grid:
        assert grid.size[1] == 2 * 64 + 14 and grid.size[0] > 4 * 64


def test_finetune_eval_on_an_unconditional_pixel_model(tmp_path):
    """tiny:ddpm with a peft-format LoRA: no prompts, so one unconditional row and no CLIP score."""
    import torch

    from qualityguide.finetune import add_lora, save_lora
    from qualityguide.testing import tiny_ddpm

    unet = tiny_ddpm().unet
    add_lora(unet, rank=2)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    save_lora(unet, tmp_path / "lora")
    result = _module("finetune").main(["--model", "tiny:ddpm", "--lora", str(tmp_path / "lora"), "--seeds", "0", "1",
                                       "--steps", "2", "--scorer", "niqe-embedded@192", "--held-out-scorer",
                                       "niqe-embedded@256", "--n-boot", "20", "--out", str(tmp_path / "out")])
    assert result["prompts"] == 1 and result["cfg"] is None and result["drift"]["mean"] > 0
    assert result["clip"]["skipped"] and "unconditional" in result["clip"]["note"]
    assert "no CFG" in (tmp_path / "out" / "results.md").read_text()


def test_acpo_toy_smoke(tmp_path):
    """Two anchor weights, a few steps on a few crops of the shared photos: structure, files, finite numbers."""
    from qualityguide.data import shared_data_dir

    if shared_data_dir() is None:
        pytest.skip("shared evaluation data (../shared/data or $QUALITYGUIDE_DATA) not found")
    acpo_toy = _module("acpo_toy")
    out = tmp_path / "out"
    summary = acpo_toy.main(["--anchor-weights", "0", "3", "--steps", "3", "--n-images", "20", "--base-steps", "8",
                             "--samples", "4", "--sample-steps", "3", "--probe", "6", "--probe-timesteps", "3",
                             "--n-boot", "20", "--out", str(out), "--cache", str(tmp_path / "cache")])
    assert [r["w_anchor"] for r in summary["runs"]] == [0.0, 3.0]
    for r in summary["runs"]:
        assert np.isfinite(r["drift"]) and r["drift"] > 0  # three steps move a B=0 LoRA off the base
        for role in ("guiding", "held_out"):
            gain = r["gains"][role]
            assert gain["pairs"] <= 4 and (gain["pairs"] == 0 or np.isfinite(gain["gain"]))
        assert set(r["final_terms"]) == {"loss", "diffusion", "anchor", "quality"}
    assert summary["scorers"]["guiding"] == acpo_toy.toy_task.TOY_SCORER
    assert json.loads((out / "summary.json").read_text())["runs"][1]["w_anchor"] == 3.0
    assert "| 3 |" in (out / "results.md").read_text()
    assert (out / "tradeoff.png").stat().st_size > 1000
    with Image.open(out / "grid.png") as grid:  # rows: base + two anchor weights, 4 samples each
        assert 0.65 < grid.size[1] / grid.size[0] < 0.85
