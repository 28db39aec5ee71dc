"""training_curves.png: what is drawn comes from the log's keys (curve_series), and the PNG is written atomically."""

from __future__ import annotations

import json
import math

from PIL import Image

from qualityguide.train.curves import CURVES_NAME, curve_series, write_training_curves
from qualityguide.train.log import StepLog


def _write_log(folder, rows):
    log = StepLog(folder, 0)
    for step, values in rows:
        log.write(step, values)
    log.close()


def test_series_follow_the_log_keys_including_late_validation_and_non_finite(tmp_path):
    rows = [(0, {"loss": 1.0, "diffusion": 0.5, "quality": 2.0, "lr": 1e-4, "grad_norm": 0.3}),
            (1, {"loss": float("nan"), "diffusion": 0.4, "quality": 2.5, "lr": 2e-4, "grad_norm": float("inf")}),
            (2, {"loss": 0.8, "diffusion": 0.3, "quality": 3.0, "lr": 3e-4, "grad_norm": 0.2,
                 "validation/quality": 4.0, "validation/held_out/niqe": 1.5,
                 "validation/guiding_minus_held_out/niqe": 2.5})]
    _write_log(tmp_path, rows)
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert records[1]["loss"] == "nan" and records[1]["grad_norm"] == "inf"  # StepLog's strings reach the reader
    panels = curve_series(records)
    assert list(panels) == ["loss terms", "gradient norm", "learning rate", "mean quality score", "validation scores",
                            "guiding minus held-out (validation)"]
    assert list(panels["loss terms"]) == ["loss", "diffusion"]
    steps, loss = panels["loss terms"]["loss"]
    assert steps == [0, 1, 2] and loss[0] == 1.0 and math.isnan(loss[1]) and loss[2] == 0.8
    assert math.isnan(panels["gradient norm"]["grad_norm"][1][1])  # an infinity is a gap, not an axis to infinity
    assert panels["learning rate"] == {"lr": ([0, 1, 2], [1e-4, 2e-4, 3e-4])}
    assert panels["mean quality score"] == {"quality": ([0, 1, 2], [2.0, 2.5, 3.0])}
    assert panels["validation scores"] == {"validation/quality": ([2], [4.0]), "validation/held_out/niqe": ([2], [1.5])}
    assert panels["guiding minus held-out (validation)"] == {"validation/guiding_minus_held_out/niqe": ([2], [2.5])}


def test_adapter_log_has_no_quality_or_validation_panels():
    panels = curve_series([{"step": 0, "loss": 0.1, "lr": 1e-5, "grad_norm": 1.0}])
    assert list(panels) == ["loss terms", "gradient norm", "learning rate"]


def test_png_is_written_for_one_step_and_replaced(tmp_path):
    _write_log(tmp_path, [(0, {"loss": 0.5, "lr": 1e-4})])
    path = write_training_curves(tmp_path)
    assert path == tmp_path / CURVES_NAME
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100
        first_height = image.height
    _write_log(tmp_path, [(0, {"loss": 0.5, "lr": 1e-4, "grad_norm": 1.0, "quality": 3.0})])
    with Image.open(write_training_curves(tmp_path)) as image:
        assert image.height > first_height  # two more panels: the file was redrawn, not kept
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CURVES_NAME, "train_log.jsonl"])  # no temporary


def test_png_without_a_log(tmp_path):
    with Image.open(write_training_curves(tmp_path)) as image:
        assert image.format == "PNG"
