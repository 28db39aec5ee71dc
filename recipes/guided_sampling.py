"""Quality-guided sampling over a prompt list, sharded across processes, resumable.

    python recipes/guided_sampling.py --model tiny:sd --prompts evals/prompts.txt --scorer niqe-embedded@192 \
        --scale 0.05 --out guided/
    accelerate launch --num_processes 4 recipes/guided_sampling.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --dtype fp16 --prompts prompts.txt --scorer pyiqa:topiq_nr --scale 0.05 --out guided/

Writes ``OUT/images/<prompt index>_<seed>.png`` and ``OUT/results-<rank>.jsonl`` (prompt, seed, settings,
score of the guiding scorer, seconds). Rerun the same command to resume: finished images are skipped.
Every piece (guidance callback, prompts, jobs, resumable records) comes from ``qualityguide.guidance``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qualityguide.guidance import QualityGuidance
from qualityguide.guidance.runner import (append_record, check_settings, finished, make_jobs, read_prompts,
                                          save_image, timed_generate)
from qualityguide.runtime import process_state, split_for_process
from qualityguide.pipelines import load_pipeline
from qualityguide.runtime import quiet_third_party, run_main
from qualityguide.scorers import load_scorer


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="hub id, local folder, tiny:sd, tiny:sdxl, random:sd15")
    parser.add_argument("--prompts", required=True, help="text file, one prompt per line")
    parser.add_argument("--scorer", required=True, help="differentiable scorer spec, optionally SPEC@SIZE to resize the "
                        "short side to SIZE px before scoring (see `qualityguide scorers`)")
    parser.add_argument("--weights", default=None, help="local weights for the scorer")
    parser.add_argument("--scale", type=float, required=True, help="guidance step size (0: unguided)")
    parser.add_argument("--start", type=float, default=0.0)
    parser.add_argument("--end", type=float, default=1.0)
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--normalize", default="rms", choices=["rms", "unit", "none"])
    parser.add_argument("--mode", default="x0", choices=["x0", "unet"])
    parser.add_argument("--out", default="guided-samples")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--seeds-per-prompt", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default=None, help="fp16 / bf16 / fp32")
    parser.add_argument("--device", default="auto", help="'auto': this process's accelerate device")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    quiet_third_party()
    args = parse_args(argv)
    state = process_state(cpu=args.device == "cpu")
    device = state.device if args.device == "auto" else torch.device(args.device)
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    jobs = make_jobs(read_prompts(args.prompts), args.seeds_per_prompt, args.seed)
    settings = {k: getattr(args, k) for k in ("model", "scorer", "weights", "scale", "start", "end",
                                              "every", "normalize", "mode", "steps", "cfg", "dtype")}
    if state.is_main_process:
        check_settings(out, settings)
    state.wait_for_everyone()
    done = finished(out, jobs)
    state.wait_for_everyone()
    mine = split_for_process(state, [job for job in jobs if job.key not in done])
    pipe = load_pipeline(args.model, dtype=args.dtype, device=device)
    scorer = load_scorer(args.scorer, weights=args.weights, device=device)
    guidance = QualityGuidance(scorer, scale=args.scale, start=args.start, end=args.end, every=args.every,
                               normalize=args.normalize, mode=args.mode).attach(pipe)
    try:
        for job in tqdm(mine, desc=f"guided sampling ({state.process_index})", disable=not state.is_main_process):
            guidance.history.clear()
            image, seconds = timed_generate(pipe, job, guidance, steps=args.steps, guidance_scale=args.cfg)
            with torch.no_grad():
                score = float(scorer(image.to(device)))
            name = f"images/{job.key}.png"
            save_image(image, out / name)
            append_record(out, state.process_index, {"key": job.key, "index": job.index, "prompt": job.prompt,
                                                     "seed": job.seed, "image": name, "score": score,
                                                     "seconds": seconds, "skipped_steps": sum(
                                                         int(h["skipped"].all()) for h in guidance.history
                                                         if not h["deferred"]),
                                                     **settings})
    finally:
        guidance.detach()
    state.wait_for_everyone()
    if state.is_main_process:
        print(json.dumps({"jobs": len(jobs), "already_done": len(done), "done_now": len(finished(out, jobs))}))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "guided_sampling"))
