"""Peak memory and throughput of ``qualityguide score`` on photos of 0.3, 3, 12 and 36 MP, at batch 1 and 8.

Photos are mosaics of real BIQ2021 photographs (512 px tiles at their native resolution, so the NSS
statistics are those of camera pictures, not of upscaled ones) written as JPEG into a temporary
folder outside the repository. Each (scorer, size, batch) case runs ``score_paths`` in a fresh
subprocess and reports its peak RSS (``ru_maxrss`` of that process, imports included; the idle RSS
after imports is reported beside it) and images/s (scoring wall time only, after a warm-up that
triggers pyiqa's lazy imports).

``--baseline`` also runs the code this replaced (pyiqa's whole-image NIQE/BRISQUE, batches of
``--batch-size`` same-size images stacked) on the cases whose estimated peak fits ``--baseline-max-gb``,
in the same run, so old/new ratios come from one machine state; it also reports the largest
difference between old and new scores on the same files.

    python -m evals.bench_scoring                       # ~8 minutes on 2 CPU cores
    python -m evals.bench_scoring --baseline            # + the old code where it fits (~+6 minutes)
    python -m evals.bench_scoring --sizes 0.3 3 --batches 1 8 --scorers niqe-embedded

Prints JSON and writes ``evals/results/bench_scoring/bench_scoring.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from evals.common.figures import pyplot, save_figure
from evals.common.flags import eval_parser
from evals.common.process import child_env, module_command
from evals.common.report import write_report

RESULTS = Path(__file__).resolve().parent / "results" / "bench_scoring"
OLD_BYTES_PER_PIXEL = 520  # the old whole-image NIQE: ~6 GB for a 12 MP photo (measured)


def _photo_size(megapixels: float) -> tuple[int, int]:
    """(width, height) of a 4:3 photo of ``megapixels``."""
    height = round(math.sqrt(megapixels * 1e6 * 3 / 4))
    return round(height * 4 / 3), height


def _sources() -> list[Path]:
    from qualityguide.evaluation.datasets import shared_data_dir
    from qualityguide.scorers.niqe_fit import DEMO_PHOTOS, FIT_PHOTOS, bundled_photo

    root = shared_data_dir()
    if root is not None and (root / "biq2021" / "images").is_dir():
        return sorted((root / "biq2021" / "images").glob("*.jpg"))
    return [bundled_photo(*item) for item in FIT_PHOTOS + DEMO_PHOTOS]  # fallback without the shared data


def synthesise(folder: Path, megapixels: float, count: int, sources: list[Path]) -> list[Path]:
    """``count`` JPEG mosaics of 512 px crops of real photos, each from a different run of sources."""
    from PIL import Image

    width, height = _photo_size(megapixels)
    paths = []
    for i in range(count):
        canvas = Image.new("RGB", (width, height))
        k = i * 37
        for top in range(0, height, 512):
            for left in range(0, width, 512):
                tile = Image.open(sources[k % len(sources)]).convert("RGB").crop((0, 0, 512, 512))
                canvas.paste(tile, (left, top))
                k += 1
        path = folder / f"{megapixels:g}mp_{i}.jpg"
        canvas.save(path, quality=95)
        paths.append(path)
    return paths


def _legacy_scorer(scorer):
    """The scorer as it was: pyiqa's whole-image maths on the whole batch (kept here only to measure it)."""
    import torch

    from qualityguide.scorers.nss import _LUMA, BRISQUEScorer, NIQEScorer

    def flat(images):
        weights = images.new_tensor(_LUMA).view(1, 3, 1, 1)
        luma = torch.round((images.detach() * weights).sum(1) * 255.0).flatten(1)
        return [int(i) for i in torch.nonzero(luma.amax(1) == luma.amin(1)).flatten()]

    if isinstance(scorer, NIQEScorer):
        def native(images):
            from pyiqa.archs.niqe_arch import calculate_niqe

            if flat(images):
                raise ValueError("flat image")
            return calculate_niqe(images.double(), 0, True, "yiq", scorer.mu, scorer.cov).reshape(-1).to(images.dtype)
    elif isinstance(scorer, BRISQUEScorer):
        def native(images):
            from pyiqa.archs.brisque_arch import natural_scene_statistics, rbf_kernel, scale_features
            from pyiqa.matlab_utils import imresize
            from pyiqa.utils.color_util import to_y_channel

            if flat(images):
                raise ValueError("flat image")
            rows = []
            for image in images.float().split(1):
                y = to_y_channel(image, 255.0)
                features = []
                for _ in range(2):
                    features.append(natural_scene_statistics(y, 7, 7 / 6))
                    y = imresize(y, scale=0.5, antialiasing=True)
                rows.append(torch.cat(features, dim=-1))
            kernel = rbf_kernel(features=scale_features(torch.cat(rows)).double(), sv=scorer.sv.t(), gamma=scorer.gamma)
            return (kernel @ scorer.sv_coef - scorer.rho).reshape(-1).to(images.dtype)
    else:
        raise TypeError(f"no legacy path for {scorer.name}")
    scorer.native = native
    return scorer


