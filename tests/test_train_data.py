"""Training data: diffusers' data flags (folders with csv/jsonl/parquet metadata, datasets tables), crop/flip variants
drawn from (seed, step, process), their latent cache, and SDXL's micro-conditioning from each image's size and crop."""

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from qualityguide.errors import InputError
from qualityguide.train import UnreadableImagesWarning, cache_latents, load_image_folder
from qualityguide.train.data import crop_windows, resize_crop, resized_size
from qualityguide.train.sources import add_data_arguments, load_training_data

SIZES = [(40, 24), (24, 36), (32, 32), (50, 30)]  # (width, height)


def _images(folder):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


ROWS = [{"file_name": f"img{i}.png", "text": f"caption {i}", "q": i + 0.5} for i in range(len(SIZES))]


def _folder(folder, form):
    _images(folder)
    if form == "csv":
        (folder / "metadata.csv").write_text("file_name,text,q\n" + "".join(f"{r['file_name']},{r['text']},{r['q']}\n"
                                                                            for r in ROWS))
    elif form == "jsonl":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    else:
        from datasets import Dataset

        Dataset.from_list(ROWS).to_parquet(str(folder / "metadata.parquet"))
    return folder


def _args(*argv):
    parser = argparse.ArgumentParser()
    add_data_arguments(parser, alias="--dataset")
    return parser.parse_args(list(argv))


def _same(a, b):
    assert len(a) == len(b) and a.captions == b.captions and torch.equal(a.scores, b.scores)
    assert a.original_sizes == b.original_sizes == [(h, w) for w, h in SIZES]
    for i in range(len(a)):
        assert torch.equal(a[i]["pixels"], b[i]["pixels"])


# ------------------------------------------------------------------------------------------------------ sources
@pytest.mark.parametrize("form", ["jsonl", "parquet"])
def test_the_three_metadata_forms_give_the_same_dataset(tmp_path, form):
    reference = load_image_folder(_folder(tmp_path / "csv", "csv"), 16, score_columns=["q"], progress=False)
    other = load_image_folder(_folder(tmp_path / form, form), 16, score_columns=["q"], progress=False)
    _same(reference, other)
    assert other.files == reference.files == [f"img{i}.png" for i in range(4)]


def test_dataset_name_reads_parquet_bytes_paths_and_saved_folders(tmp_path):
    from datasets import Dataset
    from datasets import Image as ImageFeature

    folder = _images(tmp_path / "imgs")
    reference = load_training_data(_args("--train_data_dir", str(_folder(tmp_path / "csv", "csv"))), 16, ["q"],
                                   progress=False)[0]
    encoded = {"picture": [{"bytes": (folder / f"img{i}.png").read_bytes(), "path": f"img{i}.png"} for i in range(4)],
               "caption": [r["text"] for r in ROWS], "q": [r["q"] for r in ROWS]}
    Dataset.from_dict(encoded).cast_column("picture", ImageFeature()).to_parquet(str(tmp_path / "bytes.parquet"))
    paths = {**encoded, "picture": [f"imgs/img{i}.png" for i in range(4)]}  # relative to the table's folder
    Dataset.from_dict(paths).to_parquet(str(tmp_path / "paths.parquet"))
    pil = {**encoded, "picture": [Image.fromarray(np.asarray(Image.open(folder / f"img{i}.png"))) for i in range(4)]}
    Dataset.from_dict(pil).save_to_disk(str(tmp_path / "saved"))  # PIL images in memory, stored as PNG bytes
    for name in (tmp_path / "bytes.parquet", tmp_path / "paths.parquet", tmp_path / "saved"):
        ds, note = load_training_data(_args("--dataset_name", str(name), "--image_column", "picture",
                                            "--caption_column", "caption"), 16, ["q"], progress=False)
        assert note is None
        _same(reference, ds)
    bytes_ds, note = load_training_data(_args("--dataset_name", str(tmp_path / "bytes.parquet"), "--image_column",
                                              "picture"), 16, progress=False)
    assert "no 'text' column" in note and bytes_ds.captions is None and bytes_ds[0]["caption"] == ""
    assert bytes_ds.table is not None and not any(isinstance(s, type(folder)) for s in bytes_ds.sources)  # bytes
    assert bytes_ds.sizes == [(folder / f"img{i}.png").stat().st_size for i in range(4)]


