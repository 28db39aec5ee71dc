"""Guided versus unguided sampling on the same prompts and seeds.

Reports the gain of the guiding scorer, the gain of a held-out scorer (a guided image that only fools
the guiding metric shows a gain there and none, or a loss, here: reward hacking), the CLIP text-image
score (open-clip; ``--clip`` weights, else a random-weight ViT-B-32 labelled as such) and the
wall-time ratio. Resumable (images and JSONL records under ``--out``). Writes results.json,
results.md and grid.png.

    python -m evals.guidance --model tiny:sd --scorer niqe-embedded@192 --held-out pyiqa:piqe@192 \
        --scale 0.1 --steps 10
    python -m evals.guidance --model stable-diffusion-v1-5/stable-diffusion-v1-5 --device cuda --dtype fp16 \
        --scorer pyiqa:topiq_nr --held-out pyiqa:musiq --clip open_clip_vit_b32.bin --scale 0.05
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from evals.common.clip import ClipScore
from evals.common.flags import eval_parser, one_line_errors
from evals.common.report import write_report
from evals.common.scores import score_images
from evals.common.stats import paired_gain
from qualityguide.errors import InputError
from qualityguide.guidance import QualityGuidance
from qualityguide.guidance.runner import (append_record, check_settings, finished, make_jobs, read_prompts, save_image,
                                          timed_generate)
from qualityguide.images import load_image, make_grid
from qualityguide.pipelines import load_pipeline
from qualityguide.runtime import quiet_third_party
from qualityguide.scorers import load_scorer, split_size

HERE = Path(__file__).resolve().parent
MIN_PROMPTS = 3  # the paired bootstrap intervals of the gains need three (guided, unguided) pairs


def run_arm(pipe, jobs, out: Path, guidance, steps: int, cfg: float, label: str, settings: dict) -> dict[str, dict]:
    """Generate every job not yet in ``out`` (resumable; the folder is bound to ``settings``); records by key."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    check_settings(out, settings)
    done = finished(out, jobs)
    for job in tqdm([j for j in jobs if j.key not in done], desc=label):
        image, seconds = timed_generate(pipe, job, guidance, steps=steps, guidance_scale=cfg)
        name = f"images/{job.key}.png"
        save_image(image, out / name)
        append_record(out, 0, {"key": job.key, "prompt": job.prompt, "seed": job.seed, "image": name,
                               "seconds": seconds})
    return finished(out, jobs)


def score_folder(scorer, records: dict[str, dict], keys: list[str], out: Path, device) -> np.ndarray:
    """Scores of the images recorded under ``keys`` (every image must score: a refusal stops the report)."""
    chunks = [keys[i:i + 16] for i in range(0, len(keys), 16)]  # 16 decoded images in memory at a time
    return np.concatenate([score_images(scorer, [load_image(out / records[key]["image"]) for key in chunk], device,
                                        progress=False, strict=True).numpy() for chunk in chunks])


def paired(guided: np.ndarray, base: np.ndarray) -> dict:
    """:func:`evals.common.stats.paired_gain` under this report's keys."""
    gain = paired_gain(guided, base, n_boot=2000)
    return {"unguided_mean": gain["base_mean"], "guided_mean": gain["treated_mean"], "mean_gain": gain["gain"],
            "gain_ci95": gain["gain_ci95"], "fraction_improved": gain["fraction_improved"]}


