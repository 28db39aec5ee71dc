"""Fit qualityguide's embedded NIQE pristine model and compare it with the official one.

    python -m evals.fit_niqe_pristine [--official PARAMS.mat] [--data ../shared/data] [--out DIR] [--write]

Fits mu/cov from the photographs in ``qualityguide.scorers.niqe_fit.FIT_PHOTOS`` (shipped inside
scikit-image and matplotlib), writes them to ``qualityguide/data/`` with ``--write``, and, when the
official parameters and the calibration/BIQ2021 data are available, reports how the embedded model
compares: scores on the TID2013 calibration images, Spearman correlation between the two models'
scores, and each model's SRCC with BIQ2021 MOS. Writes JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from tqdm import tqdm

from evals.common.flags import eval_parser
from evals.common.report import write_report
from qualityguide.images import load_image
from qualityguide.runtime import quiet_third_party
from qualityguide.scorers.niqe_fit import FIT_PHOTOS, bundled_photo, fit_pristine
from qualityguide.scorers.nss import EMBEDDED_NIQE_PARAMS, NIQEScorer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, parsed before anything is loaded (the tests run the docstring examples through it)."""
    parser = eval_parser(__doc__)
    parser.add_argument("--data", default=os.environ.get("QUALITYGUIDE_DATA", "../shared/data"))
    parser.add_argument("--official", default=None, help="official NIQE params (default: DATA/params/niqe_pristine.mat)")
    parser.add_argument("--biq-limit", type=int, default=300, help="BIQ2021 images to compare on (0 = all)")
    parser.add_argument("--out", default="evals/results/niqe_fit")
    parser.add_argument("--write", action="store_true", help="overwrite the embedded parameter file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    quiet_third_party()
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    images = [load_image(bundled_photo(*item)) for item in FIT_PHOTOS]
    mu, cov, blocks = fit_pristine(images)
    result: dict = {"fit_photos": [f"{p}/{f}" for p, f in FIT_PHOTOS], "blocks": blocks}
    if args.write:
        from safetensors.numpy import save_file

        save_file({"mu": mu, "cov": cov}, str(EMBEDDED_NIQE_PARAMS),
                  metadata={"fit_photos": ",".join(result["fit_photos"]), "blocks": str(blocks)})
        result["written"] = str(EMBEDDED_NIQE_PARAMS)
    embedded = NIQEScorer(mu, cov, name="niqe-embedded")

    data = Path(args.data)
    official_path = Path(args.official) if args.official else data / "params" / "niqe_pristine.mat"
    rows = []
    if official_path.is_file():
        official = NIQEScorer.from_params(official_path)
        result["mu_max_abs_diff"] = float(np.abs(official.mu.numpy() - mu).max())
        calib = data / "calibration"
        if (calib / "official_scores.csv").is_file():
            with open(calib / "official_scores.csv") as handle:
                table = {row["metric"]: row for row in csv.DictReader(handle)}
            for name in [k for k in table["niqe"] if k != "metric"]:
                x = load_image(calib / "dist_dir" / name)[None]
                rows.append({"image": name, "published": float(table["niqe"][name]),
                             "official_params": float(official.native(x)), "embedded": float(embedded.native(x))})
            result["calibration"] = rows
        mos_csv = data / "biq2021" / "mos.csv"
        if mos_csv.is_file():
            with open(mos_csv) as handle:
                items = list(csv.DictReader(handle))
            if args.biq_limit:
                items = items[: args.biq_limit]
            a, b, m = [], [], []
            for item in tqdm(items, desc="biq2021"):
                x = load_image(data / "biq2021" / item["image"])[None]
                try:
                    a.append(float(official.native(x)))
                    b.append(float(embedded.native(x)))
                    m.append(float(item["mos"]))
                except Exception:  # flat images are reported by the scorers; skip them here
                    continue
            result["biq2021"] = {
                "n": len(m),
                "srcc_official_vs_embedded": float(stats.spearmanr(a, b)[0]),
                "srcc_mos_official": float(-stats.spearmanr(a, m)[0]),
                "srcc_mos_embedded": float(-stats.spearmanr(b, m)[0]),
            }
    lines = ["| image | published NIQE | official params | embedded |", "|---|---|---|---|"]
    lines += [f"| {r['image']} | {r['published']:.3f} | {r['official_params']:.3f} | {r['embedded']:.3f} |" for r in rows]
    if "biq2021" in result:
        r = result["biq2021"]
        lines += ["", f"BIQ2021 (n={r['n']}): SRCC(official, embedded) = {r['srcc_official_vs_embedded']:.3f}; "
                  f"SRCC with MOS: official {r['srcc_mos_official']:.3f}, embedded {r['srcc_mos_embedded']:.3f}"]
    write_report(out, "niqe_fit", result, "\n".join(lines) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    main()
