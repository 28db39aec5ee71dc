"""Zero-shot NR-IQA evaluation of scorers on a folder + CSV dataset.

    python -m evals.nriqa --dataset ../shared/data/biq2021 --scorer niqe --scorer brisque \
        --weights niqe=../shared/data/params/niqe_pristine.mat \
        --weights brisque=../shared/data/params/brisque_live_svm.pth

For each scorer: SRCC, KRCC, PLCC (raw and after the 4-parameter logistic) against MOS, with
percentile-bootstrap 95% intervals. Scores go through ``qualityguide.cli.score.score_paths``, so an
interrupted run resumes where it stopped (one CSV per scorer in the output folder). Writes
``results.json``, ``results.md`` and ``scatter_<scorer>.png``.

Trained variants run the LGDM protocol (10 content-disjoint 70/10/20 splits, median SRCC/PLCC of a
head trained on cached features):

    python -m evals.nriqa --dataset ../shared/data/biq2021 --lgdm-model tiny:sd \
        --lgdm-psi none --lgdm-psi sd --lgdm-psi brisque --nss-baseline --lgdm-image-size 64

``--lgdm-psi`` adds one LGDM variant per psi (features cached, resumable, in the output folder);
``--nss-baseline`` trains the same head on BRISQUE's 36 NSS features. With a random-weight backbone
(``tiny:*``, ``random:*``) the LGDM numbers check the mechanics only, and the tables say so.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from evals.common.figures import pyplot, save_figure
from evals.common.flags import eval_parser
from evals.common.report import markdown_table, slug, write_report
from qualityguide.evaluation.datasets import load_iqa_dataset
from qualityguide.evaluation.stats import bootstrap_ci, correlations, fit_logistic, logistic4, plcc, srcc
from qualityguide.runtime import quiet_third_party
from qualityguide.scorers import load_scorer
from qualityguide.cli.score import score_paths


def evaluate(dataset: str, specs: list[str], weights: dict[str, str], out: Path, device: str = "cpu",
             batch_size: int = 8, limit: int | None = None, n_boot: int = 1000, csv_file: str | None = None) -> dict:
    ds = load_iqa_dataset(dataset, csv_file, limit=limit)
    paths, mos = ds["image"], np.asarray(ds["mos"], dtype=np.float64)
    out.mkdir(parents=True, exist_ok=True)
    results = {"dataset": str(dataset), "n_images": len(paths), "scorers": {}}
    for spec in specs:
        scorer = load_scorer(spec, weights=weights.get(spec), device=device)
        table = out / f"scores_{slug(spec)}.csv"
        start = time.perf_counter()
        score_paths(paths, scorer, table, batch_size=batch_size, device=device)
        elapsed = time.perf_counter() - start
        with open(table, newline="") as handle:
            rows = {row["path"]: row for row in csv.DictReader(handle)}
        scores = np.asarray([float(rows[p]["score"]) if rows.get(p, {}).get("score") else np.nan for p in paths])
        ok = np.isfinite(scores)
        pred, target = scores[ok], mos[ok]
        stats = correlations(pred, target)
        stats["srcc_ci95"] = bootstrap_ci(pred, target, srcc, n_boot=n_boot)
        stats["plcc_ci95"] = bootstrap_ci(pred, target, lambda a, b: plcc(a, b, "logistic"), n_boot=n_boot)
        stats.update({"n_scored": int(ok.sum()), "n_failed": int((~ok).sum()), "seconds_this_run": elapsed,
                      "native_lower_better": scorer.native_lower_better,
                      "failures": [rows[p]["error"] for p in np.asarray(paths)[~ok] if p in rows][:10]})
        results["scorers"][spec] = stats
        _scatter(pred, target, spec, out / f"scatter_{slug(spec)}.png", stats)
        print(f"{spec}: SRCC {stats['srcc']:.3f} PLCC {stats['plcc']:.3f} (n={stats['n_scored']})", file=sys.stderr)
    write_report(out, "results", results, markdown(results))
    return results


def _nss_features(paths: list[str], cache_dir: Path, progress: bool = True):
    """BRISQUE's 36 NSS features per image in a FeatureCache (resumable; flat images recorded as failures)."""
    from tqdm.auto import tqdm

    from qualityguide.errors import QualityGuideError
    from qualityguide.images import load_image
    from qualityguide.lgdm import FeatureCache, file_hash
    from qualityguide.scorers.nss import brisque_features, flat_images

    manifest = {"feature_key": "nss-brisque-36", "model_key": "nss-brisque-36", "config": {"features": "brisque"},
                "backbone": {}, "precision": "float32",
                "layout": {"num_steps": 1, "timesteps": [0], "layer_names": ["brisque"], "layer_dims": [36]}}
    cache = FeatureCache(cache_dir, manifest, create=True)
    keys = {file_hash(p): p for p in paths}
    todo = [k for k in keys if k not in cache.done_keys()]
    for start in tqdm(range(0, len(todo), 32), desc="NSS features", disable=not progress):
        chunk, rows, done = todo[start:start + 32], [], []
        for key in chunk:
            try:
                image = load_image(keys[key])[None]
                if flat_images(image):
                    raise QualityGuideError("flat image: NSS features undefined")
                rows.append(brisque_features(image))
                done.append(key)
            except QualityGuideError as exc:
                cache.record_failure(keys[key], key, str(exc))
        if done:
            cache.write(done, torch.cat(rows)[:, None, :])
    return cache


