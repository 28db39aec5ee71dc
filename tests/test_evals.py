import dataclasses
import hashlib
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evals.common import flags
from qualityguide.errors import InputError
from qualityguide.images import load_image
from qualityguide.scorers.niqe_fit import FIT_PHOTOS, bundled_photo, fit_pristine
from qualityguide.scorers.nss import EMBEDDED_NIQE_PARAMS, load_niqe_params

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    """The eval ``evals/<name>.py`` (or the package ``evals/<name>/``), imported as ``evals.<name>``: the one way
    tests load evals (pytest puts the repository root on ``sys.path``; see ``pythonpath`` in pyproject.toml)."""
    return importlib.import_module(f"evals.{name}")


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


def _tiny_sd_lora(directory, scale):
    """A LoRA for tiny:sd (seed 0): add_lora, lora_B set to ``scale`` x a seeded normal draw (0: a zero LoRA), saved."""
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
    finetune = _load("finetune")
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
    from qualityguide.finetune import add_lora, save_lora
    from qualityguide.testing import tiny_ddpm

    unet = tiny_ddpm().unet
    add_lora(unet, rank=2)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    save_lora(unet, tmp_path / "lora")
    result = _load("finetune").main(["--model", "tiny:ddpm", "--lora", str(tmp_path / "lora"), "--seeds", "0", "1",
                                       "--steps", "2", "--scorer", "niqe-embedded@192", "--held-out-scorer",
                                       "niqe-embedded@256", "--n-boot", "20", "--out", str(tmp_path / "out")])
    assert result["prompts"] == 1 and result["cfg"] is None and result["drift"]["mean"] > 0
    assert result["clip"]["skipped"] and "unconditional" in result["clip"]["note"]
    assert "no CFG" in (tmp_path / "out" / "results.md").read_text()


def test_acpo_toy_smoke(shared_data, params, tmp_path):
    """Two anchor weights, a few steps on a few crops of the shared photos: structure, files, finite numbers."""
    acpo_toy = _load("acpo_toy")
    out = tmp_path / "out"
    summary = acpo_toy.main(["--anchor-weights", "0", "3", "--steps", "3", "--n-images", "20", "--base-steps", "8",
                             "--samples", "4", "--sample-steps", "3", "--probe", "6", "--probe-timesteps", "3",
                             "--n-boot", "20", "--out", str(out), "--cache", str(tmp_path / "cache"),
                             "--data", str(shared_data), "--judge-photos", "8", "--judge-steps", "30"])
    assert [r["w_anchor"] for r in summary["runs"]] == [0.0, 3.0]
    for r in summary["runs"]:
        assert np.isfinite(r["drift"]) and r["drift"] > 0  # three steps move a B=0 LoRA off the base
        for role in ("guiding", "held_out"):
            gain = r["gains"][role]
            assert gain["pairs"] <= 4 and (gain["pairs"] == 0 or np.isfinite(gain["gain"]))
        assert set(r["final_terms"]) == {"loss", "diffusion", "anchor", "quality"}
    assert summary["scorers"]["guiding"] == acpo_toy.toy.TOY_SCORER
    assert json.loads((out / "summary.json").read_text())["runs"][1]["w_anchor"] == 3.0
    assert "| 3 |" in (out / "results.md").read_text()
    assert (out / "tradeoff.png").stat().st_size > 1000
    judge = summary["judge"]
    assert judge["photos"] == 8 and judge["held_out"]["crops"] > 0 and 0 <= judge["base"]["p_clean"] <= 1
    for r in summary["runs"]:
        v = r["judge"]
        assert v["n"] == 4 and 0 <= v["p_clean"] <= 1 and 0 <= v["level"] <= 3
        assert v["p_clean_gain"]["pairs"] == 4
        assert v["direction"] in ("toward clean", "away from clean", "no clear move")
        assert np.isclose(v["p_clean_gain"]["gain"], v["p_clean"] - judge["base"]["p_clean"])
    assert "| 3 |" in (out / "results.md").read_text() and "Toy judge" in (out / "results.md").read_text()
    with Image.open(out / "grid.png") as grid:  # rows: base + two anchor weights, 4 samples each, labelled
        assert grid.size[0] > 4 * 96 and grid.size[1] > 3 * 96  # 2x images plus a label band and captions