def _rss_now_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(spec: dict) -> dict:
    """One case, in its own process: load the scorer, warm up, score the files, report."""
    import torch

    from qualityguide import load_scorer, scoring

    scorer = load_scorer(spec["scorer"], weights=spec.get("weights"))
    if spec["legacy"]:
        scorer = _legacy_scorer(scorer)
        scoring.BATCH_PIXELS = 2**62  # batches by count only, as before
    with torch.no_grad():
        scorer.native(torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0)))  # lazy imports
    idle = _rss_now_mb()
    start = time.perf_counter()
    summary = scoring.score_paths(spec["files"], scorer, spec["output"], batch_size=spec["batch"], progress=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images": len(spec["files"]), "images_per_s": len(spec["files"]) / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "idle_rss_mb": idle,
            "failed": summary.failed, "threads": torch.get_num_threads()}


def run_case(spec: dict, timeout: float) -> dict:
    import qualityguide

    command = module_command("evals.bench_scoring", "--worker", json.dumps(spec))
    env = child_env(str(Path(qualityguide.__file__).resolve().parents[1]))  # the child measures the parent's library
    if spec["threads"]:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(spec["threads"])
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout:.0f} s"}
    if done.returncode != 0:
        killed = done.returncode in (-9, 137)
        return {"status": "killed (out of memory?)" if killed else f"exit {done.returncode}",
                "stderr": done.stderr[-2000:]}
    return {"status": "ok", **json.loads(done.stdout.strip().splitlines()[-1])}


