"""The pieces an ACPO LoRA training run is built from (``recipes/train_acpo_lora.py``), each unit-tested.

- :func:`prepare_lora_unet`: freeze the U-Net, add a LoRA (seeded), keep its weights in float32, optionally turn on
  gradient checkpointing.
- :class:`TrainingSamples`: the clean samples ``z0`` and captions a step draws from (an image folder or self
  samples), encoded once, and the U-Net conditioning of a batch (captions dropped by :func:`caption_dropout`).
- :class:`LoraCheckpointing`: accelerate ``save_state`` / ``load_state`` hooks so checkpoints hold the LoRA weights
  (and the optimizer), never the whole U-Net, plus the identity a resumed run must match.
- :func:`make_optimizer`, :func:`check_scorer`: refuse settings that cannot work before anything expensive runs
  (the tracker and precision checks are :mod:`qualityguide.train.setup`'s).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..diffusion import pipeline_upcasts_vae, to_vae_range, unet_conditioning, unwrap
from ..errors import InputError
from ..files import json_sha256
from ..identity import WeightIdentity
from .config import ACPOConfig
from .lora import add_lora, lora_parameters
from .loss import check_quality_scorer

LORA_STATE_NAME = "lora_state.safetensors"
BASE_IDENTITY_NAME = "base_unet_identity.safetensors"


# ----------------------------------------------------------------------------------------------- checks
def check_scorer(scorer: nn.Module | None, config: ACPOConfig, resolution: int | None = None) -> None:
    """Refuse a missing or non-differentiable scorer when ``config.w_quality > 0``, and one whose smallest accepted
    image side exceeds ``resolution`` (before any data is made)."""
    min_side = getattr(scorer, "min_side", 1)
    if scorer is not None and resolution is not None and resolution < min_side:
        name = getattr(scorer, "name", type(scorer).__name__)
        raise InputError(f"scorer {name!r} needs images of at least {min_side} px, the training images are "
                         f"{resolution} px; score them resized with SPEC@SIZE: --scorer {name}@{min_side}, or train at "
                         f"--resolution {min_side} or more")
    check_quality_scorer(scorer, config)


def make_optimizer(params: Sequence[nn.Parameter], learning_rate: float, weight_decay: float = 1e-2,
                   use_8bit_adam: bool = False, device: torch.device | str = "cpu") -> torch.optim.Optimizer:
    """AdamW over ``params``; with ``use_8bit_adam`` bitsandbytes' ``AdamW8bit`` (CUDA only).

    Raises:
        InputError: a bad learning rate or weight decay; 8-bit Adam without bitsandbytes or off CUDA.
    """
    if not isinstance(learning_rate, (int, float)) or not math.isfinite(learning_rate) or learning_rate <= 0:
        raise InputError(f"--learning_rate {learning_rate!r}: must be a positive number, e.g. 1e-4")
    if not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise InputError(f"--adam_weight_decay {weight_decay!r}: must be a number >= 0, e.g. 1e-2")
    params = list(params)
    if not use_8bit_adam:
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    if torch.device(device).type != "cuda":
        raise InputError(f"--use_8bit_adam needs a CUDA device (bitsandbytes' 8-bit optimizers), this run is on "
                         f"{torch.device(device)}; drop --use_8bit_adam")
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken CUDA setup raised at import
        raise InputError(f"--use_8bit_adam needs bitsandbytes, which cannot be imported ({type(exc).__name__}: "
                         f"{exc}); pip install bitsandbytes, or drop --use_8bit_adam") from None
    return bnb.optim.AdamW8bit(params, lr=learning_rate, weight_decay=weight_decay)


# ----------------------------------------------------------------------------------------------- LoRA
def prepare_lora_unet(unet: nn.Module, rank: int = 4, alpha: float | None = None,
                      target_modules: Sequence[str] | None = None, gradient_checkpointing: bool = False,
                      seed: int = 0):
    """Freeze ``unet``, add a trainable LoRA (B = 0, so it starts as the base model), upcast the LoRA weights to
    float32 (frozen weights may be fp16/bf16) and optionally enable gradient checkpointing; in place.

    The LoRA's random ``A`` factors are drawn after ``torch.manual_seed(seed)`` inside a forked CPU RNG, so every
    process and every rerun starts from the same weights and the caller's CPU RNG is untouched.

    Args:
        unet: a ``UNet2DConditionModel`` or ``UNet2DModel``.
        rank, alpha: LoRA rank and alpha (None: ``rank``).
        target_modules: module names to adapt; every name must match at least one module (None: the attention
            projections ``to_q, to_k, to_v, to_out.0``).
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% more time).
        seed: seed of the LoRA initialisation.

    Returns:
        The ``peft.LoraConfig`` used.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = add_lora(unet, rank=rank, alpha=alpha, target_modules=target_modules)
    for param in lora_parameters(unet):
        param.data = param.data.float()
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return config


