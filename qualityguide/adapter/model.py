"""IQA-Adapter (Abud et al., ICCV 2025): quality targets -> tokens for decoupled cross-attention.

A projection (diffusers' ``ImageProjection``: ``Linear(d -> N*D)``, reshape, ``LayerNorm``; or a small
MLP) turns one condition vector per image into ``N`` tokens of the U-Net's cross-attention width
``D``; every cross-attention layer gets its own key/value weights for those tokens
(``IPAdapterAttnProcessor2_0``, initialised from the layer's ``to_k``/``to_v`` as IP-Adapter's training
does), and their attention output is added with a scale. Only those weights train.

* :class:`IQAAdapter` conditions on target scores of named scorers (as percentile ranks of the
  training distribution, :mod:`qualityguide.adapter.conditions`).
* :class:`ReferenceIQAAdapter` conditions on a perceptual feature extractor's output for a reference
  image (:mod:`qualityguide.scorers.features`), standardised with the training set's statistics.

An adapter is structural, like an IP-Adapter: it attaches to any U-Net with the same cross-attention
layout (so to fine-tunes of the base it was trained on), and refuses another layout naming both.
"""

from __future__ import annotations

import json
import os
import weakref
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from ..errors import InputError, printable
from ..files import FORMATS, atomic_write
from ..hub import HubModel
from ..images import check_batch
from ..scorers.safe_load import check_fields, load_checked_safetensors, read_json_object
from .conditions import (QUANTILES_FILE, ScoreQuantiles, check_unit_range, finite_or_raise, null_condition,
                         pack_embeds, values_per_name, with_presence)
from .wiring import (ATTACHED_ATTR, IP_HID_TYPE, AttachHook, CrossAttentionLayer, cross_attention_layers, describe,
                     unet_of)

PROJECTIONS = ("linear", "mlp")
KINDS = ("scores", "features")
NEGATIVES = ("zero", "invert")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DIFFUSERS_SUBFOLDER = "diffusers"
DIFFUSERS_WEIGHTS = "ip_adapter.safetensors"
FORMAT = FORMATS["iqa_adapter"]


@dataclass
class IQAAdapterConfig:
    """Shape of an adapter (saved as ``config.json``).

    Args:
        kind: ``"scores"`` (targets of named scorers) or ``"features"`` (a reference image's features).
        score_names: the scorers, in input order (kind ``"scores"``), e.g. ``["pyiqa:topiq_nr"]``.
        feature_extractor: the feature spec (kind ``"features"``): ``"brisque"``, ``"niqe"``, ``"pyiqa:<metric>"``.
        feature_dim: its output width (kind ``"features"``).
        num_tokens: tokens per image (IQA-Adapter uses 2-4).
        cross_attention_dim: the U-Net's cross-attention width (768 for SD 1.5, 2048 for SDXL).
        projection: ``"linear"`` (diffusers' ``ImageProjection``) or ``"mlp"`` (Linear-GELU-Linear).
        hidden_dim: the MLP's hidden width (default ``cross_attention_dim``).
        layers: ``[name, hidden_size, cross_attention_dim]`` of each cross-attention layer (set by ``for_unet``
            or the first ``attach``).
    """

    kind: Literal["scores", "features"] = "scores"
    score_names: list[str] = field(default_factory=list)
    feature_extractor: str | None = None
    feature_dim: int | None = None
    num_tokens: int = 4
    cross_attention_dim: int = 768
    projection: Literal["linear", "mlp"] = "linear"
    hidden_dim: int | None = None
    layers: list[list] | None = None

    def __post_init__(self):
        def whole(name, value, low=1):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"{name}={value!r}: must be a whole number >= {low}")

        if self.kind not in KINDS:
            raise InputError(f"kind={self.kind!r}: allowed {', '.join(KINDS)}")
        if self.projection not in PROJECTIONS:
            raise InputError(f"projection={self.projection!r}: allowed {', '.join(PROJECTIONS)}")
        whole("num_tokens", self.num_tokens)
        whole("cross_attention_dim", self.cross_attention_dim)
        if self.hidden_dim is not None:
            whole("hidden_dim", self.hidden_dim)
        if self.kind == "scores":
            names = list(self.score_names) if isinstance(self.score_names, (list, tuple)) else None
            if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
                raise InputError(f"score_names={self.score_names!r}: give a list of distinct scorer names, e.g. "
                                 "['pyiqa:topiq_nr', 'pyiqa:laion_aes'] (the score columns of the training set)")
            self.score_names = names
        else:
            if not isinstance(self.feature_extractor, str) or not self.feature_extractor:
                raise InputError(f"feature_extractor={self.feature_extractor!r}: give a feature spec (brisque, niqe, "
                                 "pyiqa:<metric>)")
            whole("feature_dim", self.feature_dim)
        if self.layers is not None:
            self.layers = [_layer_entry(i, layer) for i, layer in enumerate(_list_or_raise("layers", self.layers))]

    @property
    def input_dim(self) -> int:
        """Width of the projection's input: the condition plus the presence flag."""
        return (len(self.score_names) if self.kind == "scores" else self.feature_dim) + 1

    def layer_specs(self) -> list[CrossAttentionLayer] | None:
        return None if self.layers is None else [CrossAttentionLayer(*layer) for layer in self.layers]


