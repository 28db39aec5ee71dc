"""One resolver for every ``--model`` argument: tiny offline pipelines, hub ids and local folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .errors import InputError, WeightsNotFoundError, closest
from .runtime import check_device

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# The offline specs qualityguide.testing builds (named here so that importing this module does not import it).
TINY_SPECS = ("tiny:sd", "tiny:sdxl", "tiny:ddpm")
OFFLINE_SPECS = TINY_SPECS + ("random:sd15",)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"fp16"``/``"bf16"``/``"fp32"`` (or a torch dtype, or None) -> torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise InputError(f"dtype {dtype!r} is not allowed; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_pipeline(spec: str, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
                  revision: str | None = None, variant: str | None = None, **kwargs):
    """Load a diffusers pipeline.

    Args:
        spec: ``"tiny:sd"``, ``"tiny:sdxl"``, ``"tiny:ddpm"`` (random weights, offline), ``"random:sd15"``
            (SD 1.5's full-size architecture with random weights, for benchmarks), a local folder
            written by ``save_pretrained`` (holds ``model_index.json``), or a Hugging Face hub id such as
            ``"stable-diffusion-v1-5/stable-diffusion-v1-5"``.
        dtype: weights dtype (``"fp16"``, ``"bf16"``, ``"fp32"`` or a torch dtype).
        device: where to move the pipeline (default: stays on the CPU); one this machine lacks is refused first.
        revision: hub revision (branch, tag or commit) for a hub id; diffusers' ``from_pretrained`` takes it.
        variant: weights variant (``"fp16"``: ``*.fp16.safetensors``) of a hub id or folder. Offline specs have
            neither: passing one is refused rather than ignored.
        **kwargs: for tiny specs ``seed`` and ``prediction_type``; otherwise passed to
            ``DiffusionPipeline.from_pretrained`` (e.g. ``variant="fp16"``).
    """
    if not isinstance(spec, str) or not spec:
        raise InputError(f"model spec must be a non-empty string, got {spec!r}")
    torch_dtype = parse_dtype(dtype)
    if device is not None:
        device = check_device(device)
    offline = spec.startswith(("tiny:", "random:"))
    if offline:
        if spec not in OFFLINE_SPECS:
            guess = closest(spec, list(OFFLINE_SPECS))
            raise InputError(f"unknown offline model {spec!r}; known: {', '.join(OFFLINE_SPECS)}"
                             + (f". Did you mean {guess!r}?" if guess else ""))
        for name, value in (("revision", revision), ("variant", variant)):
            if value is not None:
                raise InputError(f"{name} {value!r} with the offline model {spec!r}: offline models are built in "
                                 f"code and have no {name}; drop the {name}, or pass a hub id or local folder")
        from .testing import build_tiny

        pipe = build_tiny(spec, **kwargs)
    else:
        hub = {k: v for k, v in (("revision", revision), ("variant", variant)) if v is not None}
        pipe = _from_pretrained(spec, torch_dtype, **hub, **kwargs)
    if torch_dtype is not None and offline:
        pipe.to(dtype=torch_dtype)
    if device is not None:
        pipe.to(device)
    pipe.qualityguide_spec = spec
    return pipe


# from_pretrained options that also locate a hub id's model_index.json (hf_hub_download takes them)
_INDEX_OPTIONS = ("cache_dir", "revision", "token", "local_files_only", "force_download")


def _model_index(source: str, local: bool, options: dict) -> dict:
    """The pipeline's model_index.json alone: a local folder's, or a hub id's from the cache (or that one file)."""
    if local:
        path = Path(source) / "model_index.json"
    else:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(source, "model_index.json", **{k: options[k] for k in _INDEX_OPTIONS if k in options})
    return json.loads(Path(path).read_text())


def _without_safety_checker(index: dict) -> dict:
    """from_pretrained options that skip the NSFW safety checker a pipeline folder declares.

    qualityguide scores, extracts features from and guides latents; it never runs the checker on
    generated images, so loading (or downloading) its CLIP vision model is wasted time and memory.
    Options go only to pipelines that declare the component: diffusers warns about keyword
    arguments a pipeline does not expect (SDXL has no safety checker).
    """
    def declared(name: str) -> bool:
        value = index.get(name)
        return isinstance(value, (list, tuple)) and len(value) == 2 and value[0] is not None

    options: dict = {}
    if "safety_checker" in index:
        options["safety_checker"] = None
    if "requires_safety_checker" in index:  # else the pipeline warns that the checker was disabled
        options["requires_safety_checker"] = False
    if declared("safety_checker") and declared("feature_extractor") and not declared("image_encoder"):
        # Without an image encoder the CLIP image processor only feeds the checker (load_ip_adapter
        # creates its own when it needs one).
        options["feature_extractor"] = None
    return options


def looks_like_local_path(spec: str) -> bool:
    """Hub ids are ``owner/name``; anything else with a path shape is meant as a local folder."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec


def local_or_hub_folder(source: str | os.PathLike, what: str, files: list[str], missing_fix: str, fetch_fix: str,
                        revision: str | None = None, subfolder: str | None = None, cache_dir=None,
                        token: str | bool | None = None, local_files_only: bool = False,
                        force_download: bool = False) -> Path:
    """A local folder, or the ``files`` of a hub repository fetched with ``huggingface_hub`` (its local cache is used
    offline). An existing local path always wins; a path-shaped spec that does not exist is refused, not looked up.

    Args:
        source: a folder or a hub id ``owner/name``.
        what: how messages name the thing (``"LGDM head"``, ``"IQA-Adapter"``).
        files: the file names to fetch (only these: a repository may hold much more).
        missing_fix: what to pass instead of a missing local folder.
        fetch_fix: the alternative offered when the hub id cannot be fetched.
        revision: the hub revision (None: the default branch).
        subfolder: a folder inside the source that holds the files.
        cache_dir, token, local_files_only, force_download: passed to ``huggingface_hub.snapshot_download``.
    """
    path = Path(source).expanduser()
    if path.exists():
        return path / subfolder if subfolder else path
    text = str(source)
    if looks_like_local_path(text):
        raise InputError(f"{what} folder {path} does not exist; {missing_fix}")
    from huggingface_hub import snapshot_download

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        root = Path(snapshot_download(text, revision=revision, allow_patterns=[prefix + name for name in files],
                                      cache_dir=cache_dir, token=token, local_files_only=local_files_only,
                                      force_download=force_download))
    except (OSError, ValueError) as exc:
        raise hub_fetch_error(f"{what} {text!r} is neither a local folder nor a hub repository that could be "
                              "fetched", text, exc, fetch_fix) from None
    return root / prefix if prefix else root


def hub_fetch_error(problem: str, spec: str, exc: Exception, fix: str) -> WeightsNotFoundError:
    """The one-line error for a hub id that could not be fetched (offline, unknown, no network).

    Args:
        problem: what went wrong, naming the spec (``"model 'a/b' could not be loaded"``).
        spec: the hub id (for the download command).
        exc: the loader's exception (its first line is quoted).
        fix: the alternatives, after the download advice.
    """
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    detail = str(exc).splitlines()[0] if str(exc) else ""
    return WeightsNotFoundError(
        f"{problem} ({type(exc).__name__}: {detail}). "
        f"{'HF_HUB_OFFLINE is set; ' if offline else ''}Fix: download it on a machine with internet "
        f"(huggingface-cli download {spec}) into the Hugging Face cache, {fix}")


def _from_pretrained(spec: str, torch_dtype: torch.dtype | None, **kwargs):
    from diffusers import DiffusionPipeline

    path = Path(spec).expanduser()
    looks_local = looks_like_local_path(spec)
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise InputError(f"model folder {path} has no model_index.json; pass a folder written by "
                             "pipe.save_pretrained(), a hub id, or one of " + ", ".join(TINY_SPECS))
    elif looks_local:
        raise InputError(f"model folder {path} does not exist; pass an existing folder, a hub id "
                         f"(e.g. {DEFAULT_MODEL}) or one of {', '.join(TINY_SPECS)}")
    source = str(path) if path.exists() else spec
    options = dict(kwargs)
    if torch_dtype is not None:
        options["torch_dtype"] = torch_dtype
    try:
        if "safety_checker" not in options:  # a checker passed in is the caller's choice
            options = {**_without_safety_checker(_model_index(source, path.exists(), options)), **options}
        pipe = DiffusionPipeline.from_pretrained(source, **options)
    except (OSError, EnvironmentError) as exc:
        raise hub_fetch_error(f"model {spec!r} could not be loaded", spec, exc, f"pass a local folder, or use one of {', '.join(TINY_SPECS)} "
                              "for offline tests") from None
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe
