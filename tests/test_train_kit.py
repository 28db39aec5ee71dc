"""qualityguide.train: image folder dataset, deterministic batches, latent cache, checkpoints, loss guard."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from qualityguide.errors import InputError, TrainingError
from qualityguide.identity import WeightsMismatchError
from qualityguide.train import (CheckpointManager, UnreadableImagesWarning, batch_indices, cache_latents,
                                check_finite, check_step_finite, load_image_folder, make_accelerator,
                                mean_over_processes, resolve_caption_column, step_generator, steps_per_epoch)

SIZES = [(40, 24), (24, 36), (32, 32), (50, 30)]  # (width, height): landscape, portrait, square, landscape


def _write_folder(folder, rows=None, header="file_name,text,q,sharp"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SIZES):  # noise: a crop or resize off by one pixel changes every value
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    if rows is None:
        rows = [f"img{i}.png,caption {i},{i + 0.5},{10 - i}" for i in range(len(SIZES))]
    (folder / "metadata.csv").write_text("\n".join([header] + rows) + "\n")
    return folder


def _reference_pixels(path, resolution):
    """Independent: PIL's antialiased bilinear resize of the short side (uint8), then a centre crop."""
    image = Image.open(path).convert("RGB")
    w, h = image.size
    nw, nh = (resolution, int(resolution * h / w)) if w <= h else (int(resolution * w / h), resolution)
    resized = image.resize((nw, nh), Image.Resampling.BILINEAR)
    top, left = round((nh - resolution) / 2), round((nw - resolution) / 2)
    crop = np.asarray(resized, dtype=np.float32)[top:top + resolution, left:left + resolution] / 255.0
    return torch.from_numpy(crop).permute(2, 0, 1)


# ------------------------------------------------------------------------------------------------------ dataset
def test_items_match_an_independent_resize_and_crop(tmp_path):
    folder = _write_folder(tmp_path / "data")
    ds = load_image_folder(folder, 16, score_columns=("sharp", "q"), progress=False)
    assert len(ds) == 4 and ds.files == [f"img{i}.png" for i in range(4)]
    for i in range(4):
        item = ds[i]
        assert item["pixels"].shape == (3, 16, 16) and item["index"] == i and item["caption"] == f"caption {i}"
        assert item["scores"].dtype == torch.float32 and item["scores"].tolist() == [10 - i, i + 0.5]
        assert item["original_size"] == (SIZES[i][1], SIZES[i][0])
        # torch's antialiased bilinear is Pillow's filter, on floats instead of uint8: within rounding
        torch.testing.assert_close(item["pixels"], _reference_pixels(folder / f"img{i}.png", 16), atol=2.5 / 255,
                                   rtol=0)
    batch = ds.batch([2, 0])
    assert batch["pixels"].shape == (2, 3, 16, 16) and batch["caption"] == ["caption 2", "caption 0"]
    assert batch["index"].tolist() == [2, 0] and batch["scores"].shape == (2, 2)
    assert batch["crop_top_left"].tolist() == [[0, 0], [0, round((int(16 * 40 / 24) - 16) / 2)]]


def test_random_crop_and_flip_follow_the_generator(tmp_path):
    folder = _write_folder(tmp_path / "data")
    ds = load_image_folder(folder, 16, caption_column=None, center_crop=False, random_flip=True, progress=False)
    assert ds.captions is None and ds[0]["caption"] == "" and ds[0]["scores"].shape == (0,)
    a = ds.batch([0, 3, 3], generator=torch.Generator().manual_seed(1))
    b = ds.batch([0, 3, 3], generator=torch.Generator().manual_seed(1))
    assert torch.equal(a["pixels"], b["pixels"])
    # every random crop is a window of the same resized image the centre crop comes from
    resized = torch.nn.functional.interpolate(torch.from_numpy(np.asarray(Image.open(folder / "img3.png"),
                                                                          dtype=np.float32) / 255).permute(2, 0, 1)[None],
                                              size=(16, int(16 * 50 / 30)), mode="bilinear", antialias=True)[0]
    lefts, flips = set(), []
    for seed in range(12):
        item = ds.get(3, torch.Generator().manual_seed(seed))
        top, left = item["crop_top_left"]  # in the frame of the output: of the flipped image when flipped
        plain = torch.equal(item["pixels"], resized[:, top:top + 16, left:left + 16].clamp(0, 1))
        mirrored = torch.equal(item["pixels"], resized.flip(-1)[:, top:top + 16, left:left + 16].clamp(0, 1))
        assert plain or mirrored
        lefts.add(left)
        flips.append(mirrored and not plain)
    assert len(lefts) > 3 and 0 < sum(flips) < 12


