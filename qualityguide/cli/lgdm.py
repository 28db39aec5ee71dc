"""``qualityguide lgdm extract | fit | evaluate``: the LGDM workflow from the command line."""

from __future__ import annotations

import argparse
import json
import sys
import typing
from dataclasses import asdict, fields
from pathlib import Path

from ..errors import InputError
from ..lgdm.config import LGDMConfig


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _optional_int(text: str) -> int | None:
    if text.lower() in ("none", "native"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`LGDMConfig` field, defaults and help taken from the dataclass."""
    group = parser.add_argument_group("LGDM config (every field of LGDMConfig)")
    hints = typing.get_type_hints(LGDMConfig)
    for f in fields(LGDMConfig):
        kind = {"num_steps": int, "t_max": int, "psi_timestep": int, "seed": int, "image_size": _optional_int,
                "eta": float, "zeta1": float, "zeta2": float, "max_upscale": float}.get(f.name, str)
        choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is typing.Literal else None
        group.add_argument(_flag(f.name), dest=f"cfg_{f.name}", type=kind, default=f.default,
                           choices=list(choices) if choices else None, help=f"default {f.default!r}")


def config_from_args(args) -> LGDMConfig:
    return LGDMConfig(**{f.name: getattr(args, f"cfg_{f.name}") for f in fields(LGDMConfig)})


def add_parser(sub) -> None:
    from ..pipelines import DEFAULT_MODEL

    lgdm = sub.add_parser("lgdm", help="LGDM: extract diffusion hyperfeatures, fit a head, run the protocol")
    cmds = lgdm.add_subparsers(dest="lgdm_command", parser_class=type(lgdm))

    extract = cmds.add_parser("extract", help="extract PMG hyperfeatures of a dataset into a resumable cache "
                              "(works under `accelerate launch`)")
    extract.add_argument("--dataset", required=True, help="folder with images and mos.csv (image,mos[,content])")
    extract.add_argument("--csv", default=None, help="the CSV if not DATASET/mos.csv")
    extract.add_argument("--model", default=DEFAULT_MODEL, help=f"backbone: hub id, local folder or tiny:sd "
                         f"(default {DEFAULT_MODEL})")
    extract.add_argument("--cache", required=True, help="feature cache folder (created or resumed)")
    extract.add_argument("--batch-size", type=int, default=8)
    extract.add_argument("--device", default="auto", help="torch device; 'auto' = this process's accelerate "
                         "device (its GPU under accelerate launch, else cpu)")
    extract.add_argument("--dtype", default=None, help="weights dtype: fp32 (default), fp16, bf16")
    extract.add_argument("--autocast", default=None, choices=["fp16", "bf16"], help="mixed precision")
    extract.add_argument("--psi-weights", default=None, help="local weights for --psi pyiqa:<metric>")
    extract.add_argument("--pmg-chunk", type=int, default=None, help="images per PMG backward (less GPU memory at "
                         "large sizes; same features)")
    extract.add_argument("--limit", type=int, default=None, help="only the first N rows (quick runs)")
    extract.add_argument("--quiet", action="store_true")
    add_config_flags(extract)

    fit = cmds.add_parser("fit", help="train a head on cached features; writes a folder for --scorer lgdm:DIR")
    fit.add_argument("--cache", required=True)
    fit.add_argument("--dataset", required=True)
    fit.add_argument("--csv", default=None)
    fit.add_argument("--out", required=True, help="head folder to write")
    _head_flags(fit)

    evaluate = cmds.add_parser("evaluate", help="the paper's protocol: 10 content-disjoint 70/10/20 splits "
                               "(median SRCC/PLCC), or train on --cross and test on --dataset")
    evaluate.add_argument("--cache", required=True)
    evaluate.add_argument("--dataset", required=True, help="the (test) dataset")
    evaluate.add_argument("--csv", default=None)
    evaluate.add_argument("--cross", default=None, help="train on this dataset, test on --dataset")
    evaluate.add_argument("--repeats", type=int, default=10)
    evaluate.add_argument("--out", default=None, help="write results.json and results.md here")
    _head_flags(evaluate)


def _head_flags(parser) -> None:
    parser.add_argument("--mixing", default="softmax", choices=["softmax", "concat"])
    parser.add_argument("--max-epochs", type=int, default=300)
    parser.add_argument("--patience", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--quiet", action="store_true")


def run(args) -> int:
    handlers = {"extract": _extract, "fit": _fit, "evaluate": _evaluate}
    if args.lgdm_command is None:
        raise InputError("qualityguide lgdm needs a command: extract, fit or evaluate (see --help)")
    return handlers[args.lgdm_command](args)


def _extract(args) -> int:
    from ..errors import printable
    from ..evaluation.datasets import load_iqa_dataset
    from ..lgdm.cache import check_cache_folder
    from ..lgdm.extract import extract_to_cache
    from ..lgdm.model import LGDM
    from ..runtime import check_device, process_state

    config = config_from_args(args)
    device = None if args.device == "auto" else check_device(args.device, "--device")
    check_cache_folder(args.cache)  # before the backbone loads
    dataset = load_iqa_dataset(args.dataset, args.csv, limit=args.limit)
    state = process_state(cpu=args.device == "cpu")
    device = device or state.device
    lgdm = LGDM.from_pretrained(args.model, config, dtype=args.dtype, device=device, psi_weights=args.psi_weights,
                                pmg_chunk=args.pmg_chunk)
    summary = extract_to_cache(lgdm, dataset["image"], args.cache, batch_size=args.batch_size,
                               autocast=args.autocast, progress=not args.quiet)
    failures = summary.pop("failures")
    for failure in failures:  # every process names its own failures, then where they are kept
        error = failure["error"] if failure["error"].startswith(failure["path"]) else \
            f"{failure['path']}: {failure['error']}"
        print(f"error: {printable(error)}", file=sys.stderr)
    for log in dict.fromkeys(f["log"] for f in failures):
        print(f"failed images are recorded in {printable(log)}", file=sys.stderr)
    if state.is_main_process:
        print(json.dumps(summary), file=sys.stderr)
    return 0 if summary["failed"] == 0 else 1


def _train_config(args):
    from ..lgdm.head import TrainConfig

    return TrainConfig(max_epochs=args.max_epochs, patience=args.patience, seed=args.seed)


def _fit(args) -> int:
    from ..evaluation.datasets import load_iqa_dataset
    from ..evaluation.stats import content_disjoint_split
    from ..lgdm.extract import dataset_features
    from ..lgdm.head import HeadConfig, fit_head
    from ..lgdm.scorer import write_head_folder

    dataset = load_iqa_dataset(args.dataset, args.csv, limit=args.limit)
    features, cache = dataset_features(args.cache, dataset)
    tr, va, _ = content_disjoint_split(dataset["content"], ratios=(0.9, 0.1, 0.0), seed=args.seed)
    layout = cache.layout
    head, history = fit_head(features, dataset["mos"], tr, va,
                             HeadConfig(num_steps=layout["num_steps"], layer_dims=layout["layer_dims"],
                                        mixing=args.mixing), _train_config(args))
    report = {"train": len(tr), "val": len(va), "epochs": history["epochs"], "val_srcc": history["best_val_srcc"]}
    settings = {"dataset": str(args.dataset), "train_images": len(tr), "val_images": len(va), "mixing": args.mixing,
                **asdict(_train_config(args)), "epochs_run": history["epochs"]}
    write_head_folder(args.out, head, cache.manifest, cache.weights_identity(),
                      card={"settings": settings, "validation": {"val_srcc": history["best_val_srcc"]}})
    (Path(args.out) / "fit.json").write_text(json.dumps({**report, "history": history["history"]}, indent=2))
    print(json.dumps(report))
    print(f"head written to {args.out}; score with: qualityguide score IMAGES --scorer lgdm:{args.out}",
          file=sys.stderr)
    return 0


def _evaluate(args) -> int:
    from ..evaluation.datasets import load_iqa_dataset
    from ..lgdm.extract import dataset_features
    from ..lgdm.protocol import cross_dataset, repeated_splits

    if args.repeats < 1:
        raise InputError(f"--repeats must be >= 1, got {args.repeats}")
    test = load_iqa_dataset(args.dataset, args.csv, limit=args.limit)
    features, cache = dataset_features(args.cache, test)
    if args.cross:
        train = load_iqa_dataset(args.cross, limit=args.limit)
        train_features, _ = dataset_features(args.cache, train)
        result = cross_dataset(train_features, train["mos"], train["content"], features, test["mos"], cache.layout,
                               repeats=args.repeats, mixing=args.mixing, train=_train_config(args))
        protocol = f"train on {args.cross} ({len(train)} images), test on {args.dataset} ({len(test)} images)"
    else:
        result = repeated_splits(features, test["mos"], test["content"], cache.layout, repeats=args.repeats,
                                 mixing=args.mixing, train=_train_config(args), progress=not args.quiet)
        protocol = f"{args.repeats} content-disjoint 70/10/20 splits of {args.dataset} ({len(test)} images)"
    result.update({"protocol": protocol, "cache": str(args.cache), "config": cache.manifest["config"],
                   "backbone_spec": cache.manifest.get("backbone_spec")})
    table = markdown_row_table([{"name": cache.manifest.get("backbone_spec") or "lgdm", **result}])
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=2))
        (out / "results.md").write_text(f"{protocol}\n\n{table}\n")
    return 0


def markdown_row_table(rows: list[dict]) -> str:
    """Median SRCC/PLCC and the SRCC range ``[min, max]`` per variant (brackets: a dash between two negative values
    read as one number)."""
    lines = ["| variant | median SRCC | median PLCC | SRCC range | splits |", "|---|---|---|---|---|"]
    for row in rows:
        s, p = row["srcc"], row["plcc"]
        lines.append(f"| {row['name']} | {s['median']:.3f} | {p['median']:.3f} | [{s['min']:.3f}, {s['max']:.3f}] | "
                     f"{s['n']} |")
    return "\n".join(lines)