def evaluate_trained(dataset: str, variants: list[str], out: Path, model: str = "tiny:sd", image_size: int = 64,
                     num_steps: int = 10, t_max: int = 100, repeats: int = 10, batch_size: int = 8,
                     device: str = "cpu", limit: int | None = None, csv_file: str | None = None) -> dict:
    """The LGDM protocol for each variant (``lgdm:psi=<psi>`` or ``nss:brisque``) on one dataset."""
    from qualityguide.lgdm import LGDM, FeatureCache, LGDMConfig, extract_to_cache, file_hash, repeated_splits

    ds = load_iqa_dataset(dataset, csv_file, limit=limit)
    paths, mos = list(ds["image"]), np.asarray(ds["mos"], dtype=np.float64)
    mechanics = model.startswith(("tiny:", "random:"))
    results = {"dataset": str(dataset), "n_images": len(paths), "model": model, "repeats": repeats, "variants": {}}
    for variant in variants:
        start = time.perf_counter()
        if variant == "nss:brisque":
            cache = _nss_features(paths, out / "cache_nss_brisque")
            label = "BRISQUE NSS features (36) + LGDM head"
        else:
            psi = variant.split("=", 1)[1]
            config = LGDMConfig(psi=psi, image_size=image_size, num_steps=num_steps, t_max=t_max,
                                zeta2=0.0 if psi == "none" else 0.2)
            lgdm = LGDM.from_pretrained(model, config, device=device)
            cache_dir = out / f"cache_lgdm_{slug(model)}_{image_size}px_{num_steps}x{t_max}_{psi}"
            extract_to_cache(lgdm, paths, cache_dir, batch_size=batch_size)
            cache = FeatureCache(cache_dir)
            label = f"LGDM psi={psi}, {model}" + (" (random weights: mechanics check, not quality)" if mechanics else "")
        done = cache.done_keys()
        keys = [file_hash(p) for p in paths]
        keep = np.asarray([k in done for k in keys])
        _, features = cache.load([k for k, ok in zip(keys, keep) if ok])
        contents = [c for c, ok in zip(ds["content"], keep) if ok]
        result = repeated_splits(features, mos[keep], contents, cache.layout, repeats=repeats)
        result.update({"label": label, "n_images": int(keep.sum()), "n_dropped": int((~keep).sum()),
                       "seconds_this_run": time.perf_counter() - start, "feature_shape": list(features.shape[1:])})
        results["variants"][variant] = result
        print(f"{variant}: median SRCC {result['srcc']['median']:.3f} PLCC {result['plcc']['median']:.3f}",
              file=sys.stderr)
        del features
    write_report(out, "trained", results, markdown_trained(results))
    _split_plot(results, out / "trained_srcc.png")
    return results


def markdown_trained(results: dict) -> str:
    lines = [f"Trained on `{results['dataset']}`: {results['repeats']} content-disjoint 70/10/20 splits, "
             "median over splits (min-max in brackets).", ""]
    lines += markdown_table(["variant", "n", "median SRCC [min, max]", "median PLCC [min, max]", "features",
                             "what it shows"], [
        [name, r["n_images"], _median_range(r["srcc"]), _median_range(r["plcc"]),
         "x".join(map(str, r["feature_shape"])), r["label"]] for name, r in results["variants"].items()])
    return "\n".join(lines) + "\n"


def _median_range(stat: dict) -> str:
    return f"{stat['median']:.3f} [{stat['min']:.3f}, {stat['max']:.3f}]"


def _split_plot(results: dict, path: Path) -> None:
    plt = pyplot()

    names = list(results["variants"])
    fig, ax = plt.subplots(figsize=(1.8 * len(names) + 2, 3.5), dpi=120)
    ax.boxplot([[s["srcc"] for s in results["variants"][n]["splits"]] for n in names])
    ax.set_xticks(range(1, len(names) + 1), names, rotation=15)
    ax.set_ylabel("test SRCC per split")
    ax.set_title(f"{Path(results['dataset']).name}: {results['repeats']} content-disjoint splits")
    save_figure(fig, path)


