"""The base model's own samples as training data ("self samples"), generated once and cached as an image folder.

ACPO fine-tunes a model on its own distribution (docs/design.md section 7): with prompts and no images, the training
images are samples of the frozen base pipeline, one per index ``i`` with prompt ``prompts[i % len(prompts)]`` and a
seed derived from ``(seed, i)`` alone, so they do not depend on batching, processes or restarts.

The cache is a folder it owns::

    self_samples.json            format and the settings that make the images (see :class:`SelfSampleSettings`)
    base_identity.safetensors    the sampling pipeline's WeightIdentity (qualityguide.identity)
    000000.png 000001.png ...    written one by one (temporary name, then renamed)
    metadata.csv                 written last, when every image exists: ``file_name`` (and ``text``, the prompt)

so the finished folder is an ordinary training folder for :func:`qualityguide.train.load_image_folder` (and its
latents for :func:`qualityguide.train.cache_latents`). A killed run leaves whole images only and the next run
generates just the missing ones. A cache made for other settings or other weights is **refused** (never
overwritten or mixed): the error names the stored and the requested value.
"""

from __future__ import annotations

import csv
import json
import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..files import FORMATS, MAX_PROMPT_CHARS, atomic_write, read_prompts, write_json  # noqa: F401  (re-exported)
from ..identity import WeightIdentity
from .data import METADATA, check_int, derive_seed
from .sources import load_image_folder

FORMAT = FORMATS["self_samples"]
MANIFEST = "self_samples.json"
IDENTITY_FILE = "base_identity.safetensors"
CAPTION_COLUMN = "text"


def is_conditional(pipe) -> bool:
    """Whether ``pipe`` takes prompts (a ``UNet2DConditionModel`` pipeline) rather than being unconditional."""
    return type(pipe.unet).__name__ == "UNet2DConditionModel"


def native_resolution(pipe) -> int:
    """The image side ``pipe`` was trained for: the U-Net's sample size times the VAE's downsampling (1 without)."""
    size = pipe.unet.config.sample_size
    size = size if isinstance(size, int) else min(size)
    return int(size * getattr(pipe, "vae_scale_factor", 1)) if getattr(pipe, "vae", None) is not None else int(size)


@torch.no_grad()
def sample_images(pipe, prompts: Sequence[str] | None, seeds: Sequence[int], resolution: int,
                  num_inference_steps: int, guidance_scale: float = 7.5) -> torch.Tensor:
    """One image per seed from ``pipe`` as it is now: ``[B,3,R,R]`` float32 in [0,1] on the CPU.

    Each image's initial noise (and any sampler noise) comes from its own CPU generator seeded with its seed, so an
    image does not depend on which others share its batch.

    Args:
        pipe: a diffusers SD / SDXL pipeline (``prompts`` one per seed) or an unconditional ``DDPMPipeline``
            (``prompts`` None; it samples at its U-Net's ``sample_size``, which must equal ``resolution``).
        prompts: one prompt per seed, or None for an unconditional pipeline.
        seeds: one seed per image.
        resolution: image side in pixels.
        num_inference_steps: sampler steps.
        guidance_scale: classifier-free guidance scale (prompted pipelines; <= 1 switches it off).
    """
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    if is_conditional(pipe):
        if prompts is None or len(prompts) != len(seeds):
            raise InputError(f"{type(pipe).__name__} needs one prompt per image ({len(seeds)}), got "
                             f"{None if prompts is None else len(prompts)}")
        out = pipe(prompt=list(prompts), height=resolution, width=resolution, num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, generator=generators, output_type="pt")
    else:
        if prompts is not None:
            raise InputError(f"{type(pipe).__name__} is unconditional and takes no prompts; pass prompts=None")
        if native_resolution(pipe) != resolution:
            raise InputError(f"{type(pipe).__name__} samples {native_resolution(pipe)} px images (its U-Net's "
                             f"sample_size), not resolution={resolution}; use --resolution {native_resolution(pipe)}")
        out = pipe(batch_size=len(seeds), generator=generators, num_inference_steps=num_inference_steps,
                   output_type="pt")
    return out.images.float().cpu().clamp(0, 1)


