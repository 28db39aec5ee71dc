"""LoRA adapters on a diffusers U-Net through peft: add, switch off for the base prediction, save, load.

Two U-Net types:

- ``UNet2DConditionModel`` (SD 1.x/2.x, SDXL) carries diffusers' ``PeftAdapterMixin``; its LoRA is saved in
  diffusers' pipeline format (``pytorch_lora_weights.safetensors``, keys ``unet.*``, with the LoRA config as
  metadata so ranks and alphas survive), which ``StableDiffusionPipeline.load_lora_weights(dir)`` and the SDXL
  pipeline's load.
- ``UNet2DModel`` (pixel-space DDPM) has no LoRA loader in diffusers (``DDPMPipeline`` cannot load one), so peft
  injects the adapter directly and it is saved in peft's own format (``adapter_model.safetensors`` +
  ``adapter_config.json``, keys ``base_model.model.*`` as ``PeftModel.save_pretrained`` writes them), which
  :func:`load_lora` and plain ``peft.PeftModel.from_pretrained(unet, dir)`` both read back. Files written before
  the prefix (keys without it) still load with :func:`load_lora`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from ..diffusion import grad_flags_restored
from ..errors import InputError, WeightsNotFoundError, closest
from ..files import atomic_write

# Attention projections: the same names in both U-Net types' Attention modules (diffusers' LoRA training scripts
# use these for UNet2DConditionModel; UNet2DModel's AttnDownBlock2D/AttnUpBlock2D/mid-block name them alike).
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
UNET_TYPES = ("UNet2DConditionModel", "UNet2DModel")
# What PeftModel puts before a module's name in the state dict it saves and loads (the PeftModel wraps a LoraModel
# that wraps the U-Net): with it, PeftModel.from_pretrained(unet, dir) finds every key.
PEFT_KEY_PREFIX = "base_model.model."


def _unet_type(unet: nn.Module) -> str:
    name = type(unet).__name__
    if name not in UNET_TYPES:
        raise InputError(f"unet is a {name}; LoRA helpers support diffusers' {', '.join(UNET_TYPES)} (pass "
                         "pipe.unet; unwrap accelerate/DDP wrappers with accelerator.unwrap_model(unet))")
    return name


def tuner_layers(unet: nn.Module) -> list[nn.Module]:
    """peft's LoRA-carrying layers of ``unet`` (empty if it has no adapter)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


def check_target_modules(unet: nn.Module, target_modules: Sequence[str] | None) -> list[str]:
    """The LoRA target module names (None: ``to_q, to_k, to_v, to_out.0``); every name must match at least one
    module of ``unet`` (peft's rule: the full name or its last dotted parts), else an error with close matches."""
    targets = list(DEFAULT_TARGET_MODULES if target_modules is None else target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise InputError(f"target_modules={targets!r}: give module names, e.g. {','.join(DEFAULT_TARGET_MODULES)}")
    names = [n for n, _ in unet.named_modules()]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in unet.named_modules() if isinstance(m, (nn.Linear,
                                                                                                   nn.Conv2d))})
        guess = closest(unmatched[0], leaves)
        raise InputError(f"target_modules (--lora_target_modules): {unmatched} match no module of this "
                         f"{type(unet).__name__}; use names such as {', '.join(DEFAULT_TARGET_MODULES)} (linear/conv "
                         f"layers here: {', '.join(leaves[:12])}{', ...' if len(leaves) > 12 else ''})"
                         + (f". Did you mean {guess!r}?" if guess else ""))
    return targets


