"""Does the IQA-Adapter learn control? A small task where quality is known, on a CPU in minutes.

1. Crops of real photos (BIQ2021) at graded blur / noise / JPEG levels plus clean, labelled by a scorer of
   this library (:mod:`evals.toy`: BRISQUE with the original LIVE model, chosen there because it tracks
   the distortion level on these crops).
2. A tiny pixel-space ``UNet2DConditionModel`` trained briefly on all of them (cached by :mod:`evals.toy`), with
   v-prediction by default: with epsilon prediction a model this small spends its error at high noise levels
   on copying the noise, where a global attribute is decided and epsilon's loss discounts the clean image by
   the SNR; on flat images whose brightness is the label neither the base nor an adapter then learns
   brightness (samples 0.499 / 0.500 / 0.501 at targets 0.1 / 0.5 / 0.9), while with v-prediction the adapter
   does (``tests/test_adapter_learning.py``). ``--prediction-type epsilon`` runs the original setting.
3. An :class:`~qualityguide.adapter.IQAAdapter` trained on top with :class:`AdapterTrainer` (the recipe's
   loss, quality dropout), and ``--twins`` (8) control adapters trained identically on **shuffled** labels,
   each on another permutation. With ``--joint``, also the same U-Net + adapter trained together from scratch
   with the condition (nothing frozen, the base's budget): what this architecture can learn at all, an upper
   bound for the adapter.
4. For each target percentile, the same seeds are sampled with each adapter (and without one), the
   samples are scored by the same scorer, and the Spearman correlation between target and measured
   quality is reported: adapter on, adapter with quality guidance (CFG on the quality condition,
   negative = the null input), the first shuffled twin (also with CFG), and off (identical images for
   every target). Because the seeds are shared, the trend is also measured within seeds
   (:func:`paired_trend`). The test that separates learnt control from a network merely reacting to its
   input: the true adapter's same-seed trend ranked among its twins' (:func:`permutation`, one-sided
   permutation p ``(1 + #twins >= true) / (1 + N)``), and tested against the twins' mean per seed
   (:func:`versus_shuffled`), with and without quality CFG.
5. The toy judge (:class:`evals.toy.ToyJudge`, a classifier of the crops' known conditions trained on other
   photos' crops) gives each sample's P(clean) and expected distortion level: a check that knows the truth
   by construction, beside the scorer the labels come from; its P(clean) trend gets the same permutation test.

The grids are labelled: ``grid.png`` (row = target percentile) and ``models.png`` (row = model and target), the
score and the judge's P(clean) under each image. Each trained adapter's measurements are kept in ``OUT/parts``
as they finish, so a killed run continues where it stopped.

After that, two **known-attribute checks** run the same pieces on synthetic images whose label *is* the
measured attribute: flat 16 px images (brightness; low frequency) and white noise on grey at 32 px (pixel std;
high frequency, with the quality base's layout: the adapter only at the two lowest levels). They show what the
adapter learns when the base can draw the attribute, next to what it learns on quality (``--no-check`` skips
them).

    python -m evals.adapter_control [--joint]
    python -m evals.adapter_control --adapter-steps 50 --samples 4 --sample-steps 5 --n-images 8 --base-steps 20

Writes ``evals/results/adapter_control/{summary.json, results.md, control.png, grid.png, models.png}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import page_trend_test, spearmanr, wilcoxon
from tqdm.auto import tqdm

from evals import toy
from evals.common.figures import pyplot, save_figure
from evals.common.flags import eval_parser
from evals.common.parts import PartStore
from evals.common.report import write_report
from evals.common.stats import permutation_test
from qualityguide.adapter import IQAAdapter, ScoreQuantiles
from qualityguide.adapter.training import AdapterTrainer, DropoutConfig, dropout_masks
from qualityguide.errors import InputError
from qualityguide.runtime import quiet_third_party
from qualityguide.train import batch_indices, step_generator
from qualityguide.train.run import train_step

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


def train_adapter(unet, scheduler, images, labels, name, args, twin: int | None = None):
    """Train an adapter on (images, labels); shuffled twin ``twin`` (0, 1, ...) permutes the labels first, each twin
    with its own permutation (seed ``args.seed + 1 + twin``; twin 0 is the single twin of earlier versions), and is
    otherwise trained identically (same initial weights, batches, noise and dropout): a draw from the null."""
    torch.manual_seed(args.seed)
    adapter = IQAAdapter.for_unet(unet, [name], num_tokens=args.num_tokens, projection="linear")
    adapter.set_quantiles(ScoreQuantiles.fit({name: labels}))
    if twin is not None:
        permutation = torch.randperm(len(labels), generator=torch.Generator().manual_seed(args.seed + 1 + twin))
        labels = labels[permutation]
    adapter.attach(unet, dtype=torch.float32)
    trainer = AdapterTrainer(adapter, unet, scheduler)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=args.lr, weight_decay=1e-2)
    dropout = DropoutConfig(p_text=0.0, p_quality=args.p_quality, p_both=0.0)
    losses = []
    for step in tqdm(range(args.adapter_steps), desc="adapter (true labels)" if twin is None else
                     f"shuffled twin {twin + 1} of {args.twins}"):
        def micro_step(micro: int, step: int = step) -> dict:
            index = batch_indices(len(images), min(args.batch_size, len(images)), step, args.seed)  # as evals.toy
            generator = step_generator(args.seed, step)
            _, drop_quality = dropout_masks(len(index), dropout, generator)
            x0 = images[index] * 2 - 1
            return trainer(x0, toy.null_condition(unet, len(index)), adapter.condition(labels[index][:, None]),
                           None, drop_quality, generator)

        # the recipes' step (qualityguide.train.run.train_step): the non-finite guard, no clipping
        losses.append(train_step(None, trainer, optimizer, None, adapter.parameters(), micro_step,
                                 max_grad_norm=None, step=step)["loss"])
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
            out.append(toy.sample(model, scheduler, args.samples, seed=10_000, steps=args.sample_steps,
                                       encoder_hidden_states=toy.null_condition(unet, 1),
                                       added_cond_kwargs=kwargs, progress=False))
    finally:
        if adapter is not None:
            adapter.detach(unet)
    return torch.stack(out)


def control_stats(targets, scores: torch.Tensor) -> dict:
    """Spearman of target vs measured score over all samples, per-target means, and the paired trend.

    ``scores`` is ``[targets, seeds]`` with the same seed in each column, so besides the pooled Spearman (which
    counts the spread between seeds as noise) the trend is also tested within seeds: see :func:`paired_trend`.
    """
    t = np.repeat(np.asarray(targets, dtype=float), scores.shape[1])
    s = scores.reshape(-1).numpy()
    ok = np.isfinite(s)
    identical = bool(np.allclose(scores.numpy(), scores[:1].numpy(), equal_nan=True))
    rho = float("nan") if identical else float(spearmanr(t[ok], s[ok]).statistic)
    means = [float(np.nanmean(row)) for row in scores.numpy()]
    sems = [float(np.nanstd(row) / max(1, np.isfinite(row).sum()) ** 0.5) for row in scores.numpy()]
    return {"spearman": rho, "identical_for_every_target": identical, "mean": means, "sem": sems,
            "nan": int((~ok).sum()), "paired": paired_trend(targets, scores.numpy(), identical),
            "scores": [[float(v) for v in row] for row in scores.numpy()]}


def paired_trend(targets, scores: np.ndarray, identical: bool = False) -> dict:
    """Does the score rise with the target *for the same seed*? ``scores``: ``[targets, seeds]``.

    The seed decides most of a sample (content, its distortion), so a small shift that the target causes is
    lost in the pooled Spearman's between-seed spread but shows in each seed's column. Reported: the mean
    over seeds of Spearman(target, that seed's scores); the highest-minus-lowest target difference per seed
    (mean, standard error, share of seeds where it is positive); and Page's L test for a monotone increase
    across the ordered targets with seeds as blocks (one-sided p-value; ``scipy.stats.page_trend_test``).
    Seeds with a non-finite score are left out; all NaN when every target gave the same images.
    """
    nan = {"seeds": 0, "within_seed_spearman": float("nan"), "top_minus_bottom": float("nan"),
           "top_minus_bottom_sem": float("nan"), "share_increasing": float("nan"), "page_p": float("nan")}
    columns = _by_seed(targets, scores)
    columns = columns[np.isfinite(columns).all(axis=1)]
    if identical or len(columns) < 2 or len(targets) < 2:
        return {**nan, "seeds": int(len(columns))}
    varying = columns[columns.std(axis=1) > 0]
    rhos = [spearmanr(np.arange(len(targets)), row).statistic for row in varying]
    difference = _rise(columns)
    page = page_trend_test(columns).pvalue if len(targets) >= 3 else float("nan")
    return {"seeds": int(len(columns)), "within_seed_spearman": float(np.mean(rhos)) if rhos else float("nan"),
            "top_minus_bottom": float(difference.mean()),
            "top_minus_bottom_sem": float(difference.std(ddof=1) / len(difference) ** 0.5),
            "share_increasing": float((difference > 0).mean()), "page_p": float(page)}


def _by_seed(targets, scores) -> np.ndarray:
    """``[targets, seeds]`` scores -> ``[seeds, targets in ascending order]``."""
    order = np.argsort(np.asarray(targets, dtype=float), kind="stable")
    return np.asarray(scores, dtype=float)[order].T


def _rise(columns: np.ndarray) -> np.ndarray:
    """Per seed, highest minus lowest target, from :func:`_by_seed`'s ``[seeds, targets ascending]``."""
    return columns[:, -1] - columns[:, 0]


def versus_shuffled(targets, scores, shuffled) -> dict:
    """Is the true-label adapter's trend larger than its shuffled twin's, for the same seed?

    Any adapter whose output depends smoothly on the condition moves a seed monotonically with the target, in a
    direction the labels need not have taught (the known-attribute checks' shuffled twins do, slightly), so a
    trend alone is no proof. Per seed: (highest - lowest target) of the adapter minus the same of the
    shuffled-label adapter; mean, standard error, and the one-sided Wilcoxon signed-rank p-value that it is
    positive. Seeds with a non-finite score in either are left out.
    """
    true, control = _by_seed(targets, scores), _by_seed(targets, shuffled)
    ok = np.isfinite(true).all(axis=1) & np.isfinite(control).all(axis=1)
    gap = _rise(true[ok]) - _rise(control[ok])
    if len(gap) < 2 or not np.any(gap):
        return {"seeds": int(len(gap)), "gap": float("nan"), "gap_sem": float("nan"), "wilcoxon_p": float("nan")}
    return {"seeds": int(len(gap)), "gap": float(gap.mean()), "gap_sem": float(gap.std(ddof=1) / len(gap) ** 0.5),
            "wilcoxon_p": float(wilcoxon(gap, alternative="greater").pvalue)}


def twin_study(unet, scheduler, images, labels, name, args, n_twins: int, cfgs: tuple[float, ...], measure,
               judge=None, parts: Path | None = None, base_key: str = "") -> dict:
    """The true-label adapter and ``n_twins`` shuffled twins, each sampled at every quality-CFG scale in ``cfgs``
    (1: none), plus no adapter; every variant from the same seeds, measured by ``measure`` (and ``judge``).

    The permutation statistic is each seed's highest-minus-lowest-target change (:func:`extreme_rise`), so twins
    2 ... N are sampled at those two targets only (the statistic is the same, and a twin costs about a fifth
    less: training 600 steps takes nearly twice as long as sampling every target with and without CFG); twin 1
    at every target, as the table's "shuffled labels" row. With ``parts``, each trained adapter's
    measurements are kept there as they finish, so a rerun after a kill continues instead of training again
    (filed under the settings, the labels and ``base_key``, the base model's cache key).

    Returns:
        ``results`` (:func:`control_stats` of "adapter", "shuffled labels" (twin 1), "off", each CFG variant,
        with a ``judge`` entry given a judge), ``twins`` (per true-adapter variant, every twin's stats),
        ``permutation`` (:func:`permutation`, per true-adapter variant), ``versus_shuffled`` (the true adapter
        against the mean twin, :func:`versus_shuffled`), ``samples`` (the true adapter's, twin 1's and "off"'s
        images, for the grids), ``loss`` and ``twin_losses`` (final training loss of the adapter and each twin).
    """
    extremes = sorted({min(args.targets), max(args.targets)})
    store = PartStore(parts, {**{k: v for k, v in vars(args).items() if k not in NOT_IN_KEY}, "name": name,
                              "labels": hashlib.sha256(labels.numpy().tobytes()).hexdigest(),
                              "base": base_key})
    results, samples, twins, twin_losses = {}, {}, {_label("adapter", cfg, args): [] for cfg in cfgs}, []
    losses = None
    for k in [None, *range(n_twins)]:
        targets = args.targets if k in (None, 0) else extremes
        record, kept = store.load(f"twin-{k}" if k is not None else "adapter", keep_samples=k in (None, 0))
        if record is None:
            adapter, trained = train_adapter(unet, scheduler, images, labels, name, args, twin=k)
            record, kept = {"loss": float(np.mean(trained[-20:])), "stats": {}}, {}
            for cfg in cfgs:
                kept[str(cfg)], record["stats"][str(cfg)] = measured(unet, scheduler, adapter, name, args, cfg,
                                                                     measure, judge, targets)
            store.save(f"twin-{k}" if k is not None else "adapter", record, kept if k in (None, 0) else {})
        model = "adapter" if k is None else "shuffled labels"
        for cfg in cfgs:
            if k in (None, 0):
                results[_label(model, cfg, args)] = record["stats"][str(cfg)]
                samples[_label(model, cfg, args)] = kept[str(cfg)]
            if k is not None:
                twins[_label("adapter", cfg, args)].append(record["stats"][str(cfg)])
        if k is None:
            losses = record["loss"]
        else:
            twin_losses.append(record["loss"])
    record, kept = store.load("off", keep_samples=True)
    if record is None:
        kept["1.0"], stats = measured(unet, scheduler, None, name, args, 1.0, measure, judge)
        record = {"stats": {"1.0": stats}}
        store.save("off", record, kept)
    samples["off"], results["off"] = kept["1.0"], record["stats"]["1.0"]
    return {"results": results, "twins": twins, "samples": samples, "loss": losses, "twin_losses": twin_losses,
            "permutation": {label: permutation(results[label], twins[label]) for label in twins},
            "versus_shuffled": {label: _versus_mean_twin(results[label], twins[label]) for label in twins
                                if twins[label]}}


NOT_IN_KEY = ("out", "cache", "threads", "joint", "checks", "no_check", "twins", "check_twins", "data")


def _label(model: str, cfg: float, args) -> str:
    return model if cfg == 1.0 else f"{model}, quality CFG {args.cfg:g}"


def measured(unet, scheduler, adapter, name, args, cfg: float, measure, judge=None,
             targets=None) -> tuple[torch.Tensor, dict]:
    """``(samples [targets, seeds, 3, S, S], control_stats)`` of one variant at ``targets`` (default
    ``args.targets``, recorded in the stats); with a ``judge``, the stats hold its per-target P(clean), level and
    type shares, and each sample's P(clean) (for the permutation test)."""
    targets = args.targets if targets is None else list(targets)
    samples = generate(unet, scheduler, adapter, name, targets, args, cfg)
    stats = {**control_stats(targets, measure(samples)), "targets": targets}
    if judge is not None:
        stats["judge"] = judged(judge, samples)
    return samples, stats


def extreme_rise(stats: dict, values: str = "scores") -> float:
    """Mean over seeds of (value at the highest target - value at the lowest), seeds with a non-finite value at
    either left out: the same-seed trend the permutation test ranks. ``values``: ``"scores"`` or the judge's
    ``"p_clean_scores"``."""
    rows = np.asarray(stats["scores"] if values == "scores" else stats["judge"][values], dtype=float)
    targets = np.asarray(stats["targets"], dtype=float)
    rise = rows[int(np.argmax(targets))] - rows[int(np.argmin(targets))]
    rise = rise[np.isfinite(rise)]
    return float(rise.mean()) if rise.size else float("nan")


def _versus_mean_twin(true: dict, twins: list[dict]) -> dict:
    """:func:`versus_shuffled` of the true adapter against the mean of its twins, at the lowest and highest target."""
    def extremes(stats):
        targets = np.asarray(stats["targets"], dtype=float)
        rows = [int(np.argmin(targets)), int(np.argmax(targets))]
        return np.asarray(stats["scores"], dtype=float)[rows]

    return versus_shuffled([0.0, 1.0], extremes(true), np.mean([extremes(t) for t in twins], axis=0))


def judged(judge, samples: torch.Tensor) -> dict:
    """The toy judge on ``[targets, seeds, 3, S, S]`` samples: per target the mean ``p_clean``, ``level`` and
    ``kind_share``; ``p_clean_scores`` ``[targets][seeds]``."""
    verdicts = [judge(row) for row in samples]
    return {"p_clean": [float(v["p_clean"].mean()) for v in verdicts],
            "level": [float(v["level"].mean()) for v in verdicts],
            "kind_share": [{k: v["kind"].count(k) / len(v["kind"]) for k in toy.DISTORTIONS} for v in verdicts],
            "p_clean_scores": [[float(p) for p in v["p_clean"]] for v in verdicts]}


def permutation(true: dict, twins: list[dict]) -> dict:
    """The true adapter's same-seed trend (:func:`extreme_rise`) in the permutation distribution of its twins'
    (:func:`permutation_test`); with the judge, the same for P(clean) under ``"judge_p_clean"``."""
    out = permutation_test(extreme_rise(true), [extreme_rise(t) for t in twins])
    if "judge" in true:
        out["judge_p_clean"] = permutation_test(extreme_rise(true, "p_clean_scores"),
                                                [extreme_rise(t, "p_clean_scores") for t in twins])
    return out


def _check_task(attribute: str, seed: int):
    """``(images, labels, BaseConfig fields, description, measure)`` of one known-attribute check."""
    generator = torch.Generator().manual_seed(seed)
    if attribute == "brightness":  # low frequency: flat 16 px images, brightness ~ U(0.1, 0.9)
        size, count = 16, 512
        labels = torch.rand(count, generator=generator) * 0.8 + 0.1
        images = labels.view(-1, 1, 1, 1).expand(count, 3, size, size).contiguous()
        fields = dict(crop=size, block_out_channels=(16, 32, 64), attention=(False, True, True))
        return (images, labels, fields, "mean brightness of flat 16 px images",
                lambda x: x.mean(dim=(-3, -2, -1)))
    # high frequency: white noise of amplitude ~ U(0.02, 0.25) on mid-grey, 32 px; the label is each image's
    # measured pixel std (the same measure as the samples'); the quality base's layout (adapter at 1/4 and 1/8
    # of the side only), so the adapter must steer pixel-level detail from the two lowest levels.
    size, count = 32, 512
    amplitude = torch.rand(count, generator=generator) * 0.23 + 0.02
    images = (0.5 + amplitude.view(-1, 1, 1, 1) * torch.randn(count, 3, size, size, generator=generator)).clamp(0, 1)
    measure = lambda x: x.std(dim=(-2, -1)).mean(-1)  # noqa: E731
    fields = dict(crop=size, block_out_channels=(16, 32, 64, 64), attention=(False, False, True, True))
    return images, measure(images), fields, "pixel std of white-noise 32 px images", measure


CHECKS = ("brightness", "noise amplitude")


def known_attribute_check(args, attribute: str = "brightness", parts: Path | None = None) -> dict:
    """The mechanism on an attribute a tiny base renders, where the label *is* the measured attribute.

    Same pieces as the quality task (evals.toy's base training, :func:`train_adapter`, :func:`generate`), on 512
    synthetic images: ``"brightness"`` (flat 16 px images; low frequency, decided at high noise) or
    ``"noise amplitude"`` (white noise on grey, 32 px, the quality base's 4-level layout with the adapter only at
    the two lowest levels; high frequency, decided at low noise). Shows what the adapter learns when the base
    can draw the attribute, next to the quality task's result. ``parts``: where finished pieces are kept
    (:func:`twin_study`).
    """
    images, labels, fields, description, measure = _check_task(attribute, args.seed)
    crops = toy.Crops(images, ["clean"] * len(images), torch.zeros(len(images), dtype=torch.long),
                           [f"{'flat' if attribute == 'brightness' else 'noise'}_{i}" for i in range(len(images))])
    config = toy.BaseConfig(steps=args.check_base_steps, seed=args.seed, prediction_type=args.prediction_type,
                                 **fields)
    unet, scheduler, info = toy.load_or_train_base(crops, config, args.cache, progress=False)
    settings = argparse.Namespace(**{**vars(args), "adapter_steps": args.check_steps, "twins": args.check_twins})
    study = twin_study(unet, scheduler, images, labels.double(), attribute, settings, args.check_twins, (1.0,),
                       measure, parts=parts, base_key=info["key"])
    quantiles = ScoreQuantiles.fit({attribute: labels.double()})
    return {"attribute": description, "images": len(images), "adapter_steps": args.check_steps,
            "training_set_value_at_target": quantiles.score_at(attribute, args.targets).tolist(),
            "final_loss": study["loss"], "final_loss_twins": study["twin_losses"],
            "base_model": {k: info[k] for k in ("key", "loaded", "final_loss", "train_seconds") if k in info},
            **{k: study[k] for k in ("results", "permutation", "versus_shuffled")}}


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked before anything is built or trained (a bad value fails in a second, not after
    the known-attribute checks' minutes)."""
    parser = eval_parser(__doc__)
    parser.add_argument("--data", default=None, help="folder holding biq2021/ and params/ (default: shared data)")
    parser.add_argument("--out", default=str(HERE / "results" / "adapter_control"))
    parser.add_argument("--cache", default=str(HERE / "results" / "toy_base"), help="trained base models")
    parser.add_argument("--n-images", type=int, default=256)
    parser.add_argument("--crop", type=int, default=48)
    parser.add_argument("--distortions", nargs="+", default=list(toy.DISTORTIONS), choices=toy.DISTORTIONS,
                        help="distortion families of the crops (clean = undistorted)")
    parser.add_argument("--base-steps", type=int, default=toy.BaseConfig.steps)
    parser.add_argument("--prediction-type", default="v_prediction", choices=toy.PREDICTION_TYPES,
                        help="the base's parameterisation (v: see the module docstring on why not epsilon)")
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
    parser.add_argument("--twins", type=int, default=8,
                        help="shuffled-label twins (each another label permutation, otherwise the same training): "
                             "the permutation distribution the true adapter's trend is ranked in (p >= 1/(1+N))")
    parser.add_argument("--judge-photos", type=int, default=toy.judge.JUDGE_PHOTOS,
                        help="photos whose crops (all ten conditions) train the toy judge")
    parser.add_argument("--joint", action="store_true",
                        help="also train the same U-Net + adapter jointly from scratch with the condition (nothing "
                             "frozen, the base's budget; ~8 more minutes): an upper bound for a frozen-base adapter")
    parser.add_argument("--checks", nargs="*", default=list(CHECKS), choices=CHECKS,
                        help="known-attribute checks to run first (label = the measured attribute; ~2 and ~4 min)")
    parser.add_argument("--check-steps", type=int, default=300, help="adapter steps of each known-attribute check")
    parser.add_argument("--check-base-steps", type=int, default=400, help="base training steps of each check")
    parser.add_argument("--check-twins", type=int, default=1,
                        help="shuffled twins of each known-attribute check (1: their gaps are far outside one "
                             "twin's; each more trains and samples one more adapter)")
    parser.add_argument("--no-check", action="store_true", help="skip the known-attribute checks (= --checks)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: the machine is shared)")
    args = parser.parse_args(argv)
    parser.require_positive(args, ("n_images", "base_steps", "adapter_steps", "batch_size", "num_tokens", "samples",
                                   "sample_steps", "check_steps", "check_base_steps", "threads", "twins",
                                   "check_twins", "judge_photos"))
    if len(set(args.targets)) != len(args.targets) or len(args.targets) < 2 or not all(
            0 <= t <= 1 for t in args.targets):
        parser.error(f"--targets {args.targets}: two or more distinct percentiles in [0, 1], e.g. 0.05 0.5 0.95")
    if not 0 <= args.p_quality < 1 or args.lr <= 0:
        parser.error(f"--p-quality {args.p_quality} must be in [0, 1) and --lr {args.lr} positive")
    try:
        base_config(args)  # its checks, now rather than after the crops are built and labelled
    except InputError as exc:
        parser.error(str(exc))
    return args


def base_config(args: argparse.Namespace) -> toy.BaseConfig:
    """The quality base's :class:`toy.BaseConfig` from the command line (raises :class:`InputError`)."""
    return toy.BaseConfig(crop=args.crop, steps=args.base_steps, seed=args.seed,
                               prediction_type=args.prediction_type)


def main(argv=None) -> dict:
    quiet_third_party()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    data = toy.resolve_data_dir(args.data)
    crops = toy.build_crops(data / "biq2021", args.n_images, args.crop, seed=args.seed,
                                 distortions=tuple(args.distortions))
    scorer = toy.load_toy_scorer(params_dir=data / "params")
    name = toy.TOY_SCORER
    labels = toy.score_images(scorer, crops.images, desc="labelling crops")
    keep = torch.isfinite(labels)
    images, labels = crops.images[keep], labels[keep].double()
    base = base_config(args)
    unet, scheduler, base_info = toy.load_or_train_base(crops, base, args.cache)
    unet.requires_grad_(False)

    judge = toy.ToyJudge.fit(toy.judge_crops(data / "biq2021", args.judge_photos, args.crop, seed=args.seed + 1),
                             toy.JudgeConfig(crop=args.crop, seed=args.seed))

    def measure(samples: torch.Tensor) -> torch.Tensor:
        flat = samples.reshape(-1, *samples.shape[2:])
        return toy.score_images(scorer, flat, progress=False).reshape(samples.shape[:2])

    study = twin_study(unet, scheduler, images, labels, name, args, args.twins, (1.0, args.cfg), measure, judge,
                       parts=out / "parts", base_key=base_info["key"])
    results, samples = study["results"], study["samples"]
    checks = {} if args.no_check else {a: known_attribute_check(args, a, out / "parts") for a in args.checks}
    joint_loss = None
    if args.joint:  # the same architecture and budget, trained with the condition from the first step
        torch.manual_seed(args.seed)
        joint = IQAAdapter.for_unet(unet, [name], num_tokens=args.num_tokens, projection="linear")
        joint.set_quantiles(ScoreQuantiles.fit({name: labels}))
        kept = toy.Crops(images, [d for d, k in zip(crops.distortion, keep) if k], crops.level[keep],
                         [p for p, k in zip(crops.source, keep) if k])
        joint_unet, _, joint_losses = toy.train_base(kept, base, adapter=joint, labels=labels,
                                                     p_quality=args.p_quality)
        joint_loss = float(np.mean(joint_losses[-50:]))
        for label, cfg in (("joint model (upper bound)", 1.0), (f"joint model, quality CFG {args.cfg:g}", args.cfg)):
            samples[label], results[label] = measured(joint_unet, scheduler, joint, name, args, cfg, measure, judge)
    quantile_scores = ScoreQuantiles.fit({name: labels}).score_at(name, args.targets).tolist()
    summary = {"scorer": name, "crops": int(keep.sum()), "crop_px": args.crop, "targets": args.targets,
               "training_set_score_at_target": quantile_scores, "samples_per_target": args.samples,
               "adapter_steps": args.adapter_steps, "batch_size": min(args.batch_size, len(images)), "lr": args.lr,
               "p_quality": args.p_quality, "final_loss": study["loss"],
               "final_loss_twins": study["twin_losses"], "final_loss_joint": joint_loss,
               "prediction_type": args.prediction_type, "distortions": args.distortions, "twins": args.twins,
               "base_model": {k: base_info[k] for k in ("key", "loaded", "final_loss", "train_seconds")
                              if k in base_info},
               "judge": {"photos": args.judge_photos, "held_out": judge.held_out},
               "results": results, "twin_results": study["twins"], "permutation": study["permutation"],
               "versus_shuffled": study["versus_shuffled"], "known_attribute_checks": checks,
               "seconds": time.perf_counter() - started,
               "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
               "note": f"a tiny pixel model trained for minutes on {args.crop} px crops; the numbers show whether "
                       "the mechanism learns control, not the quality SD-scale training reaches"}
    write_report(out, "results", summary, markdown(summary), json_stem="summary")
    plot(summary, out / "control.png")
    save_grids(summary, samples, out, args)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("results", "twin_results")}, indent=2))
    print(markdown(summary))
    return summary


def _table(targets, reference: tuple[str, list], results: dict) -> list[str]:
    head = ("| variant | Spearman(target, measured) | within-seed Spearman | highest - lowest target, same seed "
            "(share up) | Page's L p | " + " | ".join(f"mean @ p={t:g}" for t in targets) + " |")
    lines = [head, "|" + "---|" * (len(targets) + 5),
             f"| {reference[0]} | | | | | " + " | ".join(f"{v:.2f}" for v in reference[1]) + " |"]
    for label, r in results.items():
        if r["identical_for_every_target"]:
            stats = "n/a (same images) | | |"
        else:
            q = r["paired"]
            stats = (f"{r['spearman']:.3f} | {q['within_seed_spearman']:.3f} | {q['top_minus_bottom']:.3g} ± "
                     f"{q['top_minus_bottom_sem']:.2g} ({q['share_increasing']:.0%}) | {q['page_p']:.2g}")
        lines.append(f"| {label} | {stats} | " + " | ".join(f"{m:.2f} ± {e:.2f}" for m, e in zip(r["mean"], r["sem"]))
                     + " |")
    return lines


def _versus_line(versus: dict) -> str:
    """One line: each adapter's same-seed trend minus that of the mean of its shuffled twins."""
    parts = [f"{label} {v['gap']:+.3g} ± {v['gap_sem']:.2g} (Wilcoxon one-sided p {v['wilcoxon_p']:.2g}, "
             f"{v['seeds']} seeds)" for label, v in versus.items()]
    return ("True labels vs the mean of the shuffled twins, same seed ((highest - lowest target) of the adapter "
            "minus the twins' mean): " + "; ".join(parts) + ".") if parts else ""