def test_acpo_toy_grid_is_labelled_by_model_with_each_samples_scores():
    """Row = model (base, then each anchor weight); under each image its guiding, held-out and judge scores."""
    acpo_toy = _load("acpo_toy")
    scores = {"guiding": {"base": np.array([10.0, 20.0]), 3.0: np.array([30.5, 40.25])},
              "held_out": {"base": np.array([-1.0, -2.0]), 3.0: np.array([-3.5, np.nan])}}
    verdicts = {"base": {"p_clean": torch.tensor([0.1, 0.2]), "level": torch.tensor([2.0, 1.25])},
                3.0: {"p_clean": torch.tensor([0.25, 0.875]), "level": torch.tensor([0.5, 3.0])}}
    captions, rows = acpo_toy.grid_labels(["base", 3.0], scores, verdicts, 2)
    assert rows == ["base", "w_anchor 3"]
    assert captions == ["g 10.0\nh -1.00\nc 0.10 l 2.0", "g 20.0\nh -2.00\nc 0.20 l 1.2",
                        "g 30.5\nh -3.50\nc 0.25 l 0.5", "g 40.2\nh nan\nc 0.88 l 3.0"]
    assert acpo_toy.judge_direction({"gain_ci95": [0.01, 0.2]}, {"gain_ci95": [-0.5, -0.1]}) == "toward clean"
    assert acpo_toy.judge_direction({"gain_ci95": [-0.2, -0.01]}, {"gain_ci95": [0.1, 0.5]}) == "away from clean"
    assert acpo_toy.judge_direction({"gain_ci95": [-0.01, 0.2]}, {"gain_ci95": [-0.5, -0.1]}) == "no clear move"
    assert acpo_toy.judge_direction({"gain_ci95": None}, {"gain_ci95": None}) == "no clear move"


# ----------------------------------------------------------------------------------------------- toy task
def _tiny_config(toy, kind, **kwargs):
    """A base model small enough to train in a second: 16 px, two levels, attention on the second."""
    return toy.BaseConfig(crop=16, steps=3, batch_size=4, seed=3, kind=kind, block_out_channels=(8, 16),
                          attention=(False, True), norm_num_groups=4, cross_attention_dim=8, **kwargs)


def _synthetic_crops(toy, n=6, size=16):
    g = torch.Generator().manual_seed(0)
    images = _to8(torch.rand(n, 3, size, size, generator=g))
    return toy.Crops(images, ["clean"] * n, torch.zeros(n, dtype=torch.long), [f"synthetic_{i}.png" for i in range(n)])


def _to8(x):
    return torch.round(x * 255) / 255


def test_toy_distortions_match_independent_implementations(photo):
    toy = _load("toy")
    import io

    from scipy.ndimage import gaussian_filter

    clean = _to8(photo[0, :, 100:148, 100:148])
    for level, sigma in enumerate(toy.LEVELS["blur"], start=1):
        radius = int(np.ceil(3 * sigma))  # torchvision's kernel: 2 * ceil(3 sigma) + 1 taps, mirrored border
        want = np.stack([gaussian_filter(c, sigma, mode="mirror", truncate=radius / sigma) for c in clean.numpy()])
        got = toy.distort(clean, "blur", level).numpy()
        assert np.abs(got - np.round(want * 255) / 255).max() <= 1 / 255 + 1e-6
    for level, std in enumerate(toy.LEVELS["noise"], start=1):
        noisy = toy.distort(clean, "noise", level, seed=7)
        assert torch.equal(noisy, toy.distort(clean, "noise", level, seed=7))
        inside = (clean > 0.2) & (clean < 0.8)  # away from clipping
        assert abs(float((noisy - clean)[inside].std()) - std) < 0.15 * std
    for level, quality in enumerate(toy.LEVELS["jpeg"], start=1):
        buffer = io.BytesIO()
        Image.fromarray((clean.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buffer, "JPEG",
                                                                                               quality=quality)
        want = np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32) / 255
        assert np.array_equal(toy.distort(clean, "jpeg", level).permute(1, 2, 0).numpy(), want)
    assert torch.equal(toy.distort(clean, "clean", 0), clean)
    with pytest.raises(InputError, match="is not one of"):
        toy.distort(clean, "blur", 4)


