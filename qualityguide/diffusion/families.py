"""What one sampling step's U-Net call says about the clean latents, for each family of diffusers schedulers.

Guidance reads this after ``scheduler.step`` (where diffusers runs ``callback_on_step_end``), from the
scheduler's own tables. Three forms of the U-Net's input, each with its own clean estimate:

- ``vp``: latents and U-Net input are ``sqrt(a) x0 + sqrt(1 - a) eps`` (DDIM, DDPM, PNDM, LCM, TCD read ``a`` off
  ``alphas_cumprod[t]``; DPM-Solver, UniPC and DEIS off their own sigma tables, ``a = 1 / (1 + sigma^2)``).
- ``karras``: latents ``x0 + sigma eps`` enter the U-Net as ``x / sqrt(1 + sigma^2)`` (Euler, Euler-ancestral,
  LMS, Heun, KDPM2), the VP form with ``a = 1 / (1 + sigma^2)``; the latents' signal coefficient is 1.
- ``edm``: latents ``x0 + sigma eps`` enter as ``c_in x``, and ``x0 = c_skip x + c_out F`` (Karras et al. 2022,
  table 1; EDMEuler and EDM DPM-Solver++, as Playground v2.5 uses).

Anything else is refused by name (:func:`scheduler_family`): flow-matching schedulers
(``x_t = (1 - sigma) x0 + sigma noise``, SD3/Flux), flow sigmas, clipped or thresholded clean estimates,
learned variances, and every scheduler class whose maths has not been checked against its own clean estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from .schedule import clean_estimate

# diffusers class name -> how its tables are read; each entry is checked against the scheduler's own clean
# estimate (tests/test_guidance_exact.py)
_VP_TABLE = ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LCMScheduler", "TCDScheduler")
_VP_SIGMAS = ("DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler",
              "DEISMultistepScheduler")
_KARRAS = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler",
           "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler")
_EDM = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
SUPPORTED_SCHEDULERS = _VP_TABLE + _VP_SIGMAS + _KARRAS + _EDM
_PREDICTION_TYPES = {"vp": ("epsilon", "v_prediction", "sample"), "karras": ("epsilon", "v_prediction", "sample"),
                     "edm": ("epsilon", "v_prediction")}


def _supported_text() -> str:
    return ", ".join(SUPPORTED_SCHEDULERS)


def scheduler_family(scheduler) -> str:
    """``"vp"``, ``"karras"`` or ``"edm"`` for a scheduler whose clean estimate guidance can rebuild exactly.

    Raises:
        InputError: naming the scheduler, what about it is not supported, and what is.
    """
    name = type(scheduler).__name__
    config = getattr(scheduler, "config", {}) or {}
    prediction_type = config.get("prediction_type", "epsilon")
    fix = "swap in a supported one, e.g. pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)"
    if "FlowMatch" in name or config.get("use_flow_sigmas") or prediction_type == "flow_prediction":
        raise InputError(f"scheduler {name} is a flow-matching one (x_t = (1 - sigma) x0 + sigma noise, SD3/Flux "
                         "transformer pipelines); QualityGuidance supports U-Net pipelines with VP, k-diffusion or EDM "
                         f"schedulers: {_supported_text()}")
    if name not in SUPPORTED_SCHEDULERS or type(scheduler) is not _diffusers_class(name):
        raise InputError(f"QualityGuidance has no exact clean estimate for scheduler {type(scheduler).__module__}."
                         f"{name}; supported: {_supported_text()} (diffusers' own classes); {fix}")
    family = "edm" if name in _EDM else "karras" if name in _KARRAS else "vp"
    if prediction_type not in _PREDICTION_TYPES[family]:
        raise InputError(f"{name}(prediction_type={prediction_type!r}) is not supported; allowed: "
                         f"{', '.join(_PREDICTION_TYPES[family])}")
    for option in ("thresholding", "clip_sample"):
        if config.get(option):
            raise InputError(f"{name}({option}=True) clips the clean estimate, so guidance cannot rebuild it; use "
                             f"{name}.from_config(pipe.scheduler.config, {option}=False) (Stable Diffusion's own "
                             "configs have it off)")
    if str(config.get("variance_type") or "").startswith("learned"):
        raise InputError(f"{name}(variance_type={config.get('variance_type')!r}) expects a U-Net that also predicts "
                         "its variance; QualityGuidance supports U-Nets that predict epsilon, v or the sample only")
    return family


def _diffusers_class(name: str):
    import diffusers

    return getattr(diffusers, name, None)


def edm_scalings(sigma: float, sigma_data: float, prediction_type: str) -> tuple[float, float, float]:
    """EDM preconditioning ``(c_skip, c_out, c_in)`` at noise level ``sigma`` (Karras et al. 2022, table 1, with
    diffusers' sign for v-prediction)."""
    norm = (sigma**2 + sigma_data**2) ** 0.5
    c_out = sigma * sigma_data / norm
    if prediction_type == "v_prediction":
        c_out = -c_out
    elif prediction_type != "epsilon":
        raise InputError(f"EDM prediction_type {prediction_type!r} is not supported; allowed: epsilon, v_prediction")
    return sigma_data**2 / norm**2, c_out, 1.0 / norm


def edm_clean_estimate(model_output: torch.Tensor, model_input: torch.Tensor, sigma: float, sigma_data: float,
                       prediction_type: str = "epsilon") -> torch.Tensor:
    """``x0 = c_skip x + c_out F`` from the U-Net's output ``F`` and its preconditioned input ``c_in x``.

    Args:
        model_output: the network output ``F`` at ``model_input``.
        model_input: ``c_in(sigma) * x``, what the U-Net saw (``scheduler.scale_model_input``).
        sigma: noise level of the latents ``x = x0 + sigma eps``.
        sigma_data: the scheduler's ``sigma_data`` (0.5 for EDM and Playground v2.5).
        prediction_type: ``"epsilon"`` or ``"v_prediction"`` (the sign of ``c_out``).
    """
    c_skip, c_out, c_in = edm_scalings(sigma, sigma_data, prediction_type)
    return (c_skip / c_in) * model_input + c_out * model_output


@dataclass(frozen=True)
class StepLevels:
    """Noise levels of one U-Net call and of the latents its scheduler step produced.

    Attributes:
        family: ``"vp"``, ``"karras"`` or ``"edm"``.
        prediction_type: the scheduler's prediction type.
        alpha_bar: noise level of the U-Net's input as a VP ``alpha_bar`` (``1 / (1 + sigma^2)`` for sigma tables).
        sigma: noise level of the latents ``x0 + sigma eps`` (``karras``/``edm``), else None.
        signal: coefficient of ``x0`` in the U-Net's input (``sqrt(alpha_bar)``; EDM: ``c_in``).
        coefficient: coefficient of ``x0`` in the latents after the step (the next level's signal coefficient).
        sigma_data: EDM's ``sigma_data``, else None.
        boundary: LCM's consistency boundary scalings ``(c_skip, c_out)``, else None.
    """

    family: str
    prediction_type: str
    alpha_bar: float
    sigma: float | None
    signal: float
    coefficient: float
    sigma_data: float | None = None
    boundary: tuple[float, float] | None = None

    def clean_estimate(self, model_output: torch.Tensor, model_input: torch.Tensor) -> torch.Tensor:
        """The clean latents the scheduler itself estimates from this U-Net call (differentiable in both inputs)."""
        if model_output.shape != model_input.shape:
            raise InputError(f"the U-Net returned shape {tuple(model_output.shape)} for input "
                             f"{tuple(model_input.shape)}; QualityGuidance needs U-Nets that predict epsilon, v or the "
                             "sample (no learned variance channels)")
        if self.family == "edm":
            return edm_clean_estimate(model_output, model_input, self.sigma, self.sigma_data, self.prediction_type)
        a_t = torch.tensor(self.alpha_bar, device=model_input.device, dtype=torch.float32)
        x0, _ = clean_estimate(model_output, model_input, a_t, self.prediction_type)
        if self.boundary is not None:  # LCM: denoised = c_out x0 + c_skip z_t (Luo et al. 2023, eq. 9)
            c_skip, c_out = self.boundary
            x0 = c_out * x0 + c_skip * model_input
        return x0


def step_levels(scheduler, timestep: float | torch.Tensor, step_index: int, num_steps: int) -> StepLevels:
    """Noise levels of the U-Net call made at ``timestep``, read after ``scheduler.step`` has run on it.

    Args:
        scheduler: a supported diffusers scheduler (see :func:`scheduler_family`), just stepped.
        timestep: the timestep the U-Net was called with.
        step_index: the pipeline's loop index of that step.
        num_steps: the pipeline's number of loop iterations (img2img's shortened loop counts only its own).
    """
    family = scheduler_family(scheduler)
    name, config = type(scheduler).__name__, scheduler.config
    prediction_type = config.get("prediction_type", "epsilon")
    if name in _VP_TABLE:
        table = scheduler.alphas_cumprod
        t = round(float(timestep))
        a_t = float(table[t])
        boundary = None
        if name == "LCMScheduler":
            boundary = tuple(float(c) for c in scheduler.get_scalings_for_boundary_condition_discrete(t))
        return StepLevels(family, prediction_type, a_t, None, a_t**0.5,
                          _vp_table_next(scheduler, name, t, step_index, num_steps) ** 0.5, boundary=boundary)
    index = scheduler.step_index
    if index is None or index < 1:
        raise InputError(f"{name} has not stepped yet (step_index={index}); read step levels after scheduler.step")
    sigma = _input_sigma(scheduler, name, index)
    sigma_next = float(scheduler.sigmas[index])
    a_t = 1.0 / (1.0 + sigma**2)
    if family == "vp":
        return StepLevels(family, prediction_type, a_t, None, a_t**0.5, (1.0 / (1.0 + sigma_next**2)) ** 0.5)
    if family == "karras":
        return StepLevels(family, prediction_type, a_t, sigma, a_t**0.5, 1.0)
    sigma_data = float(config.sigma_data)
    return StepLevels(family, prediction_type, a_t, sigma, edm_scalings(sigma, sigma_data, prediction_type)[2], 1.0,
                      sigma_data=sigma_data)


def _input_sigma(scheduler, name: str, index: int) -> float:
    """The sigma the U-Net's last input was scaled with (``scale_model_input`` ran at ``step_index = index - 1``).

    KDPM2's second stage runs at interpolated sigmas, which the two KDPM2 classes index differently; guidance only
    runs after that stage (:func:`restarts_from_saved_sample`).
    """
    if name == "KDPM2DiscreteScheduler":
        return float(scheduler.sigmas_interpol[index - 1])
    if name == "KDPM2AncestralDiscreteScheduler":
        return float(scheduler.sigmas_interpol[index - 2])
    return float(scheduler.sigmas[index - 1])


def _vp_table_next(scheduler, name: str, t: int, step_index: int, num_steps: int) -> float:
    """``alpha_bar`` of the latents the step produced, by each scheduler's own rule for its previous timestep."""
    table = scheduler.alphas_cumprod
    if name == "DDIMScheduler":  # DDIM steps by a fixed stride, whatever the spacing of its timesteps
        prev = t - int(scheduler.config.num_train_timesteps) // scheduler.num_inference_steps
        return float(table[prev]) if prev >= 0 else float(scheduler.final_alpha_cumprod)
    if name == "DDPMScheduler":
        prev = int(scheduler.previous_timestep(t))
        return float(table[prev]) if prev >= 0 else 1.0
    if name in ("LCMScheduler", "TCDScheduler"):
        index = scheduler.step_index
        if index < len(scheduler.timesteps):
            return float(table[int(scheduler.timesteps[index])])
        # the last step returns LCM's denoised sample itself, TCD's sample noised to t = 0
        return 1.0 if name == "LCMScheduler" else float(table[0])
    # PNDM: the next entry of its (img2img-offset) loop, the final level after the last one
    timesteps = scheduler.timesteps
    following = len(timesteps) - num_steps + step_index + 1
    if following < len(timesteps):
        return float(table[int(timesteps[following])])
    return float(scheduler.final_alpha_cumprod)


def restarts_from_saved_sample(scheduler) -> bool:
    """Whether the scheduler's next step starts from a sample it saved before this step instead of the latents it is
    given (a change made to the latents now would be dropped, or even reversed): PNDM's Runge-Kutta sub-steps and
    second PLMS step, the second stage of Heun/KDPM2, DPM-Solver singlestep's higher-order steps."""
    if getattr(scheduler, "state_in_first_order", True) is False:  # Heun/KDPM2 second stage
        return True
    if hasattr(scheduler, "prk_timesteps") and hasattr(scheduler, "counter"):  # PNDM
        counter = scheduler.counter
        if not scheduler.config.skip_prk_steps and counter < len(scheduler.prk_timesteps):
            return counter % 4 != 0  # Runge-Kutta sub-steps 1-3 restart from the sub-step-0 sample
        return counter == 1 and getattr(scheduler, "cur_sample", None) is not None  # PLMS warm-up
    order_list, index = getattr(scheduler, "order_list", None), getattr(scheduler, "step_index", None)
    if order_list is not None and index is not None and index < len(order_list):
        return order_list[index] > 1  # DPM-Solver singlestep: orders > 1 update from the group's first sample
    return False