def _permutation_lines(permutation: dict, unit: str) -> list[str]:
    """Per true-adapter variant: its same-seed trend, the twins' distribution, rank and permutation p."""
    lines = []
    for label, p in permutation.items():
        tests = [(unit, p)] + ([("judge P(clean)", p["judge_p_clean"])] if "judge_p_clean" in p else [])
        for what, t in tests:
            if not t["twins"]:
                continue
            lines.append(f"- {label}, {what}: true {t['statistic']:+.3g}; {len(t['twins'])} twins "
                         f"{t['twin_mean']:+.3g} ± {t['twin_sd']:.2g} (sd; {min(t['twins']):+.3g} ... "
                         f"{max(t['twins']):+.3g}); rank {t['rank']} of {t['of']}, permutation p {t['p']:.3g} "
                         f"(floor {t['p_floor']:.3g})")
    return lines


def _judge_table(targets, results: dict) -> list[str]:
    lines = ["| variant | " + " | ".join(f"P(clean) @ p={t:g}" for t in targets) + " | "
             + " | ".join(f"level @ p={t:g}" for t in targets) + " |", "|" + "---|" * (2 * len(targets) + 1)]
    for label, r in results.items():
        if "judge" in r:
            j = r["judge"]
            lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in j["p_clean"]) + " | "
                         + " | ".join(f"{v:.2f}" for v in j["level"]) + " |")
    return lines


