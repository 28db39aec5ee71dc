"""The toy task's judge (``evals/toy/judge.py``): a classifier of the toy's conditions, checked on synthetic
textures (no data needed) and, where the shared data is, on real photo crops."""

import numpy as np
import pytest
import torch

from evals.toy import Crops
from evals.toy.crops import CONDITIONS, DISTORTIONS
from evals.toy.judge import (JudgeConfig, ToyJudge, all_conditions, condition_index, distortion_features,
                             judge_crops, split_by_source)
from qualityguide.errors import InputError

SIZE = 32
CONFIG = JudgeConfig(crop=SIZE, steps=300)


def _textures(n: int, seed: int = 0) -> Crops:
    """``n`` clean synthetic "photos": sharp-edged blocks (at a random offset, so their edges are not JPEG's grid)
    over a smooth colour field, 8-bit, each its own source."""
    g = torch.Generator().manual_seed(seed)
    images = []
    for _ in range(n):
        blocks = torch.rand(3, SIZE // 4 + 2, SIZE // 4 + 2, generator=g).repeat_interleave(4, 1)
        blocks = blocks.repeat_interleave(4, 2)
        dy, dx = torch.randint(0, 8, (2,), generator=g).tolist()
        smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=SIZE, mode="bilinear")[0]
        images.append(0.6 * blocks[:, dy:dy + SIZE, dx:dx + SIZE] + 0.4 * smooth)
    images = torch.round(torch.stack(images).clamp(0, 1) * 255) / 255
    return Crops(images, ["clean"] * n, torch.zeros(n, dtype=torch.long), [f"photo_{i}" for i in range(n)])


@pytest.fixture(scope="module")
def crops() -> Crops:
    return all_conditions(_textures(80), seed=0)


@pytest.fixture(scope="module")
def judge(crops) -> ToyJudge:
    return ToyJudge.fit(crops, CONFIG)


def test_split_holds_out_whole_photos():
    sources = [f"p{i // 10}" for i in range(200)]  # 20 photos, 10 crops each
    train, held = split_by_source(sources, 0.25, seed=3)
    assert sorted(train + held) == list(range(200))
    assert not {sources[i] for i in train} & {sources[i] for i in held}
    assert len({sources[i] for i in held}) == 5
    assert split_by_source(sources, 0.25, seed=3) == (train, held) != split_by_source(sources, 0.25, seed=4)
    with pytest.raises(InputError, match="at least two photos"):
        split_by_source(["p"] * 5, 0.5, 0)


def test_all_conditions_labels_every_crop_by_construction(crops):
    assert len(crops) == 800 and crops.images.shape == (800, 3, SIZE, SIZE)
    assert condition_index(crops).tolist() == list(range(len(CONDITIONS))) * 80
    assert crops.source[:10] == ["photo_0"] * 10 and torch.equal(crops.images[0], _textures(1).images[0])
    assert not torch.equal(crops.images[1], crops.images[0])  # blur-1 changed the pixels


def test_features_match_a_hand_computation():
    """Luma derivative energy at full resolution and the 8 px blockiness, written out with numpy."""
    rng = np.random.default_rng(0)
    image = rng.random((2, 3, SIZE, SIZE)).astype(np.float32)
    image[1] = np.repeat(np.repeat(rng.random((3, 4, 4)), 8, 1), 8, 2)  # steps only across the 8 px grid
    features = distortion_features(torch.from_numpy(image)).numpy()
    luma = (image * 255 * np.array([0.299, 0.587, 0.114])[None, :, None, None]).sum(1)
    dh = np.diff(luma, axis=2)
    assert np.allclose(features[:, 0], np.log((dh ** 2).mean(axis=(1, 2)) + 1e-2), rtol=1e-5)
    edge = np.arange(SIZE - 1) % 8 == 7
    across, inside = np.abs(dh[..., edge]).mean(axis=(1, 2)), np.abs(dh[..., ~edge]).mean(axis=(1, 2))
    assert np.allclose(features[:, 10], np.log((across + 0.1) / (inside + 0.1)), rtol=1e-5, atol=1e-5)
    assert features[1, 10] > 3 > abs(features[0, 10])  # blocks show; noise has none


