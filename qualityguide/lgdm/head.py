"""The LGDM regression head g_phi: hyperfeatures ``[B, steps, F]`` -> quality, trained from a feature cache.

Timesteps are mixed with learned softmax weights per (layer, step) as in Diffusion Hyperfeatures
(Luo et al. 2023), or concatenated; then an MLP with two hidden layers. Trained with L2 on MOS
normalised to [0,1] (Saini et al. 2025, section 3.3), early-stopped on a validation split.
"""

from __future__ import annotations

import copy
import math
import numbers
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from ..errors import InputError, printable
from ..files import atomic_write, write_json
from ..hub import HubModel
from ..scorers.safe_load import check_fields, load_checked_safetensors, read_json_object

MIXINGS = ("softmax", "concat")
HEAD_CONFIG = "config.json"          # the conventional names (huggingface_hub, diffusers, transformers)
HEAD_WEIGHTS = "model.safetensors"
LEGACY_FILES = ("head_config.json", "head.safetensors")  # folders written before the switch still load


@dataclass
class HeadConfig:
    """Shape of the head.

    Args:
        num_steps: hyperfeature steps per image.
        layer_dims: pooled width of each hyperfeature layer (sums to the feature width F).
        mixing: ``"softmax"`` (learned weights over steps, per layer) or ``"concat"`` (all steps side by side).
        hidden: the two hidden widths of the MLP.
        dropout: dropout after each hidden layer (training only).
    """

    num_steps: int
    layer_dims: list[int]
    mixing: Literal["softmax", "concat"] = "softmax"
    hidden: tuple[int, int] = (512, 128)
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if not isinstance(self.mixing, str) or self.mixing not in MIXINGS:
            raise InputError(f"mixing={self.mixing!r} is not allowed; use one of {', '.join(MIXINGS)}")
        if not _whole(self.num_steps):
            raise InputError(f"num_steps={self.num_steps!r}: the head needs a whole number of steps >= 1")
        if not isinstance(self.layer_dims, (list, tuple)) or not self.layer_dims or \
                not all(_whole(d) for d in self.layer_dims):
            raise InputError(f"layer_dims={printable(repr(self.layer_dims))[:120]}: the head needs a non-empty list of "
                             "whole numbers >= 1 (the pooled width of each hyperfeature layer)")
        if not isinstance(self.hidden, (list, tuple)) or len(self.hidden) != 2 or not all(map(_whole, self.hidden)):
            raise InputError(f"hidden={printable(repr(self.hidden))[:120]}: must be two whole numbers >= 1, e.g. "
                             "(512, 128)")
        self.num_steps = int(self.num_steps)
        self.hidden = tuple(int(h) for h in self.hidden)
        self.layer_dims = [int(d) for d in self.layer_dims]
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or \
                not 0.0 <= self.dropout < 1.0:
            raise InputError(f"dropout must be a number in [0, 1), got {self.dropout!r}")

    @property
    def width(self) -> int:
        return sum(self.layer_dims)


