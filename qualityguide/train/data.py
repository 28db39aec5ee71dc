"""A captioned, scored image folder for training, and deterministic batches that survive a resume.

The folder holds images and a ``metadata.csv`` (the layout of ``datasets``' ``imagefolder``): a ``file_name``
column naming each image relative to the folder, an optional caption column and any number of numeric score
columns (``qualityguide label DIR --scorer ...`` writes one). Rows are read through
``datasets.load_dataset("imagefolder")`` (works offline: nothing is downloaded), every value as text, so
captions such as ``01`` stay as written and scores are parsed here with errors that name the row.

Randomness never comes from a data loader's hidden state: :func:`batch_indices` and :func:`step_generator` are
pure functions of (seed, step, process), so a run resumed at step ``s`` sees exactly the batches, crops, noise and
timesteps an uninterrupted run would.

Gradient accumulation: with ``accum`` micro-batches per optimizer step, call both with
``step = optimizer_step * accum + micro`` (``micro`` in ``range(accum)``); resuming at optimizer step ``s`` then
starts at micro-step ``s * accum``.
"""

from __future__ import annotations

import csv
import hashlib
import math
import numbers
import os
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ImageError, InputError, printable
from ..images import load_image

METADATA = "metadata.csv"
FILE_COLUMN = "file_name"
CAPTION_COLUMN = "text"  # what datasets' imagefolder and diffusers' training scripts call the caption
SHOWN = 5  # bad files named in one warning


class UnreadableImagesWarning(UserWarning):
    """Listed images that cannot be opened were left out (one warning per folder, or per file at decode time)."""


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of ints and strings (SHA-256, the same on every machine and version)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2 ** 63 - 1)


