"""Encode a training folder once with a frozen VAE and keep the latents on disk.

The cache is a folder it owns::

    cache.json                   format, the dataset's files (name and byte size), resolution, crop, VAE scaling,
                                 the precision the encoder ran at
    vae_identity.safetensors     the VAE's WeightIdentity (qualityguide.identity)
    shard-00000.safetensors ...  "mean" (and "std") [n*V,C,h,w] float32 for items start..start+n, V variants each

Shards are written to a temporary name and renamed, so a killed run leaves only whole shards and the next call
encodes just the missing ones. A cache made for other VAE weights, another VAE scaling, other files, another
resolution, shard layout or encoder precision (an fp16 VAE run without the float32 upcast gives other latents, or NaN
for SDXL's VAE) is **refused** (never silently rebuilt or deleted: the folder may belong to another
run); the error says which field differs. Files are identified by relative name and byte size: replacing an image
by another of exactly the same size is not noticed.

Latents follow :func:`qualityguide.diffusion.vae.encode_images`: ``(E(x) - shift) * scaling_factor`` (per-channel
``latents_mean``/``latents_std`` where the VAE config has them), the posterior mean. With ``store_std=True`` the
posterior's std is kept too and :meth:`LatentCache.latents` can draw a fresh sample per step from a generator.

Random crops and flips (``center_crop=False`` / ``random_flip``): every augmentation variant of every item is
encoded once (:func:`qualityguide.train.data.crop_windows`: ``crop_positions`` windows times two orientations), so
the encoding time and the cache's size grow ``V``-fold (``V = 2`` for flips alone, ``2 x 3 = 6`` for flips and three
crop windows); a training step then reads the variant :meth:`ImageFolderDataset.draw_variants` picked, and a
resumed run reads the same ones. Both orientations are encoded: the VAE's latents of a mirrored image are not the
mirrored latents.

Several processes: build on the main process first (``with accelerator.main_process_first(): cache_latents(...)``);
the others then find a complete cache, check it and load it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..diffusion.vae import encode_posterior
from ..errors import InputError
from ..files import FORMATS, atomic_write, write_json
from ..identity import WeightIdentity
from .data import ImageFolderDataset, check_int

FORMAT = FORMATS["latent_cache"]
KEY_FILE = "cache.json"
IDENTITY_FILE = "vae_identity.safetensors"


@dataclass
class LatentCache:
    """Latents of every dataset item, in dataset order (CPU, float32).

    Attributes:
        folder: the cache folder. files: the dataset's files, as recorded. mean: ``[N,C,h,w]`` posterior means.
        std: ``[N,C,h,w]`` posterior stds, or None unless built with ``store_std=True``.
    """

    folder: Path
    files: list[str]
    mean: torch.Tensor
    std: torch.Tensor | None
    variants: int = 1

    def __len__(self) -> int:
        return len(self.mean) // self.variants

    def latents(self, indices: Sequence[int] | torch.Tensor, generator: torch.Generator | None = None,
                variants: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Latents of items ``indices``: the means, or ``mean + std * noise`` drawn from ``generator`` (CPU).

        Args:
            indices: dataset indices, e.g. from :func:`qualityguide.train.data.batch_indices`.
            generator: draw a posterior sample (needs a cache built with ``store_std=True``); None for the mean.
            variants: the augmentation variant of each index (:meth:`ImageFolderDataset.draw_variants`; None:
                variant 0). ``mean`` holds item ``i``'s variant ``v`` at row ``i * variants + v``.
        """
        index = torch.as_tensor(indices, dtype=torch.long)
        if variants is not None:
            variant = torch.as_tensor(variants, dtype=torch.long)
            if variant.shape != index.shape or bool(((variant < 0) | (variant >= self.variants)).any()):
                raise InputError(f"variants {variant.tolist()} must give one variant in [0, {self.variants}) per "
                                 f"index ({len(index)} indices)")
            index = index * self.variants + variant
        else:
            index = index * self.variants
        mean = self.mean[index]
        if generator is None:
            return mean
        if self.std is None:
            raise InputError(f"latent cache {self.folder} holds only posterior means, so it cannot sample; rebuild it "
                             "with store_std=True in a new folder, or pass generator=None for the mean")
        return mean + self.std[index] * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)


def _encoder_dtype(vae, upcast: bool) -> str:
    """The dtype the encoder computes in: float32 when upcast (see :mod:`qualityguide.diffusion.vae`), else the VAE's."""
    dtype = next(vae.parameters()).dtype
    return str(torch.float32 if upcast and dtype == torch.float16 else dtype).removeprefix("torch.")


def _key(dataset: ImageFolderDataset, vae, shard_size: int, store_std: bool, upcast: bool) -> dict:
    config = vae.config
    scaling = {name: config.get(name) for name in ("scaling_factor", "shift_factor", "latents_mean", "latents_std")}
    key = {"format": FORMAT, "resolution": dataset.resolution, "center_crop": dataset.center_crop,
           "shard_size": shard_size, "store_std": store_std, "vae_scaling": scaling,
           "encoder_dtype": _encoder_dtype(vae, upcast),
           "files": [[f, s] for f, s in zip(dataset.files, dataset.sizes)]}
    if dataset.variants > 1:  # recorded only then: caches made before augmentation existed stay valid
        key["augment"] = {"crop_positions": dataset.crop_positions, "random_flip": dataset.random_flip}
    return key


def _files_difference(stored: list, current: list) -> str:
    for i, (a, b) in enumerate(zip(stored, current)):
        if a != b:
            return f"item {i} is {a[0]!r} ({a[1]} bytes) there, {b[0]!r} ({b[1]} bytes) here"
    return f"{len(stored)} files there, {len(current)} here"


