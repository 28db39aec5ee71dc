"""The toy task measured: how well its labelling scorers track the distortion level of the crops, and what its
base model samples score (the task itself lives in :mod:`evals.toy`).

    python -m evals.toy_task                        # conditional base (what adapter_control trains on)
    python -m evals.toy_task --kind unconditional   # the UNet2DModel base (acpo_toy)
    python -m evals.toy_task --n-images 16 --steps 20 --samples 4 --sample-steps 5   # a quick look

Writes ``evals/results/toy_task/<kind>/{summary.json, results.md, labels.png, crops.png, samples.png}``
and prints the JSON. Random crops of real photos, a model trained for minutes: the samples show whether the
mechanics work, not what a real model reaches.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from evals.common.figures import pyplot, save_figure
from evals.common.flags import eval_parser
from evals.common.report import write_report
from evals.toy import (CONDITIONS, HELD_OUT_SCORER, KINDS, LEVELS, TOY_SCORER, BaseConfig, Crops, build_crops,
                       load_or_train_base, load_toy_scorer, resolve_data_dir, sample, save_grid, score_images)
from qualityguide.errors import InputError
from qualityguide.runtime import quiet_third_party

HERE = Path(__file__).resolve().parent  # evals/: results and caches go under evals/results


# ----------------------------------------------------------------------------------------------- report
def level_tracking(crops: Crops, scores: torch.Tensor) -> dict:
    """How a scorer follows the distortion level: Spearman(level, score) per distortion (its crops plus every clean
    crop as level 0) and overall (negative = tracks: stronger distortion, lower score), the mean score per
    condition, and the share of NaN scores."""
    from scipy.stats import spearmanr

    s = scores.numpy()
    levels = crops.level.numpy()
    dist = np.asarray(crops.distortion)
    ok = np.isfinite(s)

    def rho(mask):
        mask = mask & ok
        return float(spearmanr(levels[mask], s[mask]).statistic) if mask.sum() > 2 else float("nan")

    per = {d: rho((dist == d) | (dist == "clean")) for d in ("blur", "noise", "jpeg")}
    means = {f"{d}{k}": float(np.nanmean(s[(dist == d) & (levels == k)])) if ((dist == d) & (levels == k) & ok).any()
             else float("nan") for d, k in CONDITIONS}
    return {"spearman_vs_level": {**per, "overall": rho(np.ones_like(ok))}, "mean_by_condition": means,
            "nan": int((~ok).sum())}


def markdown(s: dict) -> str:
    lines = [f"Toy task: {s['n_crops']} crops ({s['crop']} px) of BIQ2021 photos, ten conditions (clean; blur, noise, "
             f"JPEG at levels 1-3), seed {s['seed']}.", "",
             "Spearman(distortion level, score); negative = the scorer tracks the level (scores are higher-better):",
             "", "| scorer | blur | noise | jpeg | overall | NaN |", "|---|---|---|---|---|---|"]
    for name, r in s["scorers"].items():
        rho = r["spearman_vs_level"]
        lines.append(f"| `{name}` | " + " | ".join(f"{rho[k]:.3f}" for k in ("blur", "noise", "jpeg", "overall"))
                     + f" | {r['nan']} |")
    lines += ["", "Mean score per condition:", "", "| scorer | " + " | ".join(s["conditions"]) + " |",
              "|---|" + "---|" * len(s["conditions"])]
    for name, r in s["scorers"].items():
        lines.append(f"| `{name}` | " + " | ".join(f"{r['mean_by_condition'][c]:.2f}" for c in s["conditions"]) + " |")
    b = s["base"]
    lines += ["", f"Base model ({b['kind']}, key `{b['key']}`): {'loaded from cache' if b['loaded'] else 'trained'}; "
              f"{b['steps']} steps, final loss {b['final_loss']:.4f}, trained in {b['train_seconds']:.0f} s "
              f"({b['threads']} thread(s)). Its {b['samples']} samples ({b['sample_steps']} DDIM steps) score "
              + ", ".join(f"`{k}` {v['sample_mean']:.2f} (crops {v['crop_mean']:.2f})" for k, v in b["scores"].items())
              + " on average.", "", s["note"] + "."]
    return "\n".join(lines) + "\n"


def plot(s: dict, path: Path) -> None:
    plt = pyplot()

    names = list(s["scorers"])
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(4.2 * (len(names) + 1), 3.6), dpi=110)
    for ax, name in zip(axes, names):
        means = s["scorers"][name]["mean_by_condition"]
        for i, d in enumerate(("blur", "noise", "jpeg")):
            ax.plot(range(4), [means["clean0"]] + [means[f"{d}{k}"] for k in (1, 2, 3)], marker="o", color=f"C{i}",
                    label=f"{d} (rho {s['scorers'][name]['spearman_vs_level'][d]:.2f})")
        ax.set_xticks(range(4))
        ax.set_xlabel("distortion level (0 = clean)")
        ax.set_ylabel(f"mean {name} (higher is better)")
        ax.legend(fontsize=7)
    losses = np.asarray(s["base"]["losses"])
    window = max(1, len(losses) // 50)
    axes[-1].plot(np.convolve(losses, np.ones(window) / window, mode="valid"))
    axes[-1].set_yscale("log")
    axes[-1].set_xlabel("step")
    axes[-1].set_ylabel("epsilon MSE (smoothed)")
    axes[-1].set_title(f"{s['base']['kind']} base model", fontsize=9)
    fig.suptitle(f"toy task: {s['n_crops']} crops of {s['crop']} px", fontsize=9)
    save_figure(fig, path)


def crop_examples(crops: Crops, per_condition: int = 8) -> torch.Tensor:
    """Up to ``per_condition`` crops of each condition, one condition per row (missing ones left white)."""
    rows = []
    for d, k in CONDITIONS:
        index = [i for i in range(len(crops)) if crops.distortion[i] == d and int(crops.level[i]) == k][:per_condition]
        row = torch.ones(per_condition, *crops.images.shape[1:])
        if index:
            row[:len(index)] = crops.images[index]
        rows.append(row)
    return torch.cat(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, parsed and checked before anything is loaded (the tests run the docstring examples
    through it)."""
    parser = eval_parser(__doc__)
    defaults = BaseConfig()
    parser.add_argument("--data", default=None, help="folder holding biq2021/ and params/ (default: shared data)")
    parser.add_argument("--out", default=None, help="default: evals/results/toy_task/<kind>")
    parser.add_argument("--cache", default=str(HERE / "results" / "toy_base"), help="trained base models")
    parser.add_argument("--kind", choices=KINDS, default=defaults.kind)
    parser.add_argument("--n-images", type=int, default=256)
    parser.add_argument("--crop", type=int, default=defaults.crop)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="base model training steps")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=32, help="base model samples to score and show")
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--held-out", default=HELD_OUT_SCORER, help="second scorer reported next to TOY_SCORER")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: the machine is shared)")
    args = parser.parse_args(argv)
    try:
        base_config(args)  # its checks, now rather than after the crops are built and labelled
    except InputError as exc:
        parser.error(str(exc))
    parser.require_positive(args, ("n_images", "samples", "sample_steps"))
    return args