def lora_identity(config) -> dict:
    """The parts of a ``peft.LoraConfig`` a resumed run must share."""
    targets = config.target_modules
    return {"rank": int(config.r), "alpha": float(config.lora_alpha),
            "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else str(targets)}


class LoraCheckpointing:
    """accelerate hooks that put only the LoRA weights of ``unet`` in ``save_state`` checkpoints and read them back.

    ``accelerator.save_state`` would write the whole prepared U-Net (gigabytes, mostly frozen); the save hook takes
    the U-Net's entry out and writes ``lora_state.safetensors`` (peft's adapter state dict) plus the frozen base
    U-Net's :class:`~qualityguide.identity.WeightIdentity`; the load hook fills the adapter from that file (read with
    safetensors only). Optimizer, scaler and RNG states stay with accelerate.

    Args:
        unet: the adapted U-Net (unwrapped).
        base_identity: ``WeightIdentity.of({"unet": unet})`` taken *before* the adapter was added.
        adapter_name: the adapter to save and load.
    """

    def __init__(self, unet: nn.Module, base_identity: WeightIdentity, adapter_name: str = "default"):
        self.unet, self.base_identity, self.adapter_name = unet, base_identity, adapter_name

    def register(self, accelerator) -> None:
        """Register the hooks (once, before ``accelerator.prepare`` or after; before any save or load)."""
        accelerator.register_save_state_pre_hook(self._save_hook(accelerator))
        accelerator.register_load_state_pre_hook(self.load_hook)

    def _mine(self, models: list) -> int | None:
        for i, model in enumerate(models):
            if unwrap(model) is self.unet:
                return i
        return None

    def _save_hook(self, accelerator):
        def hook(models: list, weights: list, output_dir: str) -> None:
            i = self._mine(models)
            if i is None:
                return
            if weights:
                weights.pop(i)  # accelerate then saves no model file for the U-Net
            # ``models`` keeps its entry: accelerate numbers model files by position in the weights list
            writer = accelerator.is_local_main_process if accelerator.project_configuration.save_on_each_node \
                else accelerator.is_main_process
            if writer:
                self.save(output_dir)
        return hook

    def load_hook(self, models: list, input_dir: str) -> None:
        """accelerate's load pre-hook: fill the adapter from ``input_dir`` and take the U-Net off accelerate's list."""
        i = self._mine(models)
        if i is None:
            return
        models.pop(i)
        self.load(input_dir)

    def save(self, directory: str | os.PathLike) -> None:
        """Write the adapter state and the base identity into ``directory``."""
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        state = get_peft_model_state_dict(self.unet, adapter_name=self.adapter_name)
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(Path(directory) / LORA_STATE_NAME),
                  metadata={"format": "pt"})
        self.base_identity.save(Path(directory) / BASE_IDENTITY_NAME)

    def load(self, directory: str | os.PathLike) -> None:
        """Fill the adapter from ``directory/lora_state.safetensors``; every LoRA weight must be there."""
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = Path(directory) / LORA_STATE_NAME
        if not path.is_file():
            raise InputError(f"{path} not found: {directory} is not an ACPO LoRA checkpoint (it holds no LoRA "
                             "state); resume from a checkpoint this recipe wrote, or use a new --output_dir")
        state = load_file(str(path))
        result = set_peft_model_state_dict(self.unet, state, adapter_name=self.adapter_name)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing or result.unexpected_keys:
            raise InputError(f"{path} does not fit this LoRA (missing {missing[:3]}, unexpected "
                             f"{list(result.unexpected_keys)[:3]}); resume with the --rank/--lora_target_modules it "
                             "was saved with, or use a new --output_dir")

    @staticmethod
    def check_base(directory: str | os.PathLike, unet: nn.Module) -> None:
        """Refuse to resume from ``directory`` if ``unet`` (before its adapter is added) holds other base weights."""
        path = Path(directory) / BASE_IDENTITY_NAME
        if not path.is_file():
            raise InputError(f"{path} not found: {directory} is not an ACPO LoRA checkpoint; resume from one this "
                             "recipe wrote, or use a new --output_dir")
        WeightIdentity.load(path).check({"unet": unet}, what=f"checkpoint {directory} was trained on another base "
                                        "U-Net", fix="resume with the --model it was trained from, or use a new "
                                        "--output_dir")