def test_toy_crops_are_deterministic_and_graded(shared_data, params):
    toy = _load("toy")
    crops = toy.build_crops(shared_data / "biq2021", 40, seed=0)
    again = toy.build_crops(shared_data / "biq2021", 40, seed=0)
    other = toy.build_crops(shared_data / "biq2021", 40, seed=1)
    assert torch.equal(crops.images, again.images) and crops.fingerprint() == again.fingerprint()
    assert (crops.distortion, crops.source) == (again.distortion, again.source)
    assert crops.fingerprint() != other.fingerprint() and crops.source != other.source
    assert crops.images.shape == (40, 3, 48, 48) and crops.images.dtype == torch.float32
    assert float(crops.images.min()) >= 0 and float(crops.images.max()) <= 1
    assert torch.equal(crops.images, _to8(crops.images))  # stored at 8 bits
    assert len(set(crops.source)) == 40  # one crop per photo
    pairs = [(d, int(k)) for d, k in zip(crops.distortion, crops.level)]
    assert sorted(set(pairs)) == sorted(toy.CONDITIONS) and all(pairs.count(c) == 4 for c in toy.CONDITIONS)
    # A subset of families: balanced over their conditions, the same photos (the draw is otherwise unchanged).
    noisy = toy.build_crops(shared_data / "biq2021", 40, seed=0, distortions=("clean", "noise"))
    subset = [(d, int(k)) for d, k in zip(noisy.distortion, noisy.level)]
    assert sorted(set(subset)) == [("clean", 0)] + [("noise", k) for k in (1, 2, 3)]
    assert all(subset.count(c) == 10 for c in set(subset)) and noisy.source == crops.source
    for bad in (("clean", "rain"), (), ("noise", "noise")):
        with pytest.raises(InputError, match="distortions="):
            toy.build_crops(shared_data / "biq2021", 4, distortions=bad)

    scorer = toy.load_toy_scorer(toy.TOY_SCORER, params_dir=params)
    assert Path(scorer.source) == params / "brisque_live_svm.pth"
    scores = toy.score_images(scorer, crops.images, progress=False)
    assert scores.dtype == torch.float64 and bool(torch.isfinite(scores).all())
    assert torch.allclose(scores[:5], scorer(crops.images[:5]).double())  # batching changes nothing
    tracking = _load("toy_task").level_tracking(crops, scores)
    assert tracking["spearman_vs_level"]["overall"] < -0.3
    # The same crops at every level: each step up in level lowers the mean score, for every distortion.
    clean = crops.images[[i for i, (d, _) in enumerate(pairs) if d == "clean"]]
    base = scorer(clean).mean()
    for distortion in ("blur", "noise", "jpeg"):
        means = [base] + [scorer(torch.stack([toy.distort(c, distortion, k, seed=i) for i, c in enumerate(clean)]))
                          .mean() for k in (1, 2, 3)]
        assert all(a > b for a, b in zip(means, means[1:])), (distortion, means)


