"""How score_paths groups images: batches bounded by pixels, not by --batch-size."""

import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from qualityguide.errors import ImageError
from qualityguide.scorers.base import QualityScorer
from qualityguide.cli.score import score_chunk, batches_by_pixels, score_tensors


class Recorder(QualityScorer):
    """Mean brightness; records every batch it sees; refuses images whose top-left pixel is pure red."""

    name = "recorder"

    def __init__(self):
        super().__init__()
        self.batches = []

    def native(self, images):
        self.batches.append(tuple(images.shape))
        red = (images[:, 0, 0, 0] == 1) & (images[:, 1, 0, 0] == 0)
        if red.any():
            raise ImageError("recorder input", f"red image at batch index {torch.nonzero(red).flatten().tolist()}", "")
        return images.mean(dim=(1, 2, 3))


def test_batches_by_pixels_groups_same_sizes_within_the_budget():
    shapes = [(3, 10, 10)] * 5 + [(3, 20, 10)] * 3 + [(3, 100, 100)]
    batches = batches_by_pixels(shapes, max_pixels=300)
    assert sorted(i for batch in batches for i in batch) == list(range(9))
    for batch in batches:
        assert len({shapes[i] for i in batch}) == 1
        h, w = shapes[batch[0]][-2:]
        assert len(batch) * h * w <= 300 or len(batch) == 1
    assert [len(b) for b in batches] == [3, 2, 1, 1, 1, 1]  # 10x10: 3 per batch; 20x10: 1; 100x100 alone


def _write(folder, sizes, red=()):
    paths = []
    for i, (h, w) in enumerate(sizes):
        array = np.full((h, w, 3), 40 + 10 * i, dtype=np.uint8)
        if i in red:
            array[0, 0] = (255, 0, 0)
        path = folder / f"{i}.png"
        Image.fromarray(array).save(path)
        paths.append(path)
    return [(str(p), p) for p in paths]


def test_chunk_memory_is_bounded_by_pixels_not_by_count(tmp_path, monkeypatch):
    """A chunk of 8 files never holds more than the budget (plus one image) loaded at once."""
    from qualityguide import scoring

    chunk = _write(tmp_path, [(20, 20)] * 6 + [(40, 40), (20, 20)])
    held = []
    original = scoring.score_tensors

    def spy(scorer, images, device, max_pixels):
        held.append((len(images), sum(image.shape[-2] * image.shape[-1] for image in images)))
        return original(scorer, images, device, max_pixels)

    monkeypatch.setattr(scoring, "score_tensors", spy)
    live, alive_at_load = [], []
    load = scoring.load_image

    def counting_load(path):
        alive_at_load.append(sum(t.shape[-2] * t.shape[-1] for t in (ref() for ref in live) if t is not None))
        image = load(path)
        live.append(weakref.ref(image))
        return image

    monkeypatch.setattr(scoring, "load_image", counting_load)
    scorer = Recorder()
    rows = score_chunk(scorer, chunk, torch.device("cpu"), max_pixels=1000)
    assert all(row["score"] and not row["error"] for row in rows)
    assert max(alive_at_load) < 1000  # a full batch is scored (and freed) before the next file is read
    assert all(pixels <= 1000 or count == 1 for count, pixels in held), held
    assert all(b[0] * b[2] * b[3] <= 1000 or b[0] == 1 for b in scorer.batches)
    assert sum(b[0] for b in scorer.batches) == 8
    assert (1, 3, 40, 40) in scorer.batches  # 1600 px: a batch of its own
    expected = [(40 + 10 * i) / 255 for i in range(8)]
    assert [float(row["native_score"]) for row in rows] == pytest.approx(expected, abs=1e-6)


def test_a_failing_batch_is_retried_one_by_one():
    images = [torch.full((3, 8, 8), 0.5) for _ in range(4)]
    images[2][0, 0, 0], images[2][1, 0, 0] = 1.0, 0.0
    scorer = Recorder()
    results = score_tensors(scorer, images, torch.device("cpu"), max_pixels=1 << 20)
    assert isinstance(results[2], ImageError)
    assert [r[1] for i, r in enumerate(results) if i != 2] == pytest.approx([0.5] * 3)
    assert scorer.batches[0] == (4, 3, 8, 8) and scorer.batches[1:] == [(1, 3, 8, 8)] * 4


def test_a_single_image_batch_is_not_copied():
    seen = []

    class Spy(Recorder):
        def native(self, images):
            seen.append(images.untyped_storage().data_ptr())
            return super().native(images)

    image = torch.rand(3, 16, 16)
    score_tensors(Spy(), [image], torch.device("cpu"))
    assert seen == [image.untyped_storage().data_ptr()]


def test_batches_are_counted_by_the_pixels_the_scorer_computes_on():
    """16x16 images under @64 are 64x64 for the metric: a 10000 px budget holds two, not all six."""
    from qualityguide.scorers.base import Resized

    inner = Recorder()
    images = [torch.full((3, 16, 16), 0.1 * (i + 1)) for i in range(6)]
    results = score_tensors(Resized(inner, 64), images, torch.device("cpu"), max_pixels=10000)
    assert inner.batches == [(2, 3, 64, 64)] * 3
    assert [r[1] for r in results] == pytest.approx([0.1 * (i + 1) for i in range(6)], abs=1e-6)


@pytest.mark.parametrize("failure", [
    lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: not enough memory: you tried to "
                         "allocate 8847360000 bytes."),
    lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                         "you tried to allocate 8847360000 bytes. Error code 12 (Cannot allocate memory)"),
    lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.24 GiB"),
    lambda: MemoryError(),
])
def test_an_allocation_failure_is_one_images_error(failure):
    """The big image fails alone (its batch-mates are retried and scored); the run is not killed."""

    class Hungry(Recorder):
        def native(self, images):
            if images.shape[0] > 1 or images[0, 0, 0, 0] == 1:  # a batch, or the "big" image, does not fit
                raise failure()
            return super().native(images)

    images = [torch.full((3, 8, 8), 0.5) for _ in range(3)]
    images[1][:, 0, 0] = 1.0
    results = score_tensors(Hungry(), images, torch.device("cpu"), max_pixels=1 << 20)
    assert "not enough memory on cpu to score this 8x8 px image" in str(results[1])
    assert results[0][1] == pytest.approx(0.5) and results[2][1] == pytest.approx(0.5)


def test_other_runtime_errors_still_propagate():
    class Broken(Recorder):
        def native(self, images):
            raise RuntimeError("a bug, not a memory shortage")

    with pytest.raises(RuntimeError, match="a bug"):
        score_tensors(Broken(), [torch.rand(3, 8, 8)], torch.device("cpu"))