# ----------------------------------------------------------------------------------------------- data

def dataset_identity(dataset, source: str, settings: dict | None = None) -> dict:
    """Identity of an :class:`~qualityguide.train.data.ImageFolderDataset` for the resume check: where it came from,
    its size and resolution, a SHA-256 over its files (names and byte sizes) and captions, and one over the
    ``settings`` that made it (self samples: :meth:`SelfSampleSettings.to_dict`), if any."""
    identity = {"source": source, "count": len(dataset), "resolution": dataset.resolution,
                "files_sha256": json_sha256([dataset.files, dataset.sizes, dataset.captions])}
    if settings is not None:
        identity["settings_sha256"] = json_sha256(settings)
    augment = dataset.augment_identity()
    return {**identity, **augment} if augment["augment"] is not None else identity  # older identities stay valid


def caption_dropout(batch: int, probability: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Which samples of a batch of ``batch`` train on the unconditional input (bool ``[batch]``, CPU): each on its own
    with ``probability``, from one uniform draw per sample of ``generator`` (the step's, so resume repeats it).

    Without it the unconditional branch that classifier-free guidance uses is never trained nor anchored, and its
    drift is multiplied by the guidance scale at inference (diffusers' recipes drop 5-10% of captions likewise).

    Raises:
        InputError: ``probability`` outside [0, 1].
    """
    if isinstance(probability, bool) or not isinstance(probability, (int, float)) or not 0 <= probability <= 1:
        raise InputError(f"--caption_dropout {probability!r}: must be a share in [0, 1], e.g. 0.1 (0: never drop)")
    return torch.rand(batch, generator=generator) < probability


class TrainingSamples:
    """Clean model-space samples ``z0`` (CPU float32 ``[N*V,C,h,w]``, ``V`` augmentation variants per sample) and
    their captions, in dataset order.

    Build with :meth:`encode`. ``captions`` is None for an unconditional (pixel-space) model.

    Args:
        clean: the samples: scaled VAE latents, or pixels in [-1,1] for a ``UNet2DModel``; sample ``i``'s variant
            ``v`` at row ``i * variants + v``.
        captions: one caption per sample, or None.
        identity: what a resumed run must match (:func:`dataset_identity`).
        variants: augmentation variants per sample (:attr:`ImageFolderDataset.variants`).
        micro: SDXL's micro-conditioning: ``original_size`` long ``[N,2]`` and ``crop_top_left`` long ``[N,V,2]``
            (None: whole squares of the training resolution).
    """

    def __init__(self, clean: torch.Tensor, captions: list[str] | None, identity: dict, variants: int = 1,
                 micro: dict[str, torch.Tensor] | None = None):
        if len(clean) % variants:
            raise InputError(f"{len(clean)} rows are not {variants} variants per sample")
        if captions is not None and len(captions) != len(clean) // variants:
            raise InputError(f"{len(captions)} captions for {len(clean) // variants} samples; give one caption per "
                             "sample")
        self.clean, self.captions, self.identity, self.variants, self.micro = clean, captions, identity, variants, micro

    def __len__(self) -> int:
        return len(self.clean) // self.variants

    @classmethod
    def encode(cls, pipe, dataset, cache_dir: str | os.PathLike, source: str, settings: dict | None = None,
               progress: bool = True) -> TrainingSamples:
        """Encode ``dataset`` for ``pipe``'s U-Net: latents through the VAE, cached in ``cache_dir`` (see
        :func:`qualityguide.train.cache_latents`; with several processes call it on the main process first), or,
        for a pixel-space ``UNet2DModel``, the images mapped to [-1,1] (kept in memory).

        Args:
            pipe: the pipeline (its VAE, if any, frozen).
            dataset: an :class:`~qualityguide.train.data.ImageFolderDataset`; each of its augmentation variants is
                encoded (see :mod:`qualityguide.train.latents` for the cost).
            cache_dir: the latent cache folder.
            source: ``"image_dir"`` or ``"self_samples"`` (recorded in the identity).
            settings: what made the images (self samples: ``SelfSampleSettings.to_dict()``), hashed into the identity.
            progress: show tqdm bars.
        """
        from tqdm.auto import tqdm

        from ..train.latents import cache_latents

        conditional = type(pipe.unet).__name__ == "UNet2DConditionModel"
        if getattr(pipe, "vae", None) is not None:
            clean = cache_latents(dataset, pipe.vae, cache_dir, upcast=pipeline_upcasts_vae(pipe),
                                  progress=progress).mean
        else:
            clean = torch.stack([to_vae_range(dataset.get(i, variant=v)["pixels"])
                                 for i in tqdm(range(len(dataset)), desc="loading images", disable=not progress)
                                 for v in range(dataset.variants)])
        captions = (dataset.captions or [""] * len(dataset)) if conditional else None
        micro = {"original_size": torch.tensor(dataset.original_sizes, dtype=torch.long).view(-1, 2),
                 "crop_top_left": torch.tensor([[w[:2] for w in dataset.windows(i)] for i in range(len(dataset))],
                                               dtype=torch.long).view(len(dataset), dataset.variants, 2)}
        return cls(clean.float(), list(captions) if captions is not None else None,
                   dataset_identity(dataset, source, settings), dataset.variants, micro)

    def _rows(self, indices: Sequence[int], variants: Sequence[int] | torch.Tensor | None) -> torch.Tensor:
        index = torch.as_tensor(list(indices), dtype=torch.long)
        variant = torch.zeros_like(index) if variants is None else torch.as_tensor(variants, dtype=torch.long)
        return index * self.variants + variant

    def batch(self, indices: Sequence[int], device: torch.device | str, dtype: torch.dtype | None = None,
              variants: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """The clean samples of ``indices`` on ``device`` (in ``dtype``, default float32), as augmentation variants
        ``variants`` (:meth:`ImageFolderDataset.draw_variants`; None: variant 0)."""
        return self.clean[self._rows(indices, variants)].to(device, dtype or torch.float32)

    def conditioning(self, indices: Sequence[int], encoder, device: torch.device | str,
                     variants: Sequence[int] | torch.Tensor | None = None,
                     drop: torch.Tensor | None = None) -> dict | None:
        """The U-Net conditioning of ``indices`` for :class:`~qualityguide.finetune.ACPOLoss`: SD
        ``{"encoder_hidden_states"}``, SDXL also ``"added_cond_kwargs"`` (micro-conditioning from each image's size
        and the crop of its variant), None for an unconditional model.

        Args:
            indices: sample indices.
            encoder: a :class:`qualityguide.train.PromptEncoder` for the pipeline (ignored when unconditional).
            device: where the embeddings go.
            variants: the variant of each index, as passed to :meth:`batch`.
            drop: bool ``[len(indices)]`` (:func:`caption_dropout`): these rows get the pipeline's unconditional
                input instead of their caption's (the empty prompt's embedding; zeros for an SDXL pipeline that
                forces them), the input classifier-free guidance pairs with the prompt at inference.
        """
        if self.captions is None:
            return None
        micro = {}
        if self.micro is not None:
            index = torch.as_tensor(list(indices), dtype=torch.long)
            variant = torch.zeros_like(index) if variants is None else torch.as_tensor(variants, dtype=torch.long)
            micro = {"original_size": self.micro["original_size"][index],
                     "crop_top_left": self.micro["crop_top_left"][index, variant]}
        embeds, extra = encoder([self.captions[i] for i in indices], device, drop=drop, **micro)
        return unet_conditioning(embeds, extra)
