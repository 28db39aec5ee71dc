"""LGDMScorer: the scorer contract on top of LGDM features and a trained head (``load_scorer("lgdm:<dir>")``).

A head folder (``qualityguide lgdm fit --out DIR`` or :meth:`LGDMScorer.save_pretrained`) holds ``config.json``
(the head's shape, the LGDM config, the backbone spec and architecture key), ``model.safetensors`` (the head)
and ``weights_identity.safetensors`` (the backbone weights it was trained for). ``lgdm:<hub id>`` fetches those
files with ``huggingface_hub`` (an existing local folder of that name wins).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from ..errors import InputError, printable
from ..hub import HubModel
from ..identity import IDENTITY_FILE, WeightIdentity, state_sha256
from ..pipelines import local_or_hub_folder
from ..scorers.base import QualityScorer
from .cache import manifest_mismatch, file_hash
from .config import LGDMConfig, stable_hash
from ..hub.cards import write_model_card
from .head import HEAD_CONFIG, HEAD_WEIGHTS, LEGACY_FILES, LGDMHead
from .model import LGDM


def head_metadata(manifest: dict) -> dict:
    """What a head folder stores besides the head: enough to rebuild and verify its feature extractor."""
    return {"lgdm": manifest["config"], "backbone_spec": manifest.get("backbone_spec"),
            "model_key": manifest["model_key"], "backbone": manifest["backbone"], "layout": manifest["layout"],
            "weights_identity": IDENTITY_FILE, "precision": manifest.get("precision")}


def write_head_folder(directory: str | os.PathLike, head: LGDMHead, manifest: dict,
                      identity: WeightIdentity | None, card: dict | None = None) -> None:
    """``config.json`` + ``model.safetensors`` (:meth:`LGDMHead.save_pretrained`), the backbone weights' identity
    and the model card.

    Args:
        manifest: the feature cache's manifest (or :func:`~qualityguide.lgdm.extract.cache_manifest`).
        identity: the weights the features came from; None (a cache from before identities) writes none, and
            loading the head then warns that its backbone weights cannot be checked.
        card: arguments of :func:`qualityguide.hub.cards.write_model_card` (``settings=``, ``validation=``, ...).
    """
    directory = Path(directory)
    head._save_pretrained(directory, head_metadata(manifest))
    if identity is not None:
        identity.save(directory / IDENTITY_FILE)
    else:
        (directory / IDENTITY_FILE).unlink(missing_ok=True)  # never leave another backbone's identity behind
    write_model_card(directory, kind="lgdm_scorer", **{**scorer_card(head), **(card or {})})


def scorer_card(head: LGDMHead) -> dict:
    """The model card arguments of a head folder (a whole scorer: head, LGDM config, backbone)."""
    return {**head.card_defaults(), "summary": f"Backbone: {head.metadata.get('backbone_spec')}; trained on the "
            "features of its weights (checked on loading by weights_identity.safetensors)."}


def resolve_head_folder(spec: str | os.PathLike, **hub) -> Path:
    """A local head folder, or a hub id fetched with ``huggingface_hub`` (only the head's files; the local cache is
    used offline). An existing local path always wins.

    Args:
        spec: a folder or hub id.
        hub: ``revision``, ``subfolder``, ``cache_dir``, ``token``, ``local_files_only``, ``force_download``.
    """
    return local_or_hub_folder(spec, "LGDM head", [HEAD_CONFIG, HEAD_WEIGHTS, IDENTITY_FILE, *LEGACY_FILES],
                               "pass a folder written by `qualityguide lgdm fit --out DIR` (or "
                               "LGDMScorer.save_pretrained), or a hub id owner/name", "or pass an existing head folder",
                               **hub)


def head_content_hash(folder: str | os.PathLike) -> str:
    """SHA-256 of what a head folder holds (config, weights and backbone identity, each by its bytes): a head refit
    into the same folder gets a new hash, the same files copied elsewhere keep theirs."""
    folder = Path(folder)
    names = [n for n in (HEAD_CONFIG, HEAD_WEIGHTS, IDENTITY_FILE, *LEGACY_FILES) if (folder / n).is_file()]
    return stable_hash({name: file_hash(folder / name) for name in names})


def _check_metadata(meta: dict, where: str) -> None:
    """The entries of a head's config.json that rebuild its feature extractor, refused naming the first bad one."""
    for key, kind in (("lgdm", dict), ("model_key", str), ("backbone", dict)):
        if not isinstance(meta.get(key), kind):
            raise InputError(f"LGDM head config {where} has no {key!r} {kind.__name__} (found "
                             f"{printable(repr(meta.get(key)))[:80]}); write the head again with `qualityguide lgdm "
                             "fit ... --out DIR`")
    spec = meta.get("backbone_spec")
    if spec is not None and not isinstance(spec, str):
        raise InputError(f"LGDM head config {where}: backbone_spec={printable(repr(spec))[:80]} is not a model spec; "
                         "write the head again, or pass model=...")