def test_toy_scorers_and_data_errors(params, tmp_path):
    toy = _load("toy")
    held_out = toy.load_toy_scorer(toy.HELD_OUT_SCORER, params_dir=params)
    assert held_out.differentiable and held_out.name == toy.HELD_OUT_SCORER
    crop = _to8(torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    held_out(crop).sum().backward()
    assert bool(torch.isfinite(crop.grad).all()) and float(crop.grad.abs().sum()) > 0
    with pytest.raises(InputError, match="brisque_live_svm.pth"):
        toy.load_toy_scorer("brisque", params_dir=tmp_path)
    with pytest.raises(InputError, match="has no biq2021/"):
        toy.resolve_data_dir(tmp_path)
    (tmp_path / "images").mkdir()
    with pytest.raises(InputError, match="pass its parent"):
        toy.resolve_data_dir(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        toy.resolve_data_dir(tmp_path / "nowhere")
    assert toy.resolve_data_dir(params.parent) == params.parent
    with pytest.raises(InputError, match="holds only 0 photos|holds no images"):
        toy.build_crops(tmp_path, 3)
    with pytest.raises(InputError, match="not a multiple of 8"):
        toy.BaseConfig(crop=44)
    with pytest.raises(InputError, match="kind="):
        toy.BaseConfig(kind="latent")


@pytest.mark.parametrize("kind", ["conditional", "unconditional"])
def test_toy_base_trains_with_epsilon_mse_caches_and_reloads(tmp_path, kind):
    toy = _load("toy")
    from diffusers import DDPMScheduler

    crops, config = _synthetic_crops(toy), _tiny_config(toy, kind)
    (tmp_path / toy.cache_key(crops, config)).mkdir()  # a folder left by something that did not finish: not trusted
    unet, _, info = toy.load_or_train_base(crops, config, tmp_path, progress=False)
    assert not info["loaded"] and len(info["losses"]) == 3 and np.isfinite(info["final_loss"])
    assert type(unet).__name__ == ("UNet2DConditionModel" if kind == "conditional" else "UNet2DModel")
    assert sorted(p.name for p in tmp_path.iterdir()) == [info["key"]]  # no temporary folder left behind
    again, _, info2 = toy.load_or_train_base(crops, config, tmp_path, progress=False)
    assert info2["loaded"] and info2["key"] == info["key"] and info2["losses"] == info["losses"]
    trained, reloaded = unet.state_dict(), again.state_dict()
    assert trained.keys() == reloaded.keys() and all(torch.equal(trained[k], reloaded[k]) for k in trained)
    # Retraining from scratch gives the same weights (everything is seeded).
    retrained, _, _ = toy.train_base(crops, config, progress=False)
    assert all(torch.equal(trained[k], v) for k, v in retrained.state_dict().items())
    # Another config or other crops are another model.
    assert toy.cache_key(crops, _tiny_config(toy, kind, lr=2e-3)) != info["key"]
    assert toy.cache_key(_synthetic_crops(toy, n=5), config) != info["key"]
    (tmp_path / info["key"] / "info.json").write_text("{")  # damaged: trained again, never trusted
    with pytest.warns(UserWarning, match="cannot be read"):
        _, _, info3 = toy.load_or_train_base(crops, config, tmp_path, progress=False)
    assert not info3["loaded"] and info3["losses"] == info["losses"]
    assert toy.load_or_train_base(crops, config, tmp_path, progress=False)[2]["loaded"]

    # The first step's loss is the epsilon MSE at diffusers' own forward noising of that step's batch.
    fresh = toy.build_unet(config)
    x0, noise, t = _first_batch(crops, config)
    noisy = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").add_noise(x0, noise, t)
    kwargs = {"encoder_hidden_states": torch.zeros(len(t), 1, 8)} if kind == "conditional" else {}
    with torch.no_grad():
        want = torch.nn.functional.mse_loss(fresh(noisy, t, **kwargs).sample, noise)
    assert info["losses"][0] == pytest.approx(float(want), rel=1e-5)


def _first_batch(crops, config):
    """Step 0's clean batch (flips applied), noise and timesteps, drawn here as train_base documents them."""
    from qualityguide.train import batch_indices, step_generator

    index = batch_indices(len(crops), config.batch_size, 0, config.seed)
    generator = step_generator(config.seed, 0)
    x0 = crops.images[index] * 2 - 1
    flip = torch.rand(len(index), generator=generator) < 0.5
    x0 = torch.stack([x.flip(-1) if f else x for x, f in zip(x0, flip)])
    t = torch.randint(0, 1000, (len(index),), generator=generator)
    return x0, torch.randn(x0.shape, generator=generator), t


def test_toy_base_v_prediction_and_joint_training(tmp_path):
    toy = _load("toy")
    from diffusers import DDPMScheduler

    from qualityguide.adapter import IQAAdapter, ScoreQuantiles

    crops, eps_config = _synthetic_crops(toy), _tiny_config(toy, "conditional")
    config = _tiny_config(toy, "conditional", prediction_type="v_prediction")
    # Epsilon bases keep the key they had before the field existed; v-prediction is another model.
    old = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(eps_config))).items() if k != "prediction_type"}
    payload = json.dumps({"config": old, "crops": crops.fingerprint(), "version": toy.TASK_VERSION}, sort_keys=True)
    assert toy.cache_key(crops, eps_config) == "conditional-" + hashlib.sha256(payload.encode()).hexdigest()[:16]
    assert toy.cache_key(crops, config) != toy.cache_key(crops, eps_config)
    with pytest.raises(InputError, match="prediction_type="):
        toy.BaseConfig(prediction_type="sample")
    unet, scheduler, info = toy.load_or_train_base(crops, config, tmp_path, progress=False)
    assert scheduler.config.prediction_type == "v_prediction" and info["config"]["prediction_type"] == "v_prediction"
    assert toy.load_or_train_base(crops, config, tmp_path, progress=False)[2]["loaded"]
    # The first step's loss is the MSE to diffusers' own velocity target.
    fresh = toy.build_unet(config)
    x0, noise, t = _first_batch(crops, config)
    reference = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="v_prediction")
    with torch.no_grad():
        out = fresh(reference.add_noise(x0, noise, t), t, encoder_hidden_states=torch.zeros(len(t), 1, 8)).sample
    want = torch.nn.functional.mse_loss(out, reference.get_velocity(x0, noise, t))
    assert info["losses"][0] == pytest.approx(float(want), rel=1e-5)

    # Joint training: the adapter trains with the U-Net from the first step, and is detached afterwards.
    labels = torch.linspace(0, 1, len(crops)).double()
    adapter = IQAAdapter.for_unet(fresh, ["q"], num_tokens=2)
    adapter.set_quantiles(ScoreQuantiles.fit({"q": labels}))
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    joint, _, losses = toy.train_base(crops, config, progress=False, adapter=adapter, labels=labels)
    assert adapter.attached_unet is None and joint.encoder_hid_proj is None and len(losses) == config.steps
    assert all(not torch.equal(before[k], v) for k, v in adapter.state_dict().items() if k.endswith("weight"))
    plain = toy.train_base(crops, config, progress=False)[0].state_dict()
    assert any(not torch.equal(plain[k], v) for k, v in joint.state_dict().items())  # the condition changed training
    with pytest.raises(InputError, match="needs both adapter and labels"):
        toy.train_base(crops, config, progress=False, adapter=adapter)
    with pytest.raises(InputError, match="labels for"):
        toy.train_base(crops, config, progress=False, adapter=adapter, labels=labels[:2])


