"""Benchmark the ACPO loss: what one training step costs next to a plain LoRA diffusion step.

In one process, on one batch, each variant is an optimiser step of a rank-4 LoRA on the attention projections
(the U-Net frozen), timed in interleaved rounds (so slow drift of a shared machine hits every variant alike):

* ``plain``: U-Net forward with gradients + noise-prediction MSE + backward + AdamW step;
* ``acpo_default``: :class:`~qualityguide.finetune.ACPOLoss` with the default :class:`ACPOConfig` + backward + AdamW
  step, with exactly ``quality_count(batch) = round(0.5 * batch)`` samples in the quality window (timesteps are
  passed in, the others drawn above ``t_quality_max``; a random draw would sometimes put more there);
* ``acpo_all``: the same with ``quality_fraction=1``, every sample in the quality window;

and the components ACPO adds, timed in the same rounds:

* ``anchor``: the U-Net forward under ``no_grad`` with the adapters disabled (the base prediction);
* ``quality_k``: decoder + scorer forward and backward on ``k`` one-step clean estimates (``k`` = the quality
  samples of each ACPO variant).

``ratio = ACPO step / (plain + anchor + quality_k)`` on medians: 1.0 means ACPO costs exactly its parts (target
<= 1.10). ``ratio_of_minima`` is the same on each variant's fastest round: on a shared machine other processes only
ever add time, so the minima are the least disturbed estimate.
Peak memory: CUDA ``max_memory_allocated`` per variant; on CPU the process RSS sampled every 2 ms by a psutil
thread during one extra (untimed) step of each variant, reported as the peak and as the rise over the RSS before
that step (the resident model; freed heap is returned to the OS with glibc's ``malloc_trim`` first).

    python -m evals.bench_acpo --model tiny:sd --repeats 2
    python -m evals.bench_acpo --model random:sd15 --height 256 --batch-size 2 --repeats 3
    python -m evals.bench_acpo --model stable-diffusion-v1-5/stable-diffusion-v1-5 --device cuda --height 512 \
        --batch-size 4

Writes ``evals/results/bench_acpo/<model>_<size>px_b<batch>.json`` / ``.md`` / ``.png`` and prints the JSON.
Random-weight models (``tiny:``, ``random:``) measure cost only, never quality.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import threading
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from evals.common.figures import pyplot, save_figure
from evals.common.flags import add_benchmark_flags, add_pipeline_flags, eval_parser, one_line_errors
from evals.common.report import markdown_table, slug, write_report
from qualityguide.diffusion import (add_noise, frozen, is_sdxl, noise_prediction_loss, one_step_clean,
                                    sample_timesteps, sdxl_added_conditions, training_target, unet_conditioning)
from qualityguide.errors import InputError
from qualityguide.finetune import ACPOConfig, ACPOLoss, adapters_disabled, add_lora, lora_parameters
from qualityguide.pipelines import load_pipeline
from qualityguide.runtime import quiet_third_party
from qualityguide.scorers import load_scorer
from qualityguide.runtime import synchronize

RESULTS = Path(__file__).resolve().parent / "results" / "bench_acpo"
TARGET = 1.10


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so memory freed by an earlier variant does not
    hide the next one's rise; a no-op where the C library lacks it."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RSSPeak:
    """The highest resident set size seen by a psutil sampling thread while the context is open (CPU runs)."""

    def __init__(self, interval_s: float = 0.002):
        import psutil

        self.process, self.interval_s = psutil.Process(), interval_s
        self.baseline = self.peak = self.process.memory_info().rss

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RSSPeak:
        _trim_heap()
        self.baseline = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


class Bench:
    """One pipeline with a LoRA, one batch, and a step function per variant.

    Args:
        pipe: a diffusers SD / SDXL / DDPM pipeline (its U-Net gets a rank-``rank`` LoRA here).
        scorer: the differentiable quality scorer of the ACPO variants.
        size: image side in pixels.
        batch: samples per step.
        rank: LoRA rank.
    """

    def __init__(self, pipe, scorer, size: int, batch: int, rank: int = 4):
        self.pipe, self.unet, self.scorer, self.batch = pipe, pipe.unet, scorer, batch
        self.device = self.unet.device
        self.autocast = self.unet.dtype != torch.float32
        add_lora(self.unet, rank=rank)
        self.params = lora_parameters(self.unet)
        for p in self.params:  # LoRA weights train in float32 (mixed precision on fp16/bf16 U-Nets)
            p.data = p.data.float()
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5, weight_decay=1e-2)
        self.losses = {"acpo_default": ACPOLoss.from_pipeline(pipe, scorer, ACPOConfig()),
                       "acpo_all": ACPOLoss.from_pipeline(pipe, scorer, ACPOConfig(quality_fraction=1.0))}
        self.reference = self.losses["acpo_default"]
        self.denoiser = self.reference.denoiser
        self.counts = {name: loss.config.quality_count(batch) for name, loss in self.losses.items()}
        g = torch.Generator().manual_seed(0)
        latent = size // getattr(pipe, "vae_scale_factor", 1)
        channels = self.unet.config.in_channels
        if getattr(pipe, "vae", None) is not None:  # clean latents of random images, encoded once like a recipe
            with torch.no_grad():
                images = torch.rand(batch, 3, size, size, generator=g).to(self.device, self.unet.dtype)
                self.z0 = self.denoiser.encode(images).to(self.unet.dtype)
        else:
            self.z0 = (torch.rand(batch, channels, latent, latent, generator=g) * 2 - 1).to(self.device,
                                                                                             self.unet.dtype)
        self.conditioning = self._conditioning(pipe, batch, size)

    def _conditioning(self, pipe, batch: int, size: int):
        if getattr(pipe, "text_encoder", None) is None:
            return None
        prompt = ["a photo of a lighthouse on a cliff"] * batch
        with torch.no_grad():
            if is_sdxl(pipe):
                embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=self.device, do_classifier_free_guidance=False)
                return unet_conditioning(embeds, sdxl_added_conditions(pipe.unet, pooled, (size, size), (0, 0),
                                                                       (size, size), pipe.text_encoder_2, embeds.dtype))
            embeds, _ = pipe.encode_prompt(prompt, self.device, 1, False)
        return {"encoder_hidden_states": embeds}

    def _noised(self, i: int, k: int = 0):
        """Round ``i``'s timesteps (the first ``k`` in the quality window ``[0, t_quality_max]``, the rest above it,
        so a variant scores exactly ``k`` samples), noise and noisy input."""
        g = torch.Generator().manual_seed(i)
        high, total = self.reference.config.t_quality_max + 1, self.reference.num_train_timesteps
        t = torch.cat([sample_timesteps(k, total, g, high=high),
                       sample_timesteps(self.batch - k, total, g, low=min(high, total - 1))]).to(self.device)
        noise = torch.randn(self.z0.shape, generator=g).to(self.device, self.z0.dtype)
        return t, noise, add_noise(self.z0, noise, t, self.reference.alphas_cumprod)

    def _cast(self):
        return torch.autocast(self.device.type, dtype=self.unet.dtype, enabled=self.autocast)

    def _optimise(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.optimizer.step()

    def plain(self, i: int) -> None:
        """Forward with gradients + noise-prediction MSE + backward + optimiser step."""
        self.optimizer.zero_grad(set_to_none=True)
        t, noise, z_t = self._noised(i)
        with self._cast():
            out = self.denoiser.predict(z_t, t, self.conditioning or {})
        table = self.reference.alphas_cumprod
        self._optimise(noise_prediction_loss(out, training_target(self.z0, noise, t, table,
                                                                  self.reference.prediction_type)))

    def acpo(self, name: str, i: int) -> None:
        """One ACPO step (``acpo_default`` or ``acpo_all``) on the round's timesteps and noise."""
        self.optimizer.zero_grad(set_to_none=True)
        t, noise, _ = self._noised(i, self.counts[name])
        with self._cast():
            out = self.losses[name](self.z0, self.conditioning, timesteps=t, noise=noise)
        self._optimise(out["loss"])

    def anchor(self, i: int) -> None:
        """The base prediction ACPO adds: a forward without gradients with the LoRA switched off."""
        t, _, z_t = self._noised(i)
        with torch.no_grad(), adapters_disabled(self.unet), self._cast():
            self.denoiser.predict(z_t, t, self.conditioning or {})

    def quality(self, k: int, i: int) -> None:
        """Decoder + scorer forward and backward on ``k`` one-step clean estimates (a leaf standing in for the
        U-Net output, so no U-Net backward is counted)."""
        if k == 0:
            return
        t, noise, z_t = self._noised(i, k)
        output = noise[:k].detach().float().requires_grad_(True)
        t = t[:k]
        with frozen(self.pipe.vae if hasattr(self.pipe, "vae") else None, self.scorer), self._cast():
            clean = one_step_clean(output, z_t[:k], t, self.reference.alphas_cumprod, self.reference.prediction_type)
            score = self.scorer(self.denoiser.decode(clean)).float().mean()
        score.backward()

    def variants(self) -> dict:
        """Name -> ``step(i)`` for every timed variant."""
        table = {"plain": self.plain, "anchor": self.anchor}
        for name in self.losses:
            table[name] = lambda i, name=name: self.acpo(name, i)
        for k in sorted(set(self.counts.values())):
            table[f"quality_{k}"] = lambda i, k=k: self.quality(k, i)
        return table