def test_bad_data_input_names_what_exists(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"image": ["a.png"], "text": ["x"]}).to_parquet(str(tmp_path / "t.parquet"))
    with pytest.raises(InputError, match=r"missing column\(s\) \['img'\]; found \['image', 'text'\].*--image_column"):
        load_training_data(_args("--dataset_name", str(tmp_path / "t.parquet"), "--image_column", "img"), 16)
    with pytest.raises(InputError, match="--train_data_dir .* and --dataset_name .* exclude each other"):
        load_training_data(_args("--dataset", "x", "--dataset_name", "y"), 16)
    with pytest.raises(InputError, match="no training data"):
        load_training_data(_args(), 16)
    with pytest.raises(InputError, match="--dataset_name .*nowhere.parquet"):
        load_training_data(_args("--dataset_name", str(tmp_path / "nowhere.parquet")), 16)
    with pytest.raises(InputError, match="--dataset_name someone/no-such-set cannot be loaded .*save_to_disk"):
        load_training_data(_args("--dataset_name", "someone/no-such-set"), 16)  # offline (conftest): refused
    Dataset.from_dict({"image": [1, 2], "text": ["x", "y"]}).to_parquet(str(tmp_path / "ints.parquet"))
    with pytest.raises(InputError, match="image column 'image' holds .*int64.*not images"):
        load_training_data(_args("--dataset_name", str(tmp_path / "ints.parquet")), 16)
    folder = _folder(tmp_path / "two", "csv")
    (folder / "metadata.jsonl").write_text("")
    with pytest.raises(InputError, match="2 metadata files"):
        load_image_folder(folder, 16, progress=False)


def test_unreadable_table_images_follow_the_warning_policy(tmp_path):
    from datasets import Dataset

    folder = _images(tmp_path / "imgs")
    (folder / "broken.png").write_bytes(b"not an image")
    cells = [{"bytes": (folder / f"img{i}.png").read_bytes(), "path": f"img{i}.png"} for i in range(2)]
    cells.append({"bytes": b"not an image", "path": "bad.png"})
    data = (folder / "img2.png").read_bytes()
    cells.append({"bytes": data[:-40], "path": "cut.png"})  # header fine, pixels truncated
    Dataset.from_dict({"image": cells, "text": ["a", "b", "c", "d"]}).to_parquet(str(tmp_path / "t.parquet"))
    with pytest.warns(UnreadableImagesWarning, match="left out 1 of 4 .*bad.png"):
        ds, _ = load_training_data(_args("--dataset_name", str(tmp_path / "t.parquet")), 16, progress=False)
    assert ds.files == ["img0.png", "img1.png", "cut.png"] and ds.captions == ["a", "b", "d"]
    with pytest.warns(UnreadableImagesWarning, match="cut.png"):  # found when decoded: the next image stands in
        item = ds[2]
    assert item["index"] == 2 and item["caption"] == "a" and torch.equal(item["pixels"], ds[0]["pixels"])


# ------------------------------------------------------------------------------------------------------ variants
def test_crop_windows_span_the_long_side_and_mirror(tmp_path):
    assert resized_size(24, 40, 16) == (16, 26)
    windows = crop_windows((24, 40), 16, positions=3, random_flip=True)  # free: 10 columns
    assert windows == [(0, 0, False), (0, 10, True), (0, 5, False), (0, 5, True), (0, 10, False), (0, 0, True)]
    assert crop_windows((36, 24), 16, positions=1) == [(round((24 - 16) / 2), 0, False)]
    ds = load_image_folder(_folder(tmp_path / "d", "csv"), 16, center_crop=False, random_flip=True, crop_positions=3,
                           progress=False)
    assert ds.variants == 6
    image = torch.from_numpy(np.asarray(Image.open(tmp_path / "d" / "img3.png"), dtype=np.float32) / 255)
    image = image.permute(2, 0, 1)
    resized = torch.nn.functional.interpolate(image[None], size=resized_size(30, 50, 16), mode="bilinear",
                                              antialias=True)[0]
    for v, (top, left, flipped) in enumerate(ds.windows(3)):
        item = ds.get(3, variant=v)
        frame = resized.flip(-1) if flipped else resized  # crop_top_left is in the frame of the output
        assert torch.equal(item["pixels"], frame[:, top:top + 16, left:left + 16].clamp(0, 1))
        assert item["crop_top_left"] == (top, left) and item["original_size"] == (30, 50)
    centre = load_image_folder(tmp_path / "d", 16, progress=False)
    assert centre.variants == 1 and all(torch.equal(centre.get(i, variant=0)["pixels"], centre[i]["pixels"])
                                        for i in range(4))
    assert resize_crop(image, 16)[1] == centre.windows(3)[0][:2]


def test_variants_are_drawn_from_seed_step_and_process_alone(tmp_path):
    folder = _folder(tmp_path / "d", "csv")
    ds = load_image_folder(folder, 16, center_crop=False, random_flip=True, crop_positions=2, progress=False)
    draws = {(s, p): ds.draw_variants(64, 5, s, p) for s in range(3) for p in range(2)}
    assert torch.equal(draws[(1, 0)], ds.draw_variants(64, 5, 1, 0))  # a resumed run draws the same
    assert len({tuple(d.tolist()) for d in draws.values()}) == 6  # every step and process differs
    assert set(torch.cat(list(draws.values())).tolist()) == {0, 1, 2, 3}
    plain = load_image_folder(folder, 16, progress=False)
    assert plain.draw_variants(5, 5, 1, 0).tolist() == [0] * 5
    conditions = ds.micro_conditions([3, 0], [3, 1])
    assert conditions["original_size"].tolist() == [[30, 50], [24, 40]]
    assert conditions["crop_top_left"].tolist() == [list(ds.windows(3)[3][:2]), list(ds.windows(0)[1][:2])]