def grid(keys, unguided, guided, out_u: Path, out_g: Path, path: Path, n: int = 8) -> None:
    """The first ``n`` prompts: unguided images on the top row, guided (same seeds) under them."""
    keys = keys[:n]
    make_grid([Image.open(out_u / unguided[k]["image"]) for k in keys]
              + [Image.open(out_g / guided[k]["image"]) for k in keys], columns=len(keys),
              background="white").save(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked before any model is loaded or image generated."""
    parser = eval_parser(__doc__)
    parser.add_argument("--model", default="tiny:sd")
    parser.add_argument("--prompts", default=str(HERE / "prompts.txt"))
    parser.add_argument("--limit", type=int, default=None, help="first N prompts")
    parser.add_argument("--scorer", default="niqe-embedded", help="the guiding scorer (SPEC@SIZE: resize first)")
    parser.add_argument("--held-out", default="pyiqa:piqe", help="a scorer not used for guidance (SPEC@SIZE too)")
    parser.add_argument("--weights", action="append", default=[], help="SPEC=FILE (SPEC without @SIZE), repeatable")
    parser.add_argument("--scale", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--clip", default=None, help="open-clip ViT-B-32 weights file (else random weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--out", default=str(HERE / "results" / "guidance"))
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < MIN_PROMPTS:
        parser.error(f"--limit={args.limit}: the gains' bootstrap intervals need at least {MIN_PROMPTS} prompts")
    if args.steps < 1:
        parser.error(f"--steps={args.steps}: must be >= 1")
    bad = [w for w in args.weights if "=" not in w]
    if bad:
        parser.error(f"--weights {bad[0]!r}: use SPEC=FILE, e.g. brisque=/path/brisque_svm_weights.pth")
    return args


def read_eval_prompts(path: str, limit: int | None) -> list[str]:
    """The first ``limit`` prompts of ``path``, refused when fewer than the statistics need."""
    prompts = read_prompts(path)[:limit]
    if len(prompts) < MIN_PROMPTS:
        raise InputError(f"{path} holds {len(prompts)} prompt(s); the gains' bootstrap intervals need at least "
                         f"{MIN_PROMPTS}: add prompts or raise --limit")
    return prompts


def main(argv: list[str] | None = None) -> None:
    quiet_third_party()
    args = parse_args(argv)
    with one_line_errors("guidance"):
        run(args)


def run(args: argparse.Namespace) -> None:
    """Check the prompts and load the scorers (cheap, and where a bad input shows), then generate and score."""
    weights = dict(item.split("=", 1) for item in args.weights)
    device = torch.device(args.device)
    out = Path(args.out)
    jobs = make_jobs(read_eval_prompts(args.prompts, args.limit))
    guiding, held_out = (load_scorer(spec, weights=weights.get(split_size(spec)[0]), device=device)
                         for spec in (args.scorer, args.held_out))
    pipe = load_pipeline(args.model, dtype=args.dtype, device=device)
    common = {"model": args.model, "steps": args.steps, "cfg": args.cfg, "dtype": args.dtype}
    unguided = run_arm(pipe, jobs, out / "unguided", None, args.steps, args.cfg, "unguided", common)
    with QualityGuidance(guiding, scale=args.scale).attach(pipe) as guidance:
        guided = run_arm(pipe, jobs, out / "guided", guidance, args.steps, args.cfg, "guided",
                         {**common, "scorer": guiding.name, "scale": args.scale})
    keys = [j.key for j in jobs]
    result = {"model": args.model, "prompts": len(keys), "steps": args.steps, "cfg": args.cfg, "scale": args.scale,
              "guiding_scorer": guiding.name, "held_out_scorer": held_out.name,
              "random_weights": args.model.startswith(("tiny:", "random:"))}
    for role, scorer in (("guiding", guiding), ("held_out", held_out)):
        base = score_folder(scorer, unguided, keys, out / "unguided", device)
        moved = score_folder(scorer, guided, keys, out / "guided", device)
        result[role] = paired(moved, base)
    clip = ClipScore.load_or_random(args.clip, device)
    result["clip"] = {"label": clip.label, **paired(
        clip([Image.open(out / "guided" / guided[k]["image"]) for k in keys], [guided[k]["prompt"] for k in keys]),
        clip([Image.open(out / "unguided" / unguided[k]["image"]) for k in keys],
             [unguided[k]["prompt"] for k in keys]))}
    t_u = sum(unguided[k]["seconds"] for k in keys)
    t_g = sum(guided[k]["seconds"] for k in keys)
    result["time"] = {"unguided_s": t_u, "guided_s": t_g, "ratio": t_g / t_u,
                      "note": "seconds recorded when each image was generated (a resumed run mixes sessions)"}
    grid(keys, unguided, guided, out / "unguided", out / "guided", out / "grid.png")
    write_report(out, "results", result, markdown(result))
    print(json.dumps(result, indent=2))
    print(markdown(result))


def markdown(r: dict) -> str:
    head = (f"Guided vs unguided, `{r['model']}`, {r['prompts']} prompts x 1 seed, {r['steps']} steps, CFG {r['cfg']}, "
            f"scale {r['scale']}" + (" — random-weight model: mechanics check, not image quality" if r["random_weights"]
                                     else ""))
    lines = [head, "", "| signal | unguided | guided | mean gain [95% CI] | improved |", "|---|---|---|---|---|"]
    for role, name in (("guiding", r["guiding_scorer"]), ("held_out", r["held_out_scorer"]), ("clip", "CLIP score")):
        s = r[role]
        lines.append(f"| {role}: {name} | {s['unguided_mean']:.4f} | {s['guided_mean']:.4f} | {s['mean_gain']:+.4f} "
                     f"[{s['gain_ci95'][0]:+.4f}, {s['gain_ci95'][1]:+.4f}] | {100 * s['fraction_improved']:.0f}% |")
    lines += ["", f"CLIP: {r['clip']['label']}", f"Time: guided / unguided = {r['time']['ratio']:.2f}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
