"""The evals' command-line style: flags are kebab-case (``--held-out``), as in the ``qualityguide`` command, and
each also answers to the snake_case spelling the recipes use (``--held_out``, diffusers' training-script style), so a
flag copied from a recipe works. ``--help`` shows the kebab-case spelling only."""

from __future__ import annotations

import argparse
import copy
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from qualityguide.errors import QualityGuideError


def _snake(option: str) -> str:
    return "--" + option[2:].replace("-", "_")


class _KebabHelp(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written (its examples keep their lines), and each flag under its kebab-case name."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        kebab = {s for s in action.option_strings if s.startswith("--") and "-" in s[2:]}
        shown = copy.copy(action)
        shown.option_strings = [s for s in action.option_strings if s not in {_snake(k) for k in kebab}]
        return super()._format_action_invocation(shown)


class EvalArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose every ``--kebab-case`` flag also takes its ``--snake_case`` spelling."""

    def add_argument(self, *names: str, **kwargs) -> argparse.Action:
        """As ``ArgumentParser.add_argument``; ``--a-b`` adds the alias ``--a_b`` (same ``dest``)."""
        aliases = [_snake(n) for n in names if n.startswith("--") and "-" in n[2:]]
        return super().add_argument(*names, *[a for a in aliases if a not in names], **kwargs)

    def require_positive(self, args: argparse.Namespace, names: tuple[str, ...]) -> None:
        """Exit as argparse does (usage, exit 2) when a count or size flag is below 1, naming the flag as typed.

        Args:
            args: the parsed flags.
            names: the ``dest`` names that must be >= 1 (a flag left at ``None`` is not checked).
        """
        for name in names:
            value = getattr(args, name)
            if value is not None and value < 1:
                self.error(f"--{name.replace('_', '-')}={value}: must be >= 1")


def eval_parser(doc: str | None) -> EvalArgumentParser:
    """The parser of one eval, described by its module docstring (``__doc__``: what it measures, how to run it).

    Args:
        doc: the eval's module docstring, shown by ``--help`` as written.
    """
    return EvalArgumentParser(description=doc, formatter_class=_KebabHelp)


def add_pipeline_flags(parser: argparse.ArgumentParser, model: str = "tiny:sd",
                       dtype_help: str = "fp16 / bf16 weights (default fp32)") -> None:
    """``--model``, ``--device`` and ``--dtype``: the pipeline an eval loads, named as ``load_pipeline`` takes it.

    Args:
        parser: the eval's parser.
        model: the default spec (``tiny:sd`` runs offline in seconds; ``random:sd15`` has real layer sizes).
        dtype_help: what ``--dtype`` changes in this eval.
    """
    parser.add_argument("--model", default=model, help="pipeline spec (tiny:sd, random:sd15, a folder, a hub id)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help=dtype_help)


def add_generation_flags(parser: argparse.ArgumentParser, steps: int = 10, cfg: float = 7.5) -> None:
    """``--height``, ``--steps`` and ``--cfg``: the image side, sampling steps and CFG scale of generated images.

    Args:
        parser: the eval's parser.
        steps, cfg: their defaults.
    """
    parser.add_argument("--height", type=int, default=None, help="image side in px (default: the model's)")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--cfg", type=float, default=cfg)


def add_benchmark_flags(parser: argparse.ArgumentParser, out: Path,
                        repeats_help: str = "timed rounds after one warm-up round") -> None:
    """``--repeats`` and ``--out``: how often a benchmark times each variant, and where its report goes.

    Args:
        parser: the benchmark's parser.
        out: the default report folder (``evals/results/<benchmark>``).
        repeats_help: what one repeat is in this benchmark.
    """
    parser.add_argument("--repeats", type=int, default=3, help=repeats_help)
    parser.add_argument("--out", default=str(out))


@contextmanager
def one_line_errors(prog: str, errors: type[Exception] | tuple[type[Exception], ...] = QualityGuideError
                    ) -> Iterator[None]:
    """Turn the errors a user can fix into one line, ``PROG: MESSAGE``, and exit 1 instead of a traceback.

    Args:
        prog: the eval's name, which starts the line.
        errors: the exception types meant for the user (bugs keep their traceback).
    """
    try:
        yield
    except errors as exc:
        raise SystemExit(f"{prog}: {exc}") from None
