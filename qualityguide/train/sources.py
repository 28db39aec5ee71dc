"""Where a training recipe's images come from: diffusers' data flags, declared and loaded once for both recipes.

``--train_data_dir`` is an image folder with a ``metadata.csv``, ``metadata.jsonl`` or ``metadata.parquet`` (the
three layouts of ``datasets``' ``imagefolder``): a ``file_name`` column naming each image relative to the folder, an
optional caption column and any number of numeric score columns (``qualityguide label DIR --scorer ...`` writes
one). Rows are read through ``datasets.load_dataset("imagefolder")`` (offline: nothing is downloaded); a CSV's
values are read as text, so captions such as ``01`` stay as written, and scores are parsed here with errors that
name the row. ``--dataset_name`` is anything ``datasets.load_dataset`` takes (a hub name, a local folder, Parquet
files) or a folder written by ``Dataset.save_to_disk``; :func:`dataset_from_table` makes the same
:class:`~qualityguide.train.data.ImageFolderDataset` from it. ``--image_column`` and ``--caption_column`` name the
columns; score columns (the adapter's ``--score_columns``) come from the same table. ``--center_crop`` /
``--random_crop`` and ``--random_flip`` choose the augmentation: unlike diffusers' scripts the centre crop is the
default, because random crops are cached as ``--crop_positions`` encoded windows per image (see
:mod:`qualityguide.train.latents` for the cost).
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import math
import numbers
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import InputError, printable
from .data import (CAPTION_COLUMN, FILE_COLUMN, METADATA, METADATA_FILES, SHOWN, ImageFolderDataset,
                   UnreadableImagesWarning)

SAVED = ("state.json", "dataset_dict.json")  # the files Dataset(Dict).save_to_disk writes


def _header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            return next(csv.reader(handle), [])
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8; re-save it as UTF-8 (Excel: 'CSV UTF-8'; or iconv -f latin1 -t utf-8)"
                         ) from None


def _metadata_file(folder: Path) -> Path:
    """The folder's one metadata file, in any of the forms datasets' imagefolder reads."""
    found = [folder / name for name in METADATA_FILES if (folder / name).is_file()]
    if not found:
        raise InputError(f"{folder} has no {METADATA} (or {' / '.join(METADATA_FILES[1:])}); it lists the images: a "
                         f"{FILE_COLUMN} column plus caption / score columns. Create it with `qualityguide label "
                         f"{folder} --scorer ...` or by hand ({FILE_COLUMN},text)")
    if len(found) > 1:
        raise InputError(f"{folder} has {len(found)} metadata files ({', '.join(p.name for p in found)}); datasets' "
                         "imagefolder reads one: keep one of them")
    return found[0]


def _metadata_columns(metadata: Path) -> list[str]:
    """The column names of a metadata file (CSV header, the first JSON line's keys, the Parquet schema)."""
    if metadata.suffix == ".csv":
        return _header(metadata)
    try:
        if metadata.suffix == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(metadata).names)
        with open(metadata, encoding="utf-8") as handle:
            line = next((line for line in handle if line.strip()), "{}")
        row = json.loads(line)
        if not isinstance(row, dict):
            raise ValueError(f"the first line is a {type(row).__name__}, not an object")
        return list(row)
    except Exception as exc:  # noqa: BLE001 - bad JSON, not Parquet, not UTF-8
        raise InputError(f"{metadata} cannot be read ({type(exc).__name__}: {printable(str(exc))}); re-write it as "
                         "one JSON object per line (jsonl) or a Parquet table with a file_name column") from None


def _score(value: object, file: str, column: str, where: object, fix: str) -> float:
    problem = None
    if value is None or (isinstance(value, str) and not value.strip()) or \
            (isinstance(value, float) and math.isnan(value)):
        problem = "is empty (or NaN)"
    else:
        try:
            number = float(value)
        except (TypeError, ValueError):
            problem = f"{value!r} is not a number"
        else:
            if not math.isfinite(number):
                problem = f"{value!r} is not finite"
    if problem:
        raise InputError(f"{where}: score column {column!r} of {file!r} {problem}; every score must be a finite "
                         f"number. Fix: {fix}")
    return number