@dataclass(frozen=True)
class SelfSampleSettings:
    """Everything the self samples depend on besides the weights (those are checked by content).

    Args:
        prompts: the prompts, used in turn (``prompts[i % len(prompts)]``); None for an unconditional model.
        num_samples: how many images (``--num_self_samples``).
        resolution: image side in pixels.
        num_inference_steps: sampler steps per image.
        guidance_scale: classifier-free guidance scale (ignored, and stored as 0, for unconditional models).
        seed: the run's seed; image ``i`` uses ``derive_seed("qualityguide.self_sample", seed, i)``.
        scheduler: the sampling scheduler's class and config (:func:`scheduler_identity`).
        model: the ``--model`` spec, recorded for messages only (weights are compared by content).
    """

    prompts: tuple[str, ...] | None
    num_samples: int
    resolution: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    scheduler: dict
    model: str = ""

    def __post_init__(self) -> None:
        check_int("num_samples", self.num_samples, 1, "generate at least one image, e.g. --num_self_samples 64")
        check_int("resolution", self.resolution, 8, "e.g. 512")
        check_int("num_inference_steps", self.num_inference_steps, 1, "e.g. 30")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise InputError(f"seed={self.seed!r}: must be a whole number, e.g. 0")
        if not isinstance(self.guidance_scale, numbers.Real) or not math.isfinite(self.guidance_scale):
            raise InputError(f"guidance_scale={self.guidance_scale!r}: must be a finite number, e.g. 7.5")
        if self.prompts is not None:
            if isinstance(self.prompts, str) or not self.prompts or not all(isinstance(p, str) for p in self.prompts):
                raise InputError("prompts must be a non-empty sequence of strings (or None for an unconditional "
                                 "model); read them with qualityguide.train.self_samples.read_prompts(path)")
            object.__setattr__(self, "prompts", tuple(self.prompts))

    @classmethod
    def for_pipeline(cls, pipe, prompts: Sequence[str] | None, num_samples: int, resolution: int,
                     num_inference_steps: int, guidance_scale: float, seed: int, model: str = "") -> SelfSampleSettings:
        """Settings for ``pipe``: its scheduler is recorded; an unconditional pipeline must get no prompts."""
        conditional = is_conditional(pipe)
        if conditional and not prompts:
            raise InputError(f"{type(pipe).__name__} is prompted: self samples need prompts (--prompts FILE)")
        if not conditional and prompts:
            raise InputError(f"{type(pipe).__name__} is unconditional: drop --prompts (self samples are drawn without "
                             "prompts) or train on --image_dir")
        return cls(tuple(prompts) if conditional else None, num_samples, resolution, num_inference_steps,
                   float(guidance_scale) if conditional else 0.0, seed, scheduler_identity(pipe.scheduler), model)

    def prompt(self, index: int) -> str | None:
        """The prompt of image ``index`` (None for an unconditional model)."""
        return None if self.prompts is None else self.prompts[index % len(self.prompts)]

    def seed_of(self, index: int) -> int:
        """The seed of image ``index``: a function of (seed, index) only."""
        return derive_seed("qualityguide.self_sample", int(self.seed), int(index))

    def to_dict(self) -> dict:
        """JSON-able fields (prompts as a list)."""
        data = asdict(self)
        data["prompts"] = None if self.prompts is None else list(self.prompts)
        return data


def scheduler_identity(scheduler) -> dict:
    """A scheduler's class name and public config (keys starting with ``_``, such as the diffusers version, are
    left out), JSON-normalised."""
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    return {"class": type(scheduler).__name__, "config": json.loads(json.dumps(config, sort_keys=True, default=str))}


def image_name(index: int) -> str:
    return f"{index:06d}.png"


def _modules(pipe) -> dict:
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    return {n: getattr(pipe, n) for n in names if isinstance(getattr(pipe, n, None), torch.nn.Module)}