def _list_or_raise(name: str, value) -> list:
    if not isinstance(value, (list, tuple)):
        raise InputError(f"{name}={printable(repr(value))[:120]}: must be a list of [name, hidden_size, "
                         "cross_attention_dim] entries (written by save_pretrained); save the adapter again")
    return list(value)


def _layer_entry(index: int, layer) -> list:
    """One ``layers`` entry as ``[name, hidden_size, cross_attention_dim]``, or an error naming the entry."""
    ok = isinstance(layer, (list, tuple)) and len(layer) == 3 and isinstance(layer[0], str) and layer[0] and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in layer[1:])
    if not ok:
        raise InputError(f"layers[{index}]={printable(repr(layer))[:120]}: each entry must be [processor name, "
                         "hidden_size >= 1, cross_attention_dim >= 1], e.g. ['down_blocks.0.attentions.0."
                         "transformer_blocks.0.attn2.processor', 320, 768]; save the adapter again")
    return [layer[0], layer[1], layer[2]]


def weight_shapes(config: IQAAdapterConfig) -> dict[str, tuple[tuple[int, ...], dict]]:
    """Name -> (shape, the config fields that size it) of every tensor an adapter of ``config`` saves.

    Computed from the config alone, so a config read from a file is checked against its weights file before a
    module of that size is built (``tests/test_untrusted_files.py`` compares it with built adapters).
    """
    width, tokens = config.cross_attention_dim, config.num_tokens
    inputs = {"score_names": config.score_names} if config.kind == "scores" else {"feature_dim": config.feature_dim}
    out_fields = {"num_tokens": tokens, "cross_attention_dim": width}
    shapes = {"projection.norm.weight": ((width,), {"cross_attention_dim": width}),
              "projection.norm.bias": ((width,), {"cross_attention_dim": width})}
    if config.projection == "linear":
        shapes["projection.image_embeds.bias"] = ((tokens * width,), out_fields)
        shapes["projection.image_embeds.weight"] = ((tokens * width, config.input_dim), {**out_fields, **inputs})
    else:
        hidden = config.hidden_dim or width
        hidden_fields = {"hidden_dim": config.hidden_dim} if config.hidden_dim else {"hidden_dim": None, **out_fields}
        shapes["projection.net.0.bias"] = ((hidden,), hidden_fields)
        shapes["projection.net.0.weight"] = ((hidden, config.input_dim), {**hidden_fields, **inputs})
        shapes["projection.net.2.bias"] = ((tokens * width,), out_fields)
        shapes["projection.net.2.weight"] = ((tokens * width, hidden), {**out_fields, **hidden_fields})
    if config.kind == "features":
        for name in ("feature_mean", "feature_std"):
            shapes[name] = ((config.feature_dim,), {"feature_dim": config.feature_dim})
    for i, (name, hidden_size, cross_dim) in enumerate(config.layers or []):
        for kv in ("to_k_ip", "to_v_ip"):
            shapes[f"layers.{i}.{kv}.0.weight"] = ((hidden_size, cross_dim), {f"layers[{i}]": [name, hidden_size,
                                                                                               cross_dim]})
    return shapes


class MLPProjection(nn.Module):
    """``Linear(d -> h)``, GELU, ``Linear(h -> N*D)``, reshape to ``N`` tokens, ``LayerNorm(D)``."""

    def __init__(self, input_dim: int, cross_attention_dim: int, num_tokens: int, hidden_dim: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.net = nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, num_tokens * cross_attention_dim))
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        tokens = self.net(inputs.to(self.net[0].weight.dtype))
        return self.norm(tokens.reshape(inputs.shape[0], self.num_tokens, -1))


def build_projection(config: IQAAdapterConfig) -> nn.Module:
    if config.projection == "linear":
        from diffusers.models.embeddings import ImageProjection

        return ImageProjection(image_embed_dim=config.input_dim, cross_attention_dim=config.cross_attention_dim,
                               num_image_text_embeds=config.num_tokens)
    return MLPProjection(config.input_dim, config.cross_attention_dim, config.num_tokens,
                         config.hidden_dim or config.cross_attention_dim)