@pytest.fixture(scope="module")
def vae():
    from qualityguide.testing import tiny_vae

    torch.manual_seed(0)
    return tiny_vae().eval()


def test_latent_cache_holds_every_variant(tmp_path, vae):
    ds = load_image_folder(_folder(tmp_path / "d", "csv"), 16, center_crop=False, random_flip=True, crop_positions=2,
                           progress=False)
    cache = cache_latents(ds, vae, tmp_path / "c", batch_size=3, shard_size=3, progress=False)
    assert cache.mean.shape == (16, 4, 8, 8) and len(cache) == 4 and cache.variants == 4
    index, variants = [3, 0, 3], [1, 2, 3]
    with torch.no_grad():  # independent: diffusers' VAE on each variant's pixels
        pixels = torch.stack([ds.get(i, variant=v)["pixels"] for i, v in zip(index, variants)])
        expected = vae.encode(pixels * 2 - 1).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(cache.latents(index, variants=variants), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cache.latents([3], variants=[0]), cache.latents([3], variants=[1]))  # flipped
    again = cache_latents(ds, vae, tmp_path / "c", batch_size=3, shard_size=3, progress=False)  # reused as it is
    assert torch.equal(again.mean, cache.mean)
    fewer = load_image_folder(tmp_path / "d", 16, center_crop=False, random_flip=True, crop_positions=3,
                              progress=False)
    with pytest.raises(InputError, match="augment=.*'crop_positions': 2.*this run has augment=.*'crop_positions': 3"):
        cache_latents(fewer, vae, tmp_path / "c", batch_size=3, shard_size=3, progress=False)
    with pytest.raises(InputError, match=r"variants \[4\] must give one variant in \[0, 4\)"):
        cache.latents([0], variants=[4])


# ------------------------------------------------------------------------------------------------------ SDXL
def test_sdxl_micro_conditioning_follows_diffusers_get_add_time_ids(tmp_path):
    """Both recipes' text inputs carry each image's real size and its variant's crop, as diffusers' SDXL pipeline
    builds ``add_time_ids`` (original_size + crop_top_left + target_size); dropped captions keep them."""
    from qualityguide.finetune.training import TrainingSamples
    from qualityguide.pipelines import load_pipeline
    from qualityguide.train import PromptEncoder

    pipe = load_pipeline("tiny:sdxl")
    ds = load_image_folder(_folder(tmp_path / "d", "csv"), 16, center_crop=False, random_flip=True, crop_positions=3,
                           progress=False)
    index, variants = [3, 0, 1, 3], ds.draw_variants(4, 0, 7, 1)
    micro = ds.micro_conditions(index, variants)
    encoder = PromptEncoder(pipe, 16)
    projection = pipe.text_encoder_2.config.projection_dim
    captions = [ds.captions[i] for i in index]
    _, extra = encoder(captions, "cpu", torch.tensor([False, True, False, False]), **micro)
    samples = TrainingSamples.encode(pipe, ds, tmp_path / "latents", "image_dir", progress=False)
    from_samples = samples.conditioning(index, encoder, "cpu", variants)["added_cond_kwargs"]["time_ids"]
    for row, (i, v) in enumerate(zip(index, variants.tolist())):
        top, left, _ = ds.windows(i)[v]
        width, height = SIZES[i]
        expected = pipe._get_add_time_ids((height, width), (top, left), (16, 16), extra["time_ids"].dtype,
                                          text_encoder_projection_dim=projection)[0]
        assert torch.equal(extra["time_ids"][row], expected) and torch.equal(from_samples[row], expected)
    assert extra["time_ids"][:, :2].tolist() != [[16.0, 16.0]] * 4  # the real sizes, not the training square
    # the latents are the chosen variants' too
    assert torch.equal(samples.batch(index, "cpu", variants=variants),
                       samples.clean[torch.tensor(index) * ds.variants + variants])
    centre = load_image_folder(tmp_path / "d", 16, progress=False)
    plain = TrainingSamples.encode(pipe, centre, tmp_path / "plain", "image_dir", progress=False)
    time_ids = plain.conditioning([0], encoder, "cpu")["added_cond_kwargs"]["time_ids"][0]
    assert time_ids.tolist() == [24, 40, 0, round((26 - 16) / 2), 16, 16]  # 40x24 image, centre crop of 26x16


def test_original_size_is_the_upright_image_size(tmp_path):
    """A JPEG stored sideways with EXIF orientation 6 is loaded upright; its recorded size (SDXL's original_size,
    read from the header only) is the upright one too."""
    folder = tmp_path / "exif"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 24), (200, 30, 30)).save(folder / "side.jpg", exif=exif.tobytes())
    (folder / "metadata.csv").write_text("file_name\nside.jpg\n")
    ds = load_image_folder(folder, 16, caption_column=None, progress=False)
    assert ds.original_sizes == [(40, 24)] and ds[0]["original_size"] == (40, 24)
    assert ds.micro_conditions([0])["original_size"].tolist() == [[40, 24]]
