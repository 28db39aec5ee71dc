"""One way in for images: paths, PIL images, numpy arrays and tensors -> float32 ``[B,3,H,W]`` in [0,1], RGB.

Conventions (docs/design.md section 2): every scorer, sampler and loss takes this layout. Transparent images
(RGBA, LA, palette with transparency) are composited on **white**, the background most viewers
show. 16-bit images are scaled by 1/65535, 8-bit by 1/255. EXIF orientation is applied. Animated
GIFs and multi-page TIFFs give their first frame (with a :class:`MultiFrameWarning`, or a note in
:func:`collect_multi_frame`). Files over Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``)
are refused with an :class:`ImageError`. Diffusers VAEs take [-1,1]: :mod:`qualityguide.diffusion.vae`
is the only place that converts.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import re
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError, InputError, printable

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]

_ALWAYS_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pnm")
# Photo formats Pillow opens only when built with them (AVIF: Pillow >= 11.3 wheels) or with a plugin registered
# (pillow-heif for HEIC/HEIF, pillow-jxl for JPEG XL); in folders they are taken when it can, else counted in a note.
OPTIONAL_EXTENSIONS = (".avif", ".heic", ".heif", ".jxl")


def _register_plugins() -> None:
    """Register pillow-heif's HEIC/HEIF opener when that plugin is installed (a CLI user cannot register it)."""
    try:
        import pillow_heif
    except ImportError:
        return
    pillow_heif.register_heif_opener()


def image_extensions() -> tuple[str, ...]:
    """The file extensions taken as images inside folders: the common ones, and those of
    :data:`OPTIONAL_EXTENSIONS` that Pillow (with any plugin) opens on this machine now."""
    Image.init()
    registered = Image.registered_extensions()
    return _ALWAYS_EXTENSIONS + tuple(ext for ext in OPTIONAL_EXTENSIONS if registered.get(ext) in Image.OPEN)


_register_plugins()
IMAGE_EXTENSIONS = image_extensions()  # at import; image_extensions() sees plugins registered later

# Float inputs may overshoot [0,1] by rounding (e.g. after a VAE decode and a cast); beyond this it is an error.
RANGE_TOLERANCE = 1e-3


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, Image.Image):
        return f"PIL image ({source.mode}, {source.size[0]}x{source.size[1]})"
    if isinstance(source, np.ndarray):
        return f"numpy array (shape {tuple(source.shape)}, dtype {source.dtype})"
    if isinstance(source, torch.Tensor):
        return f"tensor (shape {tuple(source.shape)}, dtype {source.dtype})"
    return type(source).__name__


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """[H,W,4] float in [0,1] -> [H,W,3], alpha-composited over white."""
    rgb, alpha = rgba[..., :3], rgba[..., 3:4]
    return rgb * alpha + (1.0 - alpha)