class _QualityAdapter(nn.Module, HubModel):
    """What both adapters share: projection, per-layer key/value weights, attach/detach, save/load (and the hub:
    ``push_to_hub``, ``from_pretrained`` of a hub id, a model card in every saved folder)."""

    def __init__(self, config: IQAAdapterConfig):
        super().__init__()
        self.config = config
        self.projection = build_projection(config)
        self.layers = nn.ModuleList()
        if config.layers is not None:
            self._build_layers(config.layer_specs())
        self._attached: weakref.ref | None = None
        self._saved: dict | None = None

    # -- layers ---------------------------------------------------------------------------------------------------
    @property
    def input_dim(self) -> int:
        return self.config.input_dim

    def _build_layers(self, specs: list[CrossAttentionLayer]) -> None:
        from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

        self.layers = nn.ModuleList(
            IPAdapterAttnProcessor2_0(hidden_size=s.hidden_size, cross_attention_dim=s.cross_attention_dim,
                                      num_tokens=(self.config.num_tokens,), scale=[1.0]) for s in specs)
        self.config.layers = [[s.name, s.hidden_size, s.cross_attention_dim] for s in specs]

    @classmethod
    def for_unet(cls, unet, source, **kwargs) -> "_QualityAdapter":
        """An adapter sized for ``unet`` (or a pipeline's), its key/value weights initialised from the U-Net's.

        Args:
            unet: a ``UNet2DConditionModel`` or a pipeline holding one; its cross-attention width sizes the tokens.
            source: what the adapter is conditioned on, the constructor's first argument (an
                :class:`IQAAdapter`'s score names, a :class:`ReferenceIQAAdapter`'s feature extractor).
            kwargs: the constructor's other arguments.
        """
        specs = cross_attention_layers(unet_of(unet))
        adapter = cls(source, cross_attention_dim=specs[0].cross_attention_dim, **kwargs)
        adapter.init_layers(unet)
        return adapter

    def init_layers(self, unet) -> None:
        """Create the key/value weights for ``unet``'s layout, initialised from each layer's ``to_k``/``to_v``."""
        unet = unet_of(unet)
        specs = self._check_layout(unet)
        self._build_layers(specs)
        with torch.no_grad():
            for spec, proc in zip(specs, self.layers):
                attn = unet.get_submodule(spec.name[: -len(".processor")])
                proc.to_k_ip[0].weight.copy_(attn.to_k.weight)
                proc.to_v_ip[0].weight.copy_(attn.to_v.weight)

    def _check_layout(self, unet) -> list[CrossAttentionLayer]:
        specs = cross_attention_layers(unet)
        dims = {s.cross_attention_dim for s in specs}
        mine = self.config.layer_specs()
        if mine is not None and mine != specs:
            raise InputError(f"this IQA-Adapter was built for a U-Net with {describe(mine)}; this U-Net has "
                             f"{describe(specs)}. Use an adapter trained for this model family (SD 1.x, SD 2.x and "
                             "SDXL U-Nets differ)")
        if dims != {self.config.cross_attention_dim}:
            raise InputError(f"this IQA-Adapter makes tokens of width cross_attention_dim="
                             f"{self.config.cross_attention_dim}; this U-Net's cross-attention takes "
                             f"{sorted(dims)}. Build it with IQAAdapter.for_unet(unet, ...)")
        return specs

    def diffusers_layout_ok(self) -> tuple[bool, str]:
        """Whether diffusers' IP-Adapter file layout can express this adapter (and why not)."""
        if self.config.projection != "linear" or self.config.num_tokens != 4:
            return False, ("diffusers' loader reads a linear projection as exactly 4 tokens "
                           f"(this adapter: {self.config.projection}, {self.config.num_tokens} tokens)")
        if not len(self.layers):
            return False, "the adapter has no layers yet (attach it or build it with for_unet)"
        for spec in self.config.layer_specs():  # diffusers' loader derives each width from the block's name
            if not spec.name.startswith(("down_blocks.", "mid_block.", "up_blocks.")):
                return False, f"layer {spec.name} is outside the down/mid/up blocks diffusers' loader numbers"
        return True, ""

    # -- attach / detach ------------------------------------------------------------------------------------------
    @property
    def attached_unet(self):
        return None if self._attached is None else self._attached()

    def attach(self, target, scale: float = 1.0, dtype: torch.dtype | None = None):
        """Wire the adapter into ``target`` (a pipeline or its U-Net) through diffusers' IP-Adapter path.

        Args:
            target: ``StableDiffusion[XL][Img2Img]Pipeline`` or ``UNet2DConditionModel``.
            scale: the adapter's weight (``pipe.set_ip_adapter_scale`` changes it later).
            dtype: cast the adapter's weights to this dtype (default: the U-Net's). Training keeps them in float32
                under autocast.
        Returns:
            ``self``.
        """
        unet = unet_of(target)
        if getattr(unet, ATTACHED_ATTR, None) is self:
            return self
        if getattr(unet, ATTACHED_ATTR, None) is not None:
            raise InputError("another IQA-Adapter is attached to this U-Net; detach it first (other.detach(pipe))")
        if self.attached_unet is not None:
            raise InputError("this adapter is attached to another U-Net; call adapter.detach() first, or load a "
                             "second copy with from_pretrained")
        if getattr(unet, "encoder_hid_proj", None) is not None:
            raise InputError("this U-Net already has an encoder_hid_proj (an IP-Adapter loaded with "
                             "pipe.load_ip_adapter, or a text projection); unload it (pipe.unload_ip_adapter()) before "
                             "attaching an IQA-Adapter")
        if not len(self.layers):
            self.init_layers(unet)
        specs = self._check_layout(unet)
        param = next(unet.parameters())
        self.to(device=param.device, dtype=dtype or param.dtype)
        from diffusers.models.embeddings import MultiIPAdapterImageProjection

        before = dict(unet.attn_processors)
        processors = dict(before)
        for spec, proc in zip(specs, self.layers):
            proc.scale = [float(scale)]
            processors[spec.name] = proc
        unet.set_attn_processor(dict(processors))  # it pops entries from the dict it is given
        self._saved = {"processors": {s.name: before[s.name] for s in specs},
                       "hid_type": unet.config.encoder_hid_dim_type,
                       "hook": unet.register_forward_pre_hook(AttachHook(self, self.projection), with_kwargs=True)}
        unet.encoder_hid_proj = MultiIPAdapterImageProjection([self.projection])
        unet.config.encoder_hid_dim_type = IP_HID_TYPE  # attribute only, as diffusers' loader does: saved configs stay clean
        object.__setattr__(unet, ATTACHED_ATTR, self)
        self._attached = weakref.ref(unet)
        return self

    def detach(self, target=None):
        """Restore the U-Net exactly as it was before :meth:`attach` (the same processor objects)."""
        unet = self.attached_unet
        if unet is None:
            return self
        if target is not None and unet_of(target) is not unet:
            raise InputError("this adapter is attached to a different U-Net than the one passed to detach()")
        processors = dict(unet.attn_processors)
        processors.update(self._saved["processors"])
        unet.set_attn_processor(dict(processors))
        unet.encoder_hid_proj = None
        unet.config.encoder_hid_dim_type = self._saved["hid_type"]
        self._saved["hook"].remove()
        if getattr(unet, ATTACHED_ATTR, None) is self:
            object.__delattr__(unet, ATTACHED_ATTR)
        self._attached, self._saved = None, None
        return self

    def set_scale(self, scale: float) -> None:
        """The adapter's weight in every layer (what ``pipe.set_ip_adapter_scale(scale)`` does)."""
        for proc in self.layers:
            proc.scale = [float(scale)]

    # -- embeddings -----------------------------------------------------------------------------------------------
    def _pack(self, positive: torch.Tensor, negative: torch.Tensor | None, do_cfg: bool) -> list[torch.Tensor]:
        param = next(self.projection.parameters())
        positive = positive.to(device=param.device, dtype=torch.float32)
        negative = None if not do_cfg else negative.to(device=param.device, dtype=torch.float32)
        return pack_embeds(positive, negative)

    def null_embeds(self, count: int = 1, do_cfg: bool = True) -> list[torch.Tensor]:
        """The unconditional input (what quality dropout trained) for both halves."""
        null = null_condition(count, self.input_dim)
        return self._pack(null, null, do_cfg)

    # -- save / load ----------------------------------------------------------------------------------------------
    def _metadata(self) -> dict:
        return {}

    def save_pretrained(self, directory: str | os.PathLike, diffusers_layout: bool = True, *, config=None,
                        repo_id: str | None = None, push_to_hub: bool = False, model_card_kwargs: dict | None = None,
                        **push_to_hub_kwargs) -> Path:
        """Write ``config.json``, ``model.safetensors`` (and ``quantiles.json``); where diffusers' IP-Adapter layout
        can express the adapter, also ``diffusers/ip_adapter.safetensors`` for ``pipe.load_ip_adapter``; then the
        model card ``README.md``. Every file is replaced atomically.

        Args:
            directory: the folder (created if missing; one holding another model's config.json is refused).
            diffusers_layout: also write diffusers' IP-Adapter file where it can express the adapter.
            config: refused (the mixin's argument; the adapter writes its own config.json).
            repo_id, push_to_hub, push_to_hub_kwargs: upload the folder afterwards (``huggingface_hub``'s
                ``push_to_hub``; ``repo_id`` defaults to the folder's name).
            model_card_kwargs: arguments of :func:`qualityguide.hub.cards.write_model_card` (``base_model=``,
                ``settings=``, ``validation=``, ...).
        """
        directory = self._save_pretrained(Path(directory), diffusers_layout)
        self._finish_save(directory, config, repo_id, push_to_hub, model_card_kwargs, push_to_hub_kwargs)
        return directory

    def _save_pretrained(self, directory: Path, diffusers_layout: bool = True) -> Path:
        """The adapter's files (see :meth:`save_pretrained`)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        config_path = directory / CONFIG_FILE
        if config_path.is_file():
            try:
                ours = read_json_object(config_path, "config", "").get("format") == FORMAT
            except InputError:
                ours = False
            if not ours:
                raise InputError(f"{config_path} exists and was not written by an IQA-Adapter; save into an empty "
                                 "folder or one holding an adapter")
        if not len(self.layers):
            raise InputError("the adapter has no layers yet; build it with for_unet(unet, ...) or attach it once "
                             "before saving")
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        _atomic(directory / WEIGHTS_FILE, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
        payload = {"format": FORMAT, "config": asdict(self.config), **self._metadata()}
        ok, why = self.diffusers_layout_ok()
        payload["diffusers_layout"] = (f"{DIFFUSERS_SUBFOLDER}/{DIFFUSERS_WEIGHTS}" if ok and diffusers_layout
                                       else None if diffusers_layout else "not written (diffusers_layout=False)")
        if ok and diffusers_layout:
            (directory / DIFFUSERS_SUBFOLDER).mkdir(exist_ok=True)
            legacy = self.diffusers_state_dict()
            _atomic(directory / DIFFUSERS_SUBFOLDER / DIFFUSERS_WEIGHTS,
                    lambda p: save_file(legacy, str(p), metadata={"format": "pt"}))
        elif diffusers_layout:
            payload["diffusers_layout_absent"] = why
        _atomic(config_path, lambda p: p.write_text(json.dumps(payload, indent=2)))
        return directory

    def diffusers_state_dict(self) -> dict[str, torch.Tensor]:
        """IP-Adapter's checkpoint keys: ``image_proj.proj.*``, ``image_proj.norm.*`` and
        ``ip_adapter.<1 + 2i>.to_{k,v}_ip.weight`` for the i-th cross-attention layer (diffusers' numbering)."""
        proj = self.projection
        out = {"image_proj.proj.weight": proj.image_embeds.weight, "image_proj.proj.bias": proj.image_embeds.bias,
               "image_proj.norm.weight": proj.norm.weight, "image_proj.norm.bias": proj.norm.bias}
        for i, layer in enumerate(self.layers):
            out[f"ip_adapter.{1 + 2 * i}.to_k_ip.weight"] = layer.to_k_ip[0].weight
            out[f"ip_adapter.{1 + 2 * i}.to_v_ip.weight"] = layer.to_v_ip[0].weight
        return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}

    def card_defaults(self) -> dict:
        source = ", ".join(self.config.score_names) if self.config.kind == "scores" else self.config.feature_extractor
        return {"summary": f"Conditioned on {source}; {self.config.num_tokens} tokens, {self.config.projection} "
                           "projection."}

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None = None, cache_dir=None,
                         force_download: bool = False, local_files_only: bool = False, token=None,
                         subfolder: str | None = None, device: str | torch.device | None = None,
                         **kwargs) -> "_QualityAdapter":
        """Load an adapter from a folder written by :meth:`save_pretrained`, or a hub id (fetched with
        ``huggingface_hub``; only the adapter's files; the local cache is used offline). Called by
        ``from_pretrained(source, revision=, cache_dir=, token=, local_files_only=, subfolder=, device=)``.

        Args:
            model_id: folder or ``owner/name``.
            revision, cache_dir, force_download, local_files_only, token, subfolder: where and how the hub files are
                fetched (:meth:`qualityguide.hub.HubModel.from_pretrained`).
            device: where to put it (default CPU; ``attach`` moves it to the U-Net anyway).
            kwargs: for :class:`ReferenceIQAAdapter`, ``weights=`` of a pyiqa feature extractor.
        """
        directory = _resolve(model_id, revision, subfolder, cache_dir=cache_dir, force_download=force_download,
                             local_files_only=local_files_only, token=token)
        again = "pass a folder written by adapter.save_pretrained(...) or by recipes/train_iqa_adapter.py"
        try:
            payload = read_json_object(directory / CONFIG_FILE, "IQA-Adapter config", again)
        except FileNotFoundError:
            raise InputError(f"{directory} is not an IQA-Adapter folder (no {CONFIG_FILE}); {again}") from None
        if payload.get("format") != FORMAT or not isinstance(payload.get("config"), dict):
            raise InputError(f"{directory / CONFIG_FILE} was not written by an IQA-Adapter (format "
                             f"{printable(repr(payload.get('format')))[:80]}, expected {FORMAT!r}, and a \"config\" "
                             f"object); {again}")
        check_fields(payload["config"], [f.name for f in fields(IQAAdapterConfig)],
                     f"IQA-Adapter config {directory / CONFIG_FILE}", "it was written by another version; " + again)
        config = IQAAdapterConfig(**payload["config"])
        target = {"scores": IQAAdapter, "features": ReferenceIQAAdapter}[config.kind]
        if not issubclass(target, cls):
            raise InputError(f"{directory} holds a {target.__name__}; load it with {target.__name__}.from_pretrained")
        if not (directory / WEIGHTS_FILE).is_file():
            raise InputError(f"{directory / WEIGHTS_FILE} is missing; save the adapter again")
        # sizes are checked against the weights file before a module of the config's size is built
        state = load_checked_safetensors(directory / WEIGHTS_FILE, weight_shapes(config), "IQA-Adapter weights",
                                         "use the config.json saved with these weights, or save the adapter again")
        adapter = target._from_config(config, directory, payload, **kwargs)
        adapter.load_state_dict(state, strict=True)
        return adapter.to(device) if device is not None else adapter