def add_lora(unet: nn.Module, rank: int = 4, alpha: float | None = None,
             target_modules: list[str] | tuple[str, ...] | None = None, init_lora_weights: bool | str = True,
             adapter_name: str = "default"):
    """Freeze ``unet`` and add a trainable LoRA adapter to it (in place).

    Args:
        unet: a diffusers ``UNet2DConditionModel`` or ``UNet2DModel``.
        rank: LoRA rank ``r``.
        alpha: LoRA alpha (the update is scaled by ``alpha / rank``); None: ``rank`` (scale 1).
        target_modules: module names to adapt (peft's matching); None: the attention projections
            ``to_q, to_k, to_v, to_out.0``.
        init_lora_weights: peft's initialisation; True (default) sets ``B = 0`` so the adapted U-Net starts equal to
            the base; False makes both factors random (tests and debugging only).
        adapter_name: peft's adapter name.

    Returns:
        The ``peft.LoraConfig`` used.
    """
    from peft import LoraConfig, inject_adapter_in_model

    kind = _unet_type(unet)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InputError(f"rank={rank!r}: must be a whole number >= 1, e.g. rank=4")
    alpha = rank if alpha is None else alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise InputError(f"alpha={alpha!r}: must be a positive number (the update is scaled by alpha / rank), e.g. "
                         f"alpha={rank}")
    targets = check_target_modules(unet, target_modules)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=init_lora_weights)
    unet.requires_grad_(False)
    if hasattr(unet, "add_adapter"):  # diffusers' PeftAdapterMixin (UNet2DConditionModel)
        unet.add_adapter(config, adapter_name=adapter_name)
    else:
        if adapter_name in getattr(unet, "peft_config", {}):
            raise InputError(f"adapter_name={adapter_name!r} already exists on this {kind}; pick another name")
        inject_adapter_in_model(config, unet, adapter_name)
    return config


def lora_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """The LoRA parameters of ``unet`` (what the optimiser trains), in a stable order."""
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    if not params:
        raise InputError("unet has no LoRA parameters; add an adapter first with "
                         "qualityguide.finetune.add_lora(unet, rank=4)")
    return params


@contextmanager
def adapters_disabled(unet: nn.Module) -> Iterator[None]:
    """Run ``unet`` as its base model: every LoRA layer switched off, then restored even if the body raises.

    peft's switch also flips the adapters' ``requires_grad`` (and back on to True); the flags each LoRA parameter
    had before are restored, so a user's frozen adapter stays frozen.
    """
    layers = tuner_layers(unet)
    if not layers:
        raise InputError("unet has no LoRA adapter, so there is no base model to compare with; add one with "
                         "qualityguide.finetune.add_lora(unet, rank=4)")
    was_disabled = [layer.disable_adapters for layer in layers]
    with grad_flags_restored(p for layer in layers for p in layer.parameters()):
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer, disabled in zip(layers, was_disabled):
                layer.enable_adapters(not disabled)


def _peft_config(unet: nn.Module, adapter_name: str):
    configs = getattr(unet, "peft_config", None) or {}
    if adapter_name not in configs:
        raise InputError(f"unet has no LoRA adapter named {adapter_name!r} (has: {sorted(configs) or 'none'}); add "
                         "one with qualityguide.finetune.add_lora(unet) or pass adapter_name")
    return configs[adapter_name]