def markdown(s: dict) -> str:
    lines = [f"IQA-Adapter control on {s['crops']} real photo crops ({s['crop_px']} px), scorer `{s['scorer']}`, "
             f"{s['samples_per_target']} samples per target (same seeds), adapter trained {s['adapter_steps']} steps, "
             f"{s.get('prediction_type', 'epsilon')} base, {s['twins']} shuffled twins (\"shuffled labels\" is "
             "twin 1).", ""]
    lines += _table(s["targets"], ("training set's score at the target", s["training_set_score_at_target"]),
                    s["results"])
    joint = "" if s.get("final_loss_joint") is None else f", {s['final_loss_joint']:.4f} (joint model)"
    lines += ["", "Every target is sampled from the same seeds: the within-seed columns compare a seed with itself "
                  "across targets (the pooled Spearman counts the spread between seeds as noise); Page's L p is the "
                  "one-sided p-value of a monotone increase across the targets, seeds as blocks.", "",
              "Permutation test: the same-seed trend (highest - lowest target, mean over seeds) of the true adapter "
              "among its shuffled twins' (each trained identically on another label permutation; p = (1 + #twins >= "
              "true) / (1 + twins)):", ""]
    lines += _permutation_lines(s["permutation"], s["scorer"])
    lines += ["", _versus_line(s.get("versus_shuffled", {}))]
    held = s["judge"]["held_out"]
    lines += ["", f"Toy judge (a classifier of the crops' ten known conditions, trained on {s['judge']['photos']} "
                  f"other photos' crops; held out by photo: accuracy {held['accuracy']:.3f} of 10 conditions, "
                  f"{held['kind_accuracy']:.3f} of the 4 types, level error {held['level_mae']:.2f}, mean P(clean) "
                  f"{held['p_clean_by_condition']['clean']:.2f} on clean crops): P(clean) and expected level (0 clean "
                  "... 3) of each target's samples.", ""]
    lines += _judge_table(s["targets"], s["results"])
    twin_losses = ", ".join(f"{v:.4f}" for v in s["final_loss_twins"])
    lines += ["", f"Final training loss ({s.get('prediction_type', 'epsilon')} MSE): {s['final_loss']:.4f} (true "
              f"labels), {twin_losses} (twins){joint}. " + s["note"] + "."]
    for check in s.get("known_attribute_checks", {}).values():
        lines += ["", f"Known-attribute check: {check['attribute']} ({check['images']} images, label = the measured "
                      f"attribute, adapter trained {check['adapter_steps']} steps):", ""]
        lines += _table(s["targets"], ("training set's value at the target", check["training_set_value_at_target"]),
                        check["results"])
        lines += ["", *_permutation_lines(check["permutation"], "measured attribute"),
                  "", _versus_line(check.get("versus_shuffled", {}))]
        lines += ["", f"Final training loss: {check['final_loss']:.4f} (true labels), "
                      + ", ".join(f"{v:.4f}" for v in check["final_loss_twins"]) + " (twins)."]
    return "\n".join(lines) + "\n"