def run(args) -> dict:
    """Time every variant (median over ``args.repeats`` after a warm-up round) and measure its peak memory."""
    device = torch.device(args.device)
    pipe = load_pipeline(args.model, dtype=args.dtype, device=device)
    size = args.height or pipe.unet.config.sample_size * getattr(pipe, "vae_scale_factor", 1)
    scorer = load_scorer(args.scorer, device=device)
    bench = Bench(pipe, scorer, size, args.batch_size, args.rank)
    variants = bench.variants()
    times = {name: [] for name in variants}
    total = (args.repeats + 1) * len(variants)
    with tqdm(total=total, desc="bench_acpo rounds") as bar:
        for r in range(args.repeats + 1):  # round 0 warms up
            for name, step in variants.items():
                synchronize(device)
                start = time.perf_counter()
                step(r)
                synchronize(device)
                if r > 0:
                    times[name].append(time.perf_counter() - start)
                bar.update()
    peaks = {}
    for name, step in tqdm(variants.items(), desc="peak memory"):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            step(args.repeats + 1)
            synchronize(device)
            peaks[name] = {"peak_bytes": int(torch.cuda.max_memory_allocated(device)),
                           "rise_bytes": int(torch.cuda.max_memory_allocated(device) - base)}
        else:
            with RSSPeak() as meter:
                step(args.repeats + 1)
            peaks[name] = {"peak_bytes": int(meter.peak), "rise_bytes": int(meter.peak - meter.baseline)}
    median = {name: statistics.median(values) for name, values in times.items()}
    fastest = {name: min(values) for name, values in times.items()}
    result = {"model": args.model, "device": args.device, "dtype": args.dtype or "fp32", "size": size,
              "batch": args.batch_size, "repeats": args.repeats, "rank": args.rank, "scorer": scorer.name,
              "threads": torch.get_num_threads(), "platform": platform.platform(),
              "acpo_config_default": ACPOConfig().to_dict(),
              "quality_samples": bench.counts,
              "memory_kind": ("cuda max_memory_allocated" if device.type == "cuda" else
                              "process RSS sampled every 2 ms by psutil (peak, and rise over the RSS before the step)"),
              "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "median_s": median, "min_s": fastest, "all_s": times, "memory": peaks, "target_ratio": TARGET,
              "ratios": {}}
    for name, k in bench.counts.items():
        parts = median["plain"] + median["anchor"] + median.get(f"quality_{k}", 0.0)
        parts_min = fastest["plain"] + fastest["anchor"] + fastest.get(f"quality_{k}", 0.0)
        result["ratios"][name] = {"acpo_s": median[name], "parts_s": parts, "ratio": median[name] / parts,
                                  "over_plain": median[name] / median["plain"],
                                  "meets_target": median[name] / parts <= TARGET,
                                  "ratio_of_minima": fastest[name] / parts_min}
    return result