@pytest.mark.parametrize("kind", ["conditional", "unconditional"])
def test_toy_sample_is_deterministic_ddim(kind):
    toy = _load("toy")
    from diffusers import DDIMPipeline

    config = _tiny_config(toy, kind)
    unet, scheduler = toy.build_unet(config).eval(), toy.build_scheduler(config)
    images = toy.sample(unet, scheduler, 3, seed=5, steps=4, progress=False)
    assert images.shape == (3, 3, 16, 16) and float(images.min()) >= 0 and float(images.max()) <= 1
    assert torch.equal(images, toy.sample(unet, scheduler, 3, seed=5, steps=4, progress=False))
    assert not torch.equal(images, toy.sample(unet, scheduler, 3, seed=6, steps=4, progress=False))
    if kind == "conditional":
        assert toy.null_condition(unet, 3).shape == (3, 1, 8) and not toy.null_condition(unet, 3).any()
        explicit = toy.sample(unet, scheduler, 3, seed=5, steps=4, encoder_hidden_states=toy.null_condition(unet, 3),
                              progress=False)
        one_row = toy.sample(unet, scheduler, 3, seed=5, steps=4, encoder_hidden_states=toy.null_condition(unet, 1),
                             progress=False)
        assert torch.equal(images, explicit) and torch.equal(images, one_row)
    else:
        assert toy.null_condition(unet, 3) is None
        pipe = DDIMPipeline(unet=unet, scheduler=scheduler)  # diffusers' own DDIM loop
        pipe.set_progress_bar_config(disable=True)
        want = pipe(batch_size=3, generator=torch.Generator().manual_seed(5), num_inference_steps=4, eta=0.0,
                    output_type="np").images
        assert np.allclose(images.permute(0, 2, 3, 1).numpy(), want, atol=1e-5)
        with pytest.raises(InputError, match="unconditional"):
            toy.sample(unet, scheduler, 3, seed=5, encoder_hidden_states=torch.zeros(1, 1, 8))


def test_toy_save_grid_labels_crisp_upscaled_cells(tmp_path):
    """Each cell is its image upscaled (nearest) before the texts are drawn; rows, columns and captions add bands."""
    from evals import toy

    images = torch.rand(4, 3, 8, 8)
    toy.save_grid(images, tmp_path / "plain.png", columns=2, scale=3)
    plain = np.asarray(Image.open(tmp_path / "plain.png"))
    assert plain.shape == (2 * 2 + 2 * 24 + 2, 2 * 2 + 2 * 24 + 2, 3)  # border 2, cells 24 px, padding 2
    cell = (images[3] * 255).round().byte().permute(1, 2, 0).numpy().repeat(3, 0).repeat(3, 1)
    assert np.array_equal(plain[2 + 26:2 + 26 + 24, 2 + 26:2 + 26 + 24], cell)
    toy.save_grid(images, tmp_path / "labelled.png", columns=2, scale=3, captions=["-31.5"] * 4,
                  row_labels=["p=0.05", "p=0.95"], column_labels=["seed 0", "seed 1"])
    labelled = np.asarray(Image.open(tmp_path / "labelled.png"))
    assert labelled.shape[0] > plain.shape[0] + 20 and labelled.shape[1] > plain.shape[1] + 20
    assert (labelled < 128).all(axis=2).sum() > (plain < 128).all(axis=2).sum()  # dark text was drawn


