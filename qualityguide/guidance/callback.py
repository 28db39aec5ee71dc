"""Quality-guided sampling as a diffusers ``PipelineCallback`` (DESIGN.md section 3).

Diffusers calls ``callback_on_step_end`` after ``scheduler.step``, under ``no_grad``, without the
noise prediction. So a forward hook records the U-Net's input, timestep and output; the callback
combines the CFG halves with the pipeline's guidance scale, rebuilds the clean estimate, takes
:func:`x0_step` on ``score(decode(x0))`` and moves the new latents by the change times the signal
coefficient of the next noise level. No second U-Net call unless ``mode="unet"``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from diffusers.callbacks import PipelineCallback

from ..errors import InputError
from ..diffusion.schedule import alpha_bar_at, clean_estimate, is_sigma_parameterised
from ..diffusion.vae import decode_latents, from_vae_range, pipeline_upcasts_vae
from ..diffusion.x0 import NORMALIZE, frozen, per_sample_norm, x0_step

MODES = ("x0", "unet")


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
        self._call: dict | None = None
        self._recording = True
        self.history: list[dict] = []

    # ------------------------------------------------------------------ wiring
    def attach(self, pipe) -> "QualityGuidance":
        """Install the U-Net forward hook on ``pipe`` (returns self, so it chains into ``callback_on_step_end=``)."""
        if self._handle is not None:
            raise InputError("this QualityGuidance is already attached; detach() it first")
        for name in ("unet", "vae", "scheduler"):
            if getattr(pipe, name, None) is None:
                raise InputError(f"pipeline {type(pipe).__name__} has no {name}; QualityGuidance needs a latent "
                                 "diffusion pipeline (StableDiffusion, StableDiffusionXL, img2img)")
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
        # CFG settings as they were for this U-Net call (a callback such as SDCFGCutoffCallback may change them
        # before this one runs)
        pipe = self.pipe
        self._call = {"sample": sample, "timestep": timestep, "output": out, "args": args, "kwargs": kwargs,
                      "guidance_scale": float(getattr(pipe, "guidance_scale", 1.0) or 1.0),
                      "guidance_rescale": float(getattr(pipe, "guidance_rescale", 0.0) or 0.0)}

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
        call, self._call = self._call, None
        num_steps = int(getattr(pipeline, "num_timesteps", 0) or len(pipeline.scheduler.timesteps))
        if call is None or not self.is_guided_step(step_index, num_steps):
            return callback_kwargs
        latents = callback_kwargs["latents"]
        scheduler = pipeline.scheduler
        if _restarts_from_saved_sample(scheduler):
            # The next step rebuilds its input from a sample the scheduler saved before this step (PNDM's
            # second PLMS step, its Runge-Kutta sub-steps, Heun-type second stages): a change made now would be
            # dropped, or even reversed. Guide at the next step instead.
            self.history.append({"step": step_index, "timestep": _scalar(call["timestep"]), "deferred": True})
            return callback_kwargs
        model_input, output = self._combine_cfg(call, latents.shape[0])
        a_t, coefficient = self._noise_levels(scheduler, call, step_index, num_steps, latents)
        prediction_type = scheduler.config.get("prediction_type", "epsilon")
        self._recording = False
        modules = [pipeline.unet, pipeline.vae] + ([self.scorer] if isinstance(self.scorer, torch.nn.Module) else [])
        try:
            with frozen(*modules):
                if self.config.mode == "x0":
                    x0, _ = clean_estimate(output.float(), model_input.float(), a_t, prediction_type)
                    step = x0_step(x0, self._objective, self.config.scale, normalize=self.config.normalize,
                                   max_norm=self.config.max_norm)
                    delta = step.delta * coefficient
                else:
                    step = self._unet_step(pipeline, call, latents.shape[0], a_t, prediction_type)
                    # the step moved the U-Net's (VP-scaled) input; as a clean-latent change that is
                    # delta / sqrt(a_t), which reaches the next level times its signal coefficient
                    delta = step.delta * (coefficient / a_t.sqrt())
        finally:
            self._recording = True
        self.history.append({"step": step_index, "timestep": _scalar(call["timestep"]),
                             "score": step.objective.cpu(), "delta_norm": per_sample_norm(delta).flatten().cpu(),
                             "skipped": step.skipped.cpu(), "alpha_bar": float(a_t),
                             "coefficient": float(coefficient), "deferred": False})
        if bool(step.skipped.all()):
            return callback_kwargs
        if getattr(scheduler, "last_sample", None) is not None and hasattr(scheduler, "disable_corrector"):
            # UniPC's corrector rebuilds the current sample from the one before this step and would discard
            # the change; skip the corrector once (predictor-only update) so the guidance survives.
            scheduler.last_sample = None
        callback_kwargs["latents"] = latents + delta.to(latents.dtype)
        return callback_kwargs

    @staticmethod
    def _combine_cfg(call: dict, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The guided noise prediction and the latents it was made from; CFG is recognised by the U-Net batch
        being twice the latents' batch (unconditional half first, as diffusers orders it)."""
        sample, output = call["sample"], call["output"]
        if sample.shape[0] == 2 * batch:
            uncond, text = output.chunk(2)
            output = uncond + call["guidance_scale"] * (text - uncond)
            if call["guidance_rescale"] > 0:
                from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

                output = rescale_noise_cfg(output, text, guidance_rescale=call["guidance_rescale"])
            sample = sample.chunk(2)[1]
        elif sample.shape[0] != batch:
            raise InputError(f"the U-Net ran on {sample.shape[0]} samples for {batch} latents; QualityGuidance "
                             "supports pipelines that call the U-Net once per step on the latents (or both CFG halves)")
        return sample, output

    @staticmethod
    def _noise_levels(scheduler, call: dict, step_index: int, num_steps: int,
                      like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_bar of this step's U-Net input, signal coefficient of the latents after the step)``.

        Schedulers that keep a sigma table and a step index (Euler, LMS, DPM-Solver, UniPC) are read at
        their own position, which is exact for Karras/trailing spacings and for img2img's shortened loop.
        Others (DDIM, DDPM, PNDM) are read off ``alphas_cumprod``; their position in ``timesteps`` is offset
        by the steps img2img skips (``len(timesteps) - num_steps``).
        """
        one = torch.ones((), device=like.device)
        sigmas, index = getattr(scheduler, "sigmas", None), getattr(scheduler, "step_index", None)
        if sigmas is not None and index is not None and 0 < index < len(sigmas):
            sigma_t, sigma_next = float(sigmas[index - 1]), float(sigmas[index])
            a_t = torch.tensor(1.0 / (1.0 + sigma_t**2), device=like.device)
            if is_sigma_parameterised(scheduler):
                return a_t, one
            return a_t, torch.tensor((1.0 / (1.0 + sigma_next**2)) ** 0.5, device=like.device)
        a_t = alpha_bar_at(scheduler, _scalar(call["timestep"]), like)
        if is_sigma_parameterised(scheduler):
            return a_t, one
        timesteps = scheduler.timesteps
        following = len(timesteps) - num_steps + step_index + 1
        if following < len(timesteps):
            return a_t, alpha_bar_at(scheduler, _scalar(timesteps[following]), like).sqrt()
        return a_t, one  # the last step lands on (almost) clean latents

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

    def _unet_step(self, pipeline, call: dict, batch: int, a_t: torch.Tensor, prediction_type: str):
        """Universal-guidance style: gradient of the score w.r.t. the noisy latents through the U-Net."""
        args, kwargs = list(call["args"]), dict(call["kwargs"])
        cfg = call["sample"].shape[0] == 2 * batch
        sample = call["sample"].chunk(2)[1] if cfg else call["sample"]

        def objective(x_t: torch.Tensor) -> torch.Tensor:
            full = torch.cat([x_t, x_t]) if cfg else x_t
            if args:
                args[0] = full.to(call["sample"].dtype)
            else:
                kwargs["sample"] = full.to(call["sample"].dtype)
            out = pipeline.unet(*args, **kwargs)
            out = out[0] if isinstance(out, tuple) else out.sample
            _, combined = self._combine_cfg({**call, "sample": full, "output": out}, batch)
            x0, _ = clean_estimate(combined.float(), x_t.float(), a_t, prediction_type)
            return self._objective(x0)

        return x0_step(sample.float(), objective, self.config.scale, normalize=self.config.normalize,
                       max_norm=self.config.max_norm)


def _restarts_from_saved_sample(scheduler) -> bool:
    """Whether the scheduler's next step starts from a sample it saved earlier instead of the latents."""
    if getattr(scheduler, "state_in_first_order", True) is False:  # Heun/KDPM2 second stage
        return True
    if hasattr(scheduler, "prk_timesteps") and hasattr(scheduler, "counter"):  # PNDM
        counter = scheduler.counter
        if not scheduler.config.skip_prk_steps and counter < len(scheduler.prk_timesteps):
            return counter % 4 != 0  # Runge-Kutta sub-steps 1-3 restart from the sub-step-0 sample
        return counter == 1 and getattr(scheduler, "cur_sample", None) is not None  # PLMS warm-up
    return False


def _scalar(value) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.reshape(-1)[0])
    return float(value)

