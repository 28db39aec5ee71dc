"""Base versus LoRA fine-tuned model (ACPO, docs/design.md section 7) on held-out prompts and seeds.

For the same prompts, seeds, steps and CFG, images are generated with the LoRA switched off (the base) and on, then:

* **guiding-scorer gain** and **held-out-scorer gain**: mean fine-tuned minus mean base score, with a paired
  bootstrap 95% interval over (prompt, seed) pairs. A LoRA that only fools the scorer it was trained with gains there
  and not (or negatively) on the held-out one: the reward-hacking check;
* **drift**: ACPO's anchor figure, the noise-prediction MSE between the LoRA U-Net and the same U-Net with its
  adapters disabled, on the base samples noised at random timesteps (fixed seeds, the training schedule);
* **CLIP score**: 100 x cosine of open-clip image and text embeddings, when weights are available locally
  (``--clip-weights FILE`` or a pretrained tag in open-clip's cache); otherwise skipped with a note, never an error;
* **diversity**: mean pairwise distance between the images of one prompt across seeds, base and fine-tuned: LPIPS
  (pyiqa, when its weights are available locally), else the RMS pixel distance of 32x32 thumbnails (said which).

The LoRA folder is what ``qualityguide.finetune.save_lora`` (and ``recipes/train_acpo_lora.py``) writes: diffusers'
``pytorch_lora_weights.safetensors`` for SD / SDXL (loaded with ``pipe.load_lora_weights``), peft's
``adapter_model.safetensors`` for a pixel-space ``UNet2DModel`` (``tiny:ddpm``; loaded with
``qualityguide.finetune.load_lora``; unconditional, so there are no prompts and no CLIP score).

    python recipes/train_acpo_lora.py --model tiny:sd --prompts evals/prompts.txt --num_self_samples 8 \
        --scorer niqe-embedded@192 --num_inference_steps 4 --max_train_steps 10 --output_dir out/lora
    python -m evals.finetune --model tiny:sd --lora out/lora --scorer niqe-embedded@192 \
        --held-out-scorer pyiqa:piqe@192 --limit 4 --seeds 0 1 --steps 10
    python -m evals.finetune --model stable-diffusion-v1-5/stable-diffusion-v1-5 --device cuda --dtype fp16 \
        --lora out/acpo --scorer pyiqa:topiq_nr --held-out-scorer pyiqa:musiq --clip-weights open_clip_b32.bin

Writes ``results.json``, ``results.md`` and ``grid.png`` under ``--out`` (default ``evals/results/finetune/``) and
prints the JSON. Random-weight models (``tiny:``, ``random:``) and random LoRAs show mechanics, not quality.
"""

from __future__ import annotations

import argparse
import itertools
import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from evals.common.clip import ClipScore
from evals.common.flags import eval_parser, one_line_errors
from evals.common.report import write_report
from evals.common.scores import score_images
from evals.common.stats import paired_gain
from qualityguide.diffusion import decode_latents, from_vae_range, pipeline_upcasts_vae
from qualityguide.errors import InputError
from qualityguide.finetune import ACPOConfig, ACPOLoss, adapters_disabled, load_lora
from qualityguide.finetune.lora import DIFFUSERS_WEIGHT_NAME, PEFT_CONFIG_NAME, PEFT_WEIGHT_NAME
from qualityguide.guidance.runner import read_prompts
from qualityguide.images import make_grid
from qualityguide.pipelines import load_pipeline
from qualityguide.runtime import quiet_third_party
from qualityguide.scorers import load_scorer, split_size
from qualityguide.scorers.nss import pyiqa_cache_dir
from qualityguide.train.prompts import PromptEncoder

HERE = Path(__file__).resolve().parent
UNCONDITIONAL = "(unconditional)"
LPIPS_FILES = ("LPIPS_v0.1_alex-df73285e.pth", "alexnet-owt-7be5be79.pth")  # pyiqa's head, torchvision's backbone


