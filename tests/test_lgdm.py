"""LGDM on tiny SD (CPU): extraction against an independent DDIM reference, PMG, cache, head, scorer, errors."""

import json
import warnings

import numpy as np
import pytest
import torch

from qualityguide import load_pipeline, load_scorer
from qualityguide.errors import ImageError, InputError
from qualityguide.lgdm import (LGDM, FeatureCache, HeadConfig, LGDMConfig, LGDMHead, LGDMScorer, TrainConfig,
                               extract_to_cache, file_hash, fit_head, predict)

SMALL = dict(image_size=32, num_steps=4, t_max=40)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny:sd")


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(3, 3, 40, 48, generator=g)
    return torch.nn.functional.avg_pool2d(base, 3, 1, 1)  # some spatial structure


def lgdm(pipe, **overrides):
    return LGDM.from_pipeline(pipe, LGDMConfig(**{**SMALL, **overrides}))


def reference_ddim_features(pipe, images, config: LGDMConfig, noise):
    """Plain DDIM (diffusers' scheduler) + our own hooks, written independently of qualityguide.lgdm."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    stride = config.t_max // config.num_steps
    sched.set_timesteps(1000 // stride)
    h, w = images.shape[-2:]  # short side -> image_size keeping the aspect ratio, then a centre crop
    size = (config.image_size, round(w * config.image_size / h)) if h <= w else \
        (round(h * config.image_size / w), config.image_size)
    x = torch.nn.functional.interpolate(images, size=size, mode="bicubic", antialias=True,
                                        align_corners=False).clamp(0, 1)
    top = (x.shape[-2] - config.image_size) // 2
    left = (x.shape[-1] - config.image_size) // 2
    x = x[..., top:top + config.image_size, left:left + config.image_size]
    with torch.no_grad():
        z0 = pipe.vae.encode(x * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
        a = pipe.scheduler.alphas_cumprod[config.t_max]
        z = a.sqrt() * z0 + (1 - a).sqrt() * noise
        ids = pipe.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        cond = pipe.text_encoder(ids)[0].expand(len(x), -1, -1)
        grabbed = []
        hooks = [b.register_forward_hook(lambda m, i, o: grabbed.append(o)) for b in pipe.unet.up_blocks]
        rows = []
        try:
            for t in range(config.t_max, 0, -stride):
                grabbed.clear()
                eps = pipe.unet(z, t, encoder_hidden_states=cond).sample
                rows.append(torch.cat([torch.cat([f.mean((2, 3)), f.std((2, 3), unbiased=False)], 1)
                                       for f in grabbed], 1))
                z = sched.step(eps, t, z, eta=0.0).prev_sample
        finally:
            for h in hooks:
                h.remove()
    return torch.stack(rows, 1)


def test_shapes_layout_and_timesteps(pipe, images):
    model = lgdm(pipe, psi="none")
    with torch.no_grad():
        feats = model.extract(images)
    dims = model.recorder.dims
    assert feats.shape == (3, 4, sum(dims)) and dims == [128, 64]  # tiny up_blocks: 64 and 32 channels, mean+std
    assert model.config.timesteps == [40, 30, 20, 10]
    assert model.layout()["layer_names"] == ["up_blocks.0", "up_blocks.1"]
    resnets = lgdm(pipe, psi="none", layers="up_resnets", pooling="mean")
    with torch.no_grad():
        assert resnets.extract(images[:1]).shape == (1, 4, sum(resnets.recorder.dims))
    assert len(resnets.recorder.names) == 6 and resnets.recorder.dims == [64, 64, 64, 32, 32, 32]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_zero_zeta_equals_plain_ddim_hyperfeatures(prediction_type, images):
    pipe = load_pipeline("tiny:sd", prediction_type=prediction_type)
    config = LGDMConfig(**SMALL, zeta1=0.0, zeta2=0.0)
    model = LGDM.from_pipeline(pipe, config)
    noise = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model.extract(images, noise=noise)
    ref = reference_ddim_features(pipe, images, config, noise)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_determinism_given_noise(pipe, images):
    model = lgdm(pipe, psi="sd")
    noise = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model.extract(images, noise=noise), model.extract(images, noise=noise)
        c = model.extract(images, noise=noise + 0.5)
        probe1, probe2 = model.extract(images), model.extract(images)
        other_seed = LGDM.from_pipeline(pipe, LGDMConfig(**SMALL, psi="sd", seed=1)).extract(images)
        random = model.extract(images, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.equal(probe1, probe2)
    assert not torch.allclose(a, c) and not torch.allclose(probe1, other_seed) and not torch.allclose(probe1, random)
    with pytest.raises(InputError, match="latent shape"):
        model.extract(images, noise=torch.zeros(3, 4, 8, 8))


@pytest.mark.parametrize("psi", ["none", "sd", "brisque"])
def test_each_pmg_step_lowers_its_energy(pipe, images, psi):
    model = lgdm(pipe, psi=psi, zeta1=1.0, zeta2=0.2 if psi != "none" else 0.0)
    with torch.no_grad():
        feats, trace = model.extract(images, return_trace=True)
    assert len(trace) == model.config.num_steps - 1  # the last step's PMG update is skipped
    assert [row["t"] for row in trace] == [40, 30, 20]
    for row in trace:
        assert torch.all(row["g1_after"] < row["g1_before"]), row
        assert torch.all(row["energy_after"] < row["energy_before"]), row
        assert not row["skipped"].any()
        if psi != "none":
            assert torch.all(row["g2_before"] > 0)
    with torch.no_grad():
        plain = lgdm(pipe, psi="none", zeta1=0.0, zeta2=0.0).extract(images)
    assert not torch.allclose(feats, plain)  # guidance changes the features


def test_batch_equals_singles(pipe, images):
    model = lgdm(pipe, psi="sd")
    chunked = LGDM.from_pipeline(pipe, LGDMConfig(**SMALL, psi="sd"), pmg_chunk=2)
    with torch.no_grad():
        batch = model.extract(images)
        singles = torch.cat([model.extract(images[i:i + 1]) for i in range(3)])
        in_chunks = chunked.extract(images)  # PMG backward on 2 + 1 images
    torch.testing.assert_close(batch, singles, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(in_chunks, batch, rtol=1e-4, atol=1e-4)
    with pytest.raises(InputError, match="pmg_chunk"):
        LGDM.from_pipeline(pipe, LGDMConfig(**SMALL), pmg_chunk=0)


def test_native_size_and_sdxl_backbone(images):
    sdxl = load_pipeline("tiny:sdxl")
    model = LGDM.from_pipeline(sdxl, LGDMConfig(**SMALL, psi="sd"))
    with torch.no_grad():
        feats = model.extract(images[:2])
    assert feats.shape[:2] == (2, 4) and torch.isfinite(feats).all()
    native = LGDM.from_pipeline(sdxl, LGDMConfig(**{**SMALL, "image_size": None}, psi="none"))
    assert native.prepare(images[:, :, :39, :47]).shape[-2:] == (38, 46)  # cropped to the VAE's multiple (2)


def test_bf16_autocast_close_to_fp32(pipe, images):
    model = lgdm(pipe, psi="sd")
    with torch.no_grad():
        full = model.extract(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model.extract(images)
    assert torch.isfinite(half).all()
    rel = (half - full).norm() / full.norm()
    assert rel < 0.05, float(rel)
    assert model.feature_key(None) != model.feature_key("bf16")


def test_bad_inputs(pipe):
    with pytest.raises(InputError, match="Did you mean 'brisque'"):
        LGDMConfig(psi="brisqe")
    with pytest.raises(InputError, match="multiple of num_steps"):
        LGDMConfig(num_steps=3, t_max=100)
    with pytest.raises(InputError, match="layers"):
        LGDMConfig(layers="down_blocks")
    model = lgdm(pipe, psi="none")
    with pytest.raises(ImageError, match="upscaled"):
        model.extract(torch.rand(1, 3, 6, 6))
    native = lgdm(pipe, psi="none", image_size=None)
    with pytest.raises(ImageError, match="both sides >= 4 px"):
        native.extract(torch.rand(1, 3, 2, 2))
    with pytest.raises(InputError, match="exceeds"):
        LGDM.from_pipeline(pipe, LGDMConfig(num_steps=10, t_max=1000))
    with pytest.raises(InputError, match="pyiqa"):
        LGDMConfig(psi="pyiqa:")


def test_gradients_through_scorer(pipe, images):
    model = lgdm(pipe, psi="sd")
    head = LGDMHead(HeadConfig(num_steps=4, layer_dims=model.recorder.dims))
    scorer = LGDMScorer(model, head).eval()
    x = images[:2].clone().requires_grad_(True)
    scores = scorer(x)
    assert scores.shape == (2,)
    (grad,) = torch.autograd.grad(scores.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(p.requires_grad for p in pipe.unet.parameters())  # shared modules' flags restored
    second = LGDMScorer(model, head, create_graph=True).eval()
    (grad2,) = torch.autograd.grad(second(x).sum(), x)
    assert torch.isfinite(grad2).all() and not torch.allclose(grad, grad2)


# ----------------------------------------------------------------------------- head

def synthetic_features(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, 3, 12, generator=g)
    mos = (2.0 * feats[:, 1, 0] - feats[:, 2, 5] + 0.1 * torch.randn(n, generator=g)).numpy() * 10 + 50
    return feats, mos


@pytest.mark.parametrize("mixing", ["softmax", "concat"])
def test_head_learns_and_round_trips(tmp_path, mixing):
    feats, mos = synthetic_features()
    idx = np.arange(len(mos))
    config = HeadConfig(num_steps=3, layer_dims=[8, 4], mixing=mixing, hidden=(32, 16))
    head, history = fit_head(feats, mos, idx[:300], idx[300:350], config, TrainConfig(max_epochs=150, patience=30))
    from qualityguide.evaluation.stats import srcc

    pred = predict(head, feats[350:])
    assert srcc(pred, mos[350:]) > 0.8, history["best_val_srcc"]
    assert history["epochs"] <= 150
    if mixing == "softmax":
        torch.testing.assert_close(head.step_weights().sum(-1), torch.ones(2))
    head.save_pretrained(tmp_path / "h", extra={"note": 1})
    loaded = LGDMHead.from_pretrained(tmp_path / "h")
    assert loaded.metadata == {"note": 1}
    np.testing.assert_array_equal(predict(loaded, feats[350:]), pred)
    with pytest.raises(InputError, match="another LGDM config"):
        loaded(torch.zeros(2, 4, 12))
    with pytest.raises(InputError, match="not an LGDM head folder"):
        LGDMHead.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- cache

@pytest.fixture()
def image_files(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(7):
        array = (rng.random((40, 44, 3)) * 255 * (0.2 + 0.1 * i)).astype("uint8")
        path = tmp_path / "imgs" / f"im{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths


def test_cache_resume_after_kill_no_duplicates(pipe, image_files, tmp_path, monkeypatch):
    model = lgdm(pipe, psi="sd")
    reference_dir = tmp_path / "ref"
    extract_to_cache(model, image_files, reference_dir, batch_size=2, progress=False)
    ref_keys, ref = FeatureCache(reference_dir).load()

    calls = {"n": 0}
    original = LGDM.extract

    def dying(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the process is killed mid-run
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LGDM, "extract", dying)
    cache_dir = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        extract_to_cache(model, image_files, cache_dir, batch_size=2, progress=False)
    shards = sorted((cache_dir / "shards").glob("*.safetensors"))
    assert len(shards) == 2
    # debris of a crash: a half-written temp file and a truncated shard
    (cache_dir / "shards" / ".999-x.tmp").write_bytes(b"partial")
    truncated = cache_dir / "shards" / "000-truncated.safetensors"
    truncated.write_bytes(shards[0].read_bytes()[:40])

    monkeypatch.setattr(LGDM, "extract", original)
    counted = []
    monkeypatch.setattr(LGDM, "extract", lambda self, x, *a, **k: counted.append(len(x)) or original(self, x, *a, **k))
    with pytest.warns(RuntimeWarning, match="unreadable shard"):
        summary = extract_to_cache(model, image_files + image_files[:2], cache_dir, batch_size=2, progress=False)
    assert summary["cached_before"] == 4 and summary["extracted"] == 3 and sum(counted) == 3
    assert summary["images"] == 7 and summary["cached_now"] == 7
    assert not truncated.exists() and truncated.with_suffix(".corrupt").exists()
    keys, feats = FeatureCache(cache_dir).load()
    assert keys == ref_keys and len(set(keys)) == 7
    torch.testing.assert_close(feats, ref, rtol=1e-4, atol=1e-4)
    again = extract_to_cache(model, image_files, cache_dir, batch_size=2, progress=False)
    assert again["extracted"] == 0


def test_cache_from_another_config_is_refused(pipe, image_files, tmp_path):
    extract_to_cache(lgdm(pipe, psi="none"), image_files[:2], tmp_path / "c", progress=False)
    with pytest.raises(InputError, match=r"config\.num_steps: cache has 4, this run 2.*new --cache"):
        extract_to_cache(LGDM.from_pipeline(pipe, LGDMConfig(image_size=32, num_steps=2, t_max=40, psi="none")),
                         image_files[:2], tmp_path / "c", progress=False)
    other = load_pipeline("tiny:sd", seed=1)
    with pytest.raises(InputError, match="other backbone weights"):
        extract_to_cache(lgdm(other, psi="none"), image_files[:2], tmp_path / "c", progress=False)
    with pytest.raises(InputError, match="have no features"):
        FeatureCache(tmp_path / "c").load([file_hash(image_files[5])])


def test_unreadable_images_are_recorded_not_fatal(pipe, image_files, tmp_path):
    bad = tmp_path / "imgs" / "broken.png"
    bad.write_bytes(b"not a png")
    summary = extract_to_cache(lgdm(pipe, psi="none"), [image_files[0], bad], tmp_path / "c", progress=False)
    assert summary["extracted"] == 1 and summary["failed"] == 1
    failures = FeatureCache(tmp_path / "c").failures()
    assert failures[0]["path"] == str(bad) and failures[0]["error"]


# ----------------------------------------------------------------------------- scorer save/load, CLI

def test_scorer_save_load_and_load_scorer(pipe, images, tmp_path):
    model = lgdm(pipe, psi="sd")
    head = LGDMHead(HeadConfig(num_steps=4, layer_dims=model.recorder.dims))
    torch.nn.init.normal_(head.mlp[-1].weight, std=0.5)
    scorer = LGDMScorer(model, head).eval()
    scorer.save_pretrained(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "config.json").read_text())
    assert meta["backbone_spec"] == "tiny:sd" and meta["lgdm"]["psi"] == "sd"
    with torch.no_grad():
        expected = scorer(images)
        loaded = load_scorer(f"lgdm:{tmp_path / 's'}")  # rebuilds tiny:sd from the stored spec
        shared = LGDMScorer.from_pretrained(tmp_path / "s", pipeline=pipe)
        torch.testing.assert_close(loaded(images), expected)
        torch.testing.assert_close(shared(images), expected)
    assert shared.lgdm.unet is pipe.unet  # no second copy
    with pytest.raises(InputError, match="other backbone weights.*load the backbone the head was trained on"):
        LGDMScorer.from_pretrained(tmp_path / "s", pipeline=load_pipeline("tiny:sd", seed=2))


def _write_dataset(root, n=18):
    import csv

    from PIL import Image

    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        level = i % 6
        array = np.clip(rng.normal(128, 10 + 15 * level, (40, 44, 3)), 0, 255).astype("uint8")
        Image.fromarray(array).save(root / f"im{i}.png")
        rows.append((f"im{i}.png", float(level), f"c{i // 2}"))
    with open(root / "mos.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "mos", "content"])
        writer.writerows(rows)
    return root


def test_cli_extract_fit_evaluate_score(tmp_path, capsys):
    from qualityguide.cli import main

    data = _write_dataset(tmp_path / "data")
    cache, head = tmp_path / "cache", tmp_path / "head"
    flags = ["--image-size", "32", "--num-steps", "2", "--t-max", "20", "--psi", "none"]
    assert main(["lgdm", "extract", "--dataset", str(data), "--model", "tiny:sd", "--cache", str(cache),
                 "--device", "cpu", "--quiet", *flags]) == 0
    assert len(FeatureCache(cache).load()[0]) == 18
    assert main(["lgdm", "fit", "--cache", str(cache), "--dataset", str(data), "--out", str(head),
                 "--max-epochs", "20", "--quiet"]) == 0
    assert main(["lgdm", "evaluate", "--cache", str(cache), "--dataset", str(data), "--repeats", "3",
                 "--max-epochs", "20", "--out", str(tmp_path / "ev"), "--quiet"]) == 0
    result = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert result["srcc"]["n"] == 3 and len(result["splits"]) == 3
    assert all(s["n_train"] + s["n_val"] + s["n_test"] == 18 for s in result["splits"])
    assert main(["lgdm", "evaluate", "--cache", str(cache), "--dataset", str(data), "--cross", str(data),
                 "--repeats", "2", "--max-epochs", "5", "--quiet"]) == 0
    out = tmp_path / "scores.csv"
    assert main(["score", str(data / "im0.png"), str(data / "im5.png"), "--scorer", f"lgdm:{head}", "-o", str(out),
                 "--quiet"]) == 0
    assert len(out.read_text().splitlines()) == 3
    capsys.readouterr()
    assert main(["lgdm", "extract", "--dataset", str(data), "--model", "tiny:sd", "--cache", str(cache),
                 "--device", "cpu", "--quiet", "--image-size", "32", "--num-steps", "4", "--t-max", "20"]) == 2
    assert "another configuration" in capsys.readouterr().err
    assert main(["lgdm", "extract", "--dataset", str(data), "--model", "tiny:sd", "--cache", str(cache),
                 "--psi", "brisk"]) == 2
    assert "Did you mean 'brisque'" in capsys.readouterr().err


@pytest.mark.slow
def test_accelerate_two_processes_equal_single_process(tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    launcher = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
    data = _write_dataset(tmp_path / "data", n=10)
    flags = ["--dataset", str(data), "--model", "tiny:sd", "--image-size", "32", "--num-steps", "2", "--t-max", "20",
             "--psi", "sd", "--batch-size", "2", "--quiet"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    multi = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                            "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "qualityguide.cli", "lgdm",
                            "extract", "--cache", str(tmp_path / "multi"), *flags],
                           env=env, capture_output=True, text=True, timeout=600)
    assert multi.returncode == 0, multi.stderr[-3000:]
    ranks = {p.name[:3] for p in (tmp_path / "multi" / "shards").glob("*.safetensors")}
    assert ranks == {"000", "001"}  # both processes wrote shards
    from qualityguide.cli import main

    assert main(["lgdm", "extract", "--cache", str(tmp_path / "single"), "--device", "cpu", *flags]) == 0
    keys_m, feats_m = FeatureCache(tmp_path / "multi").load()
    keys_s, feats_s = FeatureCache(tmp_path / "single").load()
    assert keys_m == keys_s and len(keys_m) == 10
    torch.testing.assert_close(feats_m, feats_s, rtol=1e-4, atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert json.loads((tmp_path / "multi" / "manifest.json").read_text())["feature_key"] == \
            json.loads((tmp_path / "single" / "manifest.json").read_text())["feature_key"]


def test_split_for_process_is_accelerates_contiguous_split_without_padding(monkeypatch):
    from accelerate import PartialState

    from qualityguide.runtime import split_for_process

    state = PartialState(cpu=True)
    assert split_for_process(state, (k for k in "abc")) == ["a", "b", "c"]  # one process: everything
    monkeypatch.setattr(state, "num_processes", 3)  # as rank k of 3 processes would see it

    def shares(items):
        out = []
        for rank in range(3):
            monkeypatch.setattr(state, "process_index", rank)
            out.append(split_for_process(state, items))
        return out

    assert shares(list("abcdefg")) == [["a", "b", "c"], ["d", "e"], ["f", "g"]]
    assert shares(["a", "b"]) == [["a"], ["b"], []]  # no padding: nothing is done twice


def test_eta_noise_is_part_of_the_probe(pipe, images):
    with torch.no_grad():
        a = lgdm(pipe, psi="none", eta=1.0).extract(images)
        b = lgdm(pipe, psi="none", eta=1.0).extract(images)
        c = lgdm(pipe, psi="none", eta=0.0).extract(images)
    assert torch.equal(a, b) and torch.equal(a[:, 0], c[:, 0]) and not torch.allclose(a[:, 1:], c[:, 1:])


def test_niqe_psi_and_pyiqa_penultimate(pipe):
    from qualityguide.errors import WeightsNotFoundError
    from qualityguide.scorers.features import _PenultimateHook, build_image_psi

    model = LGDM.from_pipeline(pipe, LGDMConfig(image_size=192, num_steps=2, t_max=20, psi="niqe"))
    x = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 200, 200, generator=torch.Generator().manual_seed(0)), 5, 1, 2)
    with torch.no_grad():
        feats, trace = model.extract(x, return_trace=True)
    assert torch.isfinite(feats).all() and torch.all(trace[0]["g2_before"] > 0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5), torch.nn.ReLU(), torch.nn.Linear(5, 1))
    hook = _PenultimateHook(net, "pyiqa:test")
    net(torch.ones(2, 3, 2, 2))
    assert hook.value.shape == (2, 5)
    with pytest.raises(InputError, match="no nn.Linear"):
        _PenultimateHook(torch.nn.Conv2d(3, 3, 1), "pyiqa:test")
    with pytest.raises((WeightsNotFoundError, InputError)):
        build_image_psi("pyiqa:not_a_metric")


def test_cache_sees_decoder_finetunes_but_not_bf16_loading(pipe, image_files, tmp_path):
    base = lgdm(pipe, psi="none")
    extract_to_cache(base, image_files[:1], tmp_path / "c", progress=False)
    tuned = load_pipeline("tiny:sd")
    with torch.no_grad():  # a decoder-only fine-tune (what a LoRA on the up blocks amounts to once fused)
        tuned.unet.up_blocks[1].resnets[0].conv1.weight.mul_(1.01)
    changed = lgdm(tuned, psi="none")
    assert changed.model_key() == base.model_key()  # same architecture and config ...
    with pytest.raises(InputError, match=r"other backbone weights.*unet\.up_blocks\.1\.resnets\.0\.conv1\.weight"):
        extract_to_cache(changed, image_files[:1], tmp_path / "c", progress=False)  # ... other weights
    rounded = load_pipeline("tiny:sd")
    with torch.no_grad():
        for p in rounded.unet.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # what loading bf16 weights does to the values
    summary = extract_to_cache(lgdm(rounded, psi="none"), image_files[:1], tmp_path / "c", progress=False)
    assert summary["cached_before"] == 1 and summary["extracted"] == 0


def test_fp16_vae_upcast_follows_the_pipeline_and_keeps_no_copy(pipe):
    from qualityguide.diffusion.vae import decode_latents, encode_images, pipeline_upcasts_vae

    half = load_pipeline("tiny:sd")
    half.vae.to(torch.float16)
    sdxl = load_pipeline("tiny:sdxl")
    # The VAE config defaults to force_upcast=True, but only SDXL-family pipelines act on it (as diffusers does).
    assert half.vae.config.force_upcast and not pipeline_upcasts_vae(half)
    assert pipeline_upcasts_vae(sdxl)
    assert not LGDM.from_pipeline(half, LGDMConfig(psi="none", image_size=64)).upcast_vae
    assert LGDM.from_pipeline(sdxl, LGDMConfig(psi="none", image_size=64)).upcast_vae
    # the VAE's compute precision is part of the cache key: upcast and fp16 decodes give other features
    sdxl.to(torch.float16)
    keys = {LGDM.from_pipeline(sdxl, LGDMConfig(psi="none", image_size=64), upcast_vae=flag).feature_key()
            for flag in (True, False)}
    assert len(keys) == 2
    assert LGDM.from_pipeline(sdxl, LGDMConfig(psi="none", image_size=64)).precision() == "float16, vae float32"
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    reference = decode_latents(pipe.vae, z)
    upcast = decode_latents(half.vae, z, upcast=True)
    plain = decode_latents(half.vae, z, upcast=False)
    # float32 compute on fp16-rounded weights: far closer to the fp32 VAE than fp16 compute is
    assert (upcast - reference).abs().max() < (plain - reference).abs().max()
    torch.testing.assert_close(upcast, reference, rtol=1e-2, atol=1e-2)
    (grad,) = torch.autograd.grad(upcast.sum(), z)  # the graph holds its float32 weights until the backward
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # the user's module is untouched: still fp16, and nothing hidden was attached to it
    assert all(p.dtype == torch.float16 for p in half.vae.parameters())
    assert sum(1 for _ in half.vae.modules()) == sum(1 for _ in pipe.vae.modules())
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(encode_images(half.vae, x, upcast=True), encode_images(pipe.vae, x), rtol=1e-2,
                               atol=1e-2)



def test_evaluate_table_brackets_a_negative_srcc_range():
    """`lgdm evaluate`'s table wrote a range of two negative SRCCs as "-0.420--0.033", read as one number."""
    from qualityguide.cli.lgdm import markdown_row_table

    stats = {"median": -0.2, "min": -0.42, "max": -0.033, "n": 3}
    table = markdown_row_table([{"name": "lgdm", "srcc": stats, "plcc": stats}])
    assert table.splitlines()[-1] == "| lgdm | -0.200 | -0.200 | [-0.420, -0.033] | 3 |"
