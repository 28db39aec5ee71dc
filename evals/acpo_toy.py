"""Does the ACPO loss do what it claims? Quality gain against drift at several anchor weights, on a CPU in minutes.

1. Crops of real photos (BIQ2021) at graded blur / noise / JPEG levels plus clean (:mod:`evals.toy`).
2. A tiny pixel-space ``UNet2DModel`` trained briefly on all of them (``toy.load_or_train_base``, cached):
   ACPO's pixel path, as in the paper's unconditional experiments.
3. For each anchor weight (0 included), the same rank-``r`` LoRA is fine-tuned from the same initialisation, on the
   same batches, timesteps and noise, with :class:`~qualityguide.finetune.ACPOLoss`: diffusion term on the crops +
   ``w_anchor`` x anchor to the adapter-free base - ``w_quality`` x the guiding scorer (``toy.TOY_SCORER``,
   BRISQUE) of the one-step clean estimates with ``t <= t_quality_max``.
4. Each LoRA and the base sample the same seeds (DDIM). Reported per anchor weight: the guiding-scorer gain and the
   held-out-scorer gain (``toy.HELD_OUT_SCORER``, NIQE; the reward-hacking check), both as mean LoRA minus
   mean base over paired samples with bootstrap 95% intervals, and the drift: ACPO's anchor figure (noise-prediction
   MSE of the LoRA U-Net to its adapter-free self) on fixed crops noised at fixed timesteps with fixed noise.
5. A second held-out check that knows the truth by construction: the toy judge (:mod:`evals.toy.judge`, a small
   classifier trained on other photos' crops in all ten conditions) gives each sample P(clean) and a predicted
   distortion level; reported per model with the paired change against the base, and whether ACPO moved the
   samples toward clean crops.

The claim under test: the quality term raises the guiding score, and a larger anchor weight trades gain for less
drift. A tiny model trained for minutes: the numbers show whether the loss moves the model as designed, not what a
real model reaches.

    python -m evals.acpo_toy
    python -m evals.acpo_toy --anchor-weights 0 1 --steps 20 --n-images 40 --base-steps 30 --samples 8

Writes ``evals/results/acpo_toy/{summary.json, results.md, tradeoff.png, grid.png}`` and prints the JSON;
``grid.png`` has a row per model (base, then each anchor weight) and under each sample its guiding score (g), its
held-out score (h), and the judge's P(clean) (c) and predicted level (l).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from evals import toy
from evals.toy.judge import JUDGE_PHOTOS, JudgeConfig, ToyJudge, judge_crops
from evals.common.figures import pyplot, save_figure
from evals.common.flags import eval_parser, one_line_errors
from evals.common.report import write_report
from evals.common.stats import paired_gain
from qualityguide.errors import InputError
from qualityguide.finetune import ACPOConfig, ACPOLoss, add_lora, lora_parameters
from qualityguide.images import make_grid
from qualityguide.runtime import quiet_third_party
from qualityguide.train import batch_indices, step_generator

HERE = Path(__file__).resolve().parent
DEFAULT_ANCHORS = (0.0, 1.0, 3.0, 10.0, 30.0)


@dataclass
class RunConfig:
    """The LoRA fine-tune shared by every anchor weight (only ``w_anchor`` differs between runs).

    Args:
        steps, batch_size, lr: AdamW steps, crops per step, constant learning rate.
        rank: LoRA rank (alpha = rank) on the attention projections.
        w_diff, w_quality, t_quality_max, quality_fraction: :class:`ACPOConfig` fields.
        seed: LoRA initialisation, batches, timesteps and noise (the same for every run).
    """

    steps: int = 150
    batch_size: int = 16
    lr: float = 2e-3
    rank: int = 4
    w_diff: float = 1.0
    w_quality: float = 0.02
    t_quality_max: int = 300
    quality_fraction: float = 0.5
    seed: int = 0

    def acpo(self, w_anchor: float) -> ACPOConfig:
        return ACPOConfig(w_diff=self.w_diff, w_anchor=w_anchor, w_quality=self.w_quality,
                          t_quality_max=self.t_quality_max, quality_fraction=self.quality_fraction)


def finetune(base, scheduler, crops: toy.Crops, scorer, w_anchor: float, config: RunConfig,
             progress: bool = True) -> tuple[torch.nn.Module, dict]:
    """A copy of ``base`` with a LoRA trained by ACPO at ``w_anchor``; returns ``(unet, log)`` (per-step terms)."""
    unet = copy.deepcopy(base)
    torch.manual_seed(config.seed)  # the same LoRA initialisation for every anchor weight
    add_lora(unet, rank=config.rank)
    unet.train()
    loss_fn = ACPOLoss(unet, scheduler, scorer, config.acpo(w_anchor))
    optimizer = torch.optim.AdamW(lora_parameters(unet), lr=config.lr, weight_decay=0.0)
    x0_all = crops.images * 2 - 1
    log = {key: [] for key in ("loss", "diffusion", "anchor", "quality")}
    bar = tqdm(range(config.steps), desc=f"ACPO w_anchor={w_anchor:g}", disable=not progress, leave=False)
    for step in bar:
        index = batch_indices(len(crops), min(config.batch_size, len(crops)), step, config.seed)
        out = loss_fn(x0_all[index], generator=step_generator(config.seed, step))
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        for key in log:
            log[key].append(float(out[key].detach()))
        if step % 10 == 0 or step == config.steps - 1:
            bar.set_postfix(quality=f"{np.mean(log['quality'][-10:]):.2f}", anchor=f"{log['anchor'][-1]:.2e}")
    return unet.eval().requires_grad_(False), log


@torch.no_grad()
def drift(unet, scheduler, probe: torch.Tensor, timesteps: list[int], seed: int = 0) -> float:
    """ACPO's anchor term (noise-prediction MSE, LoRA vs adapters disabled) averaged over ``probe`` (clean pixels in
    [-1,1]) noised at each of ``timesteps`` with noise drawn from ``seed``: the same inputs for every model."""
    anchor = ACPOLoss(unet, scheduler, None, ACPOConfig(w_diff=0.0, w_anchor=1.0, w_quality=0.0))
    g = torch.Generator().manual_seed(seed)
    values = []
    for t in timesteps:
        noise = torch.randn(probe.shape, generator=g)
        out = anchor(probe, timesteps=torch.full((len(probe),), t, dtype=torch.long), noise=noise)
        values.append(float(out["anchor"]))
    return float(np.mean(values))


def lora_gain(tuned: np.ndarray, base: np.ndarray, n_boot: int = 2000) -> dict:
    """:func:`evals.common.stats.paired_gain` (LoRA - base over samples of the same seed; NaN scores, images a
    scorer refuses, drop their pair) under this report's keys."""
    gain = paired_gain(tuned, base, n_boot=n_boot)
    return {"gain": gain["gain"], "gain_ci95": gain["gain_ci95"], "base_mean": gain["base_mean"],
            "lora_mean": gain["treated_mean"], "pairs": gain["pairs"], "fraction_improved": gain["fraction_improved"]}