def test_adapter_control_smoke(shared_data, params, tmp_path, monkeypatch):
    control = _load("adapter_control")
    out = tmp_path / "out"
    argv = ["--data", str(shared_data), "--out", str(out), "--cache", str(tmp_path / "cache"), "--n-images", "20",
            "--base-steps", "3", "--adapter-steps", "3", "--batch-size", "32", "--samples", "3", "--sample-steps", "3",
            "--targets", "0.1", "0.5", "0.9", "--joint", "--check-steps", "2", "--check-base-steps", "3",
            "--twins", "3", "--check-twins", "2", "--judge-photos", "8"]
    summary = control.main(argv)
    results = summary["results"]
    assert len(results) == 7 and {"adapter", "shuffled labels", "off", "joint model (upper bound)"} <= set(results)
    guided = {"adapter", "adapter, quality CFG 3"}
    assert set(summary["versus_shuffled"]) == set(summary["permutation"]) == set(summary["twin_results"]) == guided
    assert summary["versus_shuffled"]["adapter"]["seeds"] == 3
    for label in guided:  # twin 1 at every target (the table's row), twins 2 and 3 at the extremes only
        twins = summary["twin_results"][label]
        assert [t["targets"] for t in twins] == [[0.1, 0.5, 0.9], [0.1, 0.9], [0.1, 0.9]]
        assert twins[0]["scores"] == results[label.replace("adapter", "shuffled labels")]["scores"]
        test = summary["permutation"][label]
        rises = [np.nanmean(np.subtract(t["scores"][-1], t["scores"][0])) for t in twins]
        assert np.allclose(test["twins"], rises) and test["of"] == 4
        true = np.nanmean(np.subtract(results[label]["scores"][-1], results[label]["scores"][0]))
        assert np.isclose(test["statistic"], true) and test["p"] == (1 + sum(r >= true for r in rises)) / 4
        assert len(test["judge_p_clean"]["twins"]) == 3
    assert len(set(summary["final_loss_twins"])) == 3  # three different label permutations
    judge = results["adapter"]["judge"]
    assert len(judge["p_clean"]) == len(judge["level"]) == 3 and all(0 <= v <= 3 for v in judge["level"])
    assert np.shape(judge["p_clean_scores"]) == (3, 3) and summary["judge"]["held_out"]["photos"] == 2
    assert not results["joint model (upper bound)"]["identical_for_every_target"]
    assert np.isfinite(summary["final_loss_joint"]) and summary["prediction_type"] == "v_prediction"
    checks = summary["known_attribute_checks"]
    assert set(checks) == {"brightness", "noise amplitude"}
    for check in checks.values():
        assert {"adapter", "shuffled labels", "off"} == set(check["results"]) and check["adapter_steps"] == 2
        assert check["results"]["off"]["identical_for_every_target"] and len(check["final_loss_twins"]) == 2
        assert check["permutation"]["adapter"]["of"] == 3
        assert all(0 <= m <= 1 for r in check["results"].values() for m in r["mean"])  # brightness, pixel std
    assert all(0 < v < 0.5 for v in checks["noise amplitude"]["training_set_value_at_target"])
    text = (out / "results.md").read_text()
    assert text.count("Known-attribute check") == 2 and "permutation p" in text and "P(clean) @ p=0.9" in text
    assert np.isfinite(results["adapter"]["spearman"]) and not results["adapter"]["identical_for_every_target"]
    assert results["off"]["identical_for_every_target"] and np.isnan(results["off"]["spearman"])
    assert results["adapter"]["paired"]["seeds"] == 3 and np.shape(results["adapter"]["scores"]) == (3, 3)
    assert "within-seed Spearman" in text and "shuffled labels" in text
    assert all(len(r["mean"]) == 3 for r in results.values()) and summary["crops"] <= 20
    assert summary["batch_size"] == summary["crops"]  # --batch-size 32 > the crops: the batch is all of them
    assert summary["threads"] == 1 and not summary["base_model"]["loaded"]
    assert json.loads((out / "summary.json").read_text())["targets"] == [0.1, 0.5, 0.9]
    assert (out / "control.png").stat().st_size > 1000
    grid, models = Image.open(out / "grid.png"), Image.open(out / "models.png")
    assert grid.height > 3 * 2 * 48 and models.height > 14 * 2 * 48 > grid.height  # 7 models x 2 targets, labelled
    assert grid.width > 3 * 2 * 48 + 40  # the row labels' band
    # a rerun with the same settings reads every finished adapter back instead of training it again
    monkeypatch.setattr(control, "train_adapter", lambda *a, **k: pytest.fail("trained again"))
    again = control.main(argv[:-6] + ["--twins", "3", "--check-twins", "2", "--judge-photos", "8", "--no-check"])
    for label in ("adapter", "adapter, quality CFG 3", "shuffled labels", "off"):
        assert again["results"][label]["scores"] == results[label]["scores"]
    assert again["permutation"] == summary["permutation"] and again["final_loss_twins"] == summary["final_loss_twins"]


def test_adapter_control_twins_are_distinct_permutations_otherwise_identical(monkeypatch):
    """Twin k permutes the labels with seed + 1 + k (twin 0 is the earlier single twin); the true adapter keeps
    them; everything else (initial weights, batches) is the same call."""
    import argparse

    control = _load("adapter_control")
    from qualityguide.adapter import IQAAdapter

    seen, condition = [], IQAAdapter.condition

    def recording_condition(self, values):
        seen.append(values[:, 0].clone())
        return condition(self, values)

    monkeypatch.setattr(IQAAdapter, "condition", recording_condition)
    args = argparse.Namespace(seed=4, num_tokens=1, lr=1e-3, p_quality=0.1, adapter_steps=1, batch_size=64, twins=3)
    from evals.toy import BaseConfig, build_scheduler, build_unet

    config = BaseConfig(crop=16, block_out_channels=(8, 16), attention=(False, True), attention_head_dim=8,
                        cross_attention_dim=8)
    unet, scheduler = build_unet(config), build_scheduler(config)
    images, labels = torch.rand(64, 3, 16, 16), torch.arange(64, dtype=torch.float64)
    first = [control.train_adapter(unet, scheduler, images, labels, "q", args, twin=twin)[1][0]
             for twin in (None, 0, 1, 2)]
    assert len(seen) == 4 and len(set(first)) == 4  # one step each, same batch and noise, other labels
    index = torch.tensor(control.batch_indices(64, 64, 0, 4))
    assert torch.equal(seen[0], labels[index])
    for k in range(3):
        permutation = torch.randperm(64, generator=torch.Generator().manual_seed(4 + 1 + k))
        assert torch.equal(seen[k + 1], labels[permutation][index])
    assert len({tuple(s.tolist()) for s in seen}) == 4


