"""`qualityguide.label_dataset`: score columns for a datasets.Dataset (qualityguide.scorers.labelling)."""

import numpy as np
import pytest
import torch
from PIL import Image

import qualityguide
from qualityguide import InputError, label_dataset, load_image, load_scorer
from qualityguide.scorers.base import QualityScorer

datasets = pytest.importorskip("datasets")
CALLS = []  # images scored by Mean, kept outside the scorer so that counting does not change its fingerprint


class Mean(QualityScorer):
    """10 x the mean pixel value: easy to compute independently with numpy."""

    name = "mean"

    def native(self, images):
        CALLS.append(images.shape[0])
        return images.mean(dim=(1, 2, 3)) * 10


def _images(folder, n, size=(64, 80)):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        array = (rng.uniform(0, 1, (*size, 3)) * (0.3 + 0.7 * i / n) * 255).astype(np.uint8)
        paths.append(str(folder / f"img{i}.png"))
        Image.fromarray(array).save(paths[-1])
    return paths


def test_columns_equal_the_scorer_on_each_image_for_pil_and_path_cells(tmp_path):
    paths = _images(tmp_path, 5)
    data = datasets.Dataset.from_dict({"image": paths, "path": paths, "caption": list("abcde")},
                                      features=datasets.Features({"image": datasets.Image(), "path": datasets.Value(
                                          "string"), "caption": datasets.Value("string")}))
    out = label_dataset(data, ["niqe-embedded@192", Mean()], batch_size=2)
    assert out.column_names == ["image", "path", "caption", "niqe-embedded@192", "mean"]
    niqe = load_scorer("niqe-embedded@192")
    with torch.no_grad():
        expected = [float(niqe(load_image(p)[None])[0]) for p in paths]
    np.testing.assert_allclose(out["niqe-embedded@192"], expected, rtol=1e-6)
    means = [10 * np.asarray(Image.open(p), dtype=np.float64).mean() / 255 for p in paths]
    np.testing.assert_allclose(out["mean"], means, rtol=1e-5)
    by_path = label_dataset(data, "niqe-embedded@192", image_column="path", batch_size=3)
    assert by_path["niqe-embedded@192"] == out["niqe-embedded@192"]
    assert out["caption"] == list("abcde")  # other columns untouched


def test_unscorable_rows_get_none_and_the_rest_go_on(tmp_path):
    paths = _images(tmp_path, 2, size=(192, 200))
    Image.new("RGB", (64, 64)).save(tmp_path / "tiny.png")  # below NIQE's minimum side
    (tmp_path / "broken.png").write_bytes(b"not a png")
    cells = [paths[0], str(tmp_path / "tiny.png"), str(tmp_path / "broken.png"), str(tmp_path / "gone.png"), paths[1]]
    out = label_dataset(datasets.Dataset.from_dict({"image": cells}), "niqe-embedded", batch_size=5)
    values = out["niqe-embedded"]
    assert values[1:4] == [None, None, None]
    assert all(isinstance(v, float) and np.isfinite(v) for v in (values[0], values[4]))
    assert out.features["niqe-embedded"] == datasets.Value("float64")


def test_rerun_on_a_cached_dataset_does_not_score_again(tmp_path):
    paths = _images(tmp_path / "img", 4)
    datasets.Dataset.from_dict({"image": paths}).cast_column("image", datasets.Image()).save_to_disk(tmp_path / "d")
    data = datasets.load_from_disk(str(tmp_path / "d"))
    CALLS.clear()
    first = label_dataset(data, [Mean()], batch_size=2)
    assert sum(CALLS) == 4
    CALLS.clear()
    again = label_dataset(datasets.load_from_disk(str(tmp_path / "d")), [Mean()], batch_size=2)
    assert CALLS == [] and again["mean"] == first["mean"]  # read from datasets' cache: not scored again
    other = Mean()
    other.register_buffer("offset", torch.ones(1))  # other weights: another fingerprint, scored afresh
    label_dataset(datasets.load_from_disk(str(tmp_path / "d")), [other], batch_size=2)
    assert sum(CALLS) == 4


def test_same_columns_as_label_writes_into_metadata(tmp_path):
    from qualityguide.cli import main

    _images(tmp_path, 3)
    assert main(["label", str(tmp_path), "--scorer", "niqe-embedded@192", "--quiet"]) == 0
    folder = datasets.load_dataset("imagefolder", data_dir=str(tmp_path), split="train")
    ours = label_dataset(folder.remove_columns(["niqe-embedded@192"]), "niqe-embedded@192")
    np.testing.assert_allclose(ours["niqe-embedded@192"], folder["niqe-embedded@192"], rtol=1e-6)


def test_bad_arguments_are_refused_naming_the_fix(tmp_path):
    paths = _images(tmp_path, 1)
    data = datasets.Dataset.from_dict({"image": paths, "mean": [1.0]})
    with pytest.raises(InputError, match="already has column.*'mean'.*overwrite=True"):
        label_dataset(data, Mean())
    assert label_dataset(data, Mean(), overwrite=True)["mean"][0] != 1.0
    with pytest.raises(InputError, match="pass one split"):
        label_dataset(datasets.DatasetDict({"train": data}), Mean())
    with pytest.raises(InputError, match="image_column 'picture' is not a column.*image, mean"):
        label_dataset(data, Mean(), image_column="picture")
    with pytest.raises(InputError, match="2 column.*1 scorer"):
        label_dataset(data, Mean(), columns=["a", "b"])
    with pytest.raises(InputError, match="given twice"):
        label_dataset(data, [Mean(), Mean()])
    with pytest.raises(InputError, match="batch_size must be a whole number >= 1, got 0"):
        label_dataset(data, Mean(), batch_size=0)
    assert qualityguide.label_dataset is label_dataset


def test_a_labelled_dataset_trains_the_adapter_recipe_through_dataset_name(tmp_path):
    """label_dataset -> save_to_disk -> the adapter recipe's --dataset_name, conditioning on the new column."""
    import json

    from helpers import load_script, reset_accelerate

    from qualityguide.adapter import IQAAdapter

    paths = _images(tmp_path / "photos", 6)
    data = datasets.Dataset.from_dict({"image": paths, "text": [f"photo {i}" for i in range(6)]},
                                      features=datasets.Features({"image": datasets.Image(),
                                                                  "text": datasets.Value("string")}))
    labelled = label_dataset(data, Mean(), batch_size=3)
    labelled.save_to_disk(str(tmp_path / "labelled"))
    reset_accelerate()
    argv = ["--model", "tiny:sd", "--dataset_name", str(tmp_path / "labelled"), "--score_columns", "mean",
            "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "1", "--output_dir",
            str(tmp_path / "adapter")]
    try:
        assert load_script("recipes/train_iqa_adapter.py").main(argv) == 0
    finally:
        reset_accelerate()
    adapter = IQAAdapter.from_pretrained(tmp_path / "adapter")
    assert adapter.score_names == ["mean"]
    # the percentiles it conditions on are the labelled column's: its ends and median, by the saved table
    table = np.asarray(json.loads((tmp_path / "adapter" / "quantiles.json").read_text())["quantiles"]["mean"])
    np.testing.assert_allclose([table[0], table[-1]], [min(labelled["mean"]), max(labelled["mean"])], rtol=1e-6)
    assert adapter.quantiles.score_at("mean", [0.5])[0] == pytest.approx(np.median(labelled["mean"]), rel=1e-6)