def crop_reference(crops: toy.Crops, scores: np.ndarray) -> dict[str, float]:
    """Mean score of the training crops that are clean and of those at the strongest level of each distortion."""
    groups = {"clean": ("clean", 0), "blur_3": ("blur", 3), "noise_3": ("noise", 3), "jpeg_3": ("jpeg", 3)}
    keys = list(zip(crops.distortion, crops.level.tolist()))
    return {name: float(np.nanmean(scores[[i for i, k in enumerate(keys) if k == key]]))
            if key in keys else float("nan") for name, key in groups.items()}


def judge_report(judge: ToyJudge, samples: dict, verdicts: dict, n_boot: int) -> dict:
    """The judge's view of every model's samples (``verdicts[key] = judge(samples[key])``): its
    :meth:`~evals.toy.judge.ToyJudge.summary`, and for each tuned model the paired change of P(clean) and of the
    predicted level against the base (same seeds), with whether that moved the samples toward clean crops
    (:func:`judge_direction`)."""
    report = {"base": judge.summary(samples["base"])}
    for key in samples:
        if key == "base":
            continue
        p_clean = lora_gain(verdicts[key]["p_clean"].numpy(), verdicts["base"]["p_clean"].numpy(), n_boot)
        level = lora_gain(verdicts[key]["level"].numpy(), verdicts["base"]["level"].numpy(), n_boot)
        report[key] = {**judge.summary(samples[key]), "p_clean_gain": p_clean, "level_change": level,
                       "direction": judge_direction(p_clean, level)}
    return report


def judge_direction(p_clean: dict, level: dict) -> str:
    """``"toward clean"`` when P(clean) rose and the level fell, both with 95% intervals off 0; ``"away from
    clean"`` for the opposite; else ``"no clear move"`` (also without intervals: too few pairs)."""
    p, lv = p_clean["gain_ci95"], level["gain_ci95"]
    if p is None or lv is None:
        return "no clear move"
    if p[0] > 0 and lv[1] < 0:
        return "toward clean"
    if p[1] < 0 and lv[0] > 0:
        return "away from clean"
    return "no clear move"


