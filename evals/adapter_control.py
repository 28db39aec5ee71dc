"""Does the IQA-Adapter learn control? A small task where quality is known, on a CPU in minutes.

1. Crops of real photos (BIQ2021) at graded blur / noise / JPEG levels plus clean, labelled by a scorer of
   this library (``evals/toy_task.py``: BRISQUE with the original LIVE model, chosen there because it tracks
   the distortion level on these crops).
2. A tiny pixel-space ``UNet2DConditionModel`` trained briefly on all of them (cached by toy_task).
3. An :class:`~qualityguide.adapter.IQAAdapter` trained on top with :class:`AdapterTrainer` (the recipe's
   loss, quality dropout), and a control adapter trained identically on **shuffled** labels.
4. For each target percentile, the same seeds are sampled with each adapter (and without one), the
   samples are scored by the same scorer, and the Spearman correlation between target and measured
   quality is reported: adapter on, adapter with quality guidance (CFG on the quality condition,
   negative = the null input), shuffled-label adapter, and off (identical images for every target).

    python evals/adapter_control.py
    python evals/adapter_control.py --adapter-steps 50 --samples 4 --sample-steps 5 --n-images 8 --base-steps 20

Writes ``evals/results/adapter_control/{summary.json, results.md, control.png, grid.png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toy_task  # noqa: E402  (the shared task lives next to this script)

from qualityguide.adapter import IQAAdapter, ScoreQuantiles  # noqa: E402
from qualityguide.adapter.training import AdapterTrainer, DropoutConfig, dropout_masks  # noqa: E402
from qualityguide.train import batch_indices, step_generator  # noqa: E402

HERE = Path(__file__).resolve().parent


class QualityCFG(torch.nn.Module):
    """Classifier-free guidance on the quality condition only: ``null + w (cond - null)`` per step."""

    def __init__(self, unet, scale: float):
        super().__init__()
        self.unet, self.scale = unet, scale
        self.config = unet.config

    @property
    def device(self):
        return self.unet.device

    @property
    def dtype(self):
        return self.unet.dtype

    def forward(self, x, t, encoder_hidden_states, added_cond_kwargs):
        cond = added_cond_kwargs["image_embeds"][0]
        both = torch.cat([torch.zeros_like(cond), cond])
        out = self.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([encoder_hidden_states] * 2),
                        added_cond_kwargs={"image_embeds": [both]}).sample
        null, guided = out.chunk(2)
        return type("Out", (), {"sample": null + self.scale * (guided - null)})()


def train_adapter(unet, scheduler, images, labels, name, args, shuffle: bool):
    """Train an adapter on (images, labels); with ``shuffle`` the labels are permuted first (the control)."""
    torch.manual_seed(args.seed)
    adapter = IQAAdapter.for_unet(unet, [name], num_tokens=args.num_tokens, projection="linear")
    adapter.set_quantiles(ScoreQuantiles.fit({name: labels}))
    if shuffle:
        labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(args.seed + 1))]
    adapter.attach(unet, dtype=torch.float32)
    trainer = AdapterTrainer(adapter, unet, scheduler)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=args.lr, weight_decay=1e-2)
    dropout = DropoutConfig(p_text=0.0, p_quality=args.p_quality, p_both=0.0)
    losses = []
    for step in tqdm(range(args.adapter_steps), desc=f"adapter ({'shuffled' if shuffle else 'true'} labels)"):
        index = batch_indices(len(images), args.batch_size, step, args.seed)
        generator = step_generator(args.seed, step)
        _, drop_quality = dropout_masks(len(index), dropout, generator)
        x0 = images[index] * 2 - 1
        loss = trainer(x0, toy_task.null_condition(unet, len(index)), adapter.condition(labels[index][:, None]),
                       None, drop_quality, generator)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    adapter.detach(unet)
    return adapter, losses


def generate(unet, scheduler, adapter, name, targets, args, cfg: float = 1.0) -> torch.Tensor:
    """``[targets, samples, 3, S, S]``: the same seeds for every target."""
    out = []
    model = unet if cfg == 1.0 else QualityCFG(unet, cfg)
    if adapter is not None:
        adapter.attach(unet)
    try:
        for p in targets:
            kwargs = None
            if adapter is not None:
                embeds = adapter.embeds(percentiles={name: float(p)}, do_cfg=False)[0]  # [1, 1, d]
                kwargs = {"image_embeds": [embeds.expand(args.samples, -1, -1)]}  # one row per image
            out.append(toy_task.sample(model, scheduler, args.samples, seed=10_000, steps=args.sample_steps,
                                       encoder_hidden_states=toy_task.null_condition(unet, 1),
                                       added_cond_kwargs=kwargs, progress=False))
    finally:
        if adapter is not None:
            adapter.detach(unet)
    return torch.stack(out)


def control_stats(targets, scores: torch.Tensor) -> dict:
    """Spearman of target vs measured score over all samples, and per-target means."""
    t = np.repeat(np.asarray(targets, dtype=float), scores.shape[1])
    s = scores.reshape(-1).numpy()
    ok = np.isfinite(s)
    identical = bool(np.allclose(scores.numpy(), scores[:1].numpy(), equal_nan=True))
    rho = float("nan") if identical else float(spearmanr(t[ok], s[ok]).statistic)
    means = [float(np.nanmean(row)) for row in scores.numpy()]
    sems = [float(np.nanstd(row) / max(1, np.isfinite(row).sum()) ** 0.5) for row in scores.numpy()]
    return {"spearman": rho, "identical_for_every_target": identical, "mean": means, "sem": sems,
            "nan": int((~ok).sum())}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="folder holding biq2021/ and params/ (default: shared data)")
    parser.add_argument("--out", default=str(HERE / "results" / "adapter_control"))
    parser.add_argument("--cache", default=str(HERE / "results" / "toy_base"), help="trained base models")
    parser.add_argument("--n-images", type=int, default=256)
    parser.add_argument("--crop", type=int, default=48)
    parser.add_argument("--base-steps", type=int, default=toy_task.BaseConfig.steps)
    parser.add_argument("--adapter-steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16,
                        help="adapter training batch (16: the eval fits ~15 min on one CPU thread)")
    parser.add_argument("--lr", type=float, default=1e-3, help="1e-3: a tiny model from scratch (SD uses 1e-5)")
    parser.add_argument("--p-quality", type=float, default=0.1, help="quality dropout (enables quality CFG)")
    parser.add_argument("--num-tokens", type=int, default=4)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.05, 0.25, 0.5, 0.75, 0.95])
    parser.add_argument("--samples", type=int, default=32, help="samples per target (same seeds for each)")
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--cfg", type=float, default=3.0, help="quality guidance scale of the guided variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: the machine is shared)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    data = toy_task.resolve_data_dir(args.data)
    crops = toy_task.build_crops(data / "biq2021", args.n_images, args.crop, seed=args.seed)
    scorer = toy_task.load_toy_scorer(params_dir=data / "params")
    name = toy_task.TOY_SCORER
    labels = toy_task.score_images(scorer, crops.images, desc="labelling crops")
    keep = torch.isfinite(labels)
    images, labels = crops.images[keep], labels[keep].double()
    unet, scheduler, base_info = toy_task.load_or_train_base(crops, toy_task.BaseConfig(
        crop=args.crop, steps=args.base_steps, seed=args.seed), args.cache)
    unet.requires_grad_(False)

    adapter, losses = train_adapter(unet, scheduler, images, labels, name, args, shuffle=False)
    control, control_losses = train_adapter(unet, scheduler, images, labels, name, args, shuffle=True)
    variants = {"adapter": (adapter, 1.0), f"adapter, quality CFG {args.cfg:g}": (adapter, args.cfg),
                "shuffled labels": (control, 1.0), "off": (None, 1.0)}
    samples, results = {}, {}
    for label, (model, cfg) in tqdm(list(variants.items()), desc="sampling variants"):
        samples[label] = generate(unet, scheduler, model, name, args.targets, args, cfg)
        flat = samples[label].reshape(-1, *samples[label].shape[2:])
        scores = toy_task.score_images(scorer, flat, progress=False).reshape(len(args.targets), args.samples)
        results[label] = control_stats(args.targets, scores)
    quantile_scores = adapter.quantiles.score_at(name, args.targets).tolist()
    summary = {"scorer": name, "crops": int(keep.sum()), "crop_px": args.crop, "targets": args.targets,
               "training_set_score_at_target": quantile_scores, "samples_per_target": args.samples,
               "adapter_steps": args.adapter_steps, "batch_size": args.batch_size, "lr": args.lr,
               "p_quality": args.p_quality, "final_loss": float(np.mean(losses[-20:])),
               "final_loss_shuffled": float(np.mean(control_losses[-20:])),
               "base_model": {k: base_info[k] for k in ("key", "loaded", "final_loss", "train_seconds")
                              if k in base_info},
               "results": results, "seconds": time.perf_counter() - started, "threads": torch.get_num_threads(),
               "load_average": os.getloadavg(),
               "note": "a tiny pixel model trained for minutes on 48 px crops; the numbers show whether the "
                       "mechanism learns control, not the quality SD-scale training reaches"}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text(markdown(summary))
    plot(summary, out / "control.png")
    best = samples["adapter"] if not np.isfinite(results[f"adapter, quality CFG {args.cfg:g}"]["spearman"]) else \
        samples[f"adapter, quality CFG {args.cfg:g}"]
    toy_task.save_grid(best[:, :12].reshape(-1, *best.shape[2:]), out / "grid.png", columns=min(12, args.samples))
    print(json.dumps(summary, indent=2))
    print(markdown(summary))
    return summary


def markdown(s: dict) -> str:
    head = "| variant | Spearman(target, measured) | " + " | ".join(f"mean @ p={t:g}" for t in s["targets"]) + " |"
    lines = [f"IQA-Adapter control on {s['crops']} real photo crops ({s['crop_px']} px), scorer `{s['scorer']}`, "
             f"{s['samples_per_target']} samples per target (same seeds), adapter trained {s['adapter_steps']} steps.",
             "", head, "|" + "---|" * (len(s["targets"]) + 2),
             "| training set's score at the target | | " + " | ".join(f"{v:.2f}" for v in
                                                                    s["training_set_score_at_target"]) + " |"]
    for label, r in s["results"].items():
        rho = "n/a (same images)" if r["identical_for_every_target"] else f"{r['spearman']:.3f}"
        lines.append(f"| {label} | {rho} | " + " | ".join(f"{m:.2f} ± {e:.2f}" for m, e in zip(r["mean"], r["sem"]))
                     + " |")
    lines += ["", f"Final training loss: {s['final_loss']:.4f} (true labels), {s['final_loss_shuffled']:.4f} "
              "(shuffled). " + s["note"] + "."]
    return "\n".join(lines) + "\n"


def plot(s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for i, (label, r) in enumerate(s["results"].items()):
        rho = "" if r["identical_for_every_target"] else f" (rho {r['spearman']:.2f})"
        ax.errorbar(s["targets"], r["mean"], yerr=r["sem"], marker="o", capsize=3, label=label + rho, color=f"C{i}")
    ax.plot(s["targets"], s["training_set_score_at_target"], "k--", label="training set at that percentile")
    ax.set_xlabel("target percentile")
    ax.set_ylabel(f"measured {s['scorer']} of samples (higher is better)")
    ax.set_title("IQA-Adapter control on real photo crops (tiny model, CPU)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