def markdown(r: dict) -> str:
    mib = 2 ** 20
    label = " (random weights: cost only)" if r["model"].startswith(("tiny:", "random:")) else ""
    lines = [f"ACPO step cost, `{r['model']}`{label} on {r['device']} ({r['dtype']}, {r['threads']} thread(s)), "
             f"{r['size']} px, batch {r['batch']}, LoRA rank {r['rank']}, scorer `{r['scorer']}`; median of "
             f"{r['repeats']} interleaved rounds after a warm-up.", ""]
    lines += markdown_table(["variant", "median s per step", "min s", "peak MiB", "rise MiB"], [
        [name, f"{s:.3f}", f"{r['min_s'][name]:.3f}", f"{r['memory'][name]['peak_bytes'] / mib:.0f}",
         f"{r['memory'][name]['rise_bytes'] / mib:.0f}"] for name, s in r["median_s"].items()])
    lines += ["", f"Memory: {r['memory_kind']}.", ""]
    lines += markdown_table(["ACPO variant", "quality samples", "ACPO s", "plain + anchor + quality s",
                             f"ratio (target <= {r['target_ratio']})", "ratio of minima", "ACPO / plain"], [
        [name, r["quality_samples"][name], f"{q['acpo_s']:.3f}", f"{q['parts_s']:.3f}",
         f"{q['ratio']:.3f} ({'meets' if q['meets_target'] else 'misses'})", f"{q['ratio_of_minima']:.3f}",
         f"{q['over_plain']:.2f}"] for name, q in r["ratios"].items()])
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    plt = pyplot()

    med = r["median_s"]
    names = list(r["ratios"])
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
    for i, name in enumerate(names):
        k = r["quality_samples"][name]
        bottom = 0.0
        for part, colour in (("plain", "C0"), ("anchor", "C1"), (f"quality_{k}", "C2")):
            value = med.get(part, 0.0)
            ax.bar(2 * i, value, bottom=bottom, color=colour, label=part if i == 0 or part.startswith("quality")
                   else None)
            bottom += value
        ax.bar(2 * i + 0.9, med[name], color="C3", label="ACPO step" if i == 0 else None)
        ax.text(2 * i + 0.9, med[name], f"x{r['ratios'][name]['ratio']:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks([2 * i + 0.45 for i in range(len(names))], names)
    ax.set_ylabel("s per step")
    ax.set_title(f"{r['model']} {r['size']} px batch {r['batch']}: ACPO vs its parts", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, parsed before anything is loaded (the tests run the docstring examples through it)."""
    parser = eval_parser(__doc__)
    add_pipeline_flags(parser, dtype_help="U-Net/VAE dtype (fp16/bf16 train the LoRA under autocast)")
    parser.add_argument("--height", type=int, default=None, help="image side in px (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--scorer", default="niqe-embedded", help="differentiable quality scorer spec")
    add_benchmark_flags(parser, RESULTS)
    args = parser.parse_args(argv)
    parser.require_positive(args, ("batch_size", "repeats", "rank"))
    if args.height is not None and (args.height < 8 or args.height % 8):
        parser.error(f"--height={args.height}: must be a positive multiple of 8, e.g. 256")
    return args


def main(argv: list[str] | None = None) -> None:
    quiet_third_party()
    args = parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    with one_line_errors("bench_acpo", InputError):
        result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, slug(args.model, f"{result['size']}px", f"b{args.batch_size}"), result, markdown(result), plot)
    print(json.dumps(result, indent=2))
    print(markdown(result))


if __name__ == "__main__":
    main()
