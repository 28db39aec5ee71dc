"""Quality-guided sampling as a diffusers ``PipelineCallback`` (docs/design.md section 5).

Diffusers calls ``callback_on_step_end`` after ``scheduler.step``, under ``no_grad``, without the
noise prediction. So a forward hook records the U-Net's input, timestep and output; the callback
combines the CFG halves with the pipeline's guidance scale, rebuilds the clean estimate, takes
:func:`x0_step` on ``score(decode(x0))`` and moves the new latents by the change times the signal
coefficient of the next noise level. No second U-Net call unless ``mode="unet"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers.callbacks import PipelineCallback

from ..errors import InputError
from ..diffusion.families import StepLevels, restarts_from_saved_sample, scheduler_family, step_levels
from ..diffusion.vae import decode_latents, from_vae_range, pipeline_upcasts_vae
from ..diffusion.x0 import NORMALIZE, frozen, per_sample_norm, x0_step

MODES = ("x0", "unet")


@dataclass
class UNetCall:
    """One U-Net call as the forward hook saw it, with the CFG settings in force for it (a callback such as
    ``SDCFGCutoffCallback`` may change them before this one runs)."""

    sample: torch.Tensor
    timestep: Any
    output: torch.Tensor
    args: tuple
    kwargs: dict
    guidance_scale: float
    guidance_rescale: float


class QualityGuidance(PipelineCallback):
    """Push a Stable Diffusion family pipeline towards higher scores of a differentiable scorer.

    Args:
        scorer: a :class:`~qualityguide.QualityScorer` (must be differentiable) or any callable
            ``images [B,3,H,W] in [0,1] -> [B]`` (higher is better).
        scale: step size of each guided update (0 disables guidance: bit-identical output).
        start, end: guided steps are those with ``start <= step / num_steps < end``.
        every: guide every k-th step inside the window.
        normalize: gradient normalisation of :func:`x0_step` (``"rms"``: each latent element moves
            about ``scale``; ``"unit"``; ``"none"``: raw gradient times ``scale``).
        max_norm: cap on each sample's clean-latent change (None: no cap).
        mode: ``"x0"`` (gradient at the clean estimate, no U-Net backward) or ``"unet"`` (backpropagate
            through the U-Net to the noisy latents, universal-guidance style; one more U-Net forward and
            backward per step, for comparison).

    Usage::

        guidance = QualityGuidance(scorer, scale=0.05).attach(pipe)
        image = pipe(prompt, callback_on_step_end=guidance).images[0]
        guidance.detach()          # or: with QualityGuidance(...).attach(pipe) as g: ...
    """

    tensor_inputs = ["latents"]

    def __init__(self, scorer: Callable[[torch.Tensor], torch.Tensor] | None = None, scale: float = 0.05,
                 start: float = 0.0, end: float = 1.0, every: int = 1, normalize: str = "rms",
                 max_norm: float | None = None, mode: str = "x0"):
        if scorer is None or not callable(scorer):
            raise InputError(f"scorer must be a QualityScorer or a callable images -> [B] scores, got {scorer!r}")
        if getattr(scorer, "differentiable", True) is False:
            raise InputError(f"scorer {getattr(scorer, 'name', scorer)!r} is not differentiable, so it cannot guide "
                             "sampling; use one with differentiable=True (niqe, brisque, most pyiqa:<name>, lgdm:<dir>)")
        if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
            raise InputError(f"scale must be a finite number, got {scale!r}")
        if not 0.0 <= start < end <= 1.0:
            raise InputError(f"need 0 <= start < end <= 1 (fractions of the sampling steps), got start={start}, "
                             f"end={end}")
        if not isinstance(every, int) or every < 1:
            raise InputError(f"every must be a positive integer, got {every!r}")
        if normalize not in NORMALIZE:
            raise InputError(f"normalize={normalize!r} is not allowed; use one of {', '.join(NORMALIZE)}")
        if mode not in MODES:
            raise InputError(f"mode={mode!r} is not allowed; use one of {', '.join(MODES)}")
        if max_norm is not None and not max_norm > 0:
            raise InputError(f"max_norm must be positive or None, got {max_norm!r}")
        self.register_to_config(scorer=str(getattr(scorer, "name", type(scorer).__name__)), scale=float(scale),
                                start=float(start), end=float(end), every=every, normalize=normalize,
                                max_norm=max_norm, mode=mode)
        self.scorer = scorer
        self.pipe = None
        self.upcast_vae = False
        self._handle = None
        self._call: UNetCall | None = None
        self._recording = True
        self._last_step: int | None = None
        self.history: list[dict] = []  # the current (or last) pipeline call's steps only

    # ------------------------------------------------------------------ wiring
    def attach(self, pipe) -> "QualityGuidance":
        """Install the U-Net forward hook on ``pipe`` (returns self, so it chains into ``callback_on_step_end=``).

        Raises:
            InputError: for a pipeline without U-Net/VAE/scheduler, or a scheduler whose clean estimate the callback
                cannot rebuild exactly (flow matching, clipped estimates, unknown classes; see
                :func:`qualityguide.diffusion.families.scheduler_family`).
        """
        if self._handle is not None:
            raise InputError("this QualityGuidance is already attached; detach() it first")
        for name in ("unet", "vae", "scheduler"):
            if getattr(pipe, name, None) is None:
                raise InputError(f"pipeline {type(pipe).__name__} has no {name}; QualityGuidance needs a latent "
                                 "diffusion pipeline (StableDiffusion, StableDiffusionXL, img2img)")
        scheduler_family(pipe.scheduler)
        self.pipe = pipe
        self.upcast_vae = pipeline_upcasts_vae(pipe)
        self._handle = pipe.unet.register_forward_hook(self._record, with_kwargs=True)
        return self

    def detach(self) -> None:
        """Remove every hook this callback installed; the pipeline is as it was."""
        if self._handle is not None:
            self._handle.remove()
        self._handle, self._call, self.pipe = None, None, None

    def __enter__(self) -> "QualityGuidance":
        if self._handle is None:
            raise InputError("use `with QualityGuidance(...).attach(pipe) as guidance:`")
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def _record(self, module, args, kwargs, output) -> None:
        if not self._recording:
            return
        sample = args[0] if args else kwargs.get("sample")
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        out = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        pipe = self.pipe
        self._call = UNetCall(sample, timestep, out, args, kwargs,
                              guidance_scale=float(getattr(pipe, "guidance_scale", 1.0) or 1.0),
                              guidance_rescale=float(getattr(pipe, "guidance_rescale", 0.0) or 0.0))

    # ------------------------------------------------------------------ step selection
    def is_guided_step(self, step_index: int, num_steps: int) -> bool:
        cfg = self.config
        position = step_index / max(num_steps, 1)
        if not (cfg.start <= position < cfg.end):
            return False
        first = math.ceil(cfg.start * num_steps - 1e-9)
        return (step_index - first) % cfg.every == 0

    # ------------------------------------------------------------------ the callback
    def callback_fn(self, pipeline, step_index: int, timestep, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        if self.config.scale == 0:
            return callback_kwargs
        if self._handle is None or self.pipe is not pipeline:
            raise InputError("QualityGuidance is not attached to this pipeline; pass "
                             "callback_on_step_end=QualityGuidance(...).attach(pipe)")
        if self._last_step is not None and step_index <= self._last_step:
            self.history = []  # a new pipeline call: keep one run's entries
        self._last_step = step_index
        call, self._call = self._call, None
        num_steps = int(getattr(pipeline, "num_timesteps", 0) or len(pipeline.scheduler.timesteps))
        if call is None or not self.is_guided_step(step_index, num_steps):
            return callback_kwargs
        latents = callback_kwargs["latents"]
        scheduler = pipeline.scheduler
        if restarts_from_saved_sample(scheduler):
            # a change made now would be dropped (or reversed) by the next step: guide at the next step instead
            self.history.append({"step": step_index, "timestep": _scalar(call.timestep), "deferred": True})
            return callback_kwargs
        levels = step_levels(scheduler, _scalar(call.timestep), step_index, num_steps)
        batch = latents.shape[0]
        self._recording = False
        modules = [pipeline.unet, pipeline.vae] + ([self.scorer] if isinstance(self.scorer, torch.nn.Module) else [])
        try:
            with frozen(*modules):
                if self.config.mode == "x0":
                    step = x0_step(self.clean_estimate(call, levels, batch), self._objective, self.config.scale,
                                   normalize=self.config.normalize, max_norm=self.config.max_norm)
                    delta = step.delta * levels.coefficient
                else:
                    step = self._unet_step(pipeline, call, batch, levels)
                    # the step moved the U-Net's input, whose clean part is x0 times levels.signal; as a clean-latent
                    # change that is delta / signal, which reaches the next level times its signal coefficient
                    delta = step.delta * (levels.coefficient / levels.signal)
        finally:
            self._recording = True
        self.history.append({"step": step_index, "timestep": _scalar(call.timestep),
                             "score": step.objective.cpu(), "delta_norm": per_sample_norm(delta).flatten().cpu(),
                             "skipped": step.skipped.cpu(), "alpha_bar": levels.alpha_bar, "sigma": levels.sigma,
                             "coefficient": levels.coefficient, "deferred": False})
        if bool(step.skipped.all()):
            return callback_kwargs
        if getattr(scheduler, "last_sample", None) is not None and hasattr(scheduler, "disable_corrector"):
            # UniPC's corrector rebuilds the current sample from the one before this step and would discard
            # the change; skip the corrector once (predictor-only update) so the guidance survives.
            scheduler.last_sample = None
        callback_kwargs["latents"] = latents + delta.to(latents.dtype)
        return callback_kwargs

    def clean_estimate(self, call: UNetCall, levels: StepLevels, batch: int) -> torch.Tensor:
        """The clean latents the scheduler itself estimated from ``call`` (its ``pred_original_sample``), float32.

        Args:
            call: the recorded U-Net call (both CFG halves when CFG is on).
            levels: the step's noise levels (:func:`qualityguide.diffusion.families.step_levels`).
            batch: the latents' batch size (a U-Net batch of twice that means CFG).
        """
        model_input, output = self._combine_cfg(call, batch)
        return levels.clean_estimate(output.float(), model_input.float())

    @staticmethod
    def _combine_cfg(call: UNetCall, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The guided noise prediction and the latents it was made from; CFG is recognised by the U-Net batch
        being twice the latents' batch (unconditional half first, as diffusers orders it)."""
        sample, output = call.sample, call.output
        if sample.shape[0] == 2 * batch:
            uncond, text = output.chunk(2)
            output = uncond + call.guidance_scale * (text - uncond)
            if call.guidance_rescale > 0:
                from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

                output = rescale_noise_cfg(output, text, guidance_rescale=call.guidance_rescale)
            sample = sample.chunk(2)[1]
        elif sample.shape[0] != batch:
            raise InputError(f"the U-Net ran on {sample.shape[0]} samples for {batch} latents; QualityGuidance "
                             "supports pipelines that call the U-Net once per step on the latents (or both CFG halves)")
        return sample, output

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Clean latents -> images in [0,1] through the pipeline's VAE, float32; an fp16 VAE runs in float32 where the
        pipeline itself would upcast it (SDXL family with ``force_upcast``)."""
        return from_vae_range(decode_latents(self.pipe.vae, latents, upcast=self.upcast_vae))

    def _objective(self, x0: torch.Tensor) -> torch.Tensor:
        scores = self.scorer(self.decode(x0))
        if scores.dim() != 1 or scores.shape[0] != x0.shape[0]:
            raise InputError(f"scorer returned shape {tuple(scores.shape)} for {x0.shape[0]} images; a scorer must "
                             "return one score per image ([B])")
        return scores.float()

    def _unet_step(self, pipeline, call: UNetCall, batch: int, levels: StepLevels):
        """Universal-guidance style: gradient of the score w.r.t. the U-Net's input through the U-Net."""
        args, kwargs = list(call.args), dict(call.kwargs)
        cfg = call.sample.shape[0] == 2 * batch
        sample = call.sample.chunk(2)[1] if cfg else call.sample

        def objective(x_t: torch.Tensor) -> torch.Tensor:
            full = torch.cat([x_t, x_t]) if cfg else x_t
            if args:
                args[0] = full.to(call.sample.dtype)
            else:
                kwargs["sample"] = full.to(call.sample.dtype)
            out = pipeline.unet(*args, **kwargs)
            out = out[0] if isinstance(out, tuple) else out.sample
            again = UNetCall(full, call.timestep, out, call.args, call.kwargs, call.guidance_scale,
                             call.guidance_rescale)
            return self._objective(self.clean_estimate(again, levels, batch))

        return x0_step(sample.float(), objective, self.config.scale, normalize=self.config.normalize,
                       max_norm=self.config.max_norm)


def _scalar(value) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.reshape(-1)[0])
    return float(value)