class IQAAdapter(_QualityAdapter):
    """Condition generation on target scores of one or more scorers.

    Args:
        score_names: the scorers (the training set's score columns), e.g. ``["pyiqa:topiq_nr"]``.
        num_tokens: tokens per image.
        cross_attention_dim: the U-Net's cross-attention width (``for_unet`` reads it).
        projection: ``"linear"`` or ``"mlp"``.
        hidden_dim: the MLP's hidden width.
        quantiles: the training set's score quantiles (needed for ``scores=`` targets and training).

    Example::

        adapter = IQAAdapter.from_pretrained("iqa-adapter/").attach(pipe)
        images = pipe(["a house"] * 8, ip_adapter_image_embeds=adapter.embeds(
            percentiles={"pyiqa:topiq_nr": torch.linspace(0.05, 0.95, 8)})).images  # one target per image
    """

    card_kind = "iqa_adapter"

    def __init__(self, score_names, num_tokens: int = 4, cross_attention_dim: int = 768,
                 projection: str = "linear", hidden_dim: int | None = None, quantiles: ScoreQuantiles | None = None,
                 layers: list[list] | None = None):
        super().__init__(IQAAdapterConfig(kind="scores", score_names=list(score_names) if isinstance(
            score_names, (list, tuple)) else score_names, num_tokens=num_tokens,
            cross_attention_dim=cross_attention_dim, projection=projection, hidden_dim=hidden_dim, layers=layers))
        self.quantiles = None
        if quantiles is not None:
            self.set_quantiles(quantiles)

    @classmethod
    def _from_config(cls, config, directory, payload, **kwargs):
        if kwargs:
            raise InputError(f"IQAAdapter.from_pretrained got unexpected options {sorted(kwargs)}")
        quantiles = ScoreQuantiles.load(directory) if (directory / QUANTILES_FILE).is_file() else None
        return cls(config.score_names, config.num_tokens, config.cross_attention_dim, config.projection,
                   config.hidden_dim, quantiles, config.layers)

    @property
    def score_names(self) -> list[str]:
        return list(self.config.score_names)

    def set_quantiles(self, quantiles: ScoreQuantiles) -> None:
        missing = [n for n in self.score_names if n not in quantiles.table]
        if missing:
            raise InputError(f"quantiles have no table for {missing}; fit them from every score column "
                             f"({self.score_names})")
        self.quantiles = quantiles

    def _save_pretrained(self, directory: Path, diffusers_layout: bool = True) -> Path:
        directory = super()._save_pretrained(directory, diffusers_layout)
        if self.quantiles is not None:
            _atomic(directory / QUANTILES_FILE, lambda p: p.write_text(self.quantiles.to_json()))
        return directory

    def _need_quantiles(self, what: str) -> ScoreQuantiles:
        if self.quantiles is None:
            raise InputError(f"{what} needs the training set's score quantiles, and this adapter has none; fit them "
                             "with adapter.set_quantiles(ScoreQuantiles.fit({name: scores}))")
        return self.quantiles

    def ranks(self, scores: torch.Tensor, strict: bool = False) -> torch.Tensor:
        """Scores ``[B, k]`` (columns in ``score_names`` order, the scorers' own units) -> percentile ranks."""
        quantiles = self._need_quantiles("converting scores")
        scores = torch.as_tensor(scores, dtype=torch.float64)
        if scores.dim() != 2 or scores.shape[1] != len(self.score_names):
            raise InputError(f"scores must be [batch, {len(self.score_names)}] (columns {self.score_names}), got "
                             f"{tuple(scores.shape)}")
        cols = [quantiles.rank(n, scores[:, i].numpy(), strict=strict) for i, n in enumerate(self.score_names)]
        return torch.from_numpy(np.stack(cols, axis=1)).float()

    def condition(self, scores: torch.Tensor) -> torch.Tensor:
        """Training inputs ``[B, k + 1]`` from the labels ``[B, k]`` (ranks, presence flag 1)."""
        return with_presence(self.ranks(scores, strict=False))

    def embeds(self, scores: dict | None = None, percentiles: dict | None = None, negative: str = "zero",
               do_cfg: bool = True) -> list[torch.Tensor]:
        """The pipeline's ``ip_adapter_image_embeds`` for target qualities.

        Args:
            scores: ``{name: value}`` in each scorer's own units (what ``qualityguide label`` wrote), inside the
                training range; or ``{name: [v1, ..., vM]}`` for one target per generated image.
            percentiles: ``{name: p}`` with ``p`` in [0,1] of the training distribution (0.99: the 99th
                percentile, what IQA-Adapter's authors generate with); or lists, one per image.
            negative: the classifier-free-guidance negative: ``"zero"`` (no quality condition, as trained by
                quality dropout) or ``"invert"`` (the opposite percentile, pushing away from it).
            do_cfg: stack the negative half first (``guidance_scale > 1``).
        Returns:
            ``[tensor]`` of shape ``[2, M, k + 1]`` (``[1, M, k + 1]`` without CFG); ``M = 1`` is broadcast to every
            image, ``M > 1`` gives image ``i`` (of prompts x ``num_images_per_prompt``) target ``i``.
        """
        if (scores is None) == (percentiles is None):
            raise InputError("pass exactly one of scores={name: value} or percentiles={name: p}")
        if negative not in NEGATIVES:
            raise InputError(f"negative={negative!r}: allowed {', '.join(map(repr, NEGATIVES))}")
        names = self.score_names
        if percentiles is not None:
            values, _ = values_per_name(percentiles, names, "percentiles")
            check_unit_range(values, names, "percentiles")
            ranks = torch.from_numpy(values).float()
        else:
            values, _ = values_per_name(scores, names, "scores")
            quantiles = self._need_quantiles("scores= targets")
            ranks = torch.from_numpy(np.stack([quantiles.rank(n, values[:, i], strict=True)
                                               for i, n in enumerate(names)], axis=1)).float()
        positive = with_presence(ranks)
        neg = null_condition(len(ranks), self.input_dim) if negative == "zero" else with_presence(1 - ranks)
        return self._pack(positive, neg, do_cfg)


