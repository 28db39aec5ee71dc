"""A captioned, scored image folder for training, and deterministic batches that survive a resume.

Items come from an image folder or a ``datasets`` table, loaded by :mod:`qualityguide.train.sources`
(:func:`~qualityguide.train.sources.load_image_folder`, :func:`~qualityguide.train.sources.dataset_from_table`):
per image a file or encoded bytes, its caption, its scores and its size.

Augmentation for a latent cache: random crops and flips are drawn from a fixed set of *variants* per image,
``crop_positions`` windows evenly spaced along the long side (one, the centre, with ``center_crop``) times two
orientations with ``random_flip``. Each variant is encoded once (:func:`qualityguide.train.latents.cache_latents`),
so ``V = positions x orientations`` multiplies the encoding time and the cache's size by ``V``; a step picks one
variant per sample with :meth:`ImageFolderDataset.draw_variants`, a pure function of (seed, step, process).

Randomness never comes from a data loader's hidden state: :func:`batch_indices` and :func:`step_generator` are
pure functions of (seed, step, process), so a run resumed at step ``s`` sees exactly the batches, crops, noise and
timesteps an uninterrupted run would.

Gradient accumulation: with ``accum`` micro-batches per optimizer step, call both with
``step = optimizer_step * accum + micro`` (``micro`` in ``range(accum)``); resuming at optimizer step ``s`` then
starts at micro-step ``s * accum``.
"""

from __future__ import annotations

import hashlib
import io
import numbers
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ImageError, InputError, printable
from ..images import load_image

METADATA = "metadata.csv"
METADATA_FILES = (METADATA, "metadata.jsonl", "metadata.parquet")  # what datasets' imagefolder reads
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
def resized_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(height, width) after resizing the short side to ``resolution``: the long side becomes
    ``int(resolution * long / short)`` (torchvision's ``Resize`` rule)."""
    if height <= width:
        return resolution, int(resolution * width / height)
    return int(resolution * height / width), resolution


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)[0]


def _window(resized: torch.Tensor, top: int, left: int, resolution: int, flipped: bool) -> torch.Tensor:
    """The square at (top, left) of ``resized``, or of ``resized`` flipped left-right when ``flipped``."""
    source = resized.flip(-1) if flipped else resized
    return source[:, top:top + resolution, left:left + resolution].clamp(0.0, 1.0).contiguous()


