"""Guided versus unguided sampling on the same prompts and seeds.

Reports the gain of the guiding scorer, the gain of a held-out scorer (a guided image that only fools
the guiding metric shows a gain there and none, or a loss, here: reward hacking), the CLIP text-image
score (open-clip; ``--clip`` weights, else a random-weight ViT-B-32 labelled as such) and the
wall-time ratio. Resumable (images and JSONL records under ``--out``). Writes results.json,
results.md and grid.png.

    python evals/guidance.py --model tiny:sd --scorer niqe-embedded@192 --held-out pyiqa:piqe@192 \
        --scale 0.1 --steps 10
    python evals/guidance.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --device cuda --dtype fp16 \
        --scorer pyiqa:topiq_nr --held-out pyiqa:musiq --clip open_clip_vit_b32.bin --scale 0.05
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from qualityguide.errors import InputError, QualityGuideError
from qualityguide.guidance import QualityGuidance
from qualityguide.guidance.runner import (append_record, check_settings, finished, make_jobs, read_prompts,
                                          save_image, timed_generate)
from qualityguide.images import load_image
from qualityguide.pipelines import load_pipeline
from qualityguide.protocol import bootstrap_ci
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


class ClipScore:
    """100 x cosine similarity of open-clip image and text embeddings."""

    def __init__(self, weights: str | None, device: torch.device, arch: str = "ViT-B-32"):
        import open_clip

        self.model, _, self.preprocess = open_clip.create_model_and_transforms(arch, pretrained=weights)
        self.model.eval().to(device)
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.device = device
        self.label = f"open-clip {arch}" + (f" ({Path(weights).name})" if weights else
                                           " with RANDOM weights (offline mechanics check, not alignment)")

    @torch.no_grad()
    def __call__(self, paths: list[Path], prompts: list[str]) -> np.ndarray:
        from PIL import Image

        images = torch.stack([self.preprocess(Image.open(p).convert("RGB")) for p in paths]).to(self.device)
        image_emb = torch.nn.functional.normalize(self.model.encode_image(images).float(), dim=-1)
        text_emb = torch.nn.functional.normalize(self.model.encode_text(self.tokenizer(prompts).to(self.device))
                                                 .float(), dim=-1)
        return (100 * (image_emb * text_emb).sum(-1)).cpu().numpy()


def score_folder(scorer, records: dict[str, dict], keys: list[str], out: Path, device) -> np.ndarray:
    values = []
    with torch.no_grad():
        for key in keys:
            values.append(float(scorer(load_image(out / records[key]["image"])[None].to(device))))
    return np.asarray(values)


def paired(guided: np.ndarray, base: np.ndarray) -> dict:
    diff = guided - base
    lo, hi = bootstrap_ci(diff, diff, lambda a, b: float(np.mean(a)), n_boot=2000)
    return {"unguided_mean": float(base.mean()), "guided_mean": float(guided.mean()), "mean_gain": float(diff.mean()),
            "gain_ci95": [lo, hi], "fraction_improved": float((diff > 0).mean())}


def grid(keys, unguided, guided, out_u: Path, out_g: Path, path: Path, n: int = 8) -> None:
    from PIL import Image

    keys = keys[:n]
    tiles = [[Image.open(out_u / unguided[k]["image"]) for k in keys], [Image.open(out_g / guided[k]["image"])
                                                                         for k in keys]]
    w, h = tiles[0][0].size
    canvas = Image.new("RGB", (w * len(keys), h * 2), "white")
    for row, images in enumerate(tiles):
        for col, image in enumerate(images):
            canvas.paste(image.convert("RGB"), (col * w, row * h))
    canvas.save(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked before any model is loaded or image generated."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    try:
        run(args)
    except QualityGuideError as exc:
        raise SystemExit(f"guidance: {exc}") from None


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
    clip = ClipScore(args.clip, device)
    result["clip"] = {"label": clip.label, **paired(
        clip([out / "guided" / guided[k]["image"] for k in keys], [guided[k]["prompt"] for k in keys]),
        clip([out / "unguided" / unguided[k]["image"] for k in keys], [unguided[k]["prompt"] for k in keys]))}
    t_u = sum(unguided[k]["seconds"] for k in keys)
    t_g = sum(guided[k]["seconds"] for k in keys)
    result["time"] = {"unguided_s": t_u, "guided_s": t_g, "ratio": t_g / t_u,
                      "note": "seconds recorded when each image was generated (a resumed run mixes sessions)"}
    grid(keys, unguided, guided, out / "unguided", out / "guided", out / "grid.png")
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(markdown(result))
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
