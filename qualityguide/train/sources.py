"""Where a training recipe's images come from: diffusers' data flags, declared and loaded once for both recipes.

``--train_data_dir`` is an image folder with ``metadata.csv``, ``metadata.jsonl`` or ``metadata.parquet`` (the
three forms ``datasets``' imagefolder reads); ``--dataset_name`` is anything ``datasets.load_dataset`` takes (a hub
name, a local folder, Parquet files) or a folder written by ``Dataset.save_to_disk``. ``--image_column`` and
``--caption_column`` name the columns; score columns (the adapter's ``--score_columns``) come from the same table.
``--center_crop`` / ``--random_crop`` and ``--random_flip`` choose the augmentation: unlike diffusers' scripts the
centre crop is the default, because random crops are cached as ``--crop_positions`` encoded windows per image (see
:mod:`qualityguide.train.latents` for the cost).
"""

from __future__ import annotations

import argparse
import glob
import os
from pathlib import Path

from ..errors import InputError, printable
from .data import ImageFolderDataset, caption_choice, dataset_from_table, load_image_folder, resolve_caption_column

SAVED = ("state.json", "dataset_dict.json")  # the files Dataset(Dict).save_to_disk writes


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