def _whole(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def weight_shapes(config: HeadConfig) -> dict[str, tuple[tuple[int, ...], dict]]:
    """Name -> (shape, the config fields that size it) of every tensor a head of ``config`` saves.

    Computed from the config alone, so a config read from a file is checked against its weights file before a
    module of that size is built (``tests/test_untrusted_files.py`` compares it with built heads).
    """
    steps, width, (h1, h2) = config.num_steps, config.width, config.hidden
    both = {"num_steps": steps, "layer_dims": config.layer_dims}
    shapes = {"feature_mean": ((steps, width), both), "feature_std": ((steps, width), both),
              "mos_range": ((2,), {})}
    inputs = width
    if config.mixing == "softmax":
        shapes["mix_logits"] = ((len(config.layer_dims), steps), both)
    else:
        inputs = width * steps
    shapes["mlp.0.bias"] = ((h1,), {"hidden": list(config.hidden)})
    shapes["mlp.0.weight"] = ((h1, inputs), {"hidden": list(config.hidden), **both})
    shapes["mlp.3.bias"] = ((h2,), {"hidden": list(config.hidden)})
    shapes["mlp.3.weight"] = ((h2, h1), {"hidden": list(config.hidden)})
    shapes["mlp.6.bias"] = ((1,), {})
    shapes["mlp.6.weight"] = ((1, h2), {"hidden": list(config.hidden)})
    return shapes


class LGDMHead(nn.Module, HubModel):
    """Standardise features, mix steps, regress. Output: normalised quality (0 = worst, 1 = best training MOS).

    Buffers hold the training set's feature mean/std and MOS range, so a saved head is self-contained.
    ``metadata`` holds what its folder stores besides the head (the LGDM config and backbone of
    :func:`qualityguide.lgdm.head_metadata`); a loaded head has it, and saving writes it back.
    """

    card_kind = "lgdm_head"

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        self.metadata: dict = {}
        steps, width = config.num_steps, config.width
        self.register_buffer("feature_mean", torch.zeros(steps, width))
        self.register_buffer("feature_std", torch.ones(steps, width))
        self.register_buffer("mos_range", torch.tensor([0.0, 1.0]))
        layer_of = torch.repeat_interleave(torch.arange(len(config.layer_dims)), torch.tensor(config.layer_dims))
        self.register_buffer("layer_of_feature", layer_of, persistent=False)
        self.mix_logits = nn.Parameter(torch.zeros(len(config.layer_dims), steps)) if config.mixing == "softmax" \
            else None
        inputs = width if config.mixing == "softmax" else width * steps
        h1, h2 = config.hidden
        self.mlp = nn.Sequential(nn.Linear(inputs, h1), nn.GELU(), nn.Dropout(config.dropout),
                                 nn.Linear(h1, h2), nn.GELU(), nn.Dropout(config.dropout), nn.Linear(h2, 1))

    def step_weights(self) -> torch.Tensor | None:
        """Softmax mixing weights ``[layers, steps]`` (None for concatenation)."""
        return None if self.mix_logits is None else self.mix_logits.softmax(-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, steps, F]`` -> normalised quality ``[B]``."""
        steps, width = self.config.num_steps, self.config.width
        if features.dim() != 3 or features.shape[1:] != (steps, width):
            raise InputError(f"head expects features [B, {steps}, {width}], got {tuple(features.shape)}; the features "
                             "come from another LGDM config or backbone than the one this head was trained on")
        z = (features.float() - self.feature_mean) / self.feature_std
        if self.mix_logits is not None:
            weights = self.mix_logits.softmax(-1)[self.layer_of_feature].t()  # [steps, F]
            z = (z * weights).sum(1)
        else:
            z = z.flatten(1)
        return self.mlp(z).squeeze(-1)

    def to_mos(self, normalised: torch.Tensor) -> torch.Tensor:
        """Normalised prediction -> the training MOS scale."""
        lo, hi = self.mos_range
        return normalised * (hi - lo) + lo

    def save_pretrained(self, directory: str | os.PathLike, extra: dict | None = None, *, config=None,
                        repo_id: str | None = None, push_to_hub: bool = False, model_card_kwargs: dict | None = None,
                        **push_to_hub_kwargs) -> Path:
        """``config.json`` (the head's config under ``"head"``, + metadata), ``model.safetensors`` and the model card.

        Args:
            directory: the folder (created if missing).
            extra: the metadata to store (default: :attr:`metadata`, so a loaded head keeps its own).
            config: refused (the mixin's argument; the head writes its own config.json).
            repo_id, push_to_hub, push_to_hub_kwargs: upload the folder afterwards (``huggingface_hub``'s
                ``push_to_hub``; ``repo_id`` defaults to the folder's name).
            model_card_kwargs: arguments of :func:`qualityguide.hub.cards.write_model_card`.
        """
        directory = Path(directory)
        self._save_pretrained(directory, extra)
        self._finish_save(directory, config, repo_id, push_to_hub, model_card_kwargs, push_to_hub_kwargs)
        return directory

    def card_defaults(self) -> dict:
        settings = {"head": asdict(self.config), **({"lgdm": self.metadata["lgdm"]} if "lgdm" in self.metadata
                                                    else {})}
        return {"base_model": self.metadata.get("backbone_spec"), "settings": settings}

    def _save_pretrained(self, directory: Path, extra: dict | None = None) -> None:
        """The head's files. Each is replaced atomically and fsynced, as adapter weights are: a fitted head is a
        result the user keeps, and a kill while refitting into the same folder leaves the old file or the new one,
        never half."""
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        extra = self.metadata if extra is None else extra
        payload = {"head": asdict(self.config), **extra}
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(directory / HEAD_WEIGHTS, lambda tmp: save_file(state, str(tmp)), durability="file")
        write_json(directory / HEAD_CONFIG, payload, durability="file")
        self.metadata = dict(extra)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None = None, cache_dir=None,
                         force_download: bool = False, local_files_only: bool = False, token=None,
                         subfolder: str | None = None) -> "LGDMHead":
        """Load a head from a folder or hub id; its :attr:`metadata` holds what ``save_pretrained`` stored besides
        the head. Called by ``LGDMHead.from_pretrained(source, revision=, cache_dir=, token=, local_files_only=)``.
        """
        from .scorer import resolve_head_folder

        return cls.load_folder(resolve_head_folder(model_id, revision=revision, cache_dir=cache_dir,
                                                   force_download=force_download, local_files_only=local_files_only,
                                                   token=token, subfolder=subfolder))

    @classmethod
    def load_folder(cls, directory: Path) -> "LGDMHead":
        """Read a local head folder (the layout of today, or the legacy ``head_config.json``/``head.safetensors``)."""
        for config_name, weights_name in ((HEAD_CONFIG, HEAD_WEIGHTS), LEGACY_FILES):
            if (directory / config_name).is_file() and (directory / weights_name).is_file():
                break
        else:
            raise InputError(f"{directory} is not an LGDM head folder (needs {HEAD_CONFIG} and {HEAD_WEIGHTS}); "
                             "write one with `qualityguide lgdm fit ... --out DIR`")
        again = "write the head again with `qualityguide lgdm fit ... --out DIR`"
        payload = read_json_object(directory / config_name, "LGDM head config", again)
        if not isinstance(payload.get("head"), dict):
            raise InputError(f"{directory / config_name} is not an LGDM head config (no \"head\" object); {again}")
        fields_ = payload.pop("head")
        check_fields(fields_, [f.name for f in fields(HeadConfig)], f"LGDM head config {directory / config_name}",
                     again)
        try:
            config = HeadConfig(**fields_)
        except TypeError as exc:  # a required field (num_steps, layer_dims) is absent
            raise InputError(f"LGDM head config {directory / config_name}: {exc}; {again}") from None
        # sizes are checked against the weights file before a module of the config's size is built
        state = load_checked_safetensors(directory / weights_name, weight_shapes(config), "LGDM head weights",
                                         f"use the {config_name} saved with these weights, or {again}")
        head = cls(config)
        head.load_state_dict(state)
        head.eval()
        head.metadata = payload
        return head


@dataclass
class TrainConfig:
    """Head training: AdamW, L2 on normalised MOS, early stopping on validation SRCC.

    Args:
        lr, weight_decay, batch_size: optimiser settings.
        max_epochs: upper bound on epochs.
        patience: stop after this many epochs without a better validation SRCC (ties broken by loss).
        seed: initialisation and batch-order seed.
    """

    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 32
    max_epochs: int = 300
    patience: int = 30
    seed: int = 0


def _srcc(pred: np.ndarray, target: np.ndarray) -> float:
    from ..evaluation.stats import srcc

    value = srcc(pred, target) if len(pred) > 2 else float("nan")
    return value if math.isfinite(value) else -1.0


def fit_head(features: torch.Tensor, mos: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray,
             config: HeadConfig, train: TrainConfig | None = None) -> tuple[LGDMHead, dict]:
    """Train a head on ``features[train_idx]``; the best epoch on ``features[val_idx]`` is kept.

    Args:
        features: ``[N, steps, F]`` hyperfeatures (float32, CPU or GPU).
        mos: ``[N]`` mean opinion scores, higher is better.
        train_idx, val_idx: index arrays (content-disjoint, from :func:`qualityguide.evaluation.stats.content_disjoint_split`).

    Returns:
        ``(head in eval mode, history)`` with per-epoch training loss and validation SRCC.
    """
    train = train or TrainConfig()
    if len(train_idx) < 2:
        raise InputError(f"need at least 2 training images, got {len(train_idx)}")
    mos = np.asarray(mos, dtype=np.float64)
    lo, hi = float(mos[train_idx].min()), float(mos[train_idx].max())
    if hi <= lo:
        raise InputError("all training MOS values are equal; nothing to regress")
    torch.manual_seed(train.seed)
    head = LGDMHead(config).to(features.device)
    x_train = features[torch.as_tensor(train_idx, device=features.device)].float()
    head.feature_mean.copy_(x_train.mean(0))
    head.feature_std.copy_(x_train.std(0, unbiased=False).clamp_min(1e-6))
    head.mos_range.copy_(torch.tensor([lo, hi]))
    y_train = torch.as_tensor((mos[train_idx] - lo) / (hi - lo), dtype=torch.float32, device=features.device)
    x_val = features[torch.as_tensor(val_idx, device=features.device)].float() if len(val_idx) else None
    y_val = mos[val_idx]
    optimiser = torch.optim.AdamW(head.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    generator = torch.Generator().manual_seed(train.seed)
    best = (-math.inf, -math.inf)
    best_state, stale, history = copy.deepcopy(head.state_dict()), 0, []
    for epoch in range(train.max_epochs):
        head.train()
        order = torch.randperm(len(train_idx), generator=generator).to(features.device)
        total = 0.0
        for start in range(0, len(order), train.batch_size):
            batch = order[start:start + train.batch_size]
            loss = torch.nn.functional.mse_loss(head(x_train[batch]), y_train[batch])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += loss.item() * len(batch)
        head.eval()
        if x_val is None:
            history.append({"epoch": epoch, "train_loss": total / len(order)})
            best_state = copy.deepcopy(head.state_dict())
            continue
        with torch.no_grad():
            pred = head(x_val)
        val_loss = float(torch.mean((pred.cpu().double() - torch.as_tensor((y_val - lo) / (hi - lo))) ** 2))
        score = (_srcc(pred.cpu().numpy(), y_val), -val_loss)
        history.append({"epoch": epoch, "train_loss": total / len(order), "val_srcc": score[0], "val_loss": val_loss})
        if score > best:
            best, best_state, stale = score, copy.deepcopy(head.state_dict()), 0
        else:
            stale += 1
            if stale >= train.patience:
                break
    head.load_state_dict(best_state)
    head.eval()
    return head, {"epochs": len(history), "best_val_srcc": best[0] if best[0] > -math.inf else None,
                  "history": history}


def predict(head: LGDMHead, features: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Predicted MOS (training scale) for ``[N, steps, F]`` features."""
    head.eval()
    outs = []
    with torch.no_grad():
        for start in range(0, features.shape[0], batch_size):
            outs.append(head.to_mos(head(features[start:start + batch_size].float())).cpu())
    return torch.cat(outs).double().numpy()