def test_paired_trend_matches_hand_computation():
    """``paired_trend`` against Page's L and Spearman written out by hand, targets given out of order."""
    from scipy.stats import norm

    control = _load("adapter_control")
    rng = np.random.default_rng(3)
    seeds, n = 40, 5
    ascending = rng.normal(size=(n, seeds)) * 3 + rng.normal(size=(1, seeds)) * 20 + np.arange(n)[:, None] * 0.8
    targets = [0.05, 0.25, 0.5, 0.75, 0.95]
    shuffle = [3, 0, 4, 1, 2]  # the same data, rows listed in another order
    got = control.paired_trend([targets[i] for i in shuffle], ascending[shuffle])
    ranks = ascending.T.argsort(axis=1).argsort(axis=1) + 1.0  # [seeds, targets], no ties in continuous data
    L = float((ranks.sum(axis=0) * np.arange(1, n + 1)).sum())
    mean = seeds * n * (n + 1) ** 2 / 4
    var = seeds * n**2 * (n + 1) * (n**2 - 1) / 144
    assert np.isclose(got["page_p"], norm.sf((L - mean) / var**0.5), rtol=1e-6)
    d = ranks - np.arange(1, n + 1)
    assert np.isclose(got["within_seed_spearman"], np.mean(1 - 6 * (d**2).sum(axis=1) / (n * (n**2 - 1))))
    diff = ascending[-1] - ascending[0]
    assert np.isclose(got["top_minus_bottom"], diff.mean())
    assert np.isclose(got["top_minus_bottom_sem"], diff.std(ddof=1) / seeds**0.5)
    assert got["share_increasing"] == (diff > 0).mean() and got["seeds"] == seeds
    assert got["page_p"] < 1e-3 < control.paired_trend(targets, ascending[::-1].copy())["page_p"]
    # a seed with a NaN is left out; identical images give NaN, not a test of nothing
    with_nan = ascending.copy()
    with_nan[2, 7] = np.nan
    assert control.paired_trend(targets, with_nan)["seeds"] == seeds - 1
    flat = control.control_stats(targets, torch.zeros(n, 4))
    assert flat["identical_for_every_target"] and np.isnan(flat["paired"]["page_p"])
    assert np.isclose(control.control_stats(targets, torch.from_numpy(ascending))["paired"]["page_p"], got["page_p"])


def test_versus_shuffled_matches_exact_signed_rank_test():
    """The same-seed gap to the shuffled twin, and its Wilcoxon p-value enumerated over all sign flips."""
    import itertools

    control = _load("adapter_control")
    rng = np.random.default_rng(5)
    seeds = 12
    targets = [0.9, 0.1, 0.5]  # out of order: the highest target is row 0, the lowest row 1
    true = rng.normal(size=(3, seeds)) * 2
    true[0] += 1.0
    shuffled = rng.normal(size=(3, seeds)) * 2
    got = control.versus_shuffled(targets, true, shuffled)
    gap = (true[0] - true[1]) - (shuffled[0] - shuffled[1])
    assert np.isclose(got["gap"], gap.mean()) and np.isclose(got["gap_sem"], gap.std(ddof=1) / seeds**0.5)
    ranks = np.abs(gap).argsort().argsort() + 1
    w_plus = ranks[gap > 0].sum()
    sums = [sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product([0, 1], repeat=seeds)]
    assert np.isclose(got["wilcoxon_p"], np.mean(np.array(sums) >= w_plus))
    assert got["seeds"] == seeds
    shuffled[2, 4] = np.nan
    assert control.versus_shuffled(targets, true, shuffled)["seeds"] == seeds - 1
    assert np.isnan(control.versus_shuffled(targets, true, true)["wilcoxon_p"])  # no gap at all: no test


def _docstring_examples(path: Path) -> list[list[str]]:
    """The ``python -m evals.<name> ...`` command lines of an eval's module docstring, as argument lists:
    continuation lines joined, ``# comments`` dropped, optional ``[--flag VALUE]`` parts included."""
    import ast
    import shlex

    text = ast.get_docstring(ast.parse(path.read_text())).replace("\\\n", " ")
    examples = []
    for line in text.splitlines():
        command = line.split("#")[0].strip()
        if command.startswith(f"python -m evals.{path.stem} ") or command == f"python -m evals.{path.stem}":
            examples.append(shlex.split(command.replace("[", " ").replace("]", " "))[3:])
    return examples


EVALS = sorted(p.stem for p in (ROOT / "evals").glob("*.py") if "\ndef parse_args(" in p.read_text())