def _probe(source: Path | bytes) -> tuple[str | None, tuple[int, int]]:
    """(why the image's header cannot be read or None, its (height, width) with EXIF orientation applied); the
    pixels are not decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as image:  # the header only
            width, height = image.size
            # a PNG's getexif() decodes the whole image unless its eXIf chunk came before the pixels: skip that
            exif = image.getexif() if image.format != "PNG" or "exif" in image.info else {}
            if exif.get(0x0112) in (5, 6, 7, 8):  # rotated a quarter turn: load_image swaps the sides
                width, height = height, width
    except FileNotFoundError:
        return "file not found", (0, 0)
    except UnidentifiedImageError:
        return "not an image Pillow can read", (0, 0)
    except Exception as exc:  # noqa: BLE001 - unreadable, decompression bomb, a folder, ...
        return f"{type(exc).__name__}: {exc}", (0, 0)
    return None, (height, width)


def caption_choice(columns: Sequence[str], requested: str | None, where: object) -> tuple[str | None, str | None]:
    """The caption column ``--caption_column`` means for a table with ``columns``, and a note to print if any.

    Not given (None): ``text`` when there is one, else no captions (every prompt empty, unconditional training)
    with a one-line note saying so. ``"none"``: no captions. Any other name is used as given (a missing one is refused
    when the data loads).

    Args:
        columns: the table's column names.
        requested: the flag's value (None when not given).
        where: how the note names the table.
    """
    if requested is not None:
        return (None if requested.strip().lower() == "none" else requested), None
    if CAPTION_COLUMN in columns:
        return CAPTION_COLUMN, None
    return None, (f"note: {where} has no {CAPTION_COLUMN!r} column: training without captions (empty prompt); "
                  "pass --caption_column NAME to use one")


def resolve_caption_column(folder: str | os.PathLike, requested: str | None) -> tuple[str | None, str | None]:
    """The caption column a recipe's ``--caption_column`` means for ``folder`` (:func:`caption_choice` of its
    metadata file's columns), and a note to print if any.

    ``qualityguide label`` writes score columns only, so a labelled folder often has no captions; the documented
    flow (label, then train) must still run.

    Args:
        folder: the image folder.
        requested: the flag's value (None when not given).

    Returns:
        (column or None, a note for stderr or None).
    """
    if requested is not None or not Path(folder).is_dir():
        return caption_choice([CAPTION_COLUMN], requested, folder)  # a missing folder is explained when it loads
    try:
        metadata = _metadata_file(Path(folder))
    except InputError:
        return CAPTION_COLUMN, None  # explained by load_image_folder
    return caption_choice(_metadata_columns(metadata), None, metadata)


def _check_resolution(resolution: object) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, numbers.Integral) or resolution < 8 \
            or resolution % 8:
        raise InputError(f"resolution {resolution!r} (--resolution): must be a positive multiple of 8 (the VAE "
                         "downsamples by 8), e.g. 512")
    return int(resolution)


def load_image_folder(folder: str | os.PathLike, resolution: int, caption_column: str | None = "text",
                      score_columns: Sequence[str] = (), center_crop: bool = True, random_flip: bool = False,
                      progress: bool = True, crop_positions: int = 3) -> ImageFolderDataset:
    """Read ``folder``'s metadata (``metadata.csv``, ``.jsonl`` or ``.parquet``) and check every listed image's
    header once (:func:`dataset_from_table` on datasets' ``imagefolder`` table).

    With several processes, let the main process load first (``with accelerator.main_process_first():``) so
    ``datasets`` builds its cache once.

    Args:
        folder: the image folder.
        resolution, caption_column, score_columns, center_crop, random_flip, progress, crop_positions: as for
            :func:`dataset_from_table`.

    Raises:
        InputError: a bad resolution, a missing folder, metadata file or column, a score cell that is empty, NaN or
            not a number, or no readable image.
    """
    from datasets import Features, Value, load_dataset

    _check_resolution(resolution)
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"image folder {folder} does not exist (or is not a folder); pass the folder holding the "
                         f"training images and their {METADATA}")
    metadata = _metadata_file(folder)
    columns = _metadata_columns(metadata)
    odd = [c for c in columns if not str(c).strip() or columns.count(c) > 1]
    if odd:
        raise InputError(f"{metadata}: the header {columns} has empty or repeated column names {sorted(set(odd))} (a "
                         "trailing comma?); give every column one distinct name")
    score_columns = (score_columns,) if isinstance(score_columns, str) else tuple(score_columns)
    wanted = [FILE_COLUMN] + ([caption_column] if caption_column is not None else []) + list(score_columns)
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise InputError(f"{metadata}: missing column(s) {missing}; found {columns}. Fix: pass the right caption and "
                         "score columns (recipes: --caption_column NAME, or none for no captions, --score_columns "
                         "NAME...; Python: caption_column=None for no captions), or add the columns")
    features = None
    if metadata.suffix == ".csv":  # every value as text: captions such as ``01`` stay as written
        from datasets import Image as ImageFeature

        features = Features({"image": ImageFeature(decode=False),
                             **{c: Value("string") for c in columns if c != FILE_COLUMN}})
    rows = load_dataset("imagefolder", data_dir=str(folder), split="train", features=features)
    return dataset_from_table(rows, resolution, "image", caption_column, score_columns, center_crop, random_flip,
                              progress, crop_positions, name=folder, where=metadata, base=folder,
                              fix=f"rerun `qualityguide label {folder} --scorer ...` or drop that row")


def _image_cells(table, column: str):
    """The image column with images left encoded: ``{"bytes", "path"}`` dicts, or path strings."""
    from datasets import Image as ImageFeature
    from datasets import Value

    feature = table.features[column]
    if isinstance(feature, ImageFeature):
        return table.cast_column(column, ImageFeature(decode=False)).select_columns([column])
    if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        return table.select_columns([column])
    if isinstance(feature, dict) and "bytes" in feature:  # Parquet written without datasets' Image metadata
        return table.select_columns([column])
    raise InputError(f"image column {column!r} holds {feature}, not images or image paths; pass the column with "
                     "the images as --image_column NAME")


def _source(cell: object, row: int, base: Path | None) -> tuple[str, Path | int, Path | bytes | None]:
    """(name, source, what to probe) of one image cell: a path, or the row of a table holding the bytes."""
    if isinstance(cell, dict) and cell.get("bytes") is not None:
        return str(cell.get("path") or f"row {row}"), row, bytes(cell["bytes"])
    path = cell.get("path") if isinstance(cell, dict) else cell
    if not path:
        return f"row {row}", row, None
    path = Path(path)
    if not path.is_absolute() and base is not None and (base / path).exists():
        path = base / path
    name = os.path.relpath(path, base) if base is not None and path.is_absolute() else str(path)
    return name, path, path


def dataset_from_table(table, resolution: int, image_column: str = "image", caption_column: str | None = "text",
                       score_columns: Sequence[str] = (), center_crop: bool = True, random_flip: bool = False,
                       progress: bool = True, crop_positions: int = 3, name: object = "dataset",
                       where: object = None, base: str | os.PathLike | None = None, fix: str = "correct that cell "
                       "or drop that row") -> ImageFolderDataset:
    """A training dataset from a ``datasets.Dataset``: images (encoded bytes or paths), captions and scores.

    Unreadable images (missing, not an image, corrupt header) are dropped with one
    :class:`UnreadableImagesWarning` naming how many and the first few. Encoded images stay in the (memory-mapped)
    table and are decoded when an item is read; only their headers are read here.

    Args:
        table: the rows (datasets' ``Image`` feature, a ``{"bytes", "path"}`` struct, or path strings).
        resolution: side of the square training images; a positive multiple of 8 (the VAE downsamples by 8).
        image_column: the column holding the images.
        caption_column: column holding captions; None for unconditional data (every caption is "").
        score_columns: numeric columns returned as ``scores``, in this order.
        center_crop: centre crop (deterministic); False: random crops, among ``crop_positions`` windows when a
            step asks for a variant (:meth:`ImageFolderDataset.draw_variants`), anywhere from a generator.
        random_flip: flip left-right with probability 1/2.
        progress: show a tqdm bar while checking image headers.
        crop_positions: crop windows per image with random crops (:func:`crop_windows`).
        name: how messages name the data (the folder or dataset name).
        where: how messages name the table (default ``name``).
        base: folder that relative image paths are relative to.
        fix: how to fix a bad score cell, appended to its message.

    Raises:
        InputError: a bad resolution, a missing column (the message lists the columns there are), a column that holds
            no images, a score cell that is empty, NaN or not a number, or no readable image.
    """
    from tqdm.auto import tqdm

    resolution = _check_resolution(resolution)
    where = name if where is None else where
    score_columns = (score_columns,) if isinstance(score_columns, str) else tuple(score_columns)
    columns = list(table.column_names)
    wanted = [image_column] + ([caption_column] if caption_column is not None else []) + list(score_columns)
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise InputError(f"{where}: missing column(s) {missing}; found {columns}. Fix: pass the right columns "
                         "(--image_column NAME, --caption_column NAME or none, --score_columns NAME...)")
    if len(table) == 0:
        raise InputError(f"{where} lists no images; add rows with an image in column {image_column!r}")
    base = Path(base) if base is not None else None
    files, sources, sizes, original_sizes, bad, keep = [], [], [], [], [], []
    cells = _image_cells(table, image_column)
    for row, record in enumerate(tqdm(cells, desc="checking images", unit="img", disable=not progress)):
        file, source, probe = _source(record[image_column], row, base)
        why, size = _probe(probe) if probe is not None else ("empty image cell", (0, 0))
        if why:
            bad.append((file, why))
            continue
        keep.append(row)
        files.append(file)
        sources.append(source)
        sizes.append(probe.stat().st_size if isinstance(probe, Path) else len(probe))
        original_sizes.append(size)
    if bad:
        shown = "; ".join(f"{printable(f)} ({printable(why)})" for f, why in bad[:SHOWN])
        more = f"; and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
        if not keep:
            raise InputError(f"{where}: none of the {len(table)} images listed can be opened: {shown}{more}. Fix the "
                             f"files or the {image_column if base is None else FILE_COLUMN} column")
        warnings.warn(f"{name}: left out {len(bad)} of {len(table)} listed images that cannot be opened: "
                      f"{shown}{more}", UnreadableImagesWarning, stacklevel=3)
    column_scores = []
    for column in score_columns:
        values = table[column]
        column_scores.append([_score(values[row], file, column, where, fix) for row, file in zip(keep, files)])
    scores = torch.tensor(list(zip(*column_scores)) if score_columns else [[]] * len(keep), dtype=torch.float32)
    captions = None
    if caption_column is not None:
        values = table[caption_column]
        captions = ["" if values[row] is None else str(values[row]) for row in keep]
    with_bytes = any(not isinstance(s, Path) for s in sources)
    return ImageFolderDataset(name, files, sources, sizes, original_sizes, captions, scores, resolution,
                              caption_column, score_columns, bool(center_crop), bool(random_flip), crop_positions,
                              cells if with_bytes else None, image_column)


def add_data_arguments(parser: argparse.ArgumentParser, alias: str | None = None) -> None:
    """The data flags of diffusers' training scripts, plus ``--crop_positions``.

    Args:
        parser: the recipe's parser.
        alias: an older name of ``--train_data_dir`` the recipe keeps working (``--dataset``, ``--image_dir``).
    """
    group = parser.add_argument_group("training data")
    a = group.add_argument
    a("--train_data_dir", *([alias] if alias else []), dest="train_data_dir", default=None,
      help="image folder with metadata.csv, metadata.jsonl or metadata.parquet (file_name, caption and score columns)")
    a("--dataset_name", default=None, help="a datasets dataset: hub name, local folder, Parquet file(s) (a glob or "
      "comma-separated), or a folder written by save_to_disk")
    a("--dataset_config_name", default=None, help="configuration of a hub --dataset_name")
    a("--image_column", default="image", help="column of --dataset_name holding the images or their paths")
    a("--caption_column", default=None, help="caption column (default: 'text' if the data has one, else none); "
      "'none': empty prompts")
    crop = group.add_mutually_exclusive_group()
    crop.add_argument("--center_crop", dest="center_crop", action="store_true", default=True,
                      help="centre-crop each image to --resolution (the default)")
    crop.add_argument("--random_crop", dest="center_crop", action="store_false",
                      help="crop at one of --crop_positions windows per image, drawn per step")
    a("--crop_positions", type=int, default=3, help="with --random_crop: windows per image, evenly spaced along the "
      "long side, each encoded once (cost: that many times the encoding time and latent cache size)")
    a("--random_flip", action="store_true", help="flip left-right with probability 1/2 (both orientations are "
      "encoded: twice the encoding time and latent cache size)")


def data_source(args: argparse.Namespace) -> str | None:
    """``"train_data_dir"``, ``"dataset_name"`` or None (neither given); both at once is refused."""
    if args.train_data_dir is not None and args.dataset_name is not None:
        raise InputError(f"--train_data_dir {args.train_data_dir} and --dataset_name {args.dataset_name} exclude each "
                         "other; pass one of them")
    if args.crop_positions < 1:
        raise InputError(f"--crop_positions {args.crop_positions}: must be >= 1, e.g. 3")
    return "train_data_dir" if args.train_data_dir is not None else \
        "dataset_name" if args.dataset_name is not None else None


def _parquet_files(name: str) -> list[str] | None:
    """The Parquet files ``name`` lists (one path, a glob, or comma-separated), or None if it names none."""
    parts = [p.strip() for p in name.split(",") if p.strip()]
    if not parts or not all(p.endswith(".parquet") for p in parts):
        return None
    files = sorted({f for p in parts for f in (glob.glob(p) if glob.has_magic(p) else [p])})
    missing = [f for f in files if not os.path.isfile(f)]
    if missing or not files:
        raise InputError(f"--dataset_name {name}: no such Parquet file(s) {missing or parts}; check the path")
    return files


def open_table(name: str, config: str | None = None):
    """The ``train`` split of ``--dataset_name`` as a ``datasets.Dataset``, and the folder its relative image paths
    are relative to (None for a hub dataset).

    Args:
        name: hub name, local folder, Parquet file(s), or a ``save_to_disk`` folder.
        config: the dataset configuration (hub datasets).
    """
    import datasets

    path = Path(name)
    try:
        if path.is_dir() and any((path / f).is_file() for f in SAVED):
            table, base = datasets.load_from_disk(str(path)), path
        elif (files := _parquet_files(name)) is not None:
            table, base = datasets.load_dataset("parquet", data_files=files, split="train"), Path(files[0]).parent
        else:
            table = datasets.load_dataset(name, config, split="train")
            base = path if path.is_dir() else None
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - offline hub, missing split, unreadable files: datasets' many types
        raise InputError(f"--dataset_name {name} cannot be loaded ({type(exc).__name__}: {printable(str(exc))}); pass "
                         "a hub dataset name (online), a local folder or Parquet file(s), or a folder written by "
                         "save_to_disk") from None
    if isinstance(table, datasets.DatasetDict):
        if "train" not in table:
            raise InputError(f"--dataset_name {name} has no 'train' split (it has {sorted(table)}); save the split to "
                             "train on as 'train'")
        table = table["train"]
    return table, base


def load_training_data(args: argparse.Namespace, resolution: int, score_columns=(), progress: bool = True,
                       conditional: bool = True) -> tuple[ImageFolderDataset, str | None]:
    """The recipe's training images from ``--train_data_dir`` or ``--dataset_name`` (see :func:`add_data_arguments`).

    With several processes call it on the main process first (``with accelerator.main_process_first():``) so
    ``datasets`` builds its cache once.

    Args:
        args: the parsed flags (one of the two sources given).
        resolution: side of the square training images.
        score_columns: numeric columns to read as ``scores`` (the adapter's ``--score_columns``).
        progress: show a progress bar while checking image headers.
        conditional: whether the model takes captions (False: none are read).

    Returns:
        (the dataset, a note for stderr or None: which caption column was not found).
    """
    source = data_source(args)
    if source is None:
        raise InputError("no training data: pass --train_data_dir FOLDER (images with metadata.csv/.jsonl/.parquet) "
                         "or --dataset_name NAME (a datasets dataset)")
    augment = {"center_crop": args.center_crop, "random_flip": args.random_flip,
               "crop_positions": args.crop_positions}
    if source == "train_data_dir":
        caption, note = resolve_caption_column(args.train_data_dir, args.caption_column) if conditional \
            else (None, None)
        return load_image_folder(args.train_data_dir, resolution, caption_column=caption,
                                 score_columns=score_columns, progress=progress, **augment), note
    table, base = open_table(args.dataset_name, args.dataset_config_name)
    caption, note = caption_choice(table.column_names, args.caption_column, f"--dataset_name {args.dataset_name}") \
        if conditional else (None, None)
    return dataset_from_table(table, resolution, args.image_column, caption, score_columns, progress=progress,
                              name=args.dataset_name, base=base, **augment), note
