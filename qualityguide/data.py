"""IQA datasets: a folder of images plus a CSV (``image``, ``mos``, optional ``content``), as a ``datasets.Dataset``."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from .errors import InputError

DATA_ENV = "QUALITYGUIDE_DATA"


def shared_data_dir() -> Path | None:
    """The evaluation data folder: ``$QUALITYGUIDE_DATA`` if set, else ``../shared/data`` next to the checkout."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    candidate = Path(__file__).resolve().parents[2] / "shared" / "data"
    return candidate if candidate.is_dir() else None


def find_csv(root: Path) -> Path:
    for name in ("mos.csv", "labels.csv", "scores.csv"):
        if (root / name).is_file():
            return root / name
    csvs = sorted(root.glob("*.csv"))
    if len(csvs) == 1:
        return csvs[0]
    raise InputError(f"dataset {root}: no mos.csv found (CSVs present: {[c.name for c in csvs]}); "
                     "pass csv=... / --csv naming the file with columns image,mos[,content]")


def load_iqa_dataset(root: str | os.PathLike, csv_file: str | os.PathLike | None = None, limit: int | None = None):
    """Load an IQA dataset.

    Args:
        root: folder holding the images (CSV paths are relative to it).
        csv_file: the CSV (default: ``root/mos.csv``); columns ``image``, ``mos`` (higher is better) and
            optionally ``content`` (images sharing a source; absent means each image is its own content).
        limit: keep only the first ``limit`` rows (quick runs).

    Returns:
        ``datasets.Dataset`` with columns ``image`` (absolute path), ``name`` (as in the CSV), ``mos``
        (float) and ``content`` (str).
    """
    from datasets import Dataset

    root = Path(root)
    if not root.is_dir():
        raise InputError(f"dataset folder {root} does not exist; pass a folder with images and a mos.csv")
    path = Path(csv_file) if csv_file else find_csv(root)
    if not path.is_absolute() and not path.is_file():
        path = root / path
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        missing = [c for c in ("image", "mos") if c not in columns]
        if missing:
            raise InputError(f"{path}: missing column(s) {missing}; found {columns}. The CSV needs image,mos[,content]")
        rows = list(reader)
    if limit:
        rows = rows[:limit]
    names, images, mos, contents, bad = [], [], [], [], []
    for line, row in enumerate(rows, start=2):
        try:
            value = float(row["mos"])
        except (TypeError, ValueError):
            raise InputError(f"{path}, line {line}: mos {row['mos']!r} is not a number") from None
        if not math.isfinite(value):
            raise InputError(f"{path}, line {line}: mos {row['mos']!r} is not finite")
        image = (root / row["image"]).resolve()
        if not image.is_file():
            bad.append(row["image"])
        names.append(row["image"])
        images.append(str(image))
        mos.append(value)
        contents.append(row.get("content") or row["image"])
    if bad:
        raise InputError(f"{path}: {len(bad)} image(s) listed but not found under {root}, e.g. {bad[:3]}; "
                         "fix the paths (relative to the dataset folder)")
    if not rows:
        raise InputError(f"{path}: no rows")
    return Dataset.from_dict({"image": images, "name": names, "mos": mos, "content": contents})
