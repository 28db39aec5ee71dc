"""``qualityguide`` command line: ``score``, ``label``, ``demo``, ``scorers``, ``lgdm extract|fit|evaluate``,
``--version``.

Exit codes: 0 success, 1 some files failed to score, 2 usage or configuration errors (one line on
stderr, no traceback).
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import InputError, QualityGuideError
from ..runtime import quiet_third_party, release_processes, run_main


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 with usage; keep that, one line
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    from ..scorers import DEFAULT_SCORER

    parser = _Parser(prog="qualityguide", description="Perceptual image quality for diffusion models.")
    parser.add_argument("--version", action="version", version=f"qualityguide {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    score = sub.add_parser("score", help="score image files and folders into a CSV")
    score.add_argument("paths", nargs="+", help="image files and/or folders")
    score.add_argument("--scorer", default=DEFAULT_SCORER, help=f"scorer spec (default {DEFAULT_SCORER}), optionally "
                       "SPEC@SIZE to resize the short side to SIZE px first (niqe-embedded@192); see `qualityguide scorers`")
    score.add_argument("--weights", default=None, help="local weights/parameter file for the scorer")
    score.add_argument("--output", "-o", default="scores.csv", help="CSV to write or resume (default scores.csv)")
    score.add_argument("--batch-size", type=int, default=8)
    score.add_argument("--recursive", "-r", action="store_true", help="descend into sub-folders")
    score.add_argument("--device", default="cpu", help="torch device, e.g. cuda, cuda:1 (default cpu)")
    score.add_argument("--retry-failed", action="store_true",
                       help="re-try the files given here that are recorded with an error (other rows stay)")
    score.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                       help="load images of up to N pixels without Pillow's decompression-bomb guard stepping in, "
                       "for files you trust (0: no limit)")
    score.add_argument("--quiet", action="store_true", help="no progress bar")

    label = sub.add_parser("label", help="write score columns into a training folder's metadata.csv (datasets "
                           "imagefolder)")
    label.add_argument("folder", metavar="DIR", help="image folder; DIR/metadata.csv is created or updated")
    label.add_argument("--scorer", action="append", required=True, metavar="SPEC",
                       help="scorer spec, optionally SPEC@SIZE; repeatable; each gives a column named SPEC as written")
    label.add_argument("--weights", action="append", default=[], metavar="[SPEC=]FILE",
                       help="local weights/parameter file for a scorer that needs one; FILE alone with one --scorer, "
                       "SPEC=FILE with several; repeatable")
    label.add_argument("--batch-size", type=int, default=8)
    label.add_argument("--recursive", "-r", action="store_true", help="label images in sub-folders too")
    label.add_argument("--device", default="cpu", help="torch device, e.g. cuda, cuda:1 (default cpu)")
    label.add_argument("--overwrite", action="store_true",
                       help="replace existing columns of these names not written by `label`, and relabel a column "
                       "labelled earlier with other settings")
    label.add_argument("--retry-failed", action="store_true", help="score again the images recorded as failed")
    label.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                       help="load images of up to N pixels without Pillow's decompression-bomb guard stepping in, "
                       "for files you trust (0: no limit)")
    label.add_argument("--quiet", action="store_true", help="no progress bar")

    demo = sub.add_parser("demo", help="offline demo: score distorted real photographs, write a report")
    demo.add_argument("--out", default="qualityguide-demo", help="report folder (default ./qualityguide-demo)")
    demo.add_argument("--scorer", action="append", default=None,
                      help=f"scorer spec, optionally SPEC@SIZE, repeatable (default {DEFAULT_SCORER}, which needs no "
                      "downloads)")
    demo.add_argument("--size", type=int, default=384, help="short side of the photographs in px (default 384; at "
                      "least the scorer's minimum, 192 for NIQE, or use SPEC@SIZE)")
    demo.add_argument("--weights", action="append", default=[], metavar="[SPEC=]FILE",
                      help="local weights/parameter file for a scorer that needs one (brisque, niqe, pyiqa:<name>); "
                      "FILE alone with one --scorer, SPEC=FILE with several; repeatable")
    demo.add_argument("--quiet", action="store_true")

    from .lgdm import add_parser as add_lgdm_parser

    add_lgdm_parser(sub)

    scorers = sub.add_parser("scorers", help="list scorers and whether each is usable offline now")
    scorers.add_argument("--no-pyiqa", action="store_true", help="list only qualityguide's built-in scorers")
    return parser


def _cmd_score(args) -> int:
    from ..runtime import check_device
    from ..scorers import load_scorer
    from .score import score_paths
    from .scorefile import check_output
    from .shards import process_device

    device = process_device(check_device(args.device, "--device"))
    check_output(args.output)  # before the scorer loads: a folder given as --output is a typo, say so at once
    _max_image_pixels(args.max_image_pixels)
    scorer = load_scorer(args.scorer, weights=args.weights, device=device)
    summary = score_paths(args.paths, scorer, args.output, batch_size=args.batch_size, recursive=args.recursive,
                          device=device, retry_failed=args.retry_failed, progress=not args.quiet)
    if not summary.main:  # another process of `accelerate launch`: the main one reports the whole run
        return 0
    for note in summary.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"{summary.scored} scored, {summary.failed} failed, {summary.skipped} already in {args.output}",
          file=sys.stderr)
    return 0 if summary.ok else 1


def _max_image_pixels(value: int | None) -> None:
    """Apply ``--max-image-pixels`` (None: keep Pillow's limit; 0: no limit)."""
    if value is not None:
        if value < 0:
            raise QualityGuideError(f"--max-image-pixels must be >= 0 (0: no limit), got {value}")
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = value or None  # Pillow warns above it, refuses above twice it


def _cmd_label(args) -> int:
    from ..errors import printable
    from ..runtime import check_device
    from ..scorers import load_scorer
    from .label import label_folder
    from .shards import process_device

    device = process_device(check_device(args.device, "--device"))
    specs = [spec.strip() for spec in args.scorer]
    twice = sorted({spec for spec in specs if specs.count(spec) > 1})
    if twice:
        raise InputError(f"--scorer {twice[0]} is given twice; each --scorer is one column: give it once")
    weights = _demo_weights(args.weights, specs)  # every key is one of specs
    _max_image_pixels(args.max_image_pixels)
    scorers = {spec: load_scorer(spec, weights=weights.get(spec), device=device) for spec in specs}
    summary = label_folder(args.folder, scorers, batch_size=args.batch_size, recursive=args.recursive, device=device,
                           overwrite=args.overwrite, retry_failed=args.retry_failed, progress=not args.quiet)
    if not summary.main:  # another process of `accelerate launch`: the main one reports the whole run
        return 0
    failed: dict[tuple[str, str], list[str]] = {}
    for name, column, error in summary.failures:
        failed.setdefault((name, error), []).append(column)
    for (name, error), columns in failed.items():
        print(f"error: [{', '.join(columns)}] {error}", file=sys.stderr)
    for name, why in summary.unlabelled:
        print(f"note: row {printable(name)!r} was not labelled: {why}", file=sys.stderr)
    if summary.missing:
        shown = ", ".join(printable(name) for name in summary.missing[:3])
        more = f" and {len(summary.missing) - 3} more" if len(summary.missing) > 3 else ""
        print(f"note: {len(summary.missing)} row(s) name files that do not exist ({shown}{more}); they were kept "
              "with empty score cells", file=sys.stderr)
    for note in summary.notes:
        print(f"note: {note}", file=sys.stderr)
    done = ", ".join(f"{column} {summary.scored[column]} of {summary.images}" for column in summary.columns)
    failed_images = len({name for name, _, _ in summary.failures})
    print(f"{summary.metadata}: {summary.images} images; scored now: {done}; {failed_images} failed; "
          f"{summary.added_rows} row(s) added", file=sys.stderr)
    return 0 if summary.ok else 1


def _cmd_demo(args) -> int:
    from .demo import run_demo

    result = run_demo(args.out, scorers=args.scorer, size=args.size, progress=not args.quiet,
                      weights=_demo_weights(args.weights, args.scorer))
    print(result["table"])
    print(f"\nreport: {args.out}/report.md, contact sheet: {args.out}/contact_sheet.png")
    return 0


def _demo_weights(items: list[str], specs: list[str] | None) -> dict[str, str]:
    """``--weights [SPEC=]FILE`` items -> {spec: file}; a bare FILE belongs to the only --scorer."""
    from ..scorers import DEFAULT_SCORER

    specs = specs or [DEFAULT_SCORER]
    weights: dict[str, str] = {}
    for item in items:
        spec, sep, file = item.partition("=")
        if not sep or spec not in specs:  # a bare file (its name may hold '=')
            if len(specs) != 1:
                raise InputError(f"--weights {item!r}: with several --scorer ({', '.join(specs)}) say which one "
                                        f"the file is for: --weights SPEC=FILE, e.g. --weights {specs[0]}=FILE")
            spec, file = specs[0], item
        if spec in weights:
            raise InputError(f"--weights: two files for {spec!r} ({weights[spec]!r} and {file!r}); give one")
        weights[spec] = file
    return weights


def _cmd_scorers(args) -> int:
    from ..scorers import scorer_table

    rows = scorer_table(include_pyiqa=not args.no_pyiqa)
    width = max(len(r["name"]) for r in rows)
    for row in rows:
        status = {True: "offline: yes", False: "offline: no ", None: "offline: ?  "}[row["offline"]]
        detail = row["description"] + (f" [{row['reason']}]" if row["reason"] else "")
        print(f"{row['name']:<{width}}  {status}  {detail}")
    return 0


def _cmd_lgdm(args) -> int:
    from .lgdm import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    quiet_third_party(quiet=getattr(args, "quiet", False))
    handlers = {"score": _cmd_score, "label": _cmd_label, "demo": _cmd_demo, "scorers": _cmd_scorers, "lgdm": _cmd_lgdm}
    try:
        return run_main(lambda: handlers[args.command](args), f"qualityguide {args.command}")
    finally:
        release_processes()  # the shards of score/label/lgdm extract under accelerate launch

