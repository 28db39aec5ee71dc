"""What decoding an fp16 VAE in float32 costs: qualityguide's upcast (float32 views of the decoder's parameters
through ``torch.func.functional_call``, nothing kept) against the alternatives, in one run.

Rows (decoder forward + backward to the latents, as a guided step does):
  - ``fp16``: no upcast (what SD 1.x/2.x pipelines do; SDXL's VAE overflows this way); GPU only;
  - ``upcast_functional``: qualityguide's ``decode_latents(vae, z, upcast=True)``;
  - ``fp32_copy``: a persistent float32 deep copy (what qualityguide did before; its memory is held for good);
  - ``fp32_vae``: a float32 VAE (the floor).
Also: bytes the float32 copy keeps alive, and the largest difference of the upcast decode from the fp32 VAE.

    python -m evals.bench_vae_upcast --model random:sd15 --size 256            # CPU (slow fp16 kernels)
    python -m evals.bench_vae_upcast --model stable-diffusion-v1-5/stable-diffusion-v1-5 --device cuda --size 1024

Prints JSON and writes ``evals/results/bench_vae_upcast/<model>_<size>px.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
from pathlib import Path

import torch

from evals.common.flags import add_benchmark_flags, eval_parser
from evals.common.report import slug, write_report
from qualityguide.diffusion.vae import decode_latents
from qualityguide.pipelines import load_pipeline
from qualityguide.runtime import quiet_third_party
from qualityguide.runtime import timed

RESULTS = Path(__file__).resolve().parent / "results" / "bench_vae_upcast"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, parsed before anything is loaded (the tests run the docstring examples through it)."""
    parser = eval_parser(__doc__)
    parser.add_argument("--model", default="random:sd15")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=1)
    add_benchmark_flags(parser, RESULTS, repeats_help="timed decodes of each variant after one warm-up")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    quiet_third_party()
    args = parse_args(argv)
    device = torch.device(args.device)
    vae32 = load_pipeline(args.model).vae.to(device).requires_grad_(False)
    vae16 = copy.deepcopy(vae32).half()
    copy32 = copy.deepcopy(vae16).float()  # the old approach: a float32 copy of the fp16 VAE, kept alive
    factor = 2 ** (len(vae32.config.block_out_channels) - 1)
    shape = (args.batch, vae32.config.latent_channels, args.size // factor, args.size // factor)
    latent = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)

    def step(decode):
        z = latent.clone().requires_grad_(True)
        torch.autograd.grad(decode(z).square().mean(), z)

    rows = {}
    if device.type != "cpu":  # CPU fp16 convolutions are a slow fallback, not what anyone runs
        rows["fp16"] = timed(lambda: step(lambda z: decode_latents(vae16, z, upcast=False)), device, args.repeats)
    rows.update({
        "upcast_functional": timed(lambda: step(lambda z: decode_latents(vae16, z, upcast=True)), device,
                                   args.repeats),
        "fp32_copy": timed(lambda: step(lambda z: decode_latents(copy32, z)), device, args.repeats),
        "fp32_vae": timed(lambda: step(lambda z: decode_latents(vae32, z)), device, args.repeats),
    })
    with torch.no_grad():
        reference = decode_latents(vae32, latent)
        upcast_err = float((decode_latents(vae16, latent, upcast=True) - reference).abs().max())
        fp16_err = float((decode_latents(vae16, latent, upcast=False) - reference).abs().max()) \
            if device.type != "cpu" else None
    kept = sum(p.numel() * p.element_size() for p in copy32.parameters())
    result = {"model": args.model, "device": str(device), "size": args.size, "batch": args.batch,
              "threads": torch.get_num_threads(), "platform": platform.platform(),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "decode_fwd_bwd_s": rows, "upcast_over_fp32_copy": rows["upcast_functional"] / rows["fp32_copy"],
              "fp32_copy_bytes_kept": kept, "upcast_bytes_kept": 0,
              "max_abs_diff_vs_fp32": {"upcast_functional": upcast_err, "fp16": fp16_err}}
    table = ["| variant | decode fwd+bwd s |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in rows.items()]
    table.append(f"\nupcast / fp32 copy: {result['upcast_over_fp32_copy']:.3f}; the copy keeps {kept / 2**20:.0f} MiB "
                 f"alive, the upcast 0. Max |diff| vs fp32 VAE: upcast {upcast_err:.2e}, fp16 {fp16_err}")
    write_report(Path(args.out), slug(args.model, f"{args.size}px"), result, "\n".join(table) + "\n")
    print(json.dumps(result, indent=2))
    print("\n".join(table))


if __name__ == "__main__":
    main()