def _open_cache(folder: Path, key: dict, vae) -> None:
    """Create the cache's key files, or check that an existing cache was made for this key and VAE."""
    key_file = folder / KEY_FILE
    fix = f"pass a new cache folder for these settings, or delete {folder} to rebuild it"
    if key_file.is_file():
        try:
            stored = json.loads(key_file.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"latent cache {key_file} cannot be read ({exc}); {fix}") from None
        if stored.get("format") != FORMAT:
            raise InputError(f"{folder} holds a {stored.get('format')!r} cache, not {FORMAT!r}; {fix}")
        for field in ("resolution", "center_crop", "shard_size", "store_std", "vae_scaling", "encoder_dtype",
                      "augment"):
            if stored.get(field) != key.get(field):
                made = (f"{field}={stored[field]!r}" if field in stored else
                        "no augmentation" if field == "augment" else f"no {field} recorded (an older qualityguide)")
                raise InputError(f"latent cache {folder} was made with {made}, this run has "
                                 f"{field}={key.get(field)!r}; {fix}")
        if stored.get("files") != key["files"]:
            raise InputError(f"latent cache {folder} was made for other files ("
                             f"{_files_difference(stored.get('files') or [], key['files'])}); {fix}")
        WeightIdentity.load(folder / IDENTITY_FILE).check(
            {"vae": vae}, what=f"latent cache {folder} was encoded with other VAE weights", fix=fix)
        return
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise InputError(f"cache folder {folder} exists and is not a latent cache (no {KEY_FILE}); pass a new or empty "
                         "folder: the cache owns it")
    folder.mkdir(parents=True, exist_ok=True)
    WeightIdentity.of({"vae": vae}).save(folder / IDENTITY_FILE)
    write_json(key_file, key, indent=1)  # last: its presence means the key files are complete


def _shard_path(folder: Path, shard: int) -> Path:
    return folder / f"shard-{shard:05d}.safetensors"


def _read_shard(path: Path, start: int, count: int, store_std: bool, variants: int = 1
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            mean = handle.get_tensor("mean")
            std = handle.get_tensor("std") if store_std else None
        if (int(meta.get("start", -1)), int(meta.get("count", -1))) != (start, count) or len(mean) != count * variants:
            raise ValueError(f"holds items {meta.get('start')}+{meta.get('count')}, expected {start}+{count}")
    except Exception as exc:  # noqa: BLE001 - any damage: truncated file, wrong keys, bad metadata
        raise InputError(f"latent cache shard {path} cannot be used ({type(exc).__name__}: {exc}); delete that file "
                         "and rerun to encode its images again") from None
    return mean, std


@torch.no_grad()
def cache_latents(dataset: ImageFolderDataset, vae, cache_dir: str | os.PathLike, batch_size: int = 8,
                  shard_size: int = 256, store_std: bool = False, upcast: bool = False, progress: bool = True
                  ) -> LatentCache:
    """Encode every item of ``dataset`` once (or resume a partial cache) and return all latents.

    Args:
        dataset: from :func:`qualityguide.train.sources.load_image_folder`; with random crops or flips each of its
            :attr:`~ImageFolderDataset.variants` is encoded (see the module docstring for the cost).
        vae: a frozen diffusers ``AutoencoderKL``; images are encoded on its device and dtype.
        cache_dir: the folder the cache owns (created if missing).
        batch_size: images per encoder call.
        shard_size: items per shard file (the unit of resume).
        store_std: keep the posterior std too, so :meth:`LatentCache.latents` can sample.
        upcast: run an fp16 encoder in float32 (see :mod:`qualityguide.diffusion.vae`).
        progress: show a tqdm bar.

    Raises:
        InputError: a folder that is not a cache, or a cache made for other weights, files, settings or
            augmentation; a damaged shard.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    batch_size = check_int("batch_size", batch_size, 1, "pass how many images to encode at once, e.g. 8")
    shard_size = check_int("shard_size", shard_size, 1, "pass how many items per shard file, e.g. 256")
    folder = Path(cache_dir)
    _open_cache(folder, _key(dataset, vae, shard_size, store_std, upcast), vae)
    total = len(dataset)
    shards = [(s, s * shard_size, min(shard_size, total - s * shard_size)) for s in range(math.ceil(total / shard_size))]
    todo = [sh for sh in shards if not _shard_path(folder, sh[0]).is_file()]
    device = next(vae.parameters()).device
    variants = dataset.variants
    jobs = [(i, v) for i in range(total) for v in range(variants)]  # item-major: row i * variants + v
    bar = tqdm(total=total * variants, initial=(total - sum(c for _, _, c in todo)) * variants,
               desc="encoding latents", unit="img", disable=not progress)
    for shard, start, count in todo:
        means, stds = [], []
        rows = jobs[start * variants:(start + count) * variants]
        for first in range(0, len(rows), batch_size):
            chunk = rows[first:first + batch_size]
            pixels = torch.stack([dataset.get(i, variant=v)["pixels"] for i, v in chunk]).to(device)
            mean, std = encode_posterior(vae, pixels, upcast=upcast)
            means.append(mean.cpu())
            stds.append(std.cpu())
            bar.update(len(chunk))
        tensors = {"mean": torch.cat(means).contiguous()}
        if store_std:
            tensors["std"] = torch.cat(stds).contiguous()
        path = _shard_path(folder, shard)
        metadata = {"start": str(start), "count": str(count)}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    bar.close()
    read = [_read_shard(_shard_path(folder, s), start, count, store_std, variants) for s, start, count in shards]
    return LatentCache(folder, list(dataset.files), torch.cat([m for m, _ in read]),
                       torch.cat([s for _, s in read]) if store_std else None, variants)