def _scores(path: Path) -> dict[str, float]:
    with open(path, newline="") as handle:
        return {row["path"]: float(row["native_score"]) for row in csv.DictReader(handle) if row["native_score"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, parsed before anything is loaded (the tests run the docstring examples through it)."""
    parser = eval_parser(__doc__)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.3, 3, 12, 36], help="megapixels")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--scorers", nargs="+", default=["niqe-embedded", "brisque"])
    parser.add_argument("--images", type=int, default=0,
                        help="photos per batch-1 case (default: 8 up to 3 MP, 2 above); batch-b cases score b")
    parser.add_argument("--baseline", action="store_true", help="also run the old whole-image code where it fits")
    parser.add_argument("--baseline-max-gb", type=float, default=7.0,
                        help="skip old-code cases whose estimated peak exceeds this")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per case")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads of each case (default: torch's); 1 steadies timings on a busy machine")
    parser.add_argument("--out", default=str(RESULTS))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from qualityguide.runtime import quiet_third_party

    quiet_third_party()
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    from qualityguide.evaluation.datasets import shared_data_dir

    load_start = os.getloadavg()  # other processes' load makes timings on a shared machine noisy: recorded
    weights = {}
    brisque_params = (shared_data_dir() or Path("/nonexistent")) / "params" / "brisque_live_svm.pth"
    if "brisque" in args.scorers:
        if brisque_params.is_file():
            weights["brisque"] = str(brisque_params)
        else:
            print(f"skipping brisque: {brisque_params} not found", file=sys.stderr)
            args.scorers = [s for s in args.scorers if s != "brisque"]
    sources = _sources()
    work = Path(tempfile.mkdtemp(prefix="qualityguide-bench-"))
    cases = []
    for size in args.sizes:
        per_case = {b: max(b, args.images or (8 if size <= 3 else 2)) for b in args.batches}
        photos = synthesise(work, size, max(per_case.values()), sources)
        for scorer in args.scorers:
            for batch in args.batches:
                files = [str(p) for p in photos[:per_case[batch]]]
                variants = ["new"]
                estimate_gb = min(batch, len(files)) * size * 1e6 * OLD_BYTES_PER_PIXEL / 2**30
                if args.baseline and estimate_gb <= args.baseline_max_gb:
                    variants.append("old")
                for variant in variants:
                    output = work / f"{scorer}_{size:g}mp_b{batch}_{variant}.csv"
                    spec = {"scorer": scorer, "weights": weights.get(scorer), "files": files, "batch": batch,
                            "legacy": variant == "old", "output": str(output), "threads": args.threads}
                    result = run_case(spec, args.timeout)
                    case = {"scorer": scorer, "megapixels": size, "pixels": list(_photo_size(size)), "batch": batch,
                            "code": variant, **result}
                    if result["status"] == "ok":
                        case["scores"] = _scores(output)
                    cases.append(case)
                    print(json.dumps({k: v for k, v in case.items() if k not in ("scores", "stderr")}), file=sys.stderr)
                if args.baseline and "old" not in variants:
                    cases.append({"scorer": scorer, "megapixels": size, "pixels": list(_photo_size(size)),
                                  "batch": batch, "code": "old",
                                  "status": f"not run: estimated {estimate_gb:.0f} GB > --baseline-max-gb"})
    result = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
              "threads": args.threads or "torch default", "load_average": {"start": load_start, "end": os.getloadavg()},
              "photos": "mosaics of 512 px BIQ2021 crops, JPEG q95", "cases": _summarise(cases)}
    table = _markdown(result["cases"])
    write_report(Path(args.out), "bench_scoring", result, table + "\n", lambda r, path: _plot(r["cases"], path))
    print(json.dumps(result, indent=2))
    print(table)


def _summarise(cases: list[dict]) -> list[dict]:
    """Drop per-file scores; add old/new score differences and new batch-1 vs batch-b differences."""
    def key(case):
        return case["scorer"], case["megapixels"]

    for case in cases:
        scores = case.get("scores")
        if not scores:
            continue
        for other in cases:
            if key(other) != key(case) or other is case or not other.get("scores"):
                continue
            common = [p for p in scores if p in other["scores"]]
            if not common:
                continue
            diff = max(abs(scores[p] - other["scores"][p]) for p in common)
            rel = max(abs(scores[p] - other["scores"][p]) / max(abs(other["scores"][p]), 1e-12) for p in common)
            if case["code"] == "new" and other["code"] == "old":
                case.setdefault("vs_old", {})[f"batch{other['batch']}"] = {"max_abs": diff, "max_rel": rel}
            elif case["code"] == other["code"] == "new" and other["batch"] < case["batch"]:
                case["vs_batch1_max_abs"] = diff
    return [{k: v for k, v in case.items() if k != "scores"} for case in cases]


def _markdown(cases: list[dict]) -> str:
    lines = ["| scorer | MP | batch | code | peak RSS MB | idle RSS MB | images/s | status | max abs diff vs old |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        ok = c["status"] == "ok"
        vs_old = ", ".join(f"{v['max_abs']:.1e}" for v in c.get("vs_old", {}).values()) or ""
        lines.append(f"| {c['scorer']} | {c['megapixels']:g} | {c['batch']} | {c['code']} | "
                     f"{c['peak_rss_mb']:.0f} | {c['idle_rss_mb']:.0f} | {c['images_per_s']:.3g} | ok | {vs_old} |"
                     if ok else f"| {c['scorer']} | {c['megapixels']:g} | {c['batch']} | {c['code']} | | | | "
                     f"{c['status']} | |")
    return "\n".join(lines)


def _plot(cases: list[dict], path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    series: dict[tuple, list] = {}
    for c in cases:
        if c["status"] == "ok":
            series.setdefault((c["scorer"], c["batch"], c["code"]), []).append(c)
    for (scorer, batch, code), rows in sorted(series.items()):
        rows.sort(key=lambda c: c["megapixels"])
        label = f"{scorer} b{batch} {code}"
        style = "-o" if code == "new" else "--x"
        axes[0].plot([c["megapixels"] for c in rows], [c["peak_rss_mb"] / 1024 for c in rows], style, label=label)
        axes[1].plot([c["megapixels"] for c in rows], [c["images_per_s"] for c in rows], style, label=label)
    for ax, ylabel in zip(axes, ["peak RSS (GiB)", "images / s"]):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("megapixels per photo")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].axhline(4, color="grey", lw=0.8)
    axes[1].legend(fontsize=7)
    save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    main()