def save_grids(s: dict, samples: dict, out: Path, args) -> None:
    """``grid.png``: the true adapter's samples (with quality CFG where it varies), row = target percentile, up to
    12 seeds; ``models.png``: the lowest and highest target of each model, row = model and target, 8 seeds. Under
    each image its score and the judge's P(clean)."""
    guided = _label("adapter", args.cfg, args)
    shown = guided if not s["results"][guided]["identical_for_every_target"] else "adapter"
    columns = min(12, args.samples)
    _labelled_grid(s, samples, [(shown, i) for i in range(len(args.targets))], columns, out / "grid.png")
    low, high = int(np.argmin(args.targets)), int(np.argmax(args.targets))
    rows = [(label, i) for label in samples for i in (low, high)]
    _labelled_grid(s, samples, rows, min(8, args.samples), out / "models.png")


def _labelled_grid(s: dict, samples: dict, rows: list[tuple[str, int]], columns: int, path: Path) -> None:
    """One grid of (variant, target index) rows, captions "score | P(clean)"."""
    images, captions, row_labels = [], [], []
    for label, i in rows:
        r = s["results"][label]
        images.append(samples[label][i, :columns])
        captions += [f"{r['scores'][i][j]:.1f} | {r['judge']['p_clean_scores'][i][j]:.2f}" for j in range(columns)]
        row_labels.append(f"{label}\ntarget p={s['targets'][i]:g}")
    toy.save_grid(torch.cat(images), path, columns=columns, captions=captions, row_labels=row_labels,
                  column_labels=[f"seed {j}" for j in range(columns)])