class ReferenceIQAAdapter(_QualityAdapter):
    """Condition generation on a reference image's content-agnostic quality features.

    Args:
        feature_extractor: a spec for :func:`qualityguide.scorers.features.build_image_psi` (``"brisque"`` and ``"niqe"``
            work offline) or an ``ImagePsi``.
        feature_dim: its output width (measured on a probe image when omitted).
        weights: local weights of a ``pyiqa:`` extractor.
        Other arguments as :class:`IQAAdapter`.
    """

    card_kind = "reference_iqa_adapter"
    RESOLUTION_KEY = "feature_resolution"  # the training scale, in config.json beside the config

    def __init__(self, feature_extractor, feature_dim: int | None = None, num_tokens: int = 4,
                 cross_attention_dim: int = 768, projection: str = "linear", hidden_dim: int | None = None,
                 layers: list[list] | None = None, weights: str | None = None):
        from ..scorers.features import ImagePsi, build_image_psi

        psi = feature_extractor if isinstance(feature_extractor, ImagePsi) else build_image_psi(
            str(feature_extractor), weights=weights)
        if feature_dim is None:
            probe = torch.linspace(0, 1, 3 * 128 * 128).reshape(1, 3, 128, 128).remainder(0.37) / 0.37
            with torch.no_grad():
                feature_dim = int(psi(probe).shape[1])
        super().__init__(IQAAdapterConfig(kind="features", feature_extractor=psi.name, feature_dim=feature_dim,
                                          num_tokens=num_tokens, cross_attention_dim=cross_attention_dim,
                                          projection=projection, hidden_dim=hidden_dim, layers=layers))
        object.__setattr__(self, "psi", psi)  # not a submodule: its weights are the extractor's, not the adapter's
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))
        self.feature_resolution: int | None = None  # side of the training images the statistics were fitted on

    @classmethod
    def _from_config(cls, config, directory, payload, weights: str | None = None):
        adapter = cls(config.feature_extractor, config.feature_dim, config.num_tokens, config.cross_attention_dim,
                      config.projection, config.hidden_dim, config.layers, weights=weights)
        # absent in adapters saved before the scale was recorded: they keep using references at their own size
        resolution = payload.get(cls.RESOLUTION_KEY)
        if resolution is not None:
            from ..train.data import check_int

            adapter.feature_resolution = check_int(
                f"{directory / CONFIG_FILE}: {cls.RESOLUTION_KEY}", resolution, 1,
                "it must be the side of the training images; save the adapter again")
        return adapter

    def _metadata(self) -> dict:
        return {self.RESOLUTION_KEY: self.feature_resolution}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Raw features ``[B, D]`` of images ``[B,3,H,W]`` in [0,1]."""
        check_batch(images, "images")
        with torch.no_grad():
            feats = self.psi(images.float()).float()
        if feats.shape[1] != self.config.feature_dim:
            raise InputError(f"{self.config.feature_extractor} gave {feats.shape[1]} features; this adapter was "
                             f"trained on {self.config.feature_dim}")
        finite_or_raise(feats, f"{self.config.feature_extractor} features of the reference images")
        return feats

    def fit_feature_stats(self, features: torch.Tensor, resolution: int | None = None) -> None:
        """Standardise inputs with the training set's feature mean and standard deviation, and record the scale.

        Args:
            features: raw features ``[N >= 2, D]`` of the training images (:meth:`features`).
            resolution: the side of the square training images they were computed on (the recipe's
                ``--resolution``). :meth:`embeds_from_reference` brings references to that scale, because
                BRISQUE/NIQE statistics depend on it: the same scene at twice the size has other local
                statistics, so its features would sit elsewhere in the training distribution. ``None`` (what
                adapters saved before the scale was recorded load as) uses references at their own size.
        """
        features = torch.as_tensor(features, dtype=torch.float32)
        if features.dim() != 2 or features.shape[1] != self.config.feature_dim or features.shape[0] < 2:
            raise InputError(f"features must be [N >= 2, {self.config.feature_dim}], got {tuple(features.shape)}")
        if resolution is not None:
            from ..train.data import check_int

            resolution = check_int("resolution", resolution, 1, "pass the side of the training images in pixels")
        self.feature_mean.copy_(features.mean(0))
        self.feature_std.copy_(features.std(0).clamp_min(1e-6))
        self.feature_resolution = resolution

    def condition(self, features: torch.Tensor) -> torch.Tensor:
        """Training inputs ``[B, D + 1]`` from raw features ``[B, D]``."""
        mean, std = self.feature_mean.float().to(features.device), self.feature_std.float().to(features.device)
        return with_presence((features.float() - mean) / std)

    def embeds_from_reference(self, images: torch.Tensor, negative: str = "zero",
                              do_cfg: bool = True) -> list[torch.Tensor]:
        """``ip_adapter_image_embeds`` carrying the quality of reference images ``[B,3,H,W]`` in [0,1]: one reference is
        broadcast to every generated image, ``B`` references give image ``i`` reference ``i``. References are first
        brought to the training images' scale (:meth:`at_feature_scale`)."""
        if negative != "zero":
            raise InputError(f"negative={negative!r}: a reference adapter supports only 'zero' (no quality condition)")
        positive = self.condition(self.features(self.at_feature_scale(images)).cpu())
        return self._pack(positive, null_condition(len(positive), self.input_dim), do_cfg)

    def at_feature_scale(self, images: torch.Tensor) -> torch.Tensor:
        """References ``[B,3,H,W]`` prepared as the training images were: short side resized to
        ``feature_resolution`` (bilinear, antialiased), centre-cropped square (``train.data.resize_crop``).

        Unchanged when they already are that size, or when no scale was recorded (``feature_resolution`` None:
        an adapter saved before it was, or fitted without ``resolution``), as references were always used before.
        """
        check_batch(images, "images")
        side = self.feature_resolution
        if side is None or images.shape[-2:] == (side, side):
            return images
        from ..train.data import resize_crop

        return torch.stack([resize_crop(image, side)[0] for image in images]).to(images.dtype)


def _atomic(path: Path, write) -> None:
    """Write through a temporary file in the same folder, fsynced, then rename: a kill never leaves half a file."""
    atomic_write(path, write, durability="file")


def _resolve(source, revision, subfolder, **hub) -> Path:
    from ..pipelines import local_or_hub_folder

    return local_or_hub_folder(source, "IQA-Adapter", [CONFIG_FILE, WEIGHTS_FILE, QUANTILES_FILE],
                               "pass a folder written by save_pretrained or a hub id owner/name",
                               "or pass a local adapter folder", revision=revision, subfolder=subfolder, **hub)