def resize_crop(image: torch.Tensor, resolution: int, center_crop: bool = True, random_flip: bool = False,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, tuple[int, int], bool]:
    """Resize the short side to ``resolution`` (bilinear, antialiased), crop a square, maybe flip.

    The long side follows :func:`resized_size`; the centre crop starts at ``round((size - resolution) / 2)``.
    Random draws, in this order: crop top, crop left (when ``center_crop`` is False), flip (when ``random_flip``), all
    from ``generator`` (torch's global RNG if None).

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
    size = resized_size(int(image.shape[1]), int(image.shape[2]), resolution)
    if center_crop:
        top, left = round((size[0] - resolution) / 2), round((size[1] - resolution) / 2)
    else:
        top = int(torch.randint(0, size[0] - resolution + 1, (1,), generator=generator))
        left = int(torch.randint(0, size[1] - resolution + 1, (1,), generator=generator))
    flipped = bool(random_flip and torch.rand(1, generator=generator).item() < 0.5)
    if flipped:  # the same pixels as flipping first and cropping at the mirrored column
        left = size[1] - left - resolution
    return _window(_resize(image, size), top, left, resolution, flipped), (top, left), flipped


def crop_windows(original_size: tuple[int, int], resolution: int, positions: int = 1, random_flip: bool = False
                 ) -> list[tuple[int, int, bool]]:
    """The augmentation variants of one image: ``(top, left, flipped)`` for variant ``v = p * F + f``.

    ``positions`` windows are evenly spaced along the resized image's long side, ends included
    (``round(j * free / (positions - 1))``); one position is the centre crop of :func:`resize_crop`. A square image's
    windows coincide (it is still encoded once per window, which keeps every item's variants indexed alike). With
    ``random_flip`` (``F = 2``) each position comes unflipped (``f = 0``) and flipped (``f = 1``). ``(top, left)`` is
    the crop's corner in the frame of the output, of the flipped image when flipped (SDXL's ``crops_coords_top_left``
    convention, as diffusers' SDXL training script records it: flip first, then crop).

    Args:
        original_size: (height, width) of the image.
        resolution: side of the square crop.
        positions: crop windows per orientation (>= 1).
        random_flip: add the mirrored twin of each window.
    """
    positions = check_int("positions", positions, 1, "pass how many crop windows per image, e.g. 3")
    height, width = resized_size(int(original_size[0]), int(original_size[1]), resolution)
    free_top, free_left = height - resolution, width - resolution
    if positions == 1:
        corners = [(round(free_top / 2), round(free_left / 2))]
    else:
        corners = [(round(j * free_top / (positions - 1)), round(j * free_left / (positions - 1)))
                   for j in range(positions)]
    flips = (False, True) if random_flip else (False,)
    return [(top, width - left - resolution if f else left, f) for top, left in corners for f in flips]


def crop_at(image: torch.Tensor, resolution: int, window: tuple[int, int, bool]) -> torch.Tensor:
    """``image`` resized as :func:`resize_crop` resizes it, cut at one of :func:`crop_windows`' windows.

    Args:
        image: ``[3,H,W]`` in [0,1].
        resolution: side of the square output.
        window: ``(top, left, flipped)``, the corner in the output's frame.
    """
    top, left, flipped = window
    size = resized_size(int(image.shape[1]), int(image.shape[2]), resolution)
    return _window(_resize(image, size), top, left, resolution, flipped)


# ----------------------------------------------------------------------------------------------- dataset
class ImageFolderDataset(torch.utils.data.Dataset):
    """Captioned, scored images from a folder or a ``datasets`` table; build with
    :func:`qualityguide.train.sources.load_image_folder` or :func:`~qualityguide.train.sources.dataset_from_table`.

    Attributes:
        folder: the folder (or the dataset's name). files: image names (relative to the folder, or as the table
        names them; readable ones only). sizes: encoded sizes in bytes. original_sizes: (height, width) of each
        image, EXIF orientation applied. captions: one str per image ("" for an empty cell), or None without a
        caption column. scores: float32 ``[N,k]`` in the order of ``score_columns``. sources: per image a ``Path``,
        or a row of ``table`` whose ``image_column`` cell holds the encoded image.
    """

    def __init__(self, folder: Path | str, files: list[str], sources: list, sizes: list[int],
                 original_sizes: list[tuple[int, int]], captions: list[str] | None, scores: torch.Tensor,
                 resolution: int, caption_column: str | None, score_columns: tuple[str, ...], center_crop: bool,
                 random_flip: bool, crop_positions: int = 1, table=None, image_column: str | None = None):
        self.folder, self.files, self.sources, self.sizes = folder, files, sources, sizes
        self.original_sizes, self.captions, self.scores = original_sizes, captions, scores
        self.resolution, self.caption_column, self.score_columns = resolution, caption_column, score_columns
        self.center_crop, self.random_flip = center_crop, random_flip
        self.crop_positions = 1 if center_crop else check_int("crop_positions", crop_positions, 1,
                                                              "pass how many crop windows per image, e.g. 3")
        self.table, self.image_column = table, image_column
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    @property
    def variants(self) -> int:
        """Augmentation variants per image (:func:`crop_windows`): crop positions times orientations."""
        return self.crop_positions * (2 if self.random_flip else 1)

    @property
    def deterministic(self) -> bool:
        """Whether an item has one variant (centre crop, no flip)."""
        return self.variants == 1

    def windows(self, index: int) -> list[tuple[int, int, bool]]:
        """Item ``index``'s variants, ``(top, left, flipped)`` (:func:`crop_windows`)."""
        return crop_windows(self.original_sizes[index], self.resolution, self.crop_positions, self.random_flip)

    def draw_variants(self, batch: int, seed: int, step: int, process_index: int = 0) -> torch.Tensor:
        """:func:`draw_variants` over this dataset's :attr:`variants`."""
        return draw_variants(self.variants, batch, seed, step, process_index)

    def augment_identity(self) -> dict:
        """``{"augment": ...}`` for a resume identity: the crop windows and flip when items have several variants,
        else None (what a missing field reads as, so identities made before augmentation existed stay valid)."""
        if self.variants == 1:
            return {"augment": None}
        return {"augment": {"crop_positions": self.crop_positions, "random_flip": self.random_flip}}

    def micro_conditions(self, indices: Sequence[int], variants: Sequence[int] | torch.Tensor | None = None
                         ) -> dict[str, torch.Tensor]:
        """SDXL's micro-conditioning inputs of items ``indices`` seen as variants ``variants`` (None: variant 0):
        ``original_size`` (height, width) and ``crop_top_left`` (top, left), long ``[B,2]`` each.

        Args:
            indices: dataset indices.
            variants: one variant per index (:meth:`draw_variants`).
        """
        variants = [0] * len(indices) if variants is None else [int(v) for v in variants]
        crops = [self.windows(int(i))[v][:2] for i, v in zip(indices, variants)]
        return {"original_size": torch.tensor([self.original_sizes[int(i)] for i in indices], dtype=torch.long),
                "crop_top_left": torch.tensor(crops, dtype=torch.long).view(-1, 2)}

    def _decode(self, i: int) -> torch.Tensor:
        source = self.sources[i]
        if isinstance(source, Path):
            return load_image(source)
        return _decode_bytes(self.table[source][self.image_column]["bytes"], self.files[i])

    def _load(self, index: int) -> tuple[int, torch.Tensor]:
        """(the index actually used, its image): an image that fails to decode is replaced by the next one."""
        for offset in range(len(self)):
            i = (index + offset) % len(self)
            try:
                return i, self._decode(i)
            except ImageError as exc:
                if i not in self._warned:
                    self._warned.add(i)
                    warnings.warn(f"{printable(str(exc))}; using the next image in its place", UnreadableImagesWarning,
                                  stacklevel=3)
        raise InputError(f"{self.folder}: none of the {len(self)} listed images can be decoded; re-export them")

    def get(self, index: int, generator: torch.Generator | None = None, variant: int | None = None) -> dict:
        """Item ``index``: ``pixels`` [3,R,R] in [0,1], ``caption`` str, ``scores`` float32 [k], ``index`` int, and
        for SDXL's micro-conditioning ``original_size`` (H, W) and ``crop_top_left`` (top, left).

        An image that fails to decode (its header was fine) is replaced by the next readable one, with one warning
        per file; ``index`` still says which item was asked for, captions and scores follow the image used.

        Args:
            index: position in the dataset (``0 <= index < len(self)``).
            generator: CPU generator for a random crop / flip (see :func:`resize_crop`); ignored with ``variant``.
            variant: cut this augmentation variant (:meth:`windows`) instead of drawing one.
        """
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        index = index % len(self)
        used, image = self._load(index)
        original = (int(image.shape[1]), int(image.shape[2]))
        if variant is None:
            pixels, crop, _ = resize_crop(image, self.resolution, self.center_crop, self.random_flip, generator)
        else:
            window = crop_windows(original, self.resolution, self.crop_positions, self.random_flip)[int(variant)]
            pixels, crop = crop_at(image, self.resolution, window), window[:2]
        return {"pixels": pixels, "caption": self.captions[used] if self.captions is not None else "",
                "scores": self.scores[used].clone(), "index": index, "original_size": original, "crop_top_left": crop}

    def __getitem__(self, index: int) -> dict:
        return self.get(index)

    def first(self, count: int) -> "ImageFolderDataset":
        """A dataset of the first ``count`` items, in order, with their captions and scores (``--max_train_samples``).

        Args:
            count: how many items to keep (>= 1; more than there are keeps all).
        """
        if count < 1:
            raise InputError(f"first({count}): keep at least 1 item")
        return ImageFolderDataset(self.folder, self.files[:count], self.sources[:count], self.sizes[:count],
                                  self.original_sizes[:count], None if self.captions is None else
                                  self.captions[:count], self.scores[:count], self.resolution, self.caption_column,
                                  self.score_columns, self.center_crop, self.random_flip, self.crop_positions,
                                  self.table, self.image_column)

    def batch(self, indices: Sequence[int], generator: torch.Generator | None = None) -> dict:
        """:func:`collate` of :meth:`get` for each index, drawing crops and flips from ``generator`` in order."""
        return collate([self.get(int(i), generator) for i in indices])


def draw_variants(variants: int, batch: int, seed: int, step: int, process_index: int = 0) -> torch.Tensor:
    """One augmentation variant per sample, long ``[batch]``, uniform over ``range(variants)``, from (seed, step,
    process) alone: a generator of its own, so the step's other draws (noise, timesteps, dropout) are the same with
    and without augmentation, and a resumed run draws what an uninterrupted one did. All zeros, without a draw, for
    one variant.

    Args:
        variants: variants per item (:attr:`ImageFolderDataset.variants`).
        batch: samples in the micro-batch.
        seed, step, process_index: as for :func:`step_generator`.
    """
    if variants == 1:
        return torch.zeros(batch, dtype=torch.long)
    step = check_int("step", step, 0, "steps count from 0")
    generator = torch.Generator().manual_seed(derive_seed("qualityguide.train.augment", int(seed), step,
                                                          int(process_index)))
    return torch.randint(0, variants, (batch,), generator=generator)


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


def _decode_bytes(data: bytes, name: str) -> torch.Tensor:
    """An image stored as bytes in a table, decoded as :func:`qualityguide.images.load_image` decodes files."""
    from PIL import Image, ImageOps

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # noqa: BLE001 - truncated, corrupt, decompression bomb
        raise ImageError(name, f"cannot be decoded ({type(exc).__name__}: {exc})", "re-export it") from None
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - broken EXIF blocks must not lose an otherwise good image
        pass
    return load_image(image, name=name)



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