def _pil_to_array(image: Image.Image, source: str) -> np.ndarray:
    """PIL image of any mode -> float32 [H,W,3] in [0,1]."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        gray = np.asarray(image, dtype=np.float32) / 65535.0
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "I":
        # 16-bit PNGs open as 32-bit "I" in some Pillow versions; their values are 0..65535.
        gray = np.asarray(image, dtype=np.float64)
        if gray.min() < 0 or gray.max() > 65535:
            raise ImageError(source, f"32-bit integer image with values {gray.min():.0f}..{gray.max():.0f}",
                             "only 8- and 16-bit images are supported: convert it to 16-bit PNG")
        return np.repeat((gray / 65535.0).astype(np.float32)[..., None], 3, axis=2)
    if mode == "F":
        gray = np.asarray(image, dtype=np.float32)
        return np.repeat(_check_float(gray, source)[..., None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        return _composite_on_white(rgba).astype(np.float32)
    # RGB, L, 1, P, CMYK (Pillow undoes Adobe's inverted CMYK JPEGs), YCbCr, LAB, HSV.
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def _check_float(array: np.ndarray, source: str) -> np.ndarray:
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise ImageError(source, f"contains {bad} NaN/inf values", "replace them before scoring")
    lo, hi = float(array.min()), float(array.max())
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise ImageError(source, f"float values span [{lo:.4g}, {hi:.4g}] but must lie in [0, 1]", _range_fix(lo, hi))
    return np.clip(array, 0.0, 1.0)


def _range_fix(lo: float, hi: float) -> str:
    if lo >= -RANGE_TOLERANCE and hi <= 255 + RANGE_TOLERANCE:
        return "it looks like 0..255 data: divide by 255"
    if lo >= -1 - RANGE_TOLERANCE and hi <= 1 + RANGE_TOLERANCE:
        return "it looks like [-1, 1] data: use (x + 1) / 2"
    if lo >= -RANGE_TOLERANCE and hi <= 65535 + RANGE_TOLERANCE:
        return "it looks like 0..65535 data: divide by 65535"
    return "rescale it to [0, 1]"


def _array_to_hwc(array: np.ndarray, source: str) -> np.ndarray:
    """numpy HW / HWC (C in 1, 3, 4) of uint8, uint16, bool or float -> float32 [H,W,3]."""
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ImageError(source, f"numpy image must be HW or HWC, got {array.ndim} dimensions",
                         "pass one image at a time, or a list of images")
    if array.shape[2] not in (1, 3, 4):
        raise ImageError(source, f"numpy image has {array.shape[2]} channels in its last axis; allowed 1, 3 or 4",
                         "numpy images are channels-last (HWC); transpose CHW arrays with .transpose(1, 2, 0)")
    if array.dtype == np.uint8:
        data = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        data = array.astype(np.float32) / 65535.0
    elif array.dtype == np.bool_:
        data = array.astype(np.float32)
    elif np.issubdtype(array.dtype, np.floating):
        data = _check_float(array.astype(np.float32), source)
    else:
        raise ImageError(source, f"dtype {array.dtype} is ambiguous; allowed uint8, uint16, bool or float in [0, 1]",
                         "cast 8-bit data to uint8 or 16-bit data to uint16")
    if data.shape[2] == 1:
        data = np.repeat(data, 3, axis=2)
    elif data.shape[2] == 4:
        data = _composite_on_white(data)
    return data.astype(np.float32)


class MultiFrameWarning(UserWarning):
    """An animated or multi-page image file was loaded as its first frame."""


_multi_frame: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("multi_frame", default=None)


@contextlib.contextmanager
def collect_multi_frame() -> Iterator[list[str]]:
    """Within this block, multi-frame files loaded from paths are appended to the yielded list instead of
    each raising a :class:`MultiFrameWarning` (for one notice per run)."""
    found: list[str] = []
    token = _multi_frame.set(found)
    try:
        yield found
    finally:
        _multi_frame.reset(token)


def _note_frames(image: Image.Image, source: str) -> None:
    frames = getattr(image, "n_frames", 1) if getattr(image, "is_animated", False) else 1
    if frames > 1:
        found = _multi_frame.get()
        if found is not None:
            found.append(source)
        else:
            warnings.warn(MultiFrameWarning(f"{printable(source)}: has {frames} frames (animated or multi-page); "
                                            "only the first is used"), stacklevel=4)


LOOP = "symlink loop"


def link_problem(path: Path) -> str | None:
    """Why a symlink cannot be followed (a loop, a missing target), or None if it can or is no link."""
    if not path.is_symlink():
        return None
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{LOOP}: following the link leads back to itself"
        return f"broken symlink: its target {printable(os.readlink(path))} does not exist"
    return None


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def special_kind(path: str | os.PathLike) -> str | None:
    """What ``path`` is if it exists and is neither a regular file nor a folder ("a FIFO (named pipe)", "a
    character device", ...), else None. Only ``stat`` is called: opening a FIFO would block until a writer came."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return next((kind for test, kind in _KINDS if test(mode)), "a special file")


def _bomb_error(source: str, exc: Exception) -> ImageError:
    match = re.search(r"\((\d+) pixels\)", str(exc))
    pixels = int(match.group(1)) if match else None
    size = f"{pixels:,} pixels" if pixels else "its size"
    need = pixels or "N"
    return ImageError(source, f"{size} is over Pillow's decompression-bomb limit of "
                      f"{2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels (a guard against small files that expand "
                      "to huge images)", f"if you trust the file, rerun with --retry-failed --max-image-pixels "
                      f"{need} (Python: PIL.Image.MAX_IMAGE_PIXELS = {need})")


def _open(path: Path) -> Image.Image:
    source = str(path)
    problem = link_problem(path)
    if problem:
        raise ImageError(source, problem, "fix or remove the link")
    if not path.exists():
        raise ImageError(source, "file not found", "check the path")
    if path.is_dir():
        raise ImageError(source, "is a directory, not an image file", "pass files, or use --recursive for folders")
    kind = special_kind(path)
    if kind:
        raise ImageError(source, f"is {kind}, not a regular file, so it holds no image to read",
                         "pass image files; copy its data into a file first")
    if path.stat().st_size == 0:
        raise ImageError(source, "file is empty (0 bytes)", "re-export or re-download it")
    try:
        image = Image.open(path)
        image.load()
    except Image.DecompressionBombError as exc:
        raise _bomb_error(source, exc) from None
    except UnidentifiedImageError:
        raise ImageError(source, "not an image: its bytes match no format Pillow can read",
                         f"supported extensions: {', '.join(image_extensions())}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(source, f"truncated or corrupt image data ({exc})", "re-export or re-download it") from None
    _note_frames(image, source)
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # broken EXIF blocks must not lose an otherwise good image
        return image


def load_image(source: ImageInput, name: str | None = None) -> torch.Tensor:
    """Load one image as a float32 tensor ``[3,H,W]`` in [0,1], RGB.

    Args:
        source: a path, a PIL image, a numpy array (HW or HWC; uint8, uint16, bool or float in
            [0,1]) or a tensor (CHW, or HW; uint8 or float in [0,1]).
        name: how to refer to the image in error messages (defaults to a description of ``source``).
    """
    label = name or _describe(source)
    if isinstance(source, (str, os.PathLike)):
        return load_image(_open(Path(source)), name=str(source))
    if isinstance(source, Image.Image):
        array = _pil_to_array(source, label)
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
    if isinstance(source, np.ndarray):
        array = _array_to_hwc(source, label)
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
    if isinstance(source, torch.Tensor):
        tensor = source.detach()
        if tensor.ndim == 2:
            tensor = tensor[None]
        if tensor.ndim != 3:
            raise ImageError(label, f"a single image tensor must be CHW, got {tensor.ndim} dimensions",
                             "use to_batch() for [B,3,H,W] batches")
        return _tensor_batch(tensor[None], label)[0]
    raise ImageError(label, f"unsupported image type {type(source).__name__}",
                     "pass a path, PIL.Image, numpy array or torch tensor")


def _check_has_values(tensor: torch.Tensor, name: str) -> None:
    """Refuse tensors without values to check or score: on the meta device, or with no image or no pixel; and
    tensors whose values are not laid out densely (sparse), which the checks and the metrics cannot read."""
    if tensor.layout != torch.strided:
        raise InputError(f"{name}: the tensor has layout {tensor.layout} (not dense), which the scorers cannot read; "
                         "convert it with .to_dense() first")
    if tensor.is_meta:
        raise InputError(f"{name}: the tensor is on the meta device, which holds shapes but no values, so there is "
                         "nothing to score; create or load the images on a real device (cpu, cuda), e.g. with "
                         "qualityguide.images.to_batch()")
    if tensor.numel() == 0:
        what = "the batch is empty" if tensor.ndim == 4 and tensor.shape[0] == 0 else "the image has no pixels"
        raise InputError(f"{name}: {what} (shape {list(tensor.shape)}); pass at least one image of at least 1x1 px")


def _tensor_batch(tensor: torch.Tensor, label: str) -> torch.Tensor:
    if tensor.ndim != 4:
        raise ImageError(label, f"expected a [B,3,H,W] tensor, got {tensor.ndim} dimensions {tuple(tensor.shape)}",
                         "add a batch axis with x[None] or stack images with torch.stack")
    _check_has_values(tensor, label)
    channels = tensor.shape[1]
    if channels not in (1, 3):
        hint = "tensors are channels-first: use x.permute(0, 3, 1, 2) for [B,H,W,C]" if tensor.shape[-1] in (1, 3) \
            else "pass RGB (3) or grayscale (1) channels"
        raise ImageError(label, f"tensor has {channels} channels in dim 1; allowed 1 or 3", hint)
    if tensor.dtype == torch.uint8:
        tensor = tensor.float() / 255.0
    elif tensor.dtype == torch.bool:
        tensor = tensor.float()
    elif tensor.is_floating_point():
        tensor = validate_range(tensor.float(), label)
    else:
        raise ImageError(label, f"dtype {tensor.dtype} is ambiguous; allowed uint8 or float in [0, 1]",
                         "cast to uint8 or divide by the maximum value")
    if channels == 1:
        tensor = tensor.expand(-1, 3, -1, -1)
    return tensor.contiguous()


def validate_range(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    """Raise for NaN/inf or values outside [0,1] (beyond rounding); return ``images`` clamped to [0,1]."""
    finite = torch.isfinite(images)
    if not bool(finite.all()):
        raise ImageError(name, f"contains {int((~finite).sum())} NaN/inf values", "replace them before scoring")
    lo, hi = float(images.min()), float(images.max())
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise ImageError(name, f"float values span [{lo:.4g}, {hi:.4g}] but must lie in [0, 1]", _range_fix(lo, hi))
    return images.clamp(0.0, 1.0)


def to_batch(images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
    """Turn one image, a list of images or a ``[B,C,H,W]`` tensor into float32 ``[B,3,H,W]`` in [0,1].

    Args:
        images: anything :func:`load_image` takes, a list of those (all the same size), or a
            ``[B,1|3,H,W]`` tensor.
    """
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return _tensor_batch(images.detach(), "images")
    if isinstance(images, (list, tuple)):
        if not images:
            raise InputError("images: got an empty list; pass at least one image")
        loaded = [load_image(item, name=None if not isinstance(item, (str, os.PathLike)) else str(item))
                  for item in images]
        sizes = {tuple(t.shape[1:]) for t in loaded}
        if len(sizes) > 1:
            raise InputError(f"images: a batch must share one size, got {sorted(sizes)}; "
                             "resize them first or score them one by one")
        return torch.stack(loaded)
    return load_image(images)[None]


def check_batch(images: torch.Tensor, name: str = "images", min_side: int = 1) -> None:
    """Validate the scorer contract's input: a float ``[B,3,H,W]`` tensor with ``B >= 1`` images holding values (not on
    the meta device), finite, in [0,1], sides >= ``min_side``."""
    if not isinstance(images, torch.Tensor):
        raise InputError(f"{name}: expected a torch.Tensor [B,3,H,W] in [0,1], got {type(images).__name__}; "
                         "convert with qualityguide.images.to_batch()")
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"{name}: expected shape [B,3,H,W], got {tuple(images.shape)}; "
                         "convert with qualityguide.images.to_batch()")
    if not images.is_floating_point():
        raise InputError(f"{name}: expected a float tensor in [0,1], got dtype {images.dtype}; "
                         "convert with qualityguide.images.to_batch()")
    check_size(images.shape[-2], images.shape[-1], min_side, name)
    _check_has_values(images, name)
    with torch.no_grad():
        validate_range(images.detach(), name)


def check_size(height: int, width: int, min_side: int, name: str) -> None:
    """Raise :class:`ImageError` if the short side is below ``min_side``."""
    if min(height, width) < min_side:
        raise ImageError(name, f"image is {width}x{height} but this scorer needs both sides >= {min_side} px",
                         f"upscale it, or have it resized before scoring by adding @{min_side} (or more) to the "
                         "scorer spec, or use a scorer with a smaller minimum size")


@dataclass
class ImageListing:
    """Image files found by :func:`scan_images`.

    Attributes:
        files: the files, in order, de-duplicated.
        keys: each file's absolute path with symlinks resolved (unresolved where a link cannot be followed).
        skipped: ``(path, why)`` for links inside folders that cannot be followed (``symlink loop``, ``broken
            symlink``; broken ones only where the name has an image extension).
    """

    files: list[Path] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    def skipped_note(self, shown: int = 3) -> str | None:
        """One line summarising :attr:`skipped`, or None."""
        if not self.skipped:
            return None
        names = "; ".join(printable(f"{path} ({why})") for path, why in self.skipped[:shown])
        more = f"; and {len(self.skipped) - shown} more" if len(self.skipped) > shown else ""
        return f"skipped {len(self.skipped)} link(s) inside folders that cannot be followed: {names}{more}"

    def unreadable_note(self, shown: int = 3) -> str | None:
        """One line summarising :attr:`unreadable`, or None."""
        if not self.unreadable:
            return None
        kinds = sorted({Path(path).suffix.lower() for path in self.unreadable})
        names = "; ".join(printable(path) for path in self.unreadable[:shown])
        more = f"; and {len(self.unreadable) - shown} more" if len(self.unreadable) > shown else ""
        return (f"skipped {len(self.unreadable)} file(s) inside folders in a format Pillow cannot open on this machine "
                f"({', '.join(kinds)}; HEIC/HEIF need the pillow-heif plugin installed): {names}{more}; convert them "
                "(e.g. to PNG) or install the plugin, and rerun")

    def notes(self) -> list[str]:
        """The lines to tell the user about files found but not listed (at most one per kind)."""
        return [note for note in (self.skipped_note(), self.unreadable_note()) if note]


def _key(path: Path) -> str:
    try:
        return str(path.resolve())
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
        return os.path.abspath(path)


def scan_images(paths: Sequence[str | os.PathLike], recursive: bool = False) -> ImageListing:
    """Expand files and folders into image files, noting links inside folders that cannot be followed.

    Files given explicitly are kept whatever their extension or state (so that bad files are reported
    per file, not skipped); files inside folders are kept when their extension is an image extension
    (:func:`image_extensions`); those with an extension of :data:`OPTIONAL_EXTENSIONS` that Pillow cannot
    open here are listed in ``unreadable``.
    """
    listing, seen, extensions = ImageListing(), set(), image_extensions()
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            walker = path.rglob("*") if recursive else path.iterdir()
            children = []
            for child in sorted(walker):
                suffix = child.suffix.lower()
                if suffix in extensions and child.is_file():
                    children.append(child)
                elif (problem := link_problem(child)) and (problem.startswith(LOOP) or suffix in extensions):
                    listing.skipped.append((str(child), problem.split(":")[0]))
                elif suffix in OPTIONAL_EXTENSIONS and child.is_file():
                    listing.unreadable.append(str(child))
        else:
            children = [path]
        for child in children:
            key = _key(child)
            if key not in seen:
                seen.add(key)
                listing.files.append(child)
                listing.keys.append(key)
    return listing


def list_images(paths: Sequence[str | os.PathLike], recursive: bool = False) -> list[Path]:
    """Expand files and folders into a sorted, de-duplicated list of image files (see :func:`scan_images`).

    Links inside folders that cannot be followed, and files in a format Pillow cannot open here, are skipped
    with one warning each.
    """
    listing = scan_images(paths, recursive=recursive)
    for note in listing.notes():
        warnings.warn(note, stacklevel=2)
    return listing.files


# ----------------------------------------------------------------------------------------------- grids
GridCell = Union[Image.Image, torch.Tensor]


def to_pil(image: torch.Tensor) -> Image.Image:
    """A ``[3,H,W]`` tensor in [0,1] as an 8-bit RGB PIL image (clamped, rounded to the nearest level)."""
    pixels = (image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(pixels)


def _cell_image(image: GridCell, index: int) -> Image.Image:
    """One grid cell as an RGB PIL image: a PIL image as it is, a ``[3,H,W]`` tensor through :func:`to_pil`."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise InputError(f"make_grid: image {index} is {shape}; pass PIL images or [3,H,W] tensors in [0,1]")
    return to_pil(image)


def _check_labels(labels: Sequence[str] | None, expected: int, what: str) -> None:
    if labels is not None and len(labels) != expected:
        raise InputError(f"make_grid: {len(labels)} {what} for {expected} {what.split()[0]}s; pass one per "
                         f"{what.split()[0]}")


def _text_size(draw, texts: Sequence[str] | None) -> tuple[int, int]:
    """(width, height) of the widest and of the tallest of ``texts`` in Pillow's default font, (0, 0) for None."""
    if not texts:
        return 0, 0
    boxes = [draw.multiline_textbbox((0, 0), text) for text in texts]
    return max(b[2] for b in boxes), max(b[3] for b in boxes)


def make_grid(images: Sequence[GridCell] | torch.Tensor, columns: int, *, captions: Sequence[str] | None = None,
              row_labels: Sequence[str] | None = None, column_labels: Sequence[str] | None = None,
              padding: int = 0, border: int | None = None, background: str = "black",
              ink: str = "black") -> Image.Image:
    """Images in a grid, row-major: the one grid of the library, its demo, its validation and the evals.

    Each cell is as large as the largest image (smaller ones sit at its top left); a caption goes under its
    image (e.g. the score), row labels in a band on the left (e.g. the model), column labels in a band on top
    (e.g. the target). Bands exist only when their labels are given, so an unlabelled grid is pixels only.

    Args:
        images: PIL images, or ``[3,H,W]`` tensors in [0,1] (or one ``[N,3,H,W]`` tensor), rounded to 8 bits.
        columns: cells per row; the rows follow from the number of images.
        captions: one text per image, drawn under it.
        row_labels: one text per row; column_labels: one text per column.
        padding: pixels between cells.
        border: pixels around the grid; None: ``padding`` (as ``torchvision.utils.make_grid``).
        background: colour of padding, bands and empty cells (PIL colour name).
        ink: colour of the texts.
    """
    from PIL import ImageDraw

    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise InputError(f"make_grid: columns={columns!r}; pass a whole number >= 1")
    border = padding if border is None else border
    for name, value in (("padding", padding), ("border", border)):
        if value < 0:
            raise InputError(f"make_grid: {name}={value}; pass 0 or more pixels")
    cells = [_cell_image(image, i) for i, image in enumerate(images)]
    if not cells:
        raise InputError("make_grid: no images; pass at least one")
    rows = -(-len(cells) // columns)
    _check_labels(captions, len(cells), "image captions")
    _check_labels(row_labels, rows, "row labels")
    _check_labels(column_labels, columns, "column labels")
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    caption_h = _text_size(measure, captions)[1] + 4 if captions else 0
    left = _text_size(measure, row_labels)[0] + 8 if row_labels else 0
    top = _text_size(measure, column_labels)[1] + 4 if column_labels else 0
    cell_w, image_h = max(c.width for c in cells), max(c.height for c in cells)
    cell_h = image_h + caption_h
    width = left + 2 * border + columns * cell_w + (columns - 1) * padding
    sheet = Image.new("RGB", (width, top + 2 * border + rows * cell_h + (rows - 1) * padding), background)
    draw = ImageDraw.Draw(sheet)
    x_of = [left + border + c * (cell_w + padding) for c in range(columns)]
    y_of = [top + border + r * (cell_h + padding) for r in range(rows)]
    for i, cell in enumerate(cells):
        r, c = divmod(i, columns)
        sheet.paste(cell, (x_of[c], y_of[r]))
        if captions:
            draw.text((x_of[c] + 2, y_of[r] + image_h + 2), captions[i], fill=ink)
    for r, label in enumerate(row_labels or []):
        draw.multiline_text((4, y_of[r] + image_h // 2 - 6), label, fill=ink)
    for c, label in enumerate(column_labels or []):
        draw.text((x_of[c] + 2, 2), label, fill=ink)
    return sheet
