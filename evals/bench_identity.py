"""Cost and power of the weights identity (qualityguide.identity) on a full-size backbone.

Times :meth:`WeightIdentity.of` (reads every parameter once: its norm, plus 64 sampled elements) and
:meth:`WeightIdentity.differences` (the check against live modules) for the U-Net, the VAE, the text encoder
and all three, on the device and dtype asked for. Then checks, on the same backbone, that bf16/fp16 copies of
the weights raise no false alarm, and measures how often a dense change of one up-block matrix is caught,
per size of change (the fraction of sampled values flagged, and of trials refused).

    python -m evals.bench_identity                                   # random:sd15 on the CPU
    python -m evals.bench_identity --device cuda --dtype fp16

Prints JSON and writes ``evals/results/bench_identity/<model>_<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

from evals.common.flags import add_pipeline_flags, eval_parser
from evals.common.report import slug, write_report
from qualityguide.identity import SAMPLES_PER_TENSOR, WeightIdentity
from qualityguide.pipelines import load_pipeline, parse_dtype
from qualityguide.runtime import quiet_third_party
from qualityguide.runtime import timed

RESULTS = Path(__file__).resolve().parent / "results" / "bench_identity"
TARGET = "up_blocks.1.resnets.0.conv1.weight"
LEVELS = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4)


def component_costs(pipe, device, repeats: int) -> dict:
    parts = {"unet": {"unet": pipe.unet}, "vae": {"vae": pipe.vae}, "text_encoder": {"text_encoder": pipe.text_encoder}}
    parts["all"] = {k: v for part in list(parts.values()) for k, v in part.items()}
    rows = {}
    for name, modules in parts.items():
        identity = WeightIdentity.of(modules)
        rows[name] = {
            "parameters": identity.num_parameters,
            "elements": sum(p.numel() for m in modules.values() for p in m.parameters()),
            "samples": identity.num_samples,
            "identity_s": timed(lambda modules=modules: WeightIdentity.of(modules), device, repeats),
            "check_s": timed(lambda identity=identity, modules=modules: identity.differences(modules), device,
                             repeats),
        }
        assert identity.differences(modules) == []
    return rows


def no_false_alarms(pipe) -> dict:
    """The identity of the weights as loaded, checked against bf16, fp16 and fp16->bf16 copies of every parameter."""
    modules = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    identity = WeightIdentity.of(modules)
    out = {}
    for label, chain in (("bf16", [torch.bfloat16]), ("fp16", [torch.float16]),
                         ("fp16->bf16", [torch.float16, torch.bfloat16])):
        originals = {}
        with torch.no_grad():
            for prefix, module in modules.items():
                for name, p in module.named_parameters():
                    originals[(prefix, name)] = p.detach().clone()
                    value = p
                    for dtype in chain:
                        value = value.to(dtype)
                    p.copy_(value.to(p.dtype))
            out[label] = len(identity.differences(modules))
            for prefix, module in modules.items():
                for name, p in module.named_parameters():
                    p.copy_(originals[(prefix, name)])
    return out


def detection(pipe, trials: int) -> list[dict]:
    """Dense random changes of one up-block matrix: fraction of samples flagged and of trials refused."""
    holder = nn.Module()
    holder.w = nn.Parameter(pipe.unet.get_parameter(TARGET).detach().clone(), requires_grad=False)
    identity = WeightIdentity.of({"m": holder})
    original, std = holder.w.detach().clone(), float(holder.w.detach().float().std())
    rows = []
    for kind in ("multiplicative", "additive"):
        for level in LEVELS:
            refused, flagged = 0, []
            for seed in range(trials):
                noise = torch.randn(original.shape, generator=torch.Generator().manual_seed(seed)).to(original)
                with torch.no_grad():
                    holder.w.copy_(original * (1 + level * noise) if kind == "multiplicative"
                                   else original + level * std * noise)
                problems = identity.differences({"m": holder})
                refused += bool(problems)
                flagged.append(int(problems[0].split(": ")[1].split("/")[0]) if problems and "sampled" in problems[0]
                               else 0)
            count = int(identity.counts[0])
            rows.append({"kind": kind, "level": level, "trials": trials, "refused": refused / trials,
                         "mean_flagged_fraction": sum(flagged) / (trials * count),
                         "miss_probability_per_tensor": (1 - sum(flagged) / (trials * count)) ** count})
    with torch.no_grad():
        holder.w.copy_(original)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, parsed before anything is loaded (the tests run the docstring examples through it)."""
    parser = eval_parser(__doc__)
    add_pipeline_flags(parser, model="random:sd15")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trials", type=int, default=10, help="random changes per level in the detection table")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    quiet_third_party()
    args = parse_args(argv)
    device = torch.device(args.device)
    start = time.perf_counter()
    pipe = load_pipeline(args.model, dtype=args.dtype, device=device)
    build_s = time.perf_counter() - start
    result = {
        "model": args.model, "device": str(device), "dtype": str(parse_dtype(args.dtype) or torch.float32),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "samples_per_tensor": SAMPLES_PER_TENSOR,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "build_s": build_s, "components": component_costs(pipe, device, args.repeats),
    }
    path = RESULTS / "identity.safetensors"
    WeightIdentity.of({"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}).save(path)
    result["identity_file_bytes"] = path.stat().st_size
    result["false_alarms_in_half_precision_copies"] = no_false_alarms(pipe)
    result["detection"] = detection(pipe, args.trials)
    lines = [f"Weights identity of `{args.model}` on {result['gpu'] or 'CPU'} ({result['dtype']}, "
             f"{result['torch_threads']} threads)", "",
             "| modules | parameters | elements | samples | identity s | check s |", "|---|---|---|---|---|---|"]
    lines += [f"| {k} | {v['parameters']} | {v['elements'] / 1e6:.1f}M | {v['samples']} | {v['identity_s']:.3f} | "
              f"{v['check_s']:.3f} |" for k, v in result["components"].items()]
    lines += ["", f"False alarms (parameters refused) for rounded copies: {result['false_alarms_in_half_precision_copies']}",
              "", f"Dense random change of unet.{TARGET}:", "",
              "| change | size | refused | sampled values flagged | P(miss) per tensor |", "|---|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['level']:g} | {r['refused']:.0%} | {r['mean_flagged_fraction']:.1%} | "
              f"{r['miss_probability_per_tensor']:.1e} |" for r in result["detection"]]
    write_report(RESULTS, slug(args.model, device.type), result, "\n".join(lines) + "\n")
    print(json.dumps(result, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