def grid_labels(keys: list, scores: dict, verdicts: dict, columns: int) -> tuple[list[str], list[str]]:
    """``(captions, row_labels)`` of the sample grid: a row per model in ``keys`` (``"base"``, then anchor weights),
    its first ``columns`` samples, each captioned with its guiding score ``g``, held-out score ``h``, and the judge's
    P(clean) ``c`` and predicted distortion level ``l`` (0 clean ... 3)."""
    rows = ["base" if key == "base" else f"w_anchor {key:g}" for key in keys]
    captions = [f"g {scores['guiding'][key][i]:.1f}\nh {scores['held_out'][key][i]:.2f}\n"
                f"c {float(verdicts[key]['p_clean'][i]):.2f} l {float(verdicts[key]['level'][i]):.1f}"
                for key in keys for i in range(columns)]
    return captions, rows


def save_labelled_grid(samples: dict, scores: dict, verdicts: dict, columns: int, path: Path, scale: int = 2) -> None:
    """The samples as :func:`qualityguide.images.make_grid` with :func:`grid_labels` (images upscaled ``scale`` x,
    nearest, so the captions fit under them; a legend in the first column label)."""
    keys = list(samples)
    images = torch.cat([samples[k][:columns] for k in keys])
    images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    captions, rows = grid_labels(keys, scores, verdicts, columns)
    legend = ["g guiding score, h held-out score, c judge's P(clean), l its level (0-3)"] + [""] * (columns - 1)
    grid = make_grid(images, columns, captions=captions, row_labels=rows, column_labels=legend, padding=2,
                     background="white")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def run(args: argparse.Namespace) -> dict:
    """The whole experiment; writes the outputs under ``args.out`` and returns the summary."""
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    data = toy.resolve_data_dir(args.data)
    crops = toy.build_crops(data / "biq2021", args.n_images, args.crop, seed=args.seed)
    scorers = {"guiding": toy.load_toy_scorer(toy.TOY_SCORER, params_dir=data / "params"),
               "held_out": toy.load_toy_scorer(args.held_out, params_dir=data / "params")}
    base, scheduler, base_info = toy.load_or_train_base(crops, toy.BaseConfig(
        crop=args.crop, steps=args.base_steps, seed=args.seed, kind="unconditional"), args.cache)
    config = RunConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, rank=args.rank, w_diff=args.w_diff,
                       w_quality=args.w_quality, t_quality_max=args.t_quality_max,
                       quality_fraction=args.quality_fraction, seed=args.seed)
    probe = crops.images[: args.probe] * 2 - 1
    probe_t = np.linspace(0, scheduler.config.num_train_timesteps - 1, args.probe_timesteps).round().astype(int)
    samples = {"base": toy.sample(base, scheduler, args.samples, seed=args.sample_seed, steps=args.sample_steps,
                                       progress=False)}
    runs = {}
    for w in tqdm(args.anchor_weights, desc="anchor weights"):
        tick = time.perf_counter()
        unet, log = finetune(base, scheduler, crops, scorers["guiding"], w, config)
        runs[w] = {"w_anchor": w, "train_seconds": time.perf_counter() - tick,
                   "drift": drift(unet, scheduler, probe, probe_t.tolist()),
                   "final_terms": {k: float(np.mean(v[-max(1, args.steps // 10):])) for k, v in log.items()},
                   "log": log}
        samples[w] = toy.sample(unet, scheduler, args.samples, seed=args.sample_seed, steps=args.sample_steps,
                                     progress=False)
    scores = {role: {key: toy.score_images(s, images, progress=False).numpy() for key, images in samples.items()}
              for role, s in scorers.items()}
    for w, r in runs.items():
        r["gains"] = {role: lora_gain(scores[role][w], scores[role]["base"], args.n_boot) for role in scorers}
    reference = {role: crop_reference(crops, toy.score_images(s, crops.images, progress=False).numpy())
                 for role, s in scorers.items()}
    judge = ToyJudge.fit(judge_crops(data / "biq2021", args.judge_photos, args.crop),
                         JudgeConfig(crop=args.crop, steps=args.judge_steps))
    verdicts = {key: judge(images) for key, images in samples.items()}
    judged = judge_report(judge, samples, verdicts, args.n_boot)
    for w, r in runs.items():
        r["judge"] = judged[w]
    clean = crops.images[[i for i, d in enumerate(crops.distortion) if d == "clean"]]
    summary = {"scorers": {role: s.name for role, s in scorers.items()}, "n_crops": len(crops), "crop": args.crop,
               "base": {k: v for k, v in base_info.items() if k != "losses"}, "finetune": asdict(config),
               "samples": args.samples, "sample_steps": args.sample_steps, "sample_seed": args.sample_seed,
               "drift_probe": {"crops": len(probe), "timesteps": probe_t.tolist(), "noise_seed": 0},
               "base_scores": {role: float(np.nanmean(v["base"])) for role, v in scores.items()},
               "crop_reference_scores": reference,
               "judge": {"photos": args.judge_photos, "held_out": judge.held_out, "base": judged["base"],
                         "clean_training_crops": judge.summary(clean) if len(clean) else None},
               "threads": torch.get_num_threads(),
               "runs": [{k: v for k, v in r.items() if k != "log"} for r in runs.values()],
               "wall_seconds": time.perf_counter() - started}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, "results", summary, markdown(summary), json_stem="summary")
    plot(summary, out / "tradeoff.png")
    save_labelled_grid(samples, scores, verdicts, min(args.samples, 12), out / "grid.png")
    (out / "training_log.json").write_text(json.dumps({str(w): r["log"] for w, r in runs.items()}))
    return summary


def _fmt_gain(g: dict) -> str:
    ci = "" if g["gain_ci95"] is None else f" [{g['gain_ci95'][0]:+.3g}, {g['gain_ci95'][1]:+.3g}]"
    return f"{g['gain']:+.3g}{ci}"


def markdown(s: dict) -> str:
    f, g, h = s["finetune"], s["scorers"]["guiding"], s["scorers"]["held_out"]
    lines = [f"ACPO on the toy task: tiny pixel-space UNet2DModel ({s['base']['key']}, "
             f"{'cached' if s['base']['loaded'] else 'trained'}) on {s['n_crops']} {s['crop']} px crops of BIQ2021 "
             f"photos; LoRA rank {f['rank']}, {f['steps']} steps of batch {f['batch_size']}, lr {f['lr']}, "
             f"w_diff {f['w_diff']}, w_quality {f['w_quality']}, t_quality_max {f['t_quality_max']}, "
             f"quality_fraction {f['quality_fraction']}; the same seeds for every run. Gains: mean LoRA - mean base "
             f"over {s['samples']} paired samples ({s['sample_steps']} DDIM steps), bootstrap 95% CI. Drift: "
             f"noise-prediction MSE to the base on {s['drift_probe']['crops']} crops x "
             f"{len(s['drift_probe']['timesteps'])} timesteps. Higher scores are better (native scores negated).",
             "", f"| w_anchor | drift | guiding `{g}` gain | held-out `{h}` gain | final quality term | train s |",
             "|---|---|---|---|---|---|"]
    for r in s["runs"]:
        lines.append(f"| {r['w_anchor']:g} | {r['drift']:.3g} | {_fmt_gain(r['gains']['guiding'])} | "
                     f"{_fmt_gain(r['gains']['held_out'])} | {r['final_terms']['quality']:.3g} | "
                     f"{r['train_seconds']:.0f} |")
    lines += judge_markdown(s)
    ref = s["crop_reference_scores"]
    lines += ["", f"Base samples score {s['base_scores']['guiding']:.3g} (`{g}`) and {s['base_scores']['held_out']:.3g}"
              f" (`{h}`). For scale, training crops: " + "; ".join(
                  f"{cond} {ref['guiding'][cond]:.3g} / {ref['held_out'][cond]:.3g}" for cond in ref["guiding"])
              + " (guiding / held-out).", "",
              f"Wall time {s['wall_seconds'] / 60:.1f} min on {s['threads']} thread(s) (shared machine).", ""]
    return "\n".join(lines)


def judge_markdown(s: dict) -> list[str]:
    """The judge's table: P(clean) and predicted level per model, the paired changes against the base, the
    direction, and the judge's own held-out accuracy for scale."""
    j, held = s["judge"], s["judge"]["held_out"]
    base = j["base"]
    lines = ["", f"Toy judge (classifier of clean vs blur / noise / JPEG levels 1-3, trained on {j['photos']} other "
             f"photos' crops; held-out photos: accuracy {held['accuracy']:.2f} over ten conditions, clean-vs-distorted "
             f"{held['clean_accuracy']:.2f}, level error {held['level_mae']:.2f}). Base samples: P(clean) "
             f"{base['p_clean']:.3f}, level {base['level']:.2f}" + (
                 f"; the clean training crops: P(clean) {j['clean_training_crops']['p_clean']:.3f}, level "
                 f"{j['clean_training_crops']['level']:.2f}" if j.get("clean_training_crops") else "") + ".", "",
             "| w_anchor | P(clean) | change [95% CI] | level | change [95% CI] | judged clean / blur / noise / jpeg | "
             "samples moved |", "|---|---|---|---|---|---|---|"]
    for r in s["runs"]:
        v = r["judge"]
        shares = " / ".join(f"{v['kind_share'].get(k, 0.0):.2f}" for k in ("clean", "blur", "noise", "jpeg"))
        lines.append(f"| {r['w_anchor']:g} | {v['p_clean']:.3f} | {_fmt_gain(v['p_clean_gain'])} | {v['level']:.2f} | "
                     f"{_fmt_gain(v['level_change'])} | {shares} | {v['direction']} |")
    return lines


def plot(s: dict, path: Path) -> None:
    plt = pyplot()
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    for ax, role, colour in zip(axes, ("guiding", "held_out"), ("C0", "C1")):
        for r in s["runs"]:
            g = r["gains"][role]
            err = None if g["gain_ci95"] is None else [[g["gain"] - g["gain_ci95"][0]], [g["gain_ci95"][1] - g["gain"]]]
            ax.errorbar(r["drift"], g["gain"], yerr=err, fmt="o", color=colour, capsize=3)
            ax.annotate(f"w={r['w_anchor']:g}", (r["drift"], g["gain"]), textcoords="offset points", xytext=(5, 4),
                        fontsize=8)
        ax.axhline(0, color="grey", lw=0.8)
        drifts = [r["drift"] for r in s["runs"]]
        if min(drifts) > 0:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        else:  # a run that never left the base (drift 0) still gets a place on the axis
            ax.set_xscale("symlog", linthresh=min([d for d in drifts if d > 0], default=1e-6))
        ax.set_xlabel("drift (noise-prediction MSE to the base)")
        ax.set_ylabel(f"gain in {s['scorers'][role]} score")
        ax.set_title(f"{'guiding' if role == 'guiding' else 'held-out'}: {s['scorers'][role]}", fontsize=9)
    fig.suptitle("ACPO toy: quality gain vs drift per anchor weight (95% CI)", fontsize=10)
    save_figure(fig, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d, b = RunConfig(), toy.BaseConfig
    parser = eval_parser(__doc__)
    parser.add_argument("--data", default=None, help="folder holding biq2021/ and params/ (default: shared data)")
    parser.add_argument("--out", default=str(HERE / "results" / "acpo_toy"))
    parser.add_argument("--cache", default=str(HERE / "results" / "toy_base"), help="trained base models")
    parser.add_argument("--n-images", type=int, default=256)
    parser.add_argument("--crop", type=int, default=b.crop)
    parser.add_argument("--base-steps", type=int, default=b.steps)
    parser.add_argument("--anchor-weights", type=float, nargs="+", default=list(DEFAULT_ANCHORS))
    parser.add_argument("--steps", type=int, default=d.steps, help="LoRA steps per anchor weight")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--rank", type=int, default=d.rank)
    parser.add_argument("--w-diff", type=float, default=d.w_diff)
    parser.add_argument("--w-quality", type=float, default=d.w_quality)
    parser.add_argument("--t-quality-max", type=int, default=d.t_quality_max)
    parser.add_argument("--quality-fraction", type=float, default=d.quality_fraction)
    parser.add_argument("--held-out", default=toy.HELD_OUT_SCORER, help="the held-out scorer spec")
    parser.add_argument("--samples", type=int, default=64, help="samples per model (same seeds)")
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--sample-seed", type=int, default=10_000)
    parser.add_argument("--probe", type=int, default=64, help="crops in the drift probe")
    parser.add_argument("--probe-timesteps", type=int, default=10)
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--judge-photos", type=int, default=JUDGE_PHOTOS, help="photos of the toy judge's crops")
    parser.add_argument("--judge-steps", type=int, default=JudgeConfig().steps, help="the toy judge's training steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: the machine is shared)")
    args = parser.parse_args(argv)
    parser.require_positive(args, ("n_images", "base_steps", "steps", "batch_size", "rank", "samples", "sample_steps",
                                   "probe", "probe_timesteps", "n_boot", "threads", "judge_photos",
                                   "judge_steps"))
    if len(set(args.anchor_weights)) != len(args.anchor_weights) or min(args.anchor_weights) < 0:
        parser.error(f"--anchor-weights {args.anchor_weights}: distinct values >= 0, e.g. 0 1 3 10 30")
    return args


def main(argv: list[str] | None = None) -> dict:
    quiet_third_party()
    args = parse_args(argv)
    with one_line_errors("acpo_toy", InputError):
        summary = run(args)
    print(json.dumps(summary, indent=2))
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