def markdown(results: dict) -> str:
    lines = [f"Zero-shot on `{results['dataset']}` ({results['n_images']} images); 95% bootstrap intervals.", ""]
    lines += markdown_table(["scorer", "n", "SRCC [95% CI]", "PLCC (logistic) [95% CI]", "PLCC raw", "KRCC",
                             "failed"], [
        [spec, s["n_scored"], _with_interval(s, "srcc"), _with_interval(s, "plcc"), f"{s['plcc_raw']:.3f}",
         f"{s['krcc']:.3f}", s["n_failed"]] for spec, s in results["scorers"].items()])
    return "\n".join(lines) + "\n"


def _with_interval(stats: dict, name: str) -> str:
    low, high = stats[f"{name}_ci95"]
    return f"{stats[name]:.3f} [{low:.3f}, {high:.3f}]"


def _scatter(pred: np.ndarray, mos: np.ndarray, spec: str, path: Path, stats: dict) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    ax.scatter(pred, mos, s=6, alpha=0.5)
    grid = np.linspace(pred.min(), pred.max(), 200)
    ax.plot(grid, logistic4(grid, *fit_logistic(pred, mos)), color="C3", label="4-parameter logistic")
    ax.set_xlabel(f"{spec} score (higher is better)")
    ax.set_ylabel("MOS")
    ax.set_title(f"{spec}: SRCC {stats['srcc']:.3f}, PLCC {stats['plcc']:.3f}")
    ax.legend(loc="lower right")
    save_figure(fig, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, parsed and checked before anything is loaded (the tests run the docstring examples
    through it)."""
    parser = eval_parser(__doc__)
    parser.add_argument("--dataset", required=True, help="folder with images and mos.csv")
    parser.add_argument("--csv", default=None, help="CSV file (default DATASET/mos.csv)")
    parser.add_argument("--scorer", action="append", default=[], help="scorer spec, repeatable (zero-shot)")
    parser.add_argument("--lgdm-psi", action="append", default=[], help="trained LGDM variant with this psi "
                        "(none, sd, brisque, niqe, pyiqa:<name>), repeatable")
    parser.add_argument("--lgdm-model", default="tiny:sd", help="LGDM backbone (default tiny:sd: mechanics check)")
    parser.add_argument("--lgdm-image-size", type=int, default=512)
    parser.add_argument("--lgdm-num-steps", type=int, default=10)
    parser.add_argument("--lgdm-t-max", type=int, default=100)
    parser.add_argument("--nss-baseline", action="store_true", help="train the same head on BRISQUE NSS features")
    parser.add_argument("--repeats", type=int, default=10, help="content-disjoint splits for trained variants")
    parser.add_argument("--weights", action="append", default=[], help="SPEC=FILE, repeatable")
    parser.add_argument("--out", default=None, help="output folder (default evals/results/nriqa/<dataset>)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="first N images only (quick runs)")
    parser.add_argument("--n-boot", type=int, default=1000)
    args = parser.parse_args(argv)
    bad = [item for item in args.weights if "=" not in item]
    if bad:
        parser.error(f"--weights {bad[0]!r}: expected SPEC=FILE, e.g. brisque=brisque_svm_weights.pth")
    if not args.scorer and not args.lgdm_psi and not args.nss_baseline:
        parser.error("nothing to evaluate: pass --scorer SPEC and/or --lgdm-psi PSI / --nss-baseline")
    return args


def main(argv: list[str] | None = None) -> None:
    quiet_third_party()
    args = parse_args(argv)
    weights = dict(item.split("=", 1) for item in args.weights)
    out = Path(args.out or f"evals/results/nriqa/{Path(args.dataset).resolve().name}")
    variants = [f"lgdm:psi={psi}" for psi in args.lgdm_psi] + (["nss:brisque"] if args.nss_baseline else [])
    if args.scorer:
        results = evaluate(args.dataset, args.scorer, weights, out, device=args.device, batch_size=args.batch_size,
                           limit=args.limit, n_boot=args.n_boot, csv_file=args.csv)
        print(json.dumps({k: {m: v for m, v in s.items() if m != "failures"} for k, s in results["scorers"].items()},
                         indent=2))
        print(markdown(results))
    if variants:
        out.mkdir(parents=True, exist_ok=True)
        trained = evaluate_trained(args.dataset, variants, out, model=args.lgdm_model,
                                   image_size=args.lgdm_image_size, num_steps=args.lgdm_num_steps,
                                   t_max=args.lgdm_t_max, repeats=args.repeats, batch_size=args.batch_size,
                                   device=args.device, limit=args.limit, csv_file=args.csv)
        print(json.dumps({k: {"srcc": v["srcc"], "plcc": v["plcc"]} for k, v in trained["variants"].items()},
                         indent=2))
        print(markdown_trained(trained))


if __name__ == "__main__":
    main()
