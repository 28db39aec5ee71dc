"""Zero-shot NR-IQA evaluation of scorers on a folder + CSV dataset.

    python evals/nriqa.py --dataset ../shared/data/biq2021 --scorer niqe --scorer brisque \
        --weights niqe=../shared/data/params/niqe_pristine.mat \
        --weights brisque=../shared/data/params/brisque_live_svm.pth

For each scorer: SRCC, KRCC, PLCC (raw and after the 4-parameter logistic) against MOS, with
percentile-bootstrap 95% intervals. Scores go through ``qualityguide.scoring.score_paths``, so an
interrupted run resumes where it stopped (one CSV per scorer in the output folder). Writes
``results.json``, ``results.md`` and ``scatter_<scorer>.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from qualityguide.data import load_iqa_dataset
from qualityguide.protocol import bootstrap_ci, correlations, fit_logistic, logistic4, plcc, srcc
from qualityguide.scorers import load_scorer
from qualityguide.scoring import score_paths


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", spec)


def evaluate(dataset: str, specs: list[str], weights: dict[str, str], out: Path, device: str = "cpu",
             batch_size: int = 8, limit: int | None = None, n_boot: int = 1000, csv_file: str | None = None) -> dict:
    ds = load_iqa_dataset(dataset, csv_file, limit=limit)
    paths, mos = ds["image"], np.asarray(ds["mos"], dtype=np.float64)
    out.mkdir(parents=True, exist_ok=True)
    results = {"dataset": str(dataset), "n_images": len(paths), "scorers": {}}
    for spec in specs:
        scorer = load_scorer(spec, weights=weights.get(spec), device=device)
        table = out / f"scores_{_slug(spec)}.csv"
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
        _scatter(pred, target, spec, out / f"scatter_{_slug(spec)}.png", stats)
        print(f"{spec}: SRCC {stats['srcc']:.3f} PLCC {stats['plcc']:.3f} (n={stats['n_scored']})", file=sys.stderr)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    return results


def markdown(results: dict) -> str:
    lines = [f"Zero-shot on `{results['dataset']}` ({results['n_images']} images); 95% bootstrap intervals.", "",
             "| scorer | n | SRCC [95% CI] | PLCC (logistic) [95% CI] | PLCC raw | KRCC | failed |",
             "|---|---|---|---|---|---|---|"]
    for spec, s in results["scorers"].items():
        lines.append(f"| {spec} | {s['n_scored']} | {s['srcc']:.3f} [{s['srcc_ci95'][0]:.3f}, {s['srcc_ci95'][1]:.3f}] "
                     f"| {s['plcc']:.3f} [{s['plcc_ci95'][0]:.3f}, {s['plcc_ci95'][1]:.3f}] | {s['plcc_raw']:.3f} "
                     f"| {s['krcc']:.3f} | {s['n_failed']} |")
    return "\n".join(lines) + "\n"


def _scatter(pred: np.ndarray, mos: np.ndarray, spec: str, path: Path, stats: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    ax.scatter(pred, mos, s=6, alpha=0.5)
    grid = np.linspace(pred.min(), pred.max(), 200)
    ax.plot(grid, logistic4(grid, *fit_logistic(pred, mos)), color="C3", label="4-parameter logistic")
    ax.set_xlabel(f"{spec} score (higher is better)")
    ax.set_ylabel("MOS")
    ax.set_title(f"{spec}: SRCC {stats['srcc']:.3f}, PLCC {stats['plcc']:.3f}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="folder with images and mos.csv")
    parser.add_argument("--csv", default=None, help="CSV file (default DATASET/mos.csv)")
    parser.add_argument("--scorer", action="append", required=True, help="scorer spec, repeatable")
    parser.add_argument("--weights", action="append", default=[], help="SPEC=FILE, repeatable")
    parser.add_argument("--out", default=None, help="output folder (default evals/results/nriqa/<dataset>)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="first N images only (quick runs)")
    parser.add_argument("--n-boot", type=int, default=1000)
    args = parser.parse_args()
    weights = {}
    for item in args.weights:
        spec, sep, file = item.partition("=")
        if not sep:
            parser.error(f"--weights {item!r}: expected SPEC=FILE, e.g. brisque=brisque_svm_weights.pth")
        weights[spec] = file
    out = Path(args.out or f"evals/results/nriqa/{Path(args.dataset).resolve().name}")
    results = evaluate(args.dataset, args.scorer, weights, out, device=args.device, batch_size=args.batch_size,
                       limit=args.limit, n_boot=args.n_boot, csv_file=args.csv)
    print(json.dumps({k: {m: v for m, v in s.items() if m != "failures"} for k, s in results["scorers"].items()},
                     indent=2))
    print(markdown(results))


if __name__ == "__main__":
    main()
