"""Build time of the offline models (tiny test pipelines, full-size random SD 1.5), after imports.

    python -m evals.bench_tiny [--repeats 5] [--with-random]

Prints JSON and writes ``evals/results/bench_tiny/bench_tiny.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from evals.common.flags import eval_parser
from evals.common.report import write_report
from qualityguide.pipelines import load_pipeline
from qualityguide.runtime import quiet_third_party
from qualityguide.testing import RANDOM_SPECS, TINY_SPECS
from qualityguide.runtime import timed

RESULTS = Path(__file__).resolve().parent / "results" / "bench_tiny"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, parsed before anything is loaded (the tests run the docstring examples through it)."""
    parser = eval_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--with-random", action="store_true", help=f"also time {', '.join(RANDOM_SPECS)} (slow)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    quiet_third_party()
    args = parse_args(argv)
    start = time.perf_counter()
    load_pipeline("tiny:sd")  # first build pays the lazy imports; reported separately
    first = time.perf_counter() - start
    specs = list(TINY_SPECS) + (list(RANDOM_SPECS) if args.with_random else [])
    rows = {spec: timed(lambda spec=spec: load_pipeline(spec), "cpu", args.repeats if spec in TINY_SPECS else 1)
            for spec in specs}
    result = {"first_build_with_imports_s": first, "median_build_s": rows, "repeats": args.repeats}
    table = "| spec | build s (median) |\n|---|---|\n" + "\n".join(f"| {k} | {v:.3f} |" for k, v in rows.items())
    write_report(RESULTS, "bench_tiny", result, table + "\n")
    print(json.dumps(result, indent=2))
    print(table)


if __name__ == "__main__":
    main()