def _same_device(requested, actual: torch.device) -> bool:
    requested = torch.device(requested)
    return requested.type == actual.type and (requested.index is None or requested.index == actual.index)


class LGDMScorer(QualityScorer, HubModel):
    """Predicted MOS (the training set's scale; higher is better) from PMG hyperfeatures.

    Differentiable: gradients flow through the VAE encoder, the DDIM path and the pooled U-Net features;
    PMG corrections are constants (pass ``create_graph=True`` to differentiate through them as well).

    Only the head is this module's state: ``state_dict()``, ``parameters()`` and :meth:`save_pretrained` hold the
    head, never the backbone. ``.to()``/``.eval()``/``.train()`` reach the head, LGDM's psi network and a backbone
    the scorer loaded itself, never the modules of a pipeline it shares (``pipeline=``): those stay as their owner
    left them.

    Args:
        lgdm: the feature extractor (shares a pipeline's modules).
        head: a trained :class:`LGDMHead`.
        name: spec shown in reports (``"lgdm:<dir>"``).
        create_graph: differentiate through the PMG corrections (second order, slower).
    """

    differentiable = True
    native_lower_better = False
    card_kind = "lgdm_scorer"

    def __init__(self, lgdm: LGDM, head: LGDMHead, name: str = "lgdm", create_graph: bool = False):
        super().__init__()
        layout = lgdm.layout()
        if head.config.num_steps != layout["num_steps"] or head.config.layer_dims != layout["layer_dims"]:
            raise InputError(f"head expects {head.config.num_steps} steps x {head.config.layer_dims} but the LGDM "
                             f"config gives {layout['num_steps']} x {layout['layer_dims']}; use the config the head "
                             "was trained with")
        object.__setattr__(self, "lgdm", lgdm)  # not a submodule: its modules are not this scorer's state
        self.head, self.name, self.create_graph = head, name, create_graph
        self.head_sha256: str | None = None  # set by from_pretrained: the content of the folder it came from
        size, upscale = lgdm.config.image_size, lgdm.config.max_upscale
        self.min_side = lgdm.min_side if size is None else max(lgdm.min_side, int(-(-size // upscale)))
        lo, hi = (float(v) for v in head.mos_range)
        self.native_range = (lo, hi)

    @property
    def settings_name(self) -> str:
        """What a scores CSV records for this scorer: the head by content (:func:`head_content_hash` of the folder
        it was loaded from, or of its weights), never by its path, and the backbone's precision when reduced."""
        content = self.head_sha256 or state_sha256(self.head)
        precision = self.lgdm.precision()
        return f"lgdm:sha256={content[:16]}" + ("" if precision == "float32" else f",{precision}")

    def _apply(self, fn, recurse=True):
        self.lgdm._apply(fn, recurse)  # LGDM decides what follows: its psi, and a backbone it owns
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> "LGDMScorer":
        self.lgdm.train(mode)
        return super().train(mode)

    def native(self, images: torch.Tensor) -> torch.Tensor:
        features = self.lgdm.extract(images, create_graph=self.create_graph)
        return self.head.to_mos(self.head(features)).to(images.dtype)

    def save_pretrained(self, directory: str | os.PathLike, *, config=None, repo_id: str | None = None,
                        push_to_hub: bool = False, model_card_kwargs: dict | None = None,
                        **push_to_hub_kwargs) -> Path:
        """The head folder: ``config.json``, ``model.safetensors`` (the head), the backbone weights' identity and
        the model card. The backbone is referenced by its spec, not copied.

        Args:
            directory: the folder (created if missing).
            config: refused (the mixin's argument; the folder's config.json is written from the scorer).
            repo_id, push_to_hub, push_to_hub_kwargs: upload the folder afterwards (``huggingface_hub``'s
                ``push_to_hub``; ``repo_id`` defaults to the folder's name).
            model_card_kwargs: arguments of :func:`qualityguide.hub.cards.write_model_card`.
        """
        from .extract import cache_manifest

        directory = Path(directory)
        if config is not None:
            raise InputError(f"config={config!r}: an LGDMScorer writes its own config.json; drop config=")
        write_head_folder(directory, self.head, cache_manifest(self.lgdm), self.lgdm.weights_identity(),
                          card=model_card_kwargs)
        if push_to_hub:
            self.push_to_hub(repo_id or directory.name, model_card_kwargs=model_card_kwargs, **push_to_hub_kwargs)
        return directory

    def card_defaults(self) -> dict:
        return scorer_card(self.head)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None = None, cache_dir=None,
                         force_download: bool = False, local_files_only: bool = False, token=None,
                         subfolder: str | None = None, pipeline=None, model: str | None = None,
                         model_revision: str | None = None, device=None, dtype=None, psi_weights=None,
                         pmg_chunk: int | None = None, **kwargs) -> "LGDMScorer":
        """Rebuild the scorer from a head folder or hub id; refuse a backbone other than the one it was trained on.
        Called by ``LGDMScorer.from_pretrained(directory, ...)`` (:meth:`qualityguide.hub.HubModel.from_pretrained`).

        Args:
            model_id: a folder written by ``save_pretrained`` or ``qualityguide lgdm fit``, or a hub id whose
                repository holds one (fetched with ``huggingface_hub``; a local folder of that name wins).
            revision, cache_dir, force_download, local_files_only, token, subfolder: where and how the head's hub
                files are fetched.
            model_revision: the backbone's hub revision (``load_pipeline``'s ``revision``).
            pipeline: a loaded pipeline whose modules to share (e.g. the one being guided); they are used as they
                are (mode, device, dtype). Else the stored backbone spec (or ``model``) is loaded with
                :func:`qualityguide.load_pipeline`.
            model: override the stored backbone spec (e.g. a local copy of the hub model).
            device, dtype: where and in which precision to load the backbone. With ``pipeline=`` they must match
                the pipeline's U-Net (the scorer does not move a pipeline it shares; move it first).
            **kwargs: passed to ``load_pipeline`` (not allowed with ``pipeline=``).
        """
        from ..pipelines import parse_dtype

        directory = model_id
        folder = resolve_head_folder(model_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
                                     local_files_only=local_files_only, token=token, subfolder=subfolder)
        head = LGDMHead.load_folder(folder)
        meta = dict(head.metadata)
        content = head_content_hash(folder)
        _check_metadata(meta, str(folder / HEAD_CONFIG))
        config = LGDMConfig.from_dict(meta["lgdm"], f"LGDM config in {folder / HEAD_CONFIG}",
                                      "write the head again with `qualityguide lgdm fit ... --out DIR`")
        if config.num_steps != head.config.num_steps:  # refused before a backbone is loaded for it
            raise InputError(f"LGDM head {directory}: its head takes num_steps={head.config.num_steps} but its LGDM "
                             f"config asks for num_steps={config.num_steps}; write the head again with `qualityguide "
                             "lgdm fit ... --out DIR`")
        if pipeline is not None:
            unet = getattr(pipeline, "unet", None)
            param = next(unet.parameters()) if unet is not None else None
            ignored = {"model": model, "model_revision": model_revision, **kwargs}
            ignored = sorted(k for k, v in ignored.items() if v is not None)
            if ignored:
                raise InputError(f"LGDM head {directory}: {', '.join(ignored)} only apply when the scorer loads its "
                                 "own backbone, but pipeline= was given; drop them, or drop pipeline=")
            if param is not None and device is not None and not _same_device(device, param.device):
                raise InputError(f"LGDM head {directory}: device={str(device)!r} but the shared pipeline's U-Net is on "
                                 f"{param.device}; the scorer does not move a pipeline it shares. Fix: move the "
                                 f"pipeline first (pipe.to({str(device)!r})) or drop device=")
            if param is not None and dtype is not None and parse_dtype(dtype) != param.dtype:
                raise InputError(f"LGDM head {directory}: dtype={dtype!r} but the shared pipeline's U-Net is "
                                 f"{param.dtype}; the scorer does not convert a pipeline it shares. Fix: convert the "
                                 "pipeline first (pipe.to(dtype=...)) or drop dtype=")
            lgdm = LGDM.from_pipeline(pipeline, config, psi_weights=psi_weights, pmg_chunk=pmg_chunk)
        else:
            spec = model or meta.get("backbone_spec")
            if not spec:
                raise InputError(f"{directory}: no backbone spec stored; pass model=... or pipeline=...")
            if model_revision is not None:
                kwargs["revision"] = model_revision
            lgdm = LGDM.from_pretrained(spec, config, dtype=dtype, device=device, psi_weights=psi_weights,
                                        pmg_chunk=pmg_chunk, **kwargs)
        if lgdm.model_key() != meta["model_key"]:
            found = {"config": meta["lgdm"], "backbone": meta["backbone"], "precision": None}
            wanted = {"config": lgdm.config.to_dict(), "backbone": lgdm.backbone_identity(), "precision": None}
            raise InputError(manifest_mismatch(Path(directory), found, wanted).replace("feature cache", "LGDM head")
                             .replace("use a new --cache folder for this configuration, or rerun with the cache's "
                                      "settings", "load the backbone the head was trained on"))
        if (folder / IDENTITY_FILE).is_file():
            WeightIdentity.load(folder / IDENTITY_FILE).check(
                lgdm.backbone_modules(), f"LGDM head {directory} was trained on features of other backbone weights",
                f"load the backbone the head was trained on ({meta.get('backbone_spec')}) with model=... or "
                "pipeline=...")
        else:
            warnings.warn(f"LGDM head {directory} has no {IDENTITY_FILE} (written by an older qualityguide): the "
                          "backbone weights cannot be checked against the ones it was trained on. Re-save it with "
                          "LGDMScorer.save_pretrained once loaded with the right backbone", UserWarning, stacklevel=2)
        scorer = cls(lgdm, head.to(next(lgdm.unet.parameters()).device), name=f"lgdm:{directory}")
        scorer.head_sha256 = content
        scorer.eval()
        return scorer
