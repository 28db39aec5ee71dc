"""LGDMScorer: the scorer contract on top of LGDM features and a trained head (``load_scorer("lgdm:<dir>")``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import InputError
from ..scorers.base import QualityScorer
from .cache import _mismatch
from .config import LGDMConfig
from .head import LGDMHead
from .model import LGDM, fingerprints_match


def head_metadata(manifest: dict) -> dict:
    """What a head folder stores besides the head: enough to rebuild and verify its feature extractor."""
    return {"lgdm": manifest["config"], "backbone_spec": manifest.get("backbone_spec"),
            "model_key": manifest["model_key"], "backbone": manifest["backbone"], "layout": manifest["layout"],
            "weights_fingerprint": manifest.get("weights_fingerprint"), "precision": manifest.get("precision")}


class LGDMScorer(QualityScorer):
    """Predicted MOS (the training set's scale; higher is better) from PMG hyperfeatures.

    Differentiable: gradients flow through the VAE encoder, the DDIM path and the pooled U-Net features;
    PMG corrections are constants (pass ``create_graph=True`` to differentiate through them as well).

    Args:
        lgdm: the feature extractor (shares a pipeline's modules).
        head: a trained :class:`LGDMHead`.
        name: spec shown in reports (``"lgdm:<dir>"``).
        create_graph: differentiate through the PMG corrections (second order, slower).
    """

    differentiable = True
    native_lower_better = False

    def __init__(self, lgdm: LGDM, head: LGDMHead, name: str = "lgdm", create_graph: bool = False):
        super().__init__()
        layout = lgdm.layout()
        if head.config.num_steps != layout["num_steps"] or head.config.layer_dims != layout["layer_dims"]:
            raise InputError(f"head expects {head.config.num_steps} steps x {head.config.layer_dims} but the LGDM "
                             f"config gives {layout['num_steps']} x {layout['layer_dims']}; use the config the head "
                             "was trained with")
        self.lgdm, self.head, self.name, self.create_graph = lgdm, head, name, create_graph
        size, upscale = lgdm.config.image_size, lgdm.config.max_upscale
        self.min_side = lgdm.min_side if size is None else max(lgdm.min_side, int(-(-size // upscale)))
        lo, hi = (float(v) for v in head.mos_range)
        self.native_range = (lo, hi)

    def native(self, images: torch.Tensor) -> torch.Tensor:
        features = self.lgdm.extract(images, create_graph=self.create_graph)
        return self.head.to_mos(self.head(features)).to(images.dtype)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Config, backbone spec and identity, and the head (safetensors); the backbone is referenced, not copied."""
        from .extract import cache_manifest

        self.head.save_pretrained(directory, extra=head_metadata(cache_manifest(self.lgdm)))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, pipeline=None, model: str | None = None,
                        device=None, dtype=None, psi_weights=None, pmg_chunk: int | None = None,
                        **kwargs) -> "LGDMScorer":
        """Rebuild the scorer from a head folder.

        Args:
            directory: written by ``save_pretrained`` or ``qualityguide lgdm fit``.
            pipeline: a loaded pipeline whose modules to share (e.g. the one being guided); else the stored
                backbone spec (or ``model``) is loaded with :func:`qualityguide.load_pipeline`.
            model: override the stored backbone spec (e.g. a local copy of the hub model).
        """
        head, meta = LGDMHead.from_pretrained(directory)
        config = LGDMConfig.from_dict(meta["lgdm"])
        if pipeline is not None:
            lgdm = LGDM.from_pipeline(pipeline, config, psi_weights=psi_weights, pmg_chunk=pmg_chunk)
        else:
            spec = model or meta.get("backbone_spec")
            if not spec:
                raise InputError(f"{directory}: no backbone spec stored; pass model=... or pipeline=...")
            lgdm = LGDM.from_pretrained(spec, config, dtype=dtype, device=device, psi_weights=psi_weights,
                                        pmg_chunk=pmg_chunk, **kwargs)
        if lgdm.model_key() != meta["model_key"]:
            found = {"config": meta["lgdm"], "backbone": meta["backbone"], "precision": None}
            wanted = {"config": lgdm.config.to_dict(), "backbone": lgdm.backbone_identity(), "precision": None}
            raise InputError(_mismatch(Path(directory), found, wanted).replace("feature cache", "LGDM head")
                             .replace("use a new --cache folder for this configuration, or rerun with the cache's "
                                      "settings", "load the backbone the head was trained on"))
        ok, why = fingerprints_match(meta.get("weights_fingerprint"), lgdm.weight_fingerprint())
        if not ok:
            raise InputError(f"LGDM head {directory} was trained on features of other backbone weights ({why}). "
                             "Fix: load the backbone the head was trained on (model=... or pipeline=...)")
        scorer = cls(lgdm, head.to(next(lgdm.unet.parameters()).device), name=f"lgdm:{directory}")
        scorer.eval()
        return scorer