def base_config(args: argparse.Namespace) -> BaseConfig:
    """The base model's :class:`BaseConfig` from the command line (raises :class:`InputError` on a bad value)."""
    return BaseConfig(crop=args.crop, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      kind=args.kind)


def main(argv=None) -> dict:
    quiet_third_party()
    args = parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    started = time.perf_counter()
    data = resolve_data_dir(args.data)
    out = Path(args.out) if args.out else HERE / "results" / "toy_task" / args.kind
    out.mkdir(parents=True, exist_ok=True)

    crops = build_crops(data / "biq2021", args.n_images, args.crop, seed=args.seed)
    scorers = {spec: load_toy_scorer(spec, params_dir=data / "params") for spec in dict.fromkeys([TOY_SCORER,
                                                                                                    args.held_out])}
    labels = {spec: score_images(scorer, crops.images, desc=f"labelling with {spec}")
              for spec, scorer in scorers.items()}
    config = base_config(args)
    unet, scheduler, info = load_or_train_base(crops, config, args.cache)
    samples = sample(unet, scheduler, args.samples, seed=10_000, steps=args.sample_steps)
    sample_scores = {spec: score_images(scorer, samples, progress=False) for spec, scorer in scorers.items()}

    summary = {
        "n_crops": len(crops), "crop": args.crop, "seed": args.seed, "data": str(data),
        "conditions": [f"{d}{k}" for d, k in CONDITIONS], "levels": LEVELS,
        "scorers": {spec: level_tracking(crops, labels[spec]) for spec in scorers},
        "base": {"kind": args.kind, "key": info["key"], "loaded": info["loaded"], "path": info["path"],
                 "steps": config.steps, "batch_size": config.batch_size, "final_loss": info["final_loss"],
                 "train_seconds": info["train_seconds"], "threads": torch.get_num_threads(),
                 "parameters": sum(p.numel() for p in unet.parameters()), "samples": args.samples,
                 "sample_steps": args.sample_steps, "losses": info["losses"],
                 "scores": {spec: {"sample_mean": float(np.nanmean(sample_scores[spec].numpy())),
                                   "sample_nan": int(torch.isnan(sample_scores[spec]).sum()),
                                   "crop_mean": float(np.nanmean(labels[spec].numpy()))} for spec in scorers}},
        "seconds": time.perf_counter() - started, "load_average": os.getloadavg(),
        "note": "a tiny pixel model trained for minutes on a CPU: its samples show the mechanics, not the quality a "
                "real model reaches",
    }
    write_report(out, "results", summary, markdown(summary), json_stem="summary")
    plot(summary, out / "labels.png")
    save_grid(crop_examples(crops), out / "crops.png", columns=8)
    save_grid(samples, out / "samples.png", columns=min(8, args.samples))
    printed = {**summary, "base": {k: v for k, v in summary["base"].items() if k != "losses"}}
    print(json.dumps(printed, indent=2))
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