def test_unreadable_images_are_dropped_with_one_warning(tmp_path):
    folder = _write_folder(tmp_path / "data")
    (folder / "broken.png").write_bytes(b"not an image")
    rows = [f"img{i}.png,c{i},1,2" for i in range(4)] + ["broken.png,b,1,2", "missing.png,m,1,2"]
    (folder / "metadata.csv").write_text("file_name,text,q,sharp\n" + "\n".join(rows) + "\n")
    with pytest.warns(UnreadableImagesWarning) as record:
        ds = load_image_folder(folder, 8, score_columns=["q"], progress=False)
    ours = [w for w in record if w.category is UnreadableImagesWarning]
    assert len(ours) == 1, [str(w.message) for w in record]
    message = str(ours[0].message)
    assert "2 of 6" in message and "broken.png" in message and "missing.png" in message
    assert ds.files == [f"img{i}.png" for i in range(4)] and ds.captions == ["c0", "c1", "c2", "c3"]
    (folder / "metadata.csv").write_text("file_name,text\nbroken.png,b\n")
    with pytest.raises(InputError, match="none of the 1 images"):
        load_image_folder(folder, 8, progress=False)


def test_image_that_fails_to_decode_later_is_replaced_by_the_next(tmp_path):
    folder = _write_folder(tmp_path / "data")
    ds = load_image_folder(folder, 8, score_columns=["q"], progress=False)
    data = (folder / "img1.png").read_bytes()
    (folder / "img1.png").write_bytes(data[:len(data) // 2])  # header fine, pixels truncated
    with pytest.warns(UnreadableImagesWarning, match="img1.png"):
        item = ds[1]
    assert item["index"] == 1 and item["caption"] == "caption 2" and torch.equal(item["pixels"], ds[2]["pixels"])


@pytest.mark.parametrize("case, match", [
    ("no folder", "does not exist"),
    ("no metadata", "qualityguide label"),
    ("no caption column", r"missing column\(s\) \['caption'\]; found \['file_name', 'text', 'q', 'sharp'\]"),
    ("missing score column", r"missing column\(s\) \['mos'\]"),
    ("empty score", r"'q' of 'img1.png' is empty"),
    ("nan score", r"'q' of 'img1.png' is empty \(or NaN\)"),
    ("text score", r"'q' of 'img1.png' 'good' is not a number.*qualityguide label"),
    ("inf score", r"'q' of 'img1.png' 'inf' is not finite"),
    ("resolution", "positive multiple of 8"),
    ("trailing comma", r"empty or repeated column names \[''\]"),
])
def test_bad_folders_and_arguments_are_explained(tmp_path, case, match):
    folder = tmp_path / "data"
    kwargs = {"resolution": 16, "score_columns": ["q"], "progress": False}
    cells = {"empty score": "", "nan score": "nan", "text score": "good", "inf score": "inf"}
    if case == "no folder":
        folder = tmp_path / "nowhere"
    else:
        _write_folder(folder)
    if case == "no metadata":
        (folder / "metadata.csv").unlink()
    if case == "no caption column":
        kwargs["caption_column"] = "caption"
    if case == "missing score column":
        kwargs["score_columns"] = ["q", "mos"]
    if case in cells:
        _write_folder(folder, ["img0.png,a,1,2", f"img1.png,b,{cells[case]},2"])
    if case == "trailing comma":
        _write_folder(folder, ["img0.png,a,1,2,"], header="file_name,text,q,sharp,")
    if case == "resolution":
        kwargs["resolution"] = 12
    with pytest.raises(InputError, match=match):
        load_image_folder(folder, **kwargs)


# ------------------------------------------------------------------------------------------------------ batches
@pytest.mark.parametrize("drop_last", [True, False])
def test_batch_indices_partition_each_epoch_across_processes(drop_last):
    n, bs, procs, seed = 23, 3, 2, 7
    per_epoch = steps_per_epoch(n, bs, procs, drop_last)
    assert per_epoch == (3 if drop_last else 4)
    assert steps_per_epoch(24, bs, procs, drop_last) == 4 and steps_per_epoch(5, bs, procs, drop_last) == 1 - drop_last
    for epoch in range(3):
        seen = []
        for step in range(epoch * per_epoch, (epoch + 1) * per_epoch):
            parts = [batch_indices(n, bs, step, seed, procs, p, drop_last) for p in range(procs)]
            assert all(len(p) == bs for p in parts) or step == (epoch + 1) * per_epoch - 1
            assert not set(parts[0]) & set(parts[1])
            seen += parts[0] + parts[1]
        assert len(seen) == len(set(seen))  # nothing repeated within an epoch
        assert len(seen) == (18 if drop_last else 23)  # the documented tail: 23 % 6 = 5 dropped
    tail = [batch_indices(n, bs, per_epoch - 1, seed, procs, p, False) for p in range(procs)]
    if not drop_last:  # short last batches are split as evenly as possible
        assert [len(t) for t in tail] == [3, 2]
        assert [len(batch_indices(26, bs, 4, seed, procs, p, False)) for p in range(procs)] == [1, 1]
    # a pure function: the same call (e.g. after a resume) gives the same indices; another epoch another order
    assert batch_indices(n, bs, 5, seed, procs, 1, drop_last) == batch_indices(n, bs, 5, seed, procs, 1, drop_last)
    one = steps_per_epoch(n, bs, 1, drop_last)
    epochs = [[i for s in range(one) for i in batch_indices(n, bs, e * one + s, seed, 1, 0, drop_last)] for e in range(2)]
    assert epochs[0] != epochs[1] and batch_indices(n, bs, 0, seed + 1) != batch_indices(n, bs, 0, seed)


def test_batch_indices_equal_an_independent_permutation():
    """Global batch s of an epoch is perm[s*G:(s+1)*G], process p takes its p-th block (hand-written)."""
    from qualityguide.train.data import derive_seed

    perm = torch.randperm(10, generator=torch.Generator().manual_seed(derive_seed("qualityguide.train.epoch", 3, 1)))
    # 10 items, global batch 4 -> 2 steps per epoch; step 3 is epoch 1, batch 1
    assert batch_indices(10, 2, 3, 3, 2, 0) == perm[4:6].tolist()
    assert batch_indices(10, 2, 3, 3, 2, 1) == perm[6:8].tolist()


def test_batch_and_step_arguments_are_checked():
    with pytest.raises(InputError, match="fewer than one global batch"):
        batch_indices(5, 3, 0, 0, num_processes=2)
    with pytest.raises(InputError, match=r"has 4 items.*= 8\).*the recipes' --train_batch_size"):
        batch_indices(4, 8, 0, 0)  # the recipes surface this message: it names their flag, not only drop_last
    with pytest.raises(InputError, match="process_index 2 must be below num_processes 2"):
        batch_indices(5, 1, 0, 0, num_processes=2, process_index=2)
    with pytest.raises(InputError, match="step -1"):
        batch_indices(5, 1, -1, 0)
    a, b = step_generator(1, 4, 0), step_generator(1, 4, 0)
    assert torch.equal(torch.randn(5, generator=a), torch.randn(5, generator=b))
    draws = {tuple(torch.randn(3, generator=step_generator(1, s, p)).tolist()) for s in (4, 5) for p in (0, 1)}
    assert len(draws) == 4


# ------------------------------------------------------------------------------------------------------ latents
@pytest.fixture(scope="module")
def vae():
    from qualityguide.testing import tiny_vae

    torch.manual_seed(0)
    return tiny_vae().eval()


def test_latent_cache_equals_direct_encoding_and_resumes(tmp_path, vae):
    folder = _write_folder(tmp_path / "data")
    ds = load_image_folder(folder, 16, progress=False)
    cache_dir = tmp_path / "latents"
    cache = cache_latents(ds, vae, cache_dir, batch_size=3, shard_size=3, store_std=True, progress=False)
    with torch.no_grad():  # independent: diffusers' own posterior, scaled as diffusers' pipelines do
        dist = vae.encode(torch.stack([ds[i]["pixels"] for i in range(4)]) * 2 - 1).latent_dist
    sf = vae.config.scaling_factor
    assert cache.mean.shape == (4, 4, 8, 8)
    torch.testing.assert_close(cache.latents([2, 0]), dist.mean[[2, 0]] * sf, atol=1e-5, rtol=1e-5)
    expected = dist.sample(generator=torch.Generator().manual_seed(3)) * sf
    torch.testing.assert_close(cache.latents(range(4), torch.Generator().manual_seed(3)), expected, atol=1e-5,
                               rtol=1e-5)
    shards = sorted(p.name for p in cache_dir.glob("shard-*"))
    assert shards == ["shard-00000.safetensors", "shard-00001.safetensors"]
    # a partial cache (killed after shard 0): only shard 1 is encoded again, shard 0 is reused as it is
    (cache_dir / shards[1]).unlink()
    stamp = (cache_dir / shards[0]).stat().st_mtime_ns
    again = cache_latents(ds, vae, cache_dir, batch_size=3, shard_size=3, store_std=True, progress=False)
    assert torch.equal(again.mean, cache.mean) and torch.equal(again.std, cache.std)
    assert (cache_dir / shards[0]).stat().st_mtime_ns == stamp and (cache_dir / shards[1]).is_file()


def test_latent_cache_refuses_other_weights_files_and_folders(tmp_path, vae):
    import copy

    folder = _write_folder(tmp_path / "data")
    ds = load_image_folder(folder, 16, progress=False)
    cache_dir = tmp_path / "latents"
    cache_latents(ds, vae, cache_dir, progress=False)
    other = copy.deepcopy(vae)
    with torch.no_grad():
        weight = other.encoder.conv_in.weight
        weight.mul_(1 + 0.01 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(WeightsMismatchError, match="other VAE weights.*encoder.conv_in.weight"):
        cache_latents(ds, other, cache_dir, progress=False)
    (folder / "metadata.csv").write_text("file_name,text\nimg0.png,a\nimg1.png,b\nimg3.png,d\nimg2.png,c\n")
    reordered = load_image_folder(folder, 16, progress=False)
    with pytest.raises(InputError, match="other files.*item 2 is 'img2.png' .* 'img3.png'"):
        cache_latents(reordered, vae, cache_dir, progress=False)
    with pytest.raises(InputError, match="resolution=16"):
        cache_latents(load_image_folder(folder, 8, progress=False), vae, cache_dir, progress=False)
    with pytest.raises(InputError, match="made with no augmentation, this run has augment=.*'random_flip': True"):
        cache_latents(load_image_folder(folder, 16, random_flip=True, progress=False), vae, cache_dir)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a latent cache"):
        cache_latents(ds, vae, tmp_path / "busy", progress=False)



def test_latent_cache_refuses_latents_encoded_at_another_precision(tmp_path, vae):
    """An fp16 encoder run without the float32 upcast gives other latents (NaN for SDXL's VAE): such a cache is
    not reused by an upcast run, nor is a cache whose precision an older qualityguide did not record."""
    import copy
    import json

    folder = _write_folder(tmp_path / "data")
    ds = load_image_folder(folder, 16, progress=False)
    half = copy.deepcopy(vae).to(torch.float16)
    cache_latents(ds, half, tmp_path / "half", progress=False)
    assert json.loads((tmp_path / "half" / "cache.json").read_text())["encoder_dtype"] == "float16"
    with pytest.raises(InputError, match="encoder_dtype='float16', this run has encoder_dtype='float32'"):
        cache_latents(ds, half, tmp_path / "half", upcast=True, progress=False)
    # float32 weights compute in float32 with or without upcast: the same cache serves both
    cache_latents(ds, vae, tmp_path / "full", progress=False)
    cache_latents(ds, vae, tmp_path / "full", upcast=True, progress=False)
    key = json.loads((tmp_path / "full" / "cache.json").read_text())
    del key["encoder_dtype"]
    (tmp_path / "full" / "cache.json").write_text(json.dumps(key))
    with pytest.raises(InputError, match="no encoder_dtype recorded"):
        cache_latents(ds, vae, tmp_path / "full", progress=False)

# ------------------------------------------------------------------------------------------------------ checkpoints
@pytest.fixture
def fresh_accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    made = []

    def make():
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        made.append(Accelerator(cpu=True))
        return made[-1]

    yield make
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _train(accelerator, manager, steps, save_at=(), resume=None, seed=11, first=0, reseed=False):
    """A tiny training loop as the recipes write it; returns {step: loss} for the steps it ran.

    ``first`` starts at that step without loading anything; ``reseed`` scrambles the global RNG after loading."""
    torch.manual_seed(1000 + len(manager.checkpoints()))  # a resumed run starts from other weights and RNG state
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    data = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    target = data.sum(1, keepdim=True)
    path = manager.resolve(resume)
    if path is not None:
        first, extra = manager.load(accelerator, path)
        assert extra == {"seen": first * 4}
    if reseed:
        torch.manual_seed(5)
    losses = {}
    for step in range(first, steps):
        idx = batch_indices(len(data), 4, step, seed)
        noise = 0.1 * torch.randn(4, 4, generator=step_generator(seed, step))
        loss = torch.nn.functional.mse_loss(model(data[idx] + noise), target[idx])  # dropout: torch's global RNG
        accelerator.backward(loss)
        check_finite({"mse": loss}, step)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses[step + 1] = loss.item()
        if step + 1 in save_at:
            manager.save(accelerator, step + 1, extra={"seen": (step + 1) * 4})
    return losses


def test_resume_from_latest_reproduces_the_losses_bit_for_bit(tmp_path, fresh_accelerator):
    manager = CheckpointManager(tmp_path / "out")
    assert manager.resolve("latest") is None
    full = _train(fresh_accelerator(), manager, 6, save_at=(3,))
    assert [s for s, _ in manager.checkpoints()] == [3]
    marker = json.loads((tmp_path / "out" / "checkpoint-3" / "qualityguide_checkpoint.json").read_text())
    assert marker["step"] == 3 and marker["extra"] == {"seen": 12}
    assert (tmp_path / "out" / "checkpoint-3" / "model.safetensors").is_file()
    resumed = _train(fresh_accelerator(), manager, 6, resume="latest")
    assert list(resumed) == [4, 5, 6] and all(resumed[s] == full[s] for s in (4, 5, 6)), (resumed, full)
    # the comparison can fail: without the weights, or without accelerate's RNG states (dropout), losses differ
    unloaded = _train(fresh_accelerator(), manager, 6, first=3)
    no_rng = _train(fresh_accelerator(), manager, 6, resume="latest", reseed=True)
    assert all(unloaded[s] != full[s] and no_rng[s] != full[s] for s in (4, 5, 6))


def test_total_limit_and_interrupted_saves(tmp_path, fresh_accelerator):
    manager = CheckpointManager(tmp_path / "out", total_limit=2)
    _train(fresh_accelerator(), manager, 5, save_at=(1, 2, 3, 4))
    assert [s for s, _ in manager.checkpoints()] == [3, 4]
    assert sorted(os.listdir(tmp_path / "out")) == ["checkpoint-3", "checkpoint-4"]
    # a save killed after accelerate wrote everything, even the marker, but before the rename
    stale = tmp_path / "out" / "checkpoint-9.tmp-partial"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    (stale / "qualityguide_checkpoint.json").write_text(json.dumps({"format": "qualityguide.checkpoint/1", "step": 9}))
    (tmp_path / "out" / "checkpoint-8").mkdir()  # a folder without a marker (killed mid-copy, or not ours)
    assert manager.resolve("latest").name == "checkpoint-4"
    assert manager.resolve("checkpoint-3").name == "checkpoint-3"
    with pytest.raises(InputError, match=r"checkpoint-7.*does not exist.*\['checkpoint-3', 'checkpoint-4'\]"):
        manager.resolve("checkpoint-7")
    for bad in ("checkpoint-8", stale):
        with pytest.raises(InputError, match="not a complete qualityguide checkpoint"):
            manager.resolve(bad)
    accelerator = fresh_accelerator()
    _train(accelerator, manager, 5, save_at=(5,), resume="latest")  # the next save removes the leftover
    assert not stale.exists() and [s for s, _ in manager.checkpoints()] == [4, 5]


def test_custom_objects_and_bad_arguments_are_refused(tmp_path, fresh_accelerator):
    with pytest.raises(InputError, match="total_limit 0"):
        CheckpointManager(tmp_path, total_limit=0)
    accelerator = fresh_accelerator()
    manager = CheckpointManager(tmp_path / "out")
    with pytest.raises(InputError, match="JSON-serialisable"):
        manager.save(accelerator, 1, extra={"t": torch.ones(1)})
    counter = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1), lambda s: 1)
    accelerator.register_for_checkpointing(counter)
    with pytest.raises(InputError, match="weights_only=False"):
        manager.save(accelerator, 1)


# ------------------------------------------------------------------------------------------------------ guard
def test_check_finite_names_the_term_and_step(fresh_accelerator):
    check_finite({"diffusion": torch.tensor(0.5), "anchor": 0.1}, step=3)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(TrainingError, match=rf"step 12: loss term 'quality' is {bad}.*diffusion=0\.5"):
            check_finite({"diffusion": torch.tensor(0.5), "quality": torch.tensor(bad)}, step=12)
    with pytest.raises(InputError, match="scalars"):
        check_finite({"x": torch.ones(2)}, 0)
    means = mean_over_processes({"a": torch.tensor(1.5), "b": 2}, fresh_accelerator())
    assert means == {"a": 1.5, "b": 2.0}



def test_check_step_finite_lets_fp16_skip_overflow_steps_and_nothing_else():
    finite = {"loss": torch.tensor(0.25)}
    for precision in ("no", "bf16", "fp16"):
        check_step_finite(finite, torch.tensor(1.5), 4, precision)
    check_step_finite(finite, torch.tensor(float("inf")), 4, "fp16")  # the GradScaler skips this step itself
    for precision in ("no", "bf16"):
        with pytest.raises(TrainingError, match=r"step 4: loss term 'grad_norm' is inf.*loss=0\.25"):
            check_step_finite(finite, torch.tensor(float("inf")), 4, precision)
    for precision in ("no", "bf16", "fp16"):  # a non-finite loss stops every precision
        with pytest.raises(TrainingError, match="'loss' is nan"):
            check_step_finite({"loss": torch.tensor(float("nan"))}, torch.tensor(1.0), 7, precision)


def test_make_accelerator_gives_trackers_a_logging_dir(tmp_path, fresh_accelerator):
    from pathlib import Path

    from accelerate.state import AcceleratorState

    fresh_accelerator()  # the fixture resets accelerate's state afterwards
    AcceleratorState._reset_state(True)
    accelerator, dtype = make_accelerator(tmp_path / "run", "no", "none")
    assert dtype is None and accelerator.log_with == []
    assert Path(accelerator.logging_dir) == tmp_path / "run" / "logs"  # what tensorboard & co. write into
    AcceleratorState._reset_state(True)
    with pytest.raises(InputError, match="fp16 on a CPU"):
        make_accelerator(tmp_path / "run", "fp16", "none")
    AcceleratorState._reset_state(True)
    with pytest.raises(InputError, match="'tensorbord' is not an accelerate tracker.*'tensorboard'"):
        make_accelerator(tmp_path / "run", "no", "tensorbord")


def test_caption_column_defaults_to_text_when_present_else_none(tmp_path):
    _write_folder(tmp_path / "captioned")
    _write_folder(tmp_path / "labelled", rows=["img0.png,1,2"], header="file_name,q,sharp")
    assert resolve_caption_column(tmp_path / "captioned", None) == ("text", None)
    column, note = resolve_caption_column(tmp_path / "labelled", None)
    assert column is None and "no 'text' column" in note and "--caption_column" in note
    assert resolve_caption_column(tmp_path / "labelled", "none") == (None, None)
    assert resolve_caption_column(tmp_path / "labelled", "title") == ("title", None)  # refused when loading
    with pytest.raises(InputError, match=r"missing column\(s\) \['title'\].*--caption_column"):
        load_image_folder(tmp_path / "labelled", 8, caption_column="title", progress=False)


# ------------------------------------------------------------------------------------------------------ damaged
def _damage(path, how):
    """Break ``path/optimizer.bin`` as a crash, a bad disk or a copied folder would."""
    target = path / "optimizer.bin"
    if how == "missing":
        target.unlink()
    elif how == "corrupt":
        target.write_bytes(target.read_bytes()[:40] + b"\x00garbage")
    else:  # wrong shapes: the state of another model with as many parameters
        state = torch.load(target, weights_only=True)
        for entry in state["state"].values():
            for key in ("exp_avg", "exp_avg_sq"):
                entry[key] = entry[key].reshape(-1)
        torch.save(state, target)


WRONG_SHAPE = r"optimizer state 'exp_avg' of parameter 0 \(group 0\) has shape \(32,\), the parameter \(8, 4\)"


@pytest.mark.parametrize("how, match", [("missing", "optimizer.bin .*is missing"), ("corrupt", "cannot be read"),
                                        ("shapes", WRONG_SHAPE)])
def test_a_damaged_checkpoint_is_refused_with_the_way_on(tmp_path, fresh_accelerator, how, match):
    manager = CheckpointManager(tmp_path / "out")
    _train(fresh_accelerator(), manager, 4, save_at=(2, 4))
    _damage(tmp_path / "out" / "checkpoint-4", how)
    with pytest.raises(InputError, match=match) as info:
        _train(fresh_accelerator(), manager, 6, resume="latest")
    message = str(info.value)
    assert "checkpoint-4 is damaged" in message and "delete" in message and "checkpoint-2" in message
    assert "start fresh" in message
    shutil_rmtree(tmp_path / "out" / "checkpoint-4")  # the fix the message gives works
    assert list(_train(fresh_accelerator(), manager, 6, resume="latest")) == [3, 4, 5, 6]


def shutil_rmtree(path):
    import shutil

    shutil.rmtree(path)


WORKER = '''
import json, sys, torch
from accelerate import Accelerator
from qualityguide.train import CheckpointManager, batch_indices, check_finite, mean_over_processes, step_generator

out, resume = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
accelerator = Accelerator(cpu=True)
torch.manual_seed(123 if resume is None else 999)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
model, optimizer = accelerator.prepare(model, optimizer)
data = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
manager, first, log = CheckpointManager(out), 0, {}
path = manager.resolve(resume)
if path is not None:
    first, _ = manager.load(accelerator, path)
for step in range(first, 6):
    idx = batch_indices(len(data), 3, step, 5, accelerator.num_processes, accelerator.process_index)
    noise = 0.1 * torch.randn(3, 4, generator=step_generator(5, step, accelerator.process_index))
    loss = torch.nn.functional.mse_loss(model(data[idx] + noise), data[idx].sum(1, keepdim=True))
    accelerator.backward(loss)
    check_finite({"mse": loss}, step)
    optimizer.step()
    optimizer.zero_grad()
    log[step + 1] = [idx, mean_over_processes({"mse": loss}, accelerator)["mse"]]
    if step + 1 == 3:
        manager.save(accelerator, 3)
with open(f"{out}/log-{resume}-{accelerator.process_index}.json", "w") as handle:
    json.dump({"processes": accelerator.num_processes, "log": log}, handle)
del model, optimizer  # DDP over gloo alive at exit aborts ~1 run in 4 (torch 2.14, "terminate called ...")
accelerator.free_memory()
accelerator.end_training()
'''


@pytest.mark.slow
def test_two_processes_save_and_resume_reproduce_the_run(tmp_path):
    """Two gloo processes: disjoint batches, one checkpoint with both RNG states, a resume equal to the run."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    launcher = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
    (tmp_path / "worker.py").write_text(WORKER)
    out = tmp_path / "out"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    for resume in ([], ["latest"]):
        run = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                              "--mixed_precision", "no", "--dynamo_backend", "no", str(tmp_path / "worker.py"),
                              str(out)] + resume, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(os.listdir(out / "checkpoint-3")) == ["model.safetensors", "optimizer.bin",
                                                         "qualityguide_checkpoint.json", "random_states_0.pkl",
                                                         "random_states_1.pkl"]
    logs = {(r, p): json.loads((out / f"log-{r}-{p}.json").read_text()) for r in ("None", "latest") for p in (0, 1)}
    assert all(v["processes"] == 2 for v in logs.values())
    full, resumed = logs[("None", 0)]["log"], logs[("latest", 0)]["log"]
    assert list(resumed) == ["4", "5", "6"] and all(resumed[s] == full[s] for s in resumed)
    for step in full:  # the two processes' batches are disjoint and each equals batch_indices' answer
        mine, theirs = full[step][0], logs[("None", 1)]["log"][step][0]
        assert not set(mine) & set(theirs) and mine == batch_indices(40, 3, int(step) - 1, 5, 2, 0)
