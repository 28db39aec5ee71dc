"""Benchmark LGDM feature extraction: speed versus batch size, peak memory, and overhead over the model calls.

For each batch size: seconds per image and images/s of ``LGDM.extract``; in the same run, the time of
the model calls it cannot avoid (VAE encoder once, U-Net forward per step, decoder forward+backward and
psi forward+backward per guided step, psi(x) once), and the ratio extract / that sum (target <= 1.15).
A literal Algorithm 1 (two separate backwards, psi(x) every step, PMG on the last step too) is timed
as well, so the saving is visible. Paper anchor: 21.3 s per image at 10 steps on an A100 (SD 1.5).

    python -m evals.bench_lgdm --model tiny:sd --image-size 64
    python -m evals.bench_lgdm --model random:sd15 --image-size 256 --num-steps 10 --batch-sizes 1
    python -m evals.bench_lgdm --model stable-diffusion-v1-5/stable-diffusion-v1-5 --device cuda --dtype fp16

Writes ``evals/results/bench_lgdm/<model>.json``, ``.md`` and ``.png``, and prints the JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch

from evals.common.figures import pyplot, save_figure
from evals.common.flags import add_pipeline_flags, eval_parser
from evals.common.report import slug, write_report
from qualityguide.diffusion.schedule import alpha_bar, clean_estimate, ddim_update
from qualityguide.diffusion.vae import from_vae_range, to_vae_range
from qualityguide.lgdm import LGDM, LGDMConfig
from qualityguide.runtime import quiet_third_party
from qualityguide.runtime import timed

RESULTS = Path(__file__).resolve().parent / "results" / "bench_lgdm"


def component_times(model: LGDM, x: torch.Tensor, device: torch.device, repeats: int) -> dict:
    """Time each unavoidable model call once; the extraction needs ``counts`` of each."""
    cfg = model.config
    with torch.no_grad():
        z0 = model.encode(x)
    cond = model._condition(x.shape[0], x.shape[-2], x.shape[-1], device)
    t = cfg.timesteps[0]
    guided = cfg.num_steps - 1 if cfg.guided else 0
    uses_decoder = cfg.zeta1 > 0 or model.psi is not None
    uses_psi = cfg.zeta2 > 0 and cfg.psi != "none"
    times = {}
    with torch.no_grad():
        times["encode"] = timed(lambda: model.encode(x), device, repeats)
        times["unet_forward"] = timed(lambda: model._unet(z0, t, cond), device, repeats)

    def decoder_fwd_bwd():
        z = z0.detach().requires_grad_(True)
        torch.autograd.grad(model.decode(z).sum(), z)

    def psi_fwd_bwd():
        if model.psi is None:  # psi "sd": U-Net on the latent, backward to the latent
            z = z0.detach().requires_grad_(True)
            with model.recorder.attached():
                torch.autograd.grad(model.psi_sd(z, cond).sum(), z)
        else:
            image = x.detach().clone().requires_grad_(True)
            torch.autograd.grad(model.psi(image).sum(), image)

    def psi_reference():
        with torch.no_grad():
            if model.psi is None:
                with model.recorder.attached():
                    model.psi_sd(z0, cond)
            else:
                model.psi(x)

    with model._frozen():
        if uses_decoder:
            times["decoder_fwd_bwd"] = timed(decoder_fwd_bwd, device, repeats)
        if uses_psi:
            times["psi_fwd_bwd"] = timed(psi_fwd_bwd, device, repeats)
            times["psi_reference"] = timed(psi_reference, device, repeats)
    counts = {"encode": 1, "unet_forward": cfg.num_steps, "decoder_fwd_bwd": guided, "psi_fwd_bwd": guided,
              "psi_reference": 1}
    total = sum(times[k] * counts[k] for k in times)
    return {"per_call_s": times, "counts": {k: counts[k] for k in times}, "sum_s": total}


def literal_algorithm1(model: LGDM, x: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 as printed: G1 and G2 gradients in two backwards, psi(x) recomputed every step, PMG
    applied after the last step's features too. Benchmark comparator only (same features otherwise)."""
    cfg = model.config
    with model._frozen(), model.recorder.attached():
        z0 = model.encode(x)
        cond = model._condition(x.shape[0], x.shape[-2], x.shape[-1], x.device)
        noise = model._noise(z0.shape, 0, x.device, None)
        a = alpha_bar(model.scheduler, cfg.timesteps[0], z0)
        z = a.sqrt() * z0 + (1 - a).sqrt() * noise
        target = to_vae_range(x).float()
        rows = []
        for k, t in enumerate(cfg.timesteps):
            out, row = model.recorder.call(model._unet, z, t, cond)
            rows.append(row)
            a_t = alpha_bar(model.scheduler, t, z)
            z0_hat, eps = clean_estimate(out, z, a_t, model.prediction_type)
            with torch.enable_grad():
                p = z0_hat.detach().requires_grad_(True)
                g1 = (model.decode(p) - target).flatten(1).norm(dim=1).sum()
                (grad1,) = torch.autograd.grad(g1, p)
                grad2 = torch.zeros_like(grad1)
                if cfg.zeta2 > 0 and cfg.psi != "none":
                    p = z0_hat.detach().requires_grad_(True)
                    with torch.no_grad():
                        ref = model.psi_sd(z0, cond) if model.psi is None else model.psi(x)
                    feats = model.psi_sd(p, cond) if model.psi is None else \
                        model.psi(from_vae_range(model.decode(p)))
                    (grad2,) = torch.autograd.grad((feats - ref).flatten(1).norm(dim=1).sum(), p)
            z0_hat = z0_hat - cfg.zeta1 * grad1 - cfg.zeta2 * grad2
            t_prev = cfg.timesteps[k + 1] if k + 1 < cfg.num_steps else 0
            z = ddim_update(z0_hat, eps, alpha_bar(model.scheduler, t_prev, z))
    return torch.stack(rows, 1)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def run(args) -> dict:
    from qualityguide.pipelines import load_pipeline

    device = torch.device(args.device)
    config = LGDMConfig(num_steps=args.num_steps, t_max=args.t_max, psi=args.psi, image_size=args.image_size)
    load_start = time.perf_counter()
    pipe = load_pipeline(args.model, dtype=args.dtype, device=device)
    load_s = time.perf_counter() - load_start
    model = LGDM.from_pipeline(pipe, config)
    rows = []
    generator = torch.Generator().manual_seed(0)
    for batch in args.batch_sizes:
        x = torch.rand(batch, 3, args.image_size, args.image_size, generator=generator).to(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            extract_s = timed(lambda: model.extract(x), device, args.repeats)
        memory = peak_memory_mb(device)
        parts = component_times(model, x, device, args.repeats)
        row = {"batch_size": batch, "extract_s": extract_s, "s_per_image": extract_s / batch,
               "images_per_s": batch / extract_s, "unavoidable_s": parts["sum_s"],
               "ratio_extract_to_model_calls": extract_s / parts["sum_s"], "components": parts,
               "peak_memory_mb": memory}
        if batch == args.batch_sizes[0] and not args.skip_literal:
            with torch.no_grad():
                literal_s = timed(lambda: literal_algorithm1(model, x), device, args.repeats)
            row["literal_algorithm1_s"] = literal_s
            row["saving_vs_literal"] = literal_s / extract_s
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "components"}), flush=True)
    return {"model": args.model, "device": str(device), "dtype": args.dtype or "fp32", "config": config.to_dict(),
            "pipeline_load_s": load_s, "threads": torch.get_num_threads(), "platform": platform.platform(),
            "cpu": platform.processor(), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "memory_note": "CUDA peak allocated" if device.type == "cuda" else
            "process peak RSS (includes model weights; monotone over the run)",
            "paper_anchor": "21.3 s/image, SD 1.5, 10 steps, A100 (Saini et al. 2025)", "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"LGDM extraction, `{result['model']}` on {result['device']} ({result['dtype']}), "
             f"{result['config']['image_size']} px, {result['config']['num_steps']} steps, psi={result['config']['psi']}",
             "", "| batch | s/image | images/s | extract / model calls | literal Alg. 1 / extract | peak MB |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        literal = f"{r['saving_vs_literal']:.2f}x" if "saving_vs_literal" in r else "-"
        lines.append(f"| {r['batch_size']} | {r['s_per_image']:.3f} | {r['images_per_s']:.2f} | "
                     f"{r['ratio_extract_to_model_calls']:.3f} | {literal} | {r['peak_memory_mb']:.0f} |")
    first = result["rows"][0]["components"]
    lines += ["", "Model calls per extract (batch " + str(result["rows"][0]["batch_size"]) + "): " +
              ", ".join(f"{k} {v * 1000:.1f} ms x {first['counts'][k]}" for k, v in first["per_call_s"].items())]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    plt = pyplot()

    batches = [r["batch_size"] for r in result["rows"]]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].plot(batches, [r["images_per_s"] for r in result["rows"]], "o-")
    ax[0].set(xlabel="batch size", ylabel="images / s", title="LGDM extract throughput")
    ax[1].plot(batches, [r["ratio_extract_to_model_calls"] for r in result["rows"]], "o-")
    ax[1].axhline(1.15, color="r", ls="--", label="target 1.15")
    ax[1].set(xlabel="batch size", ylabel="extract / model calls", title="overhead")
    ax[1].legend()
    fig.suptitle(result["model"])
    save_figure(fig, path, dpi=120)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, parsed before anything is loaded (the tests run the docstring examples through it)."""
    parser = eval_parser(__doc__)
    add_pipeline_flags(parser)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--t-max", type=int, default=100)
    parser.add_argument("--psi", default="sd")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-literal", action="store_true")
    parser.add_argument("--out", default=str(RESULTS))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    quiet_third_party()
    args = parse_args(argv)
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, slug(args.model, f"{args.image_size}px", args.psi), result, markdown(result), plot)
    print(json.dumps(result, indent=2))
    print(markdown(result))


if __name__ == "__main__":
    main()