def save_lora(unet: nn.Module, output_dir: str | Path, adapter_name: str = "default") -> Path:
    """Write the LoRA adapter of ``unet`` to ``output_dir`` and return the weights file.

    ``UNet2DConditionModel``: diffusers' ``pytorch_lora_weights.safetensors`` (loaded by
    ``pipe.load_lora_weights(output_dir)`` for SD and SDXL pipelines alike). ``UNet2DModel``: peft's
    ``adapter_model.safetensors`` + ``adapter_config.json`` with PeftModel's key names (loaded by :func:`load_lora`
    or ``peft.PeftModel.from_pretrained(unet, output_dir)``, with the same output).

    Args:
        unet: the adapted U-Net (unwrapped from accelerate/DDP).
        output_dir: a folder (created if missing).
        adapter_name: which adapter to save.
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    kind = _unet_type(unet)
    config = _peft_config(unet, adapter_name)
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"output_dir={str(output_dir)!r} is a file; pass a folder")
    output_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(unet, adapter_name=adapter_name).items()}
    if kind == "UNet2DConditionModel":
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers

        # Both SD and SDXL pipelines pack U-Net layers under "unet."; the config travels as metadata because without
        # it diffusers infers alpha = rank on loading.
        StableDiffusionPipeline.save_lora_weights(output_dir, unet_lora_layers=convert_state_dict_to_diffusers(state),
                                                  unet_lora_adapter_metadata=config.to_dict(),
                                                  weight_name=DIFFUSERS_WEIGHT_NAME, safe_serialization=True)
        return output_dir / DIFFUSERS_WEIGHT_NAME
    config.save_pretrained(str(output_dir))
    state = {PEFT_KEY_PREFIX + k: v for k, v in state.items()}
    atomic_write(output_dir / PEFT_WEIGHT_NAME, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}),
                 durability="file")
    return output_dir / PEFT_WEIGHT_NAME


def load_lora(unet: nn.Module, directory: str | Path, adapter_name: str = "default", trainable: bool = False) -> None:
    """Load a LoRA written by :func:`save_lora` into ``unet`` (in place; its own weights are untouched).

    Reads diffusers' ``pytorch_lora_weights.safetensors`` into a ``UNet2DConditionModel`` (for a whole pipeline,
    ``pipe.load_lora_weights(directory)`` does the same) and peft's ``adapter_model.safetensors`` into a
    ``UNet2DModel``. Weights are read with safetensors only (nothing is unpickled).

    Args:
        unet: a U-Net of the architecture the LoRA was trained on.
        directory: the folder :func:`save_lora` wrote.
        adapter_name: the name the loaded adapter gets.
        trainable: leave the loaded LoRA weights trainable (``requires_grad``); the default freezes them, as
            ``PeftModel.from_pretrained`` does (``is_trainable=False``): a loaded LoRA is for inference, and the
            CPU matmul kernels torch picks differ in their last bit between weights that require grad and weights
            that do not, so only equal flags give output bit-identical to plain peft's.
    """
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    kind = _unet_type(unet)
    directory = Path(directory)
    if kind == "UNet2DConditionModel":
        path = directory / DIFFUSERS_WEIGHT_NAME
        if not path.is_file():
            raise WeightsNotFoundError(f"{path} not found; pass the folder qualityguide.finetune.save_lora wrote "
                                       "(for a UNet2DConditionModel it holds pytorch_lora_weights.safetensors)")
        unet.load_lora_adapter(str(directory), weight_name=DIFFUSERS_WEIGHT_NAME, prefix="unet",
                               adapter_name=adapter_name, use_safetensors=True)
        _set_trainable(unet, adapter_name, trainable)
        return
    path, config_path = directory / PEFT_WEIGHT_NAME, directory / PEFT_CONFIG_NAME
    for needed in (path, config_path):
        if not needed.is_file():
            raise WeightsNotFoundError(f"{needed} not found; pass the folder qualityguide.finetune.save_lora wrote "
                                       f"(for a UNet2DModel it holds {PEFT_WEIGHT_NAME} and {PEFT_CONFIG_NAME})")
    config = LoraConfig.from_pretrained(str(directory))
    inject_adapter_in_model(config, unet, adapter_name)
    state = load_file(str(path))
    # PeftModel's names (this version's files) or the bare module names (files written before them)
    state = {k[len(PEFT_KEY_PREFIX):] if k.startswith(PEFT_KEY_PREFIX) else k: v for k, v in state.items()}
    result = set_peft_model_state_dict(unet, state, adapter_name=adapter_name)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise InputError(f"{path} does not fit this {kind}: missing {missing[:3]}, unexpected "
                         f"{list(result.unexpected_keys)[:3]}; load it into the architecture it was trained on")
    _set_trainable(unet, adapter_name, trainable)


def _set_trainable(unet: nn.Module, adapter_name: str, trainable: bool) -> None:
    """Set ``requires_grad`` of the LoRA weights of ``adapter_name`` (peft names them ``...lora_A.<name>.weight``)."""
    for name, param in unet.named_parameters():
        if "lora_" in name and f".{adapter_name}." in name:
            param.requires_grad_(trainable)
