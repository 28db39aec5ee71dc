"""Benchmark quality-guided sampling: guided / unguided wall time, and the overhead over the guidance work.

In one run: an unguided call, a guided call (same prompt, seed, steps), and the guidance work's own
model calls timed alone at the same shapes (VAE decoder forward+backward and scorer forward+backward,
once per guided step). Ratio = guided / (unguided + guided steps x that work); target <= 1.10.

    python -m evals.bench_guidance --model tiny:sd
    python -m evals.bench_guidance --model random:sd15 --height 256 --steps 4 --repeats 1
    python -m evals.bench_guidance --model stable-diffusion-v1-5/stable-diffusion-v1-5 --device cuda --dtype fp16 \
        --height 512 --steps 30

Writes ``evals/results/bench_guidance/<model>.json`` / ``.md`` / ``.png`` and prints the JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from evals.common.figures import pyplot, save_figure
from evals.common.flags import add_benchmark_flags, add_generation_flags, add_pipeline_flags, eval_parser
from evals.common.report import slug, write_report
from qualityguide.diffusion.vae import decode_latents, from_vae_range, pipeline_upcasts_vae
from qualityguide.diffusion.x0 import frozen
from qualityguide.guidance import QualityGuidance
from qualityguide.pipelines import load_pipeline
from qualityguide.runtime import quiet_third_party
from qualityguide.scorers import load_scorer
from qualityguide.runtime import timed

RESULTS = Path(__file__).resolve().parent / "results" / "bench_guidance"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, parsed before anything is loaded (the tests run the docstring examples through it)."""
    parser = eval_parser(__doc__)
    add_pipeline_flags(parser)
    add_generation_flags(parser)
    parser.add_argument("--scorer", default="niqe-embedded", help="scorer spec; SPEC@SIZE resizes first (tiny models: "
                        "niqe-embedded@192)")
    parser.add_argument("--scale", type=float, default=0.05)
    parser.add_argument("--unet-mode", action="store_true", help="also time mode='unet' (backprop through U-Net)")
    add_benchmark_flags(parser, RESULTS, repeats_help="timed sampling runs after one warm-up run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    quiet_third_party()
    args = parse_args(argv)
    device = torch.device(args.device)
    pipe = load_pipeline(args.model, dtype=args.dtype, device=device)
    scorer = load_scorer(args.scorer, device=device)
    size = args.height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    call = dict(prompt="a photo of a lighthouse on a cliff", num_inference_steps=args.steps, guidance_scale=args.cfg,
                height=size, width=size, output_type="pt")

    def run(callback=None):
        pipe(**call, generator=torch.Generator().manual_seed(0), callback_on_step_end=callback)

    unguided = timed(run, device, args.repeats)
    with QualityGuidance(scorer, scale=args.scale).attach(pipe) as guidance:
        guided = timed(lambda: run(guidance), device, args.repeats)
        guidance.history.clear()
        run(guidance)  # count the steps that really did the work (a window, PNDM's deferred step)
        guided_steps = sum(1 for h in guidance.history if not h["deferred"])
    latent = torch.randn(1, pipe.unet.config.in_channels, size // pipe.vae_scale_factor,
                         size // pipe.vae_scale_factor, generator=torch.Generator().manual_seed(0)).to(device)

    upcast = pipeline_upcasts_vae(pipe)

    def work():  # what a guided step must do besides the sampler: the callback's own decode, score, backward
        with frozen(pipe.vae, scorer):
            z = latent.clone().requires_grad_(True)
            image = from_vae_range(decode_latents(pipe.vae, z, upcast=upcast))
            torch.autograd.grad(scorer(image).sum(), z)

    work_s = timed(work, device, args.repeats)
    result = {"model": args.model, "device": str(device), "dtype": args.dtype or "fp32", "size": size,
              "steps": args.steps, "cfg": args.cfg, "scorer": scorer.name, "vae_upcast": upcast, "threads": torch.get_num_threads(),
              "platform": platform.platform(),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "unguided_s": unguided, "guided_s": guided, "guided_over_unguided": guided / unguided,
              "guidance_work_per_step_s": work_s, "guided_steps": guided_steps,
              "ratio_guided_to_unguided_plus_work": guided / (unguided + guided_steps * work_s), "target": 1.10}
    if args.unet_mode:
        with QualityGuidance(scorer, scale=args.scale, mode="unet").attach(pipe) as unet_guidance:
            result["guided_unet_mode_s"] = timed(lambda: run(unet_guidance), device, args.repeats)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, slug(args.model, f"{size}px", f"{args.steps}steps"), result, markdown(result), plot)
    print(json.dumps(result, indent=2))
    print(markdown(result))


def markdown(r: dict) -> str:
    lines = [f"Guided sampling cost, `{r['model']}` on {r['device']} ({r['dtype']}), {r['size']} px, {r['steps']} steps, "
             f"CFG {r['cfg']}, scorer {r['scorer']}", "",
             "| unguided s | guided s | guided / unguided | work per step s | guided / (unguided + work) |",
             "|---|---|---|---|---|",
             f"| {r['unguided_s']:.3f} | {r['guided_s']:.3f} | {r['guided_over_unguided']:.2f} | "
             f"{r['guidance_work_per_step_s']:.3f} | {r['ratio_guided_to_unguided_plus_work']:.3f} (target <= 1.10) |"]
    if "guided_unet_mode_s" in r:
        lines.append(f"\nmode='unet' (backprop through the U-Net): {r['guided_unet_mode_s']:.3f} s")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    parts = {"unguided": r["unguided_s"], "+ guidance work": r["guided_steps"] * r["guidance_work_per_step_s"]}
    ax.bar(["guided (measured)"], [r["guided_s"]], color="C1")
    ax.bar(["unguided + work"], [parts["unguided"]], color="C0", label="unguided")
    ax.bar(["unguided + work"], [parts["+ guidance work"]], bottom=[parts["unguided"]], color="C2",
           label="decoder+scorer fwd/bwd")
    if "guided_unet_mode_s" in r:
        ax.bar(["mode=unet"], [r["guided_unet_mode_s"]], color="C3")
    ax.set_ylabel("seconds per call")
    ax.set_title(f"{r['model']}: guided/unguided {r['guided_over_unguided']:.2f}, "
                 f"overhead ratio {r['ratio_guided_to_unguided_plus_work']:.3f}", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
