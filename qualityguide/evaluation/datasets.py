"""IQA datasets: a folder of images plus a CSV (``image``, ``mos``, optional ``content``), as a ``datasets.Dataset``."""

from __future__ import annotations

import csv
import math
import numbers
import os
from pathlib import Path

from ..errors import InputError

DATA_ENV = "QUALITYGUIDE_DATA"


def shared_data_dir() -> Path | None:
    """The evaluation data folder: ``$QUALITYGUIDE_DATA`` if set, else ``../shared/data`` next to the checkout."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    candidate = Path(__file__).resolve().parents[3] / "shared" / "data"
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
            UTF-8, with or without the byte-order mark Excel writes ("CSV UTF-8"). A relative name is looked
            up as given, then inside ``root``.
        limit: keep only the first ``limit`` rows (quick runs); a positive whole number, or None for all.

    Returns:
        ``datasets.Dataset`` with columns ``image`` (absolute path), ``name`` (as in the CSV), ``mos``
        (float) and ``content`` (str).

    Raises:
        InputError: a missing folder or CSV, a CSV that is not UTF-8, missing columns, a non-numeric or
            non-finite MOS, listed images that are not there, or one image listed twice with different MOS.
    """
    from datasets import Dataset

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1):
        raise InputError(f"limit {limit!r} (--limit): must be a positive number of rows (the first N rows are used); "
                         "leave --limit out to use every row")
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"dataset folder {root} does not exist; pass a folder with images and a mos.csv")
    path = _csv_path(root, csv_file) if csv_file else find_csv(root)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: Excel's "CSV UTF-8" starts with a BOM
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            missing = [c for c in ("image", "mos") if c not in columns]
            if missing:
                raise InputError(f"{path}: missing column(s) {missing}; found {columns}. The CSV needs "
                                 "image,mos[,content]")
            rows = list(reader)
    except UnicodeDecodeError:
        raise InputError(_not_utf8(path)) from None
    if limit is not None:
        rows = rows[:limit]
    names, images, mos, contents, bad = [], [], [], [], []
    first: dict[str, tuple[int, float]] = {}  # resolved image -> (line, mos) of its first row
    for line, row in enumerate(rows, start=2):
        try:
            value = float(row["mos"])
        except (TypeError, ValueError):
            raise InputError(f"{path}, line {line}: mos {row['mos']!r} is not a number") from None
        if not math.isfinite(value):
            raise InputError(f"{path}, line {line}: mos {row['mos']!r} is not finite")
        image = (root / row["image"]).resolve()
        seen = first.setdefault(str(image), (line, value))
        if seen[1] != value:
            raise InputError(f"{path}: image {row['image']!r} is listed twice with different mos ({seen[1]!r} on line "
                             f"{seen[0]}, {value!r} on line {line}); keep one row per image (e.g. their mean)")
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


def _csv_path(root: Path, csv_file: str | os.PathLike) -> Path:
    """The CSV a user named: as given (relative to the working folder), else inside ``root``."""
    given = Path(csv_file)
    candidates = [given] if given.is_absolute() else [given, root / given]
    for path in candidates:
        if path.is_file():
            return path
    looked = " and ".join(str(p) for p in candidates)
    what = "is a folder, not a CSV file" if any(p.is_dir() for p in candidates) else "does not exist"
    raise InputError(f"CSV {csv_file} {what} (looked at {looked}); pass csv=... / --csv naming the CSV file with "
                     "columns image,mos[,content], or leave it out to use DATASET/mos.csv")


def _not_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        raw.decode("utf-8-sig")
        where = ""
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        where = f" (line {line}: byte {raw[exc.start:exc.start + 1]!r})"
    return (f"{path}: not UTF-8{where}; it is probably Latin-1/Windows-1252. Re-save it as UTF-8 (Excel: "
            "'CSV UTF-8'; or iconv -f latin1 -t utf-8)")