def check_int(name: str, value: object, low: int, fix: str) -> int:
    """``value`` as an int if it is a whole number >= ``low`` (a bool is not), else an :class:`InputError`.

    Args:
        name: the argument, as the message shows it.
        value: what was passed.
        low: the smallest allowed value.
        fix: what to do instead, appended to the message.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise InputError(f"{name} {value!r}: must be a whole number >= {low}; {fix}")
    return int(value)


# ----------------------------------------------------------------------------------------------- transforms
def resize_crop(image: torch.Tensor, resolution: int, center_crop: bool = True, random_flip: bool = False,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, tuple[int, int], bool]:
    """Resize the short side to ``resolution`` (bilinear, antialiased), crop a square, maybe flip.

    The long side becomes ``int(resolution * long / short)`` (torchvision's ``Resize`` rule); the centre crop
    starts at ``round((size - resolution) / 2)``. Random draws, in this order: crop top, crop left (when
    ``center_crop`` is False), flip (when ``random_flip``), all from ``generator`` (torch's global RNG if None).

    Args:
        image: ``[3,H,W]`` in [0,1].
        resolution: side of the square output.
        center_crop: centre crop; False draws a random crop.
        random_flip: flip left-right with probability 1/2.
        generator: CPU generator for the random crop and flip.

    Returns:
        (pixels ``[3,R,R]`` in [0,1], crop top-left (top, left) in the resized image, flipped if the output is,
        as SDXL's ``crops_coords_top_left`` conditioning expects; whether it was flipped).
    """
    _, height, width = image.shape
    if height <= width:
        size = (resolution, int(resolution * width / height))
    else:
        size = (int(resolution * height / width), resolution)
    resized = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    if center_crop:
        top, left = round((size[0] - resolution) / 2), round((size[1] - resolution) / 2)
    else:
        top = int(torch.randint(0, size[0] - resolution + 1, (1,), generator=generator))
        left = int(torch.randint(0, size[1] - resolution + 1, (1,), generator=generator))
    pixels = resized[:, top:top + resolution, left:left + resolution]
    flipped = bool(random_flip and torch.rand(1, generator=generator).item() < 0.5)
    if flipped:  # the same pixels as flipping first and cropping at the mirrored column
        pixels, left = pixels.flip(-1), size[1] - left - resolution
    return pixels.clamp(0.0, 1.0).contiguous(), (top, left), flipped


# ----------------------------------------------------------------------------------------------- dataset
class ImageFolderDataset(torch.utils.data.Dataset):
    """Images listed in ``metadata.csv`` with captions and scores; build with :func:`load_image_folder`.

    Attributes:
        folder: the folder. files: image names relative to it (as listed, readable ones only). paths: absolute
        paths. sizes: file sizes in bytes when loaded. captions: one str per image ("" for an empty cell), or
        None without a caption column. scores: float32 ``[N,k]`` in the order of ``score_columns``.
    """

    def __init__(self, folder: Path, paths: list[Path], captions: list[str] | None, scores: torch.Tensor,
                 resolution: int, caption_column: str | None, score_columns: tuple[str, ...], center_crop: bool,
                 random_flip: bool):
        self.folder, self.paths, self.captions, self.scores = folder, paths, captions, scores
        self.files = [os.path.relpath(p, folder) for p in paths]
        self.sizes = [p.stat().st_size for p in paths]
        self.resolution, self.caption_column, self.score_columns = resolution, caption_column, score_columns
        self.center_crop, self.random_flip = center_crop, random_flip
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def deterministic(self) -> bool:
        """Whether an item's pixels are fixed (centre crop, no flip), as a latent cache needs."""
        return self.center_crop and not self.random_flip

    def _load(self, index: int) -> tuple[int, torch.Tensor]:
        """(the index actually used, its image): an image that fails to decode is replaced by the next one."""
        for offset in range(len(self)):
            i = (index + offset) % len(self)
            try:
                return i, load_image(self.paths[i])
            except ImageError as exc:
                if i not in self._warned:
                    self._warned.add(i)
                    warnings.warn(f"{printable(str(exc))}; using the next image in its place", UnreadableImagesWarning,
                                  stacklevel=3)
        raise InputError(f"{self.folder}: none of the {len(self)} listed images can be decoded; re-export them")

    def get(self, index: int, generator: torch.Generator | None = None) -> dict:
        """Item ``index``: ``pixels`` [3,R,R] in [0,1], ``caption`` str, ``scores`` float32 [k], ``index`` int, and
        for SDXL's micro-conditioning ``original_size`` (H, W) and ``crop_top_left`` (top, left).

        An image that fails to decode (its header was fine) is replaced by the next readable one, with one warning
        per file; ``index`` still says which item was asked for, captions and scores follow the image used.

        Args:
            index: position in the dataset (``0 <= index < len(self)``).
            generator: CPU generator for a random crop / flip (see :func:`resize_crop`).
        """
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        index = index % len(self)
        used, image = self._load(index)
        pixels, crop, _ = resize_crop(image, self.resolution, self.center_crop, self.random_flip, generator)
        return {"pixels": pixels, "caption": self.captions[used] if self.captions is not None else "",
                "scores": self.scores[used].clone(), "index": index,
                "original_size": (int(image.shape[1]), int(image.shape[2])), "crop_top_left": crop}

    def __getitem__(self, index: int) -> dict:
        return self.get(index)

    def first(self, count: int) -> "ImageFolderDataset":
        """A dataset of the first ``count`` items, in order, with their captions and scores (``--max_train_samples``).

        Args:
            count: how many items to keep (>= 1; more than there are keeps all).
        """
        if count < 1:
            raise InputError(f"first({count}): keep at least 1 item")
        return ImageFolderDataset(self.folder, self.paths[:count], None if self.captions is None else
                                  self.captions[:count], self.scores[:count], self.resolution, self.caption_column,
                                  self.score_columns, self.center_crop, self.random_flip)

    def batch(self, indices: Sequence[int], generator: torch.Generator | None = None) -> dict:
        """:func:`collate` of :meth:`get` for each index, drawing crops and flips from ``generator`` in order."""
        return collate([self.get(int(i), generator) for i in indices])


def collate(items: Sequence[dict]) -> dict:
    """Stack items from :meth:`ImageFolderDataset.get`: ``pixels`` [B,3,R,R], ``caption`` list[str], ``scores``
    [B,k], ``index`` long [B], ``original_size`` and ``crop_top_left`` long [B,2]."""
    if not items:
        raise InputError("collate got no items; pass at least one item from the dataset")
    return {"pixels": torch.stack([it["pixels"] for it in items]),
            "caption": [it["caption"] for it in items],
            "scores": torch.stack([it["scores"] for it in items]),
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
            "original_size": torch.tensor([it["original_size"] for it in items], dtype=torch.long),
            "crop_top_left": torch.tensor([it["crop_top_left"] for it in items], dtype=torch.long)}


def _header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            return next(csv.reader(handle), [])
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8; re-save it as UTF-8 (Excel: 'CSV UTF-8'; or iconv -f latin1 -t utf-8)"
                         ) from None


def _score(value: str | None, file: str, column: str, metadata: Path) -> float:
    problem = None
    if value is None or not value.strip():
        problem = "is empty (or NaN)"
    else:
        try:
            number = float(value)
        except ValueError:
            problem = f"{value!r} is not a number"
        else:
            if not math.isfinite(number):
                problem = f"{value!r} is not finite"
    if problem:
        raise InputError(f"{metadata}: score column {column!r} of {file!r} {problem}; every score must be a finite "
                         f"number. Fix: rerun `qualityguide label {metadata.parent} --scorer ...` or drop that row")
    return number


def _readable(path: Path) -> str | None:
    """Why the file's header cannot be read (None if it can); the pixels are not decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path):  # reads the header only
            pass
    except FileNotFoundError:
        return "file not found"
    except UnidentifiedImageError:
        return "not an image Pillow can read"
    except Exception as exc:  # noqa: BLE001 - unreadable, decompression bomb, a folder, ...
        return f"{type(exc).__name__}: {exc}"
    return None


def resolve_caption_column(folder: str | os.PathLike, requested: str | None) -> tuple[str | None, str | None]:
    """The caption column a recipe's ``--caption_column`` means for ``folder``, and a note to print if any.

    ``qualityguide label`` writes score columns only, so a labelled folder often has no captions; the documented
    flow (label, then train) must still run. Not given (None): ``text`` when ``metadata.csv`` has it, else no
    captions (every prompt empty, unconditional training) with a one-line note saying so. ``"none"``: no captions.
    Any other name is used as given (a missing one is refused by :func:`load_image_folder`).

    Args:
        folder: the image folder.
        requested: the flag's value (None when not given).

    Returns:
        (column or None, a note for stderr or None).
    """
    if requested is not None:
        return (None if requested.strip().lower() == "none" else requested), None
    metadata = Path(folder) / METADATA
    if not metadata.is_file() or CAPTION_COLUMN in _header(metadata):
        return CAPTION_COLUMN, None  # a missing file is explained by load_image_folder
    return None, (f"note: {metadata} has no {CAPTION_COLUMN!r} column: training without captions (empty prompt); "
                  "pass --caption_column NAME to use one")


def load_image_folder(folder: str | os.PathLike, resolution: int, caption_column: str | None = "text",
                      score_columns: Sequence[str] = (), center_crop: bool = True, random_flip: bool = False,
                      progress: bool = True) -> ImageFolderDataset:
    """Read ``folder/metadata.csv`` and check every listed image's header once.

    Unreadable images (missing, not an image, corrupt header) are dropped with one
    :class:`UnreadableImagesWarning` naming how many and the first few. With several processes, let the main
    process load first (``with accelerator.main_process_first():``) so ``datasets`` builds its cache once.

    Args:
        folder: the image folder.
        resolution: side of the square training images; a positive multiple of 8 (the VAE downsamples by 8).
        caption_column: column holding captions; None for unconditional data (every caption is "").
        score_columns: numeric columns returned as ``scores``, in this order.
        center_crop: centre crop (deterministic); False draws random crops.
        random_flip: flip left-right with probability 1/2.
        progress: show a tqdm bar while checking image headers.

    Raises:
        InputError: a bad resolution, a missing folder, metadata.csv or column, a score cell that is empty, NaN or
            not a number, or no readable image.
    """
    from datasets import Features, Value, load_dataset
    from datasets import Image as ImageFeature
    from tqdm.auto import tqdm

    if isinstance(resolution, bool) or not isinstance(resolution, numbers.Integral) or resolution < 8 \
            or resolution % 8:
        raise InputError(f"resolution {resolution!r} (--resolution): must be a positive multiple of 8 (the VAE "
                         "downsamples by 8), e.g. 512")
    if isinstance(score_columns, str):
        score_columns = (score_columns,)
    score_columns = tuple(score_columns)
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"image folder {folder} does not exist (or is not a folder); pass the folder holding the "
                         f"training images and their {METADATA}")
    metadata = folder / METADATA
    if not metadata.is_file():
        raise InputError(f"{folder} has no {METADATA}; it lists the images: a {FILE_COLUMN} column plus caption / score "
                         f"columns. Create it with `qualityguide label {folder} --scorer ...` or by hand "
                         f"({FILE_COLUMN},text)")
    columns = _header(metadata)
    odd = [c for c in columns if not c.strip() or columns.count(c) > 1]
    if odd:
        raise InputError(f"{metadata}: the header {columns} has empty or repeated column names {sorted(set(odd))} (a "
                         "trailing comma?); give every column one distinct name")
    wanted = [FILE_COLUMN] + ([caption_column] if caption_column is not None else []) + list(score_columns)
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise InputError(f"{metadata}: missing column(s) {missing}; found {columns}. Fix: pass the right caption and "
                         "score columns (recipes: --caption_column NAME, or none for no captions, --score_columns "
                         "NAME...; Python: caption_column=None for no captions), or add the columns")
    features = Features({"image": ImageFeature(decode=False),
                         **{c: Value("string") for c in columns if c != FILE_COLUMN}})
    rows = load_dataset("imagefolder", data_dir=str(folder), split="train", features=features)
    paths = [Path(entry["path"]) for entry in rows["image"]]
    if not paths:
        raise InputError(f"{metadata} lists no images; add rows ({FILE_COLUMN},...) for the images in {folder}")
    files = [os.path.relpath(p, folder) for p in paths]
    columns_scores = [[_score(v, f, c, metadata) for f, v in zip(files, rows[c])] for c in score_columns]
    scores = torch.tensor(list(zip(*columns_scores)) if score_columns else [[]] * len(paths), dtype=torch.float32)
    captions = [c or "" for c in rows[caption_column]] if caption_column is not None else None

    bad = []
    for i, path in enumerate(tqdm(paths, desc="checking images", unit="img", disable=not progress)):
        why = _readable(path)
        if why:
            bad.append((i, why))
    if bad:
        shown = "; ".join(f"{printable(files[i])} ({printable(why)})" for i, why in bad[:SHOWN])
        more = f"; and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
        if len(bad) == len(paths):
            raise InputError(f"{folder}: none of the {len(paths)} images listed in {METADATA} can be opened: "
                             f"{shown}{more}. Fix the files or the {FILE_COLUMN} column")
        warnings.warn(f"{folder}: left out {len(bad)} of {len(paths)} listed images that cannot be opened: "
                      f"{shown}{more}", UnreadableImagesWarning, stacklevel=2)
        keep = sorted(set(range(len(paths))) - {i for i, _ in bad})
        paths, scores = [paths[i] for i in keep], scores[keep]
        captions = [captions[i] for i in keep] if captions is not None else None
    return ImageFolderDataset(folder, paths, captions, scores, int(resolution), caption_column, score_columns,
                              bool(center_crop), bool(random_flip))


# ----------------------------------------------------------------------------------------------- batches
def steps_per_epoch(num_items: int, batch_size: int, num_processes: int = 1, drop_last: bool = True) -> int:
    """Optimizer (micro-)steps in one pass over ``num_items`` with a global batch of ``batch_size * num_processes``."""
    total = batch_size * num_processes
    return num_items // total if drop_last else -(-num_items // total)


@lru_cache(maxsize=4)
def _permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(derive_seed("qualityguide.train.epoch", seed, epoch))
    return torch.randperm(num_items, generator=generator)


def batch_indices(num_items: int, batch_size: int, step: int, seed: int, num_processes: int = 1,
                  process_index: int = 0, drop_last: bool = True) -> list[int]:
    """This process's item indices for (micro-)step ``step``: a pure function of its arguments.

    Each epoch is a permutation of ``range(num_items)`` seeded by (seed, epoch). Step ``s`` of an epoch takes the
    global batch ``perm[s*G:(s+1)*G]`` with ``G = batch_size * num_processes``, and process ``p`` gets its slice
    ``[p*batch_size:(p+1)*batch_size]``: processes are disjoint, and an epoch repeats no item. With ``drop_last`` the
    last ``num_items % G`` items of each epoch's permutation are skipped (different ones every epoch). Without it
    the last global batch is short and split as evenly as possible (sizes differ by at most one; a process may get
    an empty list when fewer items than processes remain), so prefer ``drop_last`` with several processes.

    Args:
        num_items: dataset size.
        batch_size: items per process per step.
        step: global (micro-)step, from 0; with gradient accumulation ``optimizer_step * accum + micro``.
        seed: the run's seed.
        num_processes, process_index: ``accelerator.num_processes`` and ``accelerator.process_index``.
        drop_last: skip the incomplete tail of each epoch.
    """
    num_items = check_int("num_items", num_items, 1, "the dataset is empty")
    batch_size = check_int("batch_size", batch_size, 1, "pass the per-process batch size, e.g. 4")
    step = check_int("step", step, 0, "steps count from 0")
    num_processes = check_int("num_processes", num_processes, 1, "pass accelerator.num_processes")
    process_index = check_int("process_index", process_index, 0, "pass accelerator.process_index")
    if process_index >= num_processes:
        raise InputError(f"process_index {process_index} must be below num_processes {num_processes}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise InputError(f"seed {seed!r}: must be a whole number, e.g. 0")
    per_epoch = steps_per_epoch(num_items, batch_size, num_processes, drop_last)
    if per_epoch == 0:
        raise InputError(f"the dataset has {num_items} items, fewer than one global batch (batch_size {batch_size} x "
                         f"{num_processes} processes = {batch_size * num_processes}); add images, lower the "
                         "per-process batch size (the recipes' --train_batch_size), or fewer processes")
    epoch, within = divmod(step, per_epoch)
    total = batch_size * num_processes
    batch = _permutation(num_items, int(seed), epoch)[within * total:(within + 1) * total]
    if len(batch) == total:
        mine = batch[process_index * batch_size:(process_index + 1) * batch_size]
    else:
        mine = batch.tensor_split(num_processes)[process_index]
    return mine.tolist()


def step_generator(seed: int, step: int, process_index: int = 0, device: str | torch.device = "cpu"
                   ) -> torch.Generator:
    """A generator for step ``step`` on process ``process_index`` (noise, timesteps, condition dropout, crops),
    seeded from (seed, step, process) alone: the same whether or not the run was resumed, different per process.

    Args:
        seed: the run's seed.
        step: global (micro-)step, as for :func:`batch_indices`.
        process_index: ``accelerator.process_index``.
        device: where the generator draws (a CUDA generator for tensors made on the GPU).
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise InputError(f"seed {seed!r}: must be a whole number, e.g. 0")
    step = check_int("step", step, 0, "steps count from 0")
    process_index = check_int("process_index", process_index, 0, "pass accelerator.process_index")
    generator = torch.Generator(device=device)
    return generator.manual_seed(derive_seed("qualityguide.train.step", int(seed), step, process_index))