def _same_seed_change(targets, scores) -> np.ndarray | None:
    """``[seeds, targets ascending]``: each seed's change from its lowest target (seeds with a NaN left out);
    None below two seeds."""
    change = _by_seed(targets, scores)
    change = change[np.isfinite(change).all(axis=1)]
    return change - change[:, :1] if len(change) >= 2 else None


def plot(s: dict, path: Path) -> None:
    plt = pyplot()

    panels = [("IQA-Adapter control on real photo crops (tiny model, CPU)", s["results"],
               s["training_set_score_at_target"], f"measured {s['scorer']} of samples (higher is better)",
               s.get("twin_results", {}))]
    for check in s.get("known_attribute_checks", {}).values():
        panels.append((f"known attribute: {check['attribute']}", check["results"],
                       check["training_set_value_at_target"], "measured attribute of samples", {}))
    fig, axes = plt.subplots(2, len(panels), figsize=(6 * len(panels), 8), dpi=120, squeeze=False)
    targets = np.sort(np.asarray(s["targets"], dtype=float))  # the order of _by_seed's columns
    for top, bottom, (title, results, reference, ylabel, twins) in zip(axes[0], axes[1], panels):
        for i, (label, r) in enumerate(results.items()):
            for k, twin in enumerate(twins.get(label, [])):  # the permutation distribution, thin
                change = _same_seed_change(twin["targets"], twin["scores"])  # twins 2...N: two targets only
                if change is not None:
                    bottom.plot(sorted(twin["targets"]), change.mean(axis=0), color=f"C{i}", lw=0.7, alpha=0.35,
                                label=f"{label}: its {len(twins[label])} shuffled twins" if k == 0 else None)
            rho = "" if r["identical_for_every_target"] else f" (rho {r['spearman']:.2f})"
            top.errorbar(s["targets"], r["mean"], yerr=r["sem"], marker="o", capsize=3, label=label + rho,
                         color=f"C{i}")
            if r["identical_for_every_target"]:
                continue
            change = _same_seed_change(s["targets"], r["scores"])
            if change is None:
                continue
            bottom.errorbar(targets, change.mean(axis=0), yerr=change.std(axis=0, ddof=1) / len(change) ** 0.5,
                            marker="o", capsize=3, color=f"C{i}",
                            label=f"{label} (within-seed rho {r['paired']['within_seed_spearman']:.2f})")
        top.plot(s["targets"], reference, "k--", label="training set at that percentile")
        top.set_title(title, fontsize=9)
        top.set_ylabel(ylabel)
        bottom.axhline(0, color="k", lw=0.5)
        bottom.set_title("same seed: change from the lowest target (mean ± sem over seeds)", fontsize=9)
        bottom.set_ylabel("change of the measured value")
        for ax in (top, bottom):
            ax.set_xlabel("target percentile")
            ax.legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