def open_self_samples(pipe, settings: SelfSampleSettings, folder: str | os.PathLike) -> Path:
    """Create the cache folder for ``settings`` (manifest and weight identity), or check that an existing one was
    made for exactly these settings and weights. With several processes call it on the main process first.

    Raises:
        InputError: the folder is not a self-sample cache, or one made for other settings (the message names the
            first differing field with both values) or other weights.
    """
    folder = Path(folder)
    manifest = folder / MANIFEST
    fix = f"pass another --cache_dir for these settings, or delete {folder} to generate them again"
    wanted = {"format": FORMAT, **settings.to_dict()}
    if manifest.is_file():
        try:
            stored = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"self-sample manifest {manifest} cannot be read ({exc}); {fix}") from None
        if not isinstance(stored, dict) or stored.get("format") != FORMAT:
            raise InputError(f"{manifest} is not a {FORMAT!r} manifest; {fix}")
        for field in ("prompts", "num_samples", "resolution", "num_inference_steps", "guidance_scale", "seed",
                      "scheduler"):
            if stored.get(field) != wanted[field]:
                raise InputError(f"self samples in {folder} were generated with {field}={_short(stored.get(field))} "
                                 f"(model {stored.get('model')!r}); this run has {field}={_short(wanted[field])} "
                                 f"(model {settings.model!r}); {fix}")
        WeightIdentity.load(folder / IDENTITY_FILE).check(
            _modules(pipe), what=f"self samples in {folder} were generated by other weights (model "
                                 f"{stored.get('model')!r} there, {settings.model!r} here)", fix=fix)
        return folder
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise InputError(f"self-sample folder {folder} exists and is not a self-sample cache (no {MANIFEST}); pass a "
                         "new or empty --cache_dir: the cache owns its folder")
    folder.mkdir(parents=True, exist_ok=True)
    WeightIdentity.of(_modules(pipe)).save(folder / IDENTITY_FILE)
    write_json(manifest, wanted, indent=1)  # last: its presence means the key files are complete
    return folder


def _short(value: object, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


def missing_indices(settings: SelfSampleSettings, folder: str | os.PathLike) -> list[int]:
    """Indices whose image is not in ``folder`` yet."""
    folder = Path(folder)
    return [i for i in range(settings.num_samples) if not (folder / image_name(i)).is_file()]


def generate_self_samples(pipe, settings: SelfSampleSettings, folder: str | os.PathLike, batch_size: int = 4,
                          process_index: int = 0, num_processes: int = 1, progress: bool = True) -> int:
    """Generate the missing images of this process's share (indices ``process_index::num_processes``).

    Opens (or checks) the cache first, see :func:`open_self_samples`; with several processes, let the main process
    open it first, call this on every process, then wait for all before :func:`load_self_samples`.

    Args:
        pipe: the frozen base pipeline (before any adapter is added), on its device.
        settings: what to generate.
        folder: the cache folder.
        batch_size: images per pipeline call.
        process_index, num_processes: this process's share.
        progress: show a tqdm bar.

    Returns:
        How many images this call generated.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    batch_size = check_int("batch_size", batch_size, 1, "e.g. 4")
    folder = open_self_samples(pipe, settings, folder)
    for stale in folder.glob(".*.png.tmp-*"):  # left by a killed writer of this share
        index = stale.name[1:].split(".", 1)[0]
        if index.isdigit() and int(index) % num_processes == process_index:
            stale.unlink(missing_ok=True)
    missing = missing_indices(settings, folder)
    todo = [i for i in missing if i % num_processes == process_index]
    done = settings.num_samples - len(missing)
    bar = tqdm(total=settings.num_samples, initial=done, desc="self samples", unit="img", disable=not progress)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        prompts = None if settings.prompts is None else [settings.prompt(i) for i in chunk]
        images = sample_images(pipe, prompts, [settings.seed_of(i) for i in chunk], settings.resolution,
                               settings.num_inference_steps, settings.guidance_scale)
        for i, image in zip(chunk, images):
            pixels = (image.permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype("uint8")
            path = folder / image_name(i)
            atomic_write(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))
        bar.update(len(chunk))
    bar.close()
    return len(todo)


def load_self_samples(pipe, settings: SelfSampleSettings, folder: str | os.PathLike, progress: bool = True):
    """The finished cache as an :class:`~qualityguide.train.data.ImageFolderDataset` (centre crop, no flip).

    Writes ``metadata.csv`` (atomically) the first time every image exists; with several processes, call it on the
    main process first.

    Raises:
        InputError: images are missing (rerun the generation), or the cache was made for other settings or weights.
    """
    folder = open_self_samples(pipe, settings, folder)
    missing = missing_indices(settings, folder)
    if missing:
        raise InputError(f"self samples in {folder}: {len(missing)} of {settings.num_samples} images are missing "
                         f"(first {image_name(missing[0])}); run generate_self_samples for them first")
    metadata = folder / METADATA
    if not metadata.is_file():
        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(["file_name"] + ([CAPTION_COLUMN] if settings.prompts is not None else []))
                for i in range(settings.num_samples):
                    writer.writerow([image_name(i)] + ([settings.prompt(i)] if settings.prompts is not None else []))

        atomic_write(metadata, write)
    return load_image_folder(folder, settings.resolution,
                             caption_column=CAPTION_COLUMN if settings.prompts is not None else None, progress=progress)