def test_judge_beats_chance_on_held_out_photos_with_a_2x_margin(judge, crops):
    report = judge.held_out
    assert report["photos"] == 20 and report["crops"] == 200 and report["train_crops"] == 600
    assert report["accuracy"] >= 2 * 1 / len(CONDITIONS)
    assert report["kind_accuracy"] >= 2 * 1 / len(DISTORTIONS)
    by_condition = report["p_clean_by_condition"]
    distorted = np.mean([v for k, v in by_condition.items() if k != "clean"])
    assert by_condition["clean"] >= 2 * distorted


def test_p_clean_falls_and_predicted_level_rises_with_the_true_level(judge, crops):
    _, held = split_by_source(crops.source, CONFIG.held_out, CONFIG.seed)
    verdict = judge(crops.images[held])
    level, kind = crops.level[held], [crops.distortion[i] for i in held]
    p_clean = [float(verdict["p_clean"][level == k].mean()) for k in range(4)]
    assert p_clean[0] > p_clean[1] > p_clean[2] >= p_clean[3]
    for family in ("blur", "noise", "jpeg"):
        rows = torch.tensor([d in ("clean", family) for d in kind])
        predicted = [float(verdict["level"][rows & (level == k)].mean()) for k in range(4)]
        assert predicted == sorted(predicted) and predicted[3] > predicted[0] + 1, (family, predicted)
    assert verdict["kind_probs"].sum(dim=1).allclose(torch.ones(len(held)))
    assert 0 <= float(verdict["level"].min()) and float(verdict["level"].max()) <= 3


def test_summary_is_the_mean_of_the_judgements(judge, crops):
    images = crops.images[:40]
    verdict, summary = judge(images), judge.summary(images)
    assert summary["n"] == 40 and summary["p_clean"] == pytest.approx(float(verdict["p_clean"].mean()))
    assert summary["level"] == pytest.approx(float(verdict["level"].mean()))
    assert summary["kind_share"] == {k: verdict["kind"].count(k) / 40 for k in DISTORTIONS}
    assert sum(summary["kind_share"].values()) == pytest.approx(1.0)


def test_fit_is_deterministic_and_leaves_the_global_rng_alone(judge, crops):
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    again = ToyJudge.fit(crops, CONFIG)
    assert torch.equal(torch.rand(3), before)  # fit drew nothing from the global generator
    for (name, a), b in zip(judge.net.state_dict().items(), again.net.state_dict().values()):
        assert torch.equal(a, b), name
    assert again.held_out == judge.held_out
    other = ToyJudge.fit(crops, JudgeConfig(crop=SIZE, steps=300, seed=1))
    assert not torch.equal(other.net.mlp[0].weight, judge.net.mlp[0].weight)


def test_judge_refuses_other_sizes_and_unknown_conditions(judge, crops):
    with pytest.raises(InputError, match=r"\[B,3,32,32\]"):
        judge(torch.zeros(2, 3, 48, 48))
    odd = Crops(crops.images[:2], ["clean", "blur"], torch.tensor([0, 4]), ["a", "b"])
    with pytest.raises(InputError, match="blur"):
        ToyJudge.fit(odd, CONFIG)
    with pytest.raises(InputError, match="held_out"):
        JudgeConfig(held_out=1.0)


def test_judge_on_real_photo_crops(shared_data):
    """Real BIQ2021 crops, all ten conditions: held out by photo, well above chance."""
    real = judge_crops(shared_data / "biq2021", 40, 48, seed=1)
    assert len(real) == 400 and len(set(real.source)) == 40
    report = ToyJudge.fit(real, JudgeConfig(steps=300)).held_out
    assert report["photos"] == 10 and report["accuracy"] >= 2 * 1 / len(CONDITIONS)
    assert report["p_clean_by_condition"]["clean"] > max(v for k, v in report["p_clean_by_condition"].items()
                                                         if k != "clean")
