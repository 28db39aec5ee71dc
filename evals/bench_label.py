"""Images per second of ``qualityguide score`` and ``label`` in one process and sharded over 2 ``accelerate
launch`` processes on CPU (target: 2 processes >= 1.7x one on 2 cores).

Images are JPEG mosaics of real BIQ2021 photographs (bundled photos without the shared data), written to a
temporary folder outside the repository. Each case runs in fresh processes (``python -m evals.bench_label
--worker``, or ``accelerate launch --multi_gpu --num_processes 2`` with ``ACCELERATE_USE_CPU=1``), each with
``--threads`` intra-op threads. The clock starts once the scorer is loaded and has scored one image (its first
call sets things up) on every process (a barrier), and stops when the command returns: the merge of the parts is
timed, the imports and the launcher are not (the end-to-end wall time is reported beside it). The outputs of 1 and
2 processes are compared: ``score``'s CSV and ``label``'s ``metadata.csv`` must be byte-identical.

    python -m evals.bench_label                          # ~1 minute on 2 quiet CPU cores
    python -m evals.bench_label --commands score --images 32 --megapixels 0.1

Prints JSON and writes ``evals/results/bench_label/bench_label.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from evals.bench_scoring import _sources, synthesise
from evals.common.figures import pyplot, save_figure
from evals.common.flags import eval_parser
from evals.common.process import child_env, module_command
from evals.common.report import write_report

RESULTS = Path(__file__).resolve().parent / "results" / "bench_label"
TARGET = 1.7


def worker(spec: dict) -> dict | None:
    """One case in this process (one of the launched ones, or the only one): seconds of the command after the
    scorer loaded everywhere; None off the main process."""
    import torch

    from qualityguide import load_image, load_scorer
    from qualityguide.runtime import launched, process_state

    torch.set_num_threads(spec["threads"])
    scorer = load_scorer(spec["scorer"])
    with torch.no_grad():  # the first call of a scorer costs several times the next ones (lazy set-up): untimed
        scorer(load_image(spec["warmup"])[None])
    state = process_state(cpu=True) if launched() else None
    if state is not None:
        state.wait_for_everyone()
    start = time.perf_counter()
    if spec["command"] == "score":
        from qualityguide.cli.score import score_paths

        summary = score_paths([spec["folder"]], scorer, spec["output"], batch_size=spec["batch"], progress=False)
        done = summary.scored + summary.failed
    else:
        from qualityguide.cli.label import label_folder

        summary = label_folder(spec["folder"], {spec["scorer"]: scorer}, batch_size=spec["batch"], progress=False)
        done = summary.scored[spec["scorer"]]
    seconds = time.perf_counter() - start
    if state is not None and not state.is_main_process:
        return None
    return {"seconds": seconds, "images": done}


def run_case(spec: dict, processes: int, timeout: float) -> dict:
    """``spec`` in fresh processes: the worker's numbers and the end-to-end wall time, or a status saying why not."""
    env = {**child_env(), "OMP_NUM_THREADS": str(spec["threads"]), "ACCELERATE_USE_CPU": "1"}
    command = module_command("evals.bench_label", "--worker", json.dumps(spec))
    if processes > 1:
        launcher = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
        command = [launcher, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", *command[1:]]
    start = time.perf_counter()
    try:
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout:g} s"}
    wall = time.perf_counter() - start
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode != 0 or not lines:
        return {"status": f"exit {run.returncode}: {run.stderr.strip()[-400:]}"}
    result = json.loads(lines[-1])
    return {"status": "ok", **result, "images_per_s": result["images"] / result["seconds"], "wall_s": wall}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, parsed before anything is loaded (the tests run the docstring examples through it)."""
    parser = eval_parser(__doc__)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--commands", nargs="+", choices=["score", "label"], default=["score", "label"])
    parser.add_argument("--scorer", default="niqe-embedded", help="scorer spec (default niqe-embedded: offline)")
    parser.add_argument("--images", type=int, default=192,
                        help="images per case (default 192; with 48 a case lasts about a second: the ratio is noise)")
    parser.add_argument("--megapixels", type=float, default=0.2, help="size of each image (default 0.2 MP)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process (default 1: one core "
                        "each, so 2 processes use the 2 cores one process leaves idle)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per case")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    parser.require_positive(args, ("images", "batch_size", "threads"))
    if args.megapixels <= 0:
        parser.error(f"--megapixels={args.megapixels}: must be > 0")
    return args


def main(argv: list[str] | None = None) -> None:
    from qualityguide.runtime import quiet_third_party

    quiet_third_party()
    args = parse_args(argv)
    if args.worker:
        from qualityguide.runtime import release_processes

        try:
            result = worker(json.loads(args.worker))
        finally:
            release_processes()  # as the CLI does: a process still in a gloo group can abort at exit
        if result is not None:
            print(json.dumps(result))
        return
    load_start = os.getloadavg()  # others' load on a shared machine slows both cases: recorded
    work = Path(tempfile.mkdtemp(prefix="qualityguide-bench-label-"))
    images = synthesise(work, args.megapixels, args.images, _sources())
    cases, same = [], {}
    for command in args.commands:
        produced = {}
        for processes in (1, 2):
            folder = work / f"{command}-{processes}"
            if command == "label":  # label writes into the folder: each case labels its own copy
                folder.mkdir()
                for image in images:
                    shutil.copy(image, folder / image.name)
            output = work / f"{command}-{processes}.csv"
            spec = {"command": command, "folder": str(folder if command == "label" else work), "output": str(output),
                    "scorer": args.scorer, "batch": args.batch_size, "threads": args.threads,
                    "warmup": str(images[0])}
            case = {"command": command, "processes": processes, **run_case(spec, processes, args.timeout)}
            cases.append(case)
            print(json.dumps(case), file=sys.stderr)
            produced[processes] = (folder / "metadata.csv") if command == "label" else output
        if all(path.is_file() for path in produced.values()):
            same[command] = produced[1].read_bytes() == produced[2].read_bytes()
    speedups = {}
    for command in args.commands:
        rates = {c["processes"]: c.get("images_per_s") for c in cases if c["command"] == command}
        if rates.get(1) and rates.get(2):
            speedups[command] = {"speedup": rates[2] / rates[1], "meets_target": rates[2] / rates[1] >= TARGET}
    result = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
              "threads_per_process": args.threads, "scorer": args.scorer, "images": args.images,
              "megapixels": args.megapixels, "batch_size": args.batch_size, "target_speedup": TARGET,
              "load_average": {"start": load_start, "end": os.getloadavg()}, "cases": cases, "speedup": speedups,
              "same_output_1_vs_2_processes": same}
    shutil.rmtree(work, ignore_errors=True)
    table = _markdown(result)
    write_report(Path(args.out), "bench_label", result, table + "\n", _plot)
    print(json.dumps(result, indent=2))
    print(table)


def _markdown(result: dict) -> str:
    lines = ["| command | processes | images/s | command s | end-to-end s | status |", "|---|---|---|---|---|---|"]
    for c in result["cases"]:
        if c["status"] == "ok":
            lines.append(f"| {c['command']} | {c['processes']} | {c['images_per_s']:.3g} | {c['seconds']:.1f} | "
                         f"{c['wall_s']:.1f} | ok |")
        else:
            lines.append(f"| {c['command']} | {c['processes']} | | | | {c['status']} |")
    for command, s in result["speedup"].items():
        lines.append(f"\n{command}: 2 processes / 1 = {s['speedup']:.2f}x (target {result['target_speedup']}x: "
                     f"{'met' if s['meets_target'] else 'not met'}); same output: "
                     f"{result['same_output_1_vs_2_processes'].get(command)}")
    lines.append(f"\nload average at start / end: {result['load_average']['start'][0]:.1f} / "
                 f"{result['load_average']['end'][0]:.1f} on {result['cpus']} CPUs")
    return "\n".join(lines)


def _plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ok = [c for c in result["cases"] if c["status"] == "ok"]
    labels = [f"{c['command']}\n{c['processes']} proc" for c in ok]
    ax.bar(range(len(ok)), [c["images_per_s"] for c in ok], color=["C0" if c["processes"] == 1 else "C1" for c in ok])
    ax.set_xticks(range(len(ok)), labels)
    ax.set_ylabel("images / s")
    ax.set_title(f"{result['scorer']}, {result['megapixels']:g} MP, {result['threads_per_process']} thread(s)/process")
    save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    main()