def test_every_eval_with_a_main_has_a_parse_args_and_docstring_examples():
    with_main = sorted(p.stem for p in (ROOT / "evals").glob("*.py") if "\ndef main(" in p.read_text())
    assert EVALS == with_main and len(EVALS) >= 15
    assert all(_docstring_examples(ROOT / "evals" / f"{name}.py") for name in EVALS)


@pytest.mark.parametrize("name", EVALS)
def test_docstring_examples_pass_the_eval_argument_checks(name):
    """Each example command of an eval's docstring parses with its parser and passes the checks that run before
    anything expensive (here: every check but the data, models and weights an example names)."""
    module = _load(name)
    for argv in _docstring_examples(ROOT / "evals" / f"{name}.py"):
        args = module.parse_args(argv)
        if name == "guidance":
            assert len(module.read_eval_prompts(args.prompts, args.limit)) >= module.MIN_PROMPTS
        if name == "finetune" and args.model.startswith("tiny:"):  # the offline example: its scorers load offline
            assert set(module.load_scorers(args, torch.device("cpu"))) == {"guiding", "held_out"}


def test_guidance_eval_refuses_too_few_prompts_before_generating(tmp_path, capsys):
    """``--limit 2`` used to generate every image and then fail in the statistics ("at least 3 pairs")."""
    guidance = _load("guidance")
    with pytest.raises(SystemExit) as exc:
        guidance.parse_args(["--limit", "2"])
    assert exc.value.code == 2 and "--limit=2" in capsys.readouterr().err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na lighthouse\n")
    with pytest.raises(InputError, match="2 prompt"):
        guidance.read_eval_prompts(str(prompts), None)
    # main stops there, before any model is loaded: a one-line error instead of a traceback
    with pytest.raises(SystemExit, match="guidance: .*need at least 3"):
        guidance.main(["--prompts", str(prompts), "--model", "no/such-model", "--out", str(tmp_path / "out")])


def test_finetune_eval_names_missing_scorer_weights_before_loading_the_model(tmp_path, monkeypatch):
    """The old docstring example used ``niqe@192`` as the held-out scorer: offline that is a WeightsNotFoundError,
    which came as a traceback after the pipeline had loaded. Now it is one line, before the pipeline."""
    finetune = _load("finetune")
    monkeypatch.delenv("QUALITYGUIDE_NIQE_WEIGHTS", raising=False)
    monkeypatch.setattr(finetune, "load_with_lora", lambda *a, **k: pytest.fail("the pipeline loaded first"))
    from pyiqa.utils import download_util

    monkeypatch.setattr(download_util, "DEFAULT_CACHE_DIR", str(tmp_path))  # an empty pyiqa cache (where pyiqa looks)
    with pytest.raises(SystemExit, match=r"finetune: .*niqe.*niqe-embedded"):
        finetune.main(["--model", "tiny:sd", "--lora", str(tmp_path), "--held-out-scorer", "niqe@192",
                       "--out", str(tmp_path / "out")])


def test_adapter_control_checks_its_arguments_first(capsys):
    control = _load("adapter_control")
    for argv, message in ((["--targets", "0.5", "0.5"], "--targets"), (["--batch-size", "0"], "--batch-size=0"),
                          (["--base-steps", "0"], "--base-steps=0"), (["--p-quality", "1"], "--p-quality"),
                          (["--twins", "0"], "--twins=0"), (["--judge-photos", "0"], "--judge-photos=0")):
        with pytest.raises(SystemExit):
            control.parse_args(argv)
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("name", EVALS)
def test_eval_flags_are_kebab_case_in_help_and_take_the_snake_case_spelling(name, capsys, monkeypatch):
    """One flag style (README, Evaluation): ``--help`` lists kebab-case flags only, and each also parses under the
    snake_case spelling of the recipes."""
    import re

    module = _load(name)
    parsers = []
    monkeypatch.setattr(module, "eval_parser", lambda doc: parsers.append(flags.eval_parser(doc)) or parsers[-1])
    with pytest.raises(SystemExit) as exc:
        module.parse_args(["--help"])
    options = capsys.readouterr().out.split("options:", 1)[1]
    assert exc.value.code == 0 and not re.findall(r"--[a-z0-9]+_[a-z0-9_]+", options)
    actions = parsers[0]._option_string_actions
    kebab = [flag for flag in actions if re.fullmatch(r"--[a-z0-9]+(-[a-z0-9]+)+", flag)]
    assert all(flag in options for flag in kebab)
    assert all(actions["--" + flag[2:].replace("-", "_")] is actions[flag] for flag in kebab)
    if name == "guidance":
        assert vars(module.parse_args(["--held_out", "pyiqa:musiq", "--limit", "4"])) == vars(
            module.parse_args(["--held-out", "pyiqa:musiq", "--limit", "4"]))