def load_with_lora(spec: str, lora: str | Path, device: torch.device, dtype: str | None):
    """The pipeline for ``spec`` with the LoRA in ``lora`` loaded (diffusers format for SD / SDXL, peft format for a
    ``UNet2DModel``); every weight frozen, since this only evaluates."""
    lora = Path(lora)
    if not lora.is_dir():
        raise InputError(f"--lora {str(lora)!r} is not a folder; pass the folder qualityguide.finetune.save_lora "
                         "(or recipes/train_acpo_lora.py) wrote")
    pipe = load_pipeline(spec, dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    if type(pipe.unet).__name__ == "UNet2DModel":
        if not (lora / PEFT_WEIGHT_NAME).is_file():
            raise InputError(f"--lora {str(lora)!r} has no {PEFT_WEIGHT_NAME} + {PEFT_CONFIG_NAME}, the format "
                             "save_lora writes for a pixel-space UNet2DModel; pass that folder")
        load_lora(pipe.unet, lora)
    else:
        if not (lora / DIFFUSERS_WEIGHT_NAME).is_file():
            raise InputError(f"--lora {str(lora)!r} has no {DIFFUSERS_WEIGHT_NAME}; pass the folder save_lora wrote "
                             "for this SD / SDXL model")
        pipe.load_lora_weights(str(lora), weight_name=DIFFUSERS_WEIGHT_NAME)
    pipe.unet.to(device)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(pipe, part, None) is not None:
            getattr(pipe, part).requires_grad_(False)
    return pipe


@contextmanager
def lora_off(pipe):
    """The base model: every LoRA layer of the pipeline switched off (text encoders too, where the LoRA has any)."""
    if hasattr(pipe, "disable_lora"):
        pipe.disable_lora()
        try:
            yield
        finally:
            pipe.enable_lora()
    else:
        with adapters_disabled(pipe.unet):
            yield


def is_pixel(pipe) -> bool:
    """Whether ``pipe`` denoises pixels (no VAE), like ``DDPMPipeline``."""
    return getattr(pipe, "vae", None) is None


@torch.no_grad()
def generate(pipe, prompt: str, seeds: list[int], steps: int, cfg: float,
             size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, clean)``: one image per seed ``[S,3,H,W]`` in [0,1] (CPU), and the clean model-space samples behind
    them (scaled latents, or pixels in [-1,1] for a ``UNet2DModel``) on the U-Net's device."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    if is_pixel(pipe):
        out = pipe(batch_size=len(seeds), generator=generators, num_inference_steps=steps, output_type="np").images
        images = torch.from_numpy(np.ascontiguousarray(out)).permute(0, 3, 1, 2).float()
        return images, images.to(pipe.unet.device) * 2 - 1
    latents = pipe(prompt=[prompt] * len(seeds), generator=generators, num_inference_steps=steps,
                   guidance_scale=cfg, height=size, width=size, output_type="latent").images
    images = from_vae_range(decode_latents(pipe.vae, latents, upcast=pipeline_upcasts_vae(pipe))).cpu()
    return images, latents


@torch.no_grad()
def drift(pipe, clean: torch.Tensor, prompt: str, size: int, repeats: int, seed: int) -> float:
    """ACPO's anchor term (noise-prediction MSE of the LoRA U-Net to its adapter-free self) on ``clean`` noised at
    ``repeats`` random timesteps per sample, drawn with a generator seeded by ``seed``."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    anchor = ACPOLoss(pipe.unet, scheduler, None, ACPOConfig(w_diff=0.0, w_anchor=1.0, w_quality=0.0),
                      vae=getattr(pipe, "vae", None))
    conditioning = None
    if not is_pixel(pipe):
        embeds, extra = PromptEncoder(pipe, size)([prompt] * clean.shape[0], clean.device)
        conditioning = {"encoder_hidden_states": embeds, **({"added_cond_kwargs": extra} if extra else {})}
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(repeats):
        t = torch.randint(0, anchor.num_train_timesteps, (clean.shape[0],), generator=g)
        noise = torch.randn(clean.shape, generator=g)
        out = anchor(clean, conditioning, timesteps=t.to(clean.device), noise=noise.to(clean.device, clean.dtype))
        values.append(float(out["anchor"]))
    return float(np.mean(values))


def paired(tuned: np.ndarray, base: np.ndarray, n_boot: int) -> dict:
    """:func:`evals.common.stats.paired_gain` under this report's keys (``gain_ci95`` None below 3 pairs)."""
    gain = paired_gain(tuned, base, n_boot=n_boot)
    return {"base_mean": gain["base_mean"], "finetuned_mean": gain["treated_mean"], "gain": gain["gain"],
            "gain_ci95": gain["gain_ci95"], "fraction_improved": gain["fraction_improved"]}


def _ci(g: dict, digits: int) -> str:
    return "n/a (< 3 pairs)" if g["gain_ci95"] is None else (f"[{g['gain_ci95'][0]:+.{digits}g}, "
                                                              f"{g['gain_ci95'][1]:+.{digits}g}]")


class Diversity:
    """Mean pairwise distance between images of one prompt: LPIPS if its weights are local, else thumbnail RMS."""

    def __init__(self, device: torch.device):
        self.device, self.lpips = device, None
        hub = Path(torch.hub.get_dir())
        if (pyiqa_cache_dir() / LPIPS_FILES[0]).is_file() and (hub / "checkpoints" / LPIPS_FILES[1]).is_file():
            import pyiqa

            self.lpips = pyiqa.create_metric("lpips", device=device, as_loss=False)
            self.label = "mean pairwise LPIPS (pyiqa, alex, v0.1)"
        else:
            self.label = ("mean pairwise RMS pixel distance of 32x32 area-downsampled thumbnails, in [0,1] units "
                          "(LPIPS weights not found locally: " + ", ".join(LPIPS_FILES) + ")")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> float:
        pairs = list(itertools.combinations(range(len(images)), 2))
        if not pairs:
            return float("nan")
        if self.lpips is not None:
            values = [float(self.lpips(images[i:i + 1].to(self.device), images[j:j + 1].to(self.device)))
                      for i, j in pairs]
        else:
            thumbs = torch.nn.functional.adaptive_avg_pool2d(images.float(), 32).flatten(1)
            values = [float((thumbs[i] - thumbs[j]).pow(2).mean().sqrt()) for i, j in pairs]
        return float(np.mean(values))


def load_scorers(args: argparse.Namespace, device: torch.device) -> dict:
    """The guiding and held-out scorers, by role. A scorer whose weights are not available (``niqe`` or
    ``brisque`` offline without ``--weights``) raises :class:`WeightsNotFoundError` naming the file, where it
    was looked for and how to get it (or which scorer works offline)."""
    weights = dict(item.split("=", 1) for item in args.weights)
    return {role: load_scorer(spec, weights=weights.get(split_size(spec)[0]), device=device)
            for role, spec in (("guiding", args.scorer), ("held_out", args.held_out_scorer))}


def evaluate(args: argparse.Namespace) -> dict:
    """Generate, score and compare; write results.json, results.md and grid.png under ``args.out``."""
    device = torch.device(args.device)
    out = Path(args.out)
    scorers = load_scorers(args, device)  # before the pipeline: missing scorer weights fail in seconds
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_with_lora(args.model, args.lora, device, args.dtype)
    pixel = is_pixel(pipe)
    size = args.height or pipe.unet.config.sample_size * (1 if pixel else pipe.vae_scale_factor)
    prompts = [UNCONDITIONAL] if pixel else read_prompts(args.prompts)[: args.limit]
    clip, clip_note = (None, "skipped: unconditional model (no prompts)") if pixel else ClipScore.load(
        args.clip_model, args.clip_weights, device)
    diversity = Diversity(device)
    images = {"base": [], "finetuned": []}
    drifts, div = [], {"base": [], "finetuned": []}
    for p, prompt in enumerate(tqdm(prompts, desc="prompts (base, fine-tuned, drift)")):
        with lora_off(pipe):
            base, clean = generate(pipe, prompt, args.seeds, args.steps, args.cfg, size)
        tuned, _ = generate(pipe, prompt, args.seeds, args.steps, args.cfg, size)
        drifts.append(drift(pipe, clean, prompt, size, args.drift_timesteps, seed=p))
        for arm, batch in (("base", base), ("finetuned", tuned)):
            images[arm].append(batch)
            div[arm].append(diversity(batch))
    flat = {arm: torch.cat(v) for arm, v in images.items()}
    result = {"model": args.model, "lora": str(args.lora), "prompts": len(prompts), "seeds": args.seeds,
              "steps": args.steps, "cfg": None if pixel else args.cfg, "size": size, "device": args.device,
              "dtype": args.dtype or "fp32", "mechanics_only": args.model.startswith(("tiny:", "random:")),
              "scorers": {role: s.name for role, s in scorers.items()}, "gains": {}}
    for role, scorer in scorers.items():
        values = {arm: score_images(scorer, batch, device, batch_size=8, progress=False, strict=True).numpy()
                  for arm, batch in flat.items()}
        result["gains"][role] = paired(values["finetuned"], values["base"], args.n_boot)
    result["drift"] = {"mean": float(np.mean(drifts)), "per_prompt": drifts,
                       "definition": f"noise-prediction MSE, LoRA vs adapters disabled, base samples noised at "
                                     f"{args.drift_timesteps} uniform timestep(s) per sample (fixed seeds)"}
    if clip is None:
        result["clip"] = {"skipped": True, "note": clip_note}
    else:
        texts = [p for p in prompts for _ in args.seeds]
        values = {arm: clip(batch, texts) for arm, batch in flat.items()}
        result["clip"] = {"skipped": False, "model": clip_note, **paired(values["finetuned"], values["base"],
                                                                          args.n_boot)}
    result["diversity"] = {"measure": diversity.label,
                           **{arm: float(np.nanmean(v)) if len(args.seeds) > 1 else None for arm, v in div.items()},
                           "per_prompt": div}
    write_report(out, "results", result, markdown(result))
    save_grid(images, prompts, out / "grid.png", rows=args.grid_rows)
    return result


def markdown(r: dict) -> str:
    label = " **Random weights: mechanics only, not quality.**" if r["mechanics_only"] else ""
    cfg = "no CFG" if r["cfg"] is None else f"CFG {r['cfg']}"
    lines = [f"Base vs LoRA `{r['lora']}` on `{r['model']}`: {r['prompts']} prompt(s) x {len(r['seeds'])} seed(s), "
             f"{r['steps']} steps, {cfg}, {r['size']} px.{label}", "",
             "| measure | base | fine-tuned | gain [95% CI] | improved |", "|---|---|---|---|---|"]
    for role, g in r["gains"].items():
        lines.append(f"| {role} `{r['scorers'][role]}` | {g['base_mean']:.4g} | {g['finetuned_mean']:.4g} | "
                     f"{g['gain']:+.4g} {_ci(g, 3)} | "
                     f"{g['fraction_improved']:.0%} |")
    c = r["clip"]
    if c["skipped"]:
        lines.append(f"| CLIP score | - | - | {c['note']} | - |")
    else:
        lines.append(f"| CLIP score ({c['model']}) | {c['base_mean']:.2f} | {c['finetuned_mean']:.2f} | "
                     f"{c['gain']:+.2f} {_ci(c, 3)} | "
                     f"{c['fraction_improved']:.0%} |")
    d = r["diversity"]
    base, tuned = ("n/a (one seed)" if d[arm] is None else f"{d[arm]:.4g}" for arm in ("base", "finetuned"))
    lines += [f"| diversity | {base} | {tuned} | | |", "",
              f"Drift (ACPO's anchor figure): **{r['drift']['mean']:.4g}** ({r['drift']['definition']}).",
              f"Diversity: {d['measure']}.",
              "A gain on the guiding scorer without one on the held-out scorer suggests reward hacking.", ""]
    return "\n".join(lines)


def save_grid(images: dict[str, list[torch.Tensor]], prompts: list[str], path: Path, rows: int = 8,
              columns: int = 4) -> None:
    """Rows = prompts; base seeds on the left, fine-tuned (same seeds) on the right, a white gap between."""
    rows = min(rows, len(prompts))
    n = min(columns, images["base"][0].shape[0])
    arms = [make_grid([image for r in range(rows) for image in images[arm][r][:n]], columns=n)
            for arm in ("base", "finetuned")]
    make_grid(arms, columns=2, column_labels=["base", "fine-tuned"], padding=max(4, arms[0].width // n // 8),
              border=0, background="white").save(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = eval_parser(__doc__)
    parser.add_argument("--model", default="tiny:sd", help="pipeline spec the LoRA was trained on")
    parser.add_argument("--lora", required=True, help="folder written by qualityguide.finetune.save_lora")
    parser.add_argument("--prompts", default=str(HERE / "prompts.txt"), help="held-out prompts, one per line")
    parser.add_argument("--limit", type=int, default=None, help="first N prompts")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--height", type=int, default=None, help="image side in px (default: the model's)")
    parser.add_argument("--scorer", default="niqe-embedded", help="the guiding scorer the LoRA was trained with")
    parser.add_argument("--held-out-scorer", default="pyiqa:piqe", help="a scorer not used in training")
    parser.add_argument("--weights", action="append", default=[], help="SPEC=FILE scorer weights, repeatable")
    parser.add_argument("--clip-model", default="ViT-B-32")
    parser.add_argument("--clip-weights", default=None, help="open-clip weights file or cached pretrained tag")
    parser.add_argument("--drift-timesteps", type=int, default=4, help="noised copies per sample for the drift")
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--grid-rows", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--out", default=str(HERE / "results" / "finetune"))
    args = parser.parse_args(argv)
    parser.require_positive(args, ("steps", "drift_timesteps", "n_boot", "grid_rows"))
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit={args.limit}: must be >= 1 (or omit it for every prompt)")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds {args.seeds}: repeated seeds would pair identical images; give distinct seeds")
    bad = [w for w in args.weights if "=" not in w]
    if bad:
        parser.error(f"--weights {bad[0]!r}: use SPEC=FILE, e.g. brisque=/path/brisque_svm_weights.pth")
    return args


def main(argv: list[str] | None = None) -> dict:
    quiet_third_party()
    args = parse_args(argv)
    with one_line_errors("finetune"):  # bad input, or scorer weights not available (WeightsNotFoundError)
        result = evaluate(args)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
