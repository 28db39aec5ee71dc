"""LGDM feature extraction: DDIM near t=0 under Perceptual Manifold Guidance, hyperfeatures read per step.

Saini et al. 2025 (arXiv 2506.00327), Algorithm 1, with the gaps filled as in docs/design.md section 4.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ImageError, InputError
from ..identity import WeightIdentity
from ..diffusion.conditioning import is_sdxl, sdxl_added_conditions, unet_conditioning
from ..diffusion.denoisers import call_unet
from ..diffusion.schedule import alpha_bar, clean_estimate, ddim_sigma, ddim_update
from ..diffusion.vae import decode_latents, encode_images, from_vae_range, pipeline_upcasts_vae, to_vae_range
from ..diffusion.x0 import StepResult, frozen, per_sample_norm, x0_step
from ..images import check_batch
from .config import LGDMConfig, stable_hash
from .hooks import HyperfeatureRecorder


@dataclass
class _Condition:
    hidden: torch.Tensor
    added: dict | None


def _double_backward_attention(enabled: bool):
    """Fused SDPA kernels have no double backward; differentiating through PMG needs the math kernel."""
    if not enabled:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _config_hash(module) -> str:
    # Private keys ("_use_default_values", "_name_or_path") vary between loads of the same weights.
    return stable_hash({k: v for k, v in dict(module.config).items() if not k.startswith("_")})


class LGDM(nn.Module):
    """Diffusion hyperfeatures of an image under PMG.

    The modules are shared, never copied: building an LGDM from a pipeline adds no memory. They are not registered
    as submodules, so ``state_dict()``/``parameters()`` hold only LGDM's own parts (a pyiqa psi network), and
    ``.to()``/``.train()``/``.eval()`` leave a user's modules as they are (their mode, device and dtype are the
    user's); only a backbone LGDM loaded itself (:meth:`from_pretrained`, ``owns_backbone=True``) follows them.

    Args:
        unet, vae, scheduler: a latent diffusion model's U-Net, VAE and (any) scheduler; only the
            scheduler's ``alphas_cumprod`` and ``prediction_type`` are used.
        text_encoder, tokenizer: encode ``config.prompt`` (once; cached per device, dtype, prompt and size).
        config: :class:`LGDMConfig` (default: the paper's settings).
        text_encoder_2, tokenizer_2: SDXL's second encoder (U-Nets with ``addition_embed_type="text_time"``).
        backbone_spec: the ``load_pipeline`` spec the modules came from (saved with heads).
        psi_weights: local weights for ``psi="pyiqa:<metric>"``.
        upcast_vae: run an fp16 VAE in float32 (default: as the model's diffusers pipeline does, i.e. for SDXL
            VAEs with ``force_upcast``; :meth:`from_pipeline` reads it off the pipeline).
        pmg_chunk: run each PMG backward (VAE decoder, psi) on at most this many images at a time. The
            features are the same (every term is per image); peak memory drops from the batch's decoder
            graph to the chunk's, which matters at 1024 px. None: the whole batch at once.
        owns_backbone: the modules belong to this LGDM (it loaded them), so ``.to()``/``.train()`` apply to them.
    """

    def __init__(self, unet, vae, scheduler, text_encoder=None, tokenizer=None, config: LGDMConfig | None = None,
                 *, text_encoder_2=None, tokenizer_2=None, backbone_spec: str | None = None, psi_weights=None,
                 pmg_chunk: int | None = None, upcast_vae: bool | None = None, owns_backbone: bool = False):
        super().__init__()
        if pmg_chunk is not None and (not isinstance(pmg_chunk, int) or pmg_chunk < 1):
            raise InputError(f"pmg_chunk must be a positive integer or None, got {pmg_chunk!r}")
        self.pmg_chunk = pmg_chunk
        self.config = config or LGDMConfig()
        if not isinstance(self.config, LGDMConfig):
            raise InputError(f"config must be an LGDMConfig, got {type(self.config).__name__}")
        # Plain attributes, not submodules: nn.Module's registration would let .to()/.eval()/state_dict() reach
        # a user's pipeline modules through this object (see _apply and train for an owned backbone).
        for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder),
                             ("text_encoder_2", text_encoder_2)):
            object.__setattr__(self, name, module)
        self.owns_backbone = bool(owns_backbone)
        self.scheduler, self.tokenizer, self.tokenizer_2 = scheduler, tokenizer, tokenizer_2
        self.backbone_spec = backbone_spec
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        if self.config.t_max >= len(scheduler.alphas_cumprod):
            raise InputError(f"t_max={self.config.t_max} exceeds the scheduler's {len(scheduler.alphas_cumprod)} "
                             "training timesteps")
        self.sdxl = is_sdxl(unet)
        # An fp16 VAE runs in float32 where diffusers' own pipeline would upcast it (SDXL family, force_upcast).
        self.upcast_vae = bool(upcast_vae if upcast_vae is not None else
                               self.sdxl and vae.config.get("force_upcast", False))
        if text_encoder is None or tokenizer is None:
            raise InputError("LGDM needs the pipeline's text_encoder and tokenizer (to encode the prompt); "
                             "build it with LGDM.from_pipeline(pipe)")
        if self.sdxl and (text_encoder_2 is None or tokenizer_2 is None):
            raise InputError("this U-Net is SDXL-style (text_time embeddings): pass text_encoder_2 and tokenizer_2, "
                             "or use LGDM.from_pipeline(pipe)")
        self.recorder = HyperfeatureRecorder(unet, self.config.layers, self.config.pooling)
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.min_side = self.vae_factor * 2 ** (len(unet.config.block_out_channels) - 1)
        if self.config.image_size is not None and self.config.image_size % self.vae_factor:
            raise InputError(f"image_size={self.config.image_size} must be a multiple of the VAE's downsampling "
                             f"factor {self.vae_factor}")
        self.psi = None
        self.psi_weights_hash = None
        if self.config.zeta2 > 0 and self.config.psi not in ("none", "sd"):
            from ..scorers.features import build_image_psi

            self.psi = build_image_psi(self.config.psi, weights=psi_weights)
            if psi_weights is not None:  # other psi weights, other features: part of the cache key
                from .cache import file_hash

                self.psi_weights_hash = file_hash(psi_weights)
        self._conditions: dict = {}

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_pipeline(cls, pipe, config: LGDMConfig | None = None, **kwargs) -> "LGDM":
        """Share a loaded diffusers pipeline's U-Net, VAE, scheduler and text encoder(s) (no copy)."""
        missing = [name for name in ("unet", "vae", "scheduler") if getattr(pipe, name, None) is None]
        if missing:
            raise InputError(f"pipeline {type(pipe).__name__} has no {missing}; LGDM needs a latent diffusion "
                             "pipeline (Stable Diffusion 1.x/2.x, SDXL)")
        spec = kwargs.pop("backbone_spec", None) or getattr(pipe, "qualityguide_spec", None) or \
            pipe.config.get("_name_or_path")
        return cls(pipe.unet, pipe.vae, pipe.scheduler, getattr(pipe, "text_encoder", None),
                   getattr(pipe, "tokenizer", None), config, text_encoder_2=getattr(pipe, "text_encoder_2", None),
                   tokenizer_2=getattr(pipe, "tokenizer_2", None), backbone_spec=spec,
                   **{"upcast_vae": pipeline_upcasts_vae(pipe), **kwargs})

    @classmethod
    def from_pretrained(cls, model_spec: str, config: LGDMConfig | None = None, dtype=None, device=None,
                        psi_weights=None, pmg_chunk: int | None = None, **kwargs) -> "LGDM":
        """Load a pipeline with :func:`qualityguide.load_pipeline` (tiny spec, local folder or hub id) and wrap it."""
        from ..pipelines import load_pipeline

        pipe = load_pipeline(model_spec, dtype=dtype, device=device, **kwargs)
        lgdm = cls.from_pipeline(pipe, config, backbone_spec=model_spec, psi_weights=psi_weights, pmg_chunk=pmg_chunk,
                                 owns_backbone=True)
        if device is not None:
            lgdm.to(device)
        return lgdm

    def backbone_modules(self) -> dict[str, nn.Module]:
        """The weights features depend on: U-Net, VAE and text encoder(s), by name."""
        modules = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder,
                   "text_encoder_2": self.text_encoder_2}
        return {name: module for name, module in modules.items() if module is not None}

    def _apply(self, fn, recurse=True):
        # nn.Module.to/cuda/half/... all go through _apply: an owned backbone follows, a shared one stays the user's.
        if self.owns_backbone:
            for module in self.backbone_modules().values():
                module._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> "LGDM":
        if self.owns_backbone:
            for module in self.backbone_modules().values():
                module.train(mode)
        return super().train(mode)

    # ----------------------------------------------------------------- identity (cache keys)
    def backbone_identity(self) -> dict:
        """What identifies the architecture: configs, prediction type and noise schedule (the weights themselves:
        :meth:`weights_identity`, compared up to half-precision rounding)."""
        return {"unet": _config_hash(self.unet), "vae": _config_hash(self.vae),
                "prediction_type": self.prediction_type,
                "alphas_cumprod": stable_hash({"a": [round(float(a), 8) for a in self.scheduler.alphas_cumprod[::50]]})}

    def weights_identity(self) -> WeightIdentity:
        """:class:`~qualityguide.identity.WeightIdentity` of :meth:`backbone_modules` (stored with caches and heads)."""
        return WeightIdentity.of(self.backbone_modules())

    def model_key(self) -> str:
        """Hash of the config fields and backbone identity that change the features (precision aside)."""
        config = self.config.to_dict()
        if self.config.psi == "none" or self.config.zeta2 == 0:
            config["psi"], config["psi_timestep"] = "none", 0  # equal features, equal key
        if self.psi_weights_hash:
            config["psi_weights_sha256"] = self.psi_weights_hash
        return stable_hash({"config": config, "backbone": self.backbone_identity()})

    def precision(self, autocast: str | None = None) -> str:
        """The numeric precision features are computed in: the autocast dtype or the U-Net's weights dtype, plus the
        VAE's compute dtype where it differs (an fp32 VAE beside an fp16 U-Net, or an fp16 VAE run upcast)."""
        main = autocast or str(self.unet.dtype).replace("torch.", "")
        vae = torch.float32 if self.vae.dtype == torch.float16 and self.upcast_vae else self.vae.dtype
        vae = str(vae).replace("torch.", "")
        return main if autocast or vae == main else f"{main}, vae {vae}"

    def feature_key(self, autocast: str | None = None) -> str:
        """Cache key: :meth:`model_key` plus the numeric precision (weights dtype or autocast dtype)."""
        return stable_hash({"model": self.model_key(), "precision": self.precision(autocast)})

    def layout(self) -> dict:
        return {"num_steps": self.config.num_steps, "timesteps": self.config.timesteps,
                "layer_names": self.recorder.names, "layer_dims": self.recorder.dims}

    # ----------------------------------------------------------------- inputs
    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Resize the short side to ``image_size`` and centre-crop a square, or crop to the VAE's multiple."""
        check_batch(images, "LGDM input", self.min_side)
        h, w = images.shape[-2:]
        size = self.config.image_size
        if size is None:
            th, tw = h - h % self.vae_factor, w - w % self.vae_factor
            top, left = (h - th) // 2, (w - tw) // 2
            return images[..., top:top + th, left:left + tw]
        short = min(h, w)
        if short * self.config.max_upscale < size:
            raise ImageError("LGDM input", f"{h}x{w} px would be upscaled {size / short:.1f}x to image_size={size} "
                             f"(max_upscale={self.config.max_upscale})",
                             f"use images with a short side >= {int(size / self.config.max_upscale + 0.999)} px, or "
                             "a smaller image_size, or image_size=None (native size)")
        if short != size:
            nh, nw = max(size, round(h * size / short)), max(size, round(w * size / short))
            images = F.interpolate(images, size=(nh, nw), mode="bicubic", antialias=True,
                                   align_corners=False).clamp(0, 1)
            h, w = nh, nw
        top, left = (h - size) // 2, (w - size) // 2
        return images[..., top:top + size, left:left + size]

    def _condition(self, batch: int, height: int, width: int, device) -> _Condition:
        key = (str(device), str(self.unet.dtype), self.config.prompt, height, width)
        if key not in self._conditions:
            with torch.no_grad():
                self._conditions[key] = self._encode_prompt(height, width, device)
        cond = self._conditions[key]
        hidden = cond.hidden.expand(batch, -1, -1)
        added = None if cond.added is None else {k: v.expand(batch, -1) for k, v in cond.added.items()}
        return _Condition(hidden, added)

    def _encode_prompt(self, height: int, width: int, device) -> _Condition:
        def ids(tokenizer):
            return tokenizer([self.config.prompt], padding="max_length", max_length=tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)

        if not self.sdxl:
            hidden = self.text_encoder(ids(self.tokenizer))[0]
            return _Condition(hidden.to(self.unet.dtype), None)
        # SDXL: penultimate hidden states of both encoders, pooled output of the second, size ids.
        out1 = self.text_encoder(ids(self.tokenizer), output_hidden_states=True)
        out2 = self.text_encoder_2(ids(self.tokenizer_2), output_hidden_states=True)
        hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
        added = sdxl_added_conditions(self.unet, out2[0].to(self.unet.dtype), (height, width), (0, 0), (height, width),
                                      text_encoder_2=self.text_encoder_2)
        return _Condition(hidden.to(self.unet.dtype), added)

    # ----------------------------------------------------------------- model calls
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``z0 = E(x)``: the latent distribution's mean times the scaling factor (float32)."""
        return encode_images(self.vae, images, upcast=self.upcast_vae)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``D(z)`` in the VAE's [-1,1] range (float32; fp16 VAEs that overflow run upcast)."""
        return decode_latents(self.vae, latents, upcast=self.upcast_vae)

    def _unet(self, latents: torch.Tensor, t: int, cond: _Condition) -> torch.Tensor:
        timestep = torch.full((latents.shape[0],), t, device=latents.device, dtype=torch.long)
        out = call_unet(self.unet, latents, timestep, unet_conditioning(cond.hidden, cond.added), dtype=self.unet.dtype)
        return out.float()

    def psi_sd(self, latents: torch.Tensor, cond: _Condition) -> torch.Tensor:
        """psi 'sd': pooled decoder features of the U-Net on a clean latent at ``psi_timestep`` (hooks attached)."""
        return self.recorder.call(self._unet, latents, self.config.psi_timestep, cond)[1]

    def _noise(self, shape, step: int, device, generator) -> torch.Tensor:
        if generator is not None:
            from diffusers.utils.torch_utils import randn_tensor

            return randn_tensor(tuple(shape), generator=generator, device=device, dtype=torch.float32)
        # The fixed probe: one noise field per (seed, step, latent shape), shared by every image.
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        return torch.randn(tuple(shape[1:]), generator=gen).to(device).expand(tuple(shape))

    def _frozen(self):
        """Parameters need no gradients here (flags restored afterwards: the modules may be a user's pipeline)."""
        return frozen(self.unet, self.vae, self.text_encoder, self.text_encoder_2, self.psi)

    # ----------------------------------------------------------------- PMG
    def pmg_energy(self, z0: torch.Tensor, target: torch.Tensor, psi_ref: torch.Tensor | None,
                   cond: _Condition) -> dict[str, torch.Tensor]:
        """``zeta1*G1 + zeta2*G2`` at a clean estimate, with its terms (each ``[B]``).

        G1 = ||D(z0) - x||_2 in [-1,1] pixels; G2 = ||psi(.) - psi(x)||_2 (Algorithm 1, lines 8-9).
        """
        cfg = self.config
        zero = z0.new_zeros(z0.shape[0])
        decoded = self.decode(z0) if (cfg.zeta1 > 0 or self.psi is not None) else None
        g1 = per_sample_norm(decoded - target).flatten() if decoded is not None else zero
        g2 = zero
        if psi_ref is not None:
            feats = self.psi_sd(z0, cond) if self.psi is None else self.psi(from_vae_range(decoded))
            g2 = per_sample_norm(feats - psi_ref).flatten()
        return {"energy": cfg.zeta1 * g1 + cfg.zeta2 * g2, "g1": g1, "g2": g2}

    def _pmg_step(self, z0_hat, target, psi_ref, cond: _Condition, create_graph: bool):
        """x0_step on ``-(zeta1*G1 + zeta2*G2)``, in chunks of ``pmg_chunk`` images (same result, less memory)."""
        size = self.pmg_chunk or z0_hat.shape[0]
        parts = []
        for start in range(0, z0_hat.shape[0], size):
            part = slice(start, start + size)
            sub = _Condition(cond.hidden[part], None if cond.added is None else
                             {k: v[part] for k, v in cond.added.items()})
            ref = None if psi_ref is None else psi_ref[part]
            parts.append(x0_step(z0_hat[part], lambda z_: -self.pmg_energy(z_, target[part], ref, sub)["energy"],
                                 1.0, create_graph=create_graph))
        if len(parts) == 1:
            return parts[0]
        return StepResult(x0=torch.cat([p.x0 for p in parts]), delta=torch.cat([p.delta for p in parts]),
                          objective=torch.cat([p.objective for p in parts]),
                          skipped=torch.cat([p.skipped for p in parts]))

    def _psi_reference(self, x: torch.Tensor, z0: torch.Tensor, cond: _Condition) -> torch.Tensor | None:
        """psi(x), once per image (docs/design.md section 4: not once per step as a literal Algorithm 1 would)."""
        if self.config.zeta2 == 0 or self.config.psi == "none":
            return None
        with torch.no_grad():
            if self.psi is None:
                return self.psi_sd(z0.detach(), cond)
            return self.psi(x.detach())

    # ----------------------------------------------------------------- extraction
    def extract(self, images: torch.Tensor, noise: torch.Tensor | None = None, generator=None,
                create_graph: bool = False, return_trace: bool = False):
        """Pooled hyperfeatures ``[B, num_steps, F]``, steps in sampling order (``t_max`` first).

        Within a step, layers in U-Net forward order; per layer the channel means then (``mean_std``)
        the population standard deviations.

        Args:
            images: ``[B,3,H,W]`` in [0,1] (prepared with :meth:`prepare`: resized/cropped to ``image_size``).
            noise: latent-shaped initial noise (default: the config's fixed probe, same for every image).
            generator: torch generator(s) for random noise instead of the fixed probe.
            create_graph: differentiate through the PMG corrections too, as functions of the latents (second
                order). The input image's direct role as G1's target and psi(x) stays constant. Otherwise the
                corrections are constants and gradients flow through the encoder and the U-Net feature path.
            return_trace: also return per-step PMG energies before and after each update (diagnostics).
        """
        cfg = self.config
        x = self.prepare(images)
        device = x.device
        if self.psi is not None:
            self.psi.to(device)  # pyiqa psi nets are built on the CPU; follow the images
        trace: list[dict] = []
        with self._frozen(), self.recorder.attached():
            z0 = self.encode(x)
            batch, _, h, w = z0.shape
            cond = self._condition(batch, x.shape[-2], x.shape[-1], device)
            timesteps = cfg.timesteps
            if noise is None:
                noise = self._noise(z0.shape, 0, device, generator)
            elif tuple(noise.shape) != tuple(z0.shape):
                raise InputError(f"noise has shape {tuple(noise.shape)}; expected the latent shape {tuple(z0.shape)}")
            a_t = alpha_bar(self.scheduler, timesteps[0], z0)
            z = a_t.sqrt() * z0 + (1 - a_t).sqrt() * noise.to(device=device, dtype=torch.float32)
            target = to_vae_range(x).detach().float()
            psi_ref = self._psi_reference(x, z0, cond)
            rows = []
            for k, t in enumerate(timesteps):
                out, row = self.recorder.call(self._unet, z, t, cond)
                rows.append(row)
                if k == len(timesteps) - 1:
                    break  # features are read before PMG: the last update would never be used
                a_t = alpha_bar(self.scheduler, t, z)
                z0_hat, eps = clean_estimate(out, z, a_t, self.prediction_type)
                if cfg.guided:
                    # One backward of zeta1*G1 + zeta2*G2 at the Tweedie estimate (Algorithm 1, lines 8-10).
                    with _double_backward_attention(create_graph):
                        step = self._pmg_step(z0_hat, target, psi_ref, cond, create_graph)
                    if return_trace:
                        with torch.no_grad():
                            after = self.pmg_energy(step.x0.detach(), target, psi_ref, cond)
                            before = self.pmg_energy(z0_hat.detach(), target, psi_ref, cond)
                        trace.append({"t": t, **{f"{k_}_before": v for k_, v in before.items()},
                                      **{f"{k_}_after": v for k_, v in after.items()}, "skipped": step.skipped})
                    z0_hat = step.x0
                a_prev = alpha_bar(self.scheduler, timesteps[k + 1], z)
                sigma = ddim_sigma(a_t, a_prev, cfg.eta)
                step_noise = self._noise(z0.shape, k + 1, device, generator) if cfg.eta > 0 else None
                z = ddim_update(z0_hat, eps, a_prev, sigma, step_noise)
        features = torch.stack(rows, dim=1)
        return (features, trace) if return_trace else features

    def extra_repr(self) -> str:
        return f"backbone={self.backbone_spec!r}, config={self.config}"
