"""The README's commands parse as written.

Every command of the README's ``bash`` blocks, and every whole command quoted in its prose (``python recipes/...``,
``accelerate launch ...``), is parsed by the parser that would run it: the ``qualityguide`` CLI's, a recipe's
``parse_args`` (with the recipe's own cross-flag checks), and accelerate's own ``launch`` parser for the launcher's
flags, and an eval's ``parse_args`` for ``python -m evals.NAME`` (its argument checks run before anything is loaded).
Prose that names a ``qualityguide`` command and flags (``qualityguide label DIR --scorer SPEC``) is checked for the
command and each flag. Hub ids need no substitution: parsing loads nothing. Commands of other programs (``pip``,
``pytest``) are skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

from helpers import ROOT, load_script

README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
OTHER_PROGRAMS = ("pip", "pytest")  # not ours: `pip install ...`, `python -m pytest ...`


def block_commands(text: str) -> list[str]:
    """The commands of the ``bash`` blocks, one per line after joining ``\\``-continued lines."""
    lines = []
    for language, body in FENCE.findall(text):
        if language == "bash":
            lines += [line.strip() for line in body.replace("\\\n", " ").splitlines() if line.strip()]
    return lines


def prose_snippets(text: str) -> list[str]:
    """Backticked prose outside code blocks, whitespace (line breaks included) collapsed."""
    return [" ".join(snippet.split()) for snippet in re.findall(r"`([^`\n]+(?:\n[^`\n]+)*)`", FENCE.sub("", text))]


def simple_commands(line: str) -> list[list[str]]:
    """``a && b  # comment`` -> [argv of a, argv of b], leading ``VAR=value`` assignments dropped."""
    commands, current = [], []
    for token in shlex.split(line, comments=True) + ["&&"]:
        if token == "&&":
            while current and re.fullmatch(r"[A-Za-z_]\w*=.*", current[0]):
                current.pop(0)
            if current:
                commands.append(current)
            current = []
        else:
            current.append(token)
    return commands


def _parse(parse, argv: list[str]) -> str | None:
    """None if ``parse(argv)`` accepts ``argv`` (``--help`` included), else why not."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # --help's text
            parse(argv)
    except SystemExit as exc:
        return None if exc.code == 0 else f"refused (exit {exc.code})"
    return None


def _cli_parse(argv: list[str]):
    from qualityguide.cli.commands import build_parser

    return build_parser().parse_args(argv)


def _recipe_parse(script: str):
    """The ``parse_args`` of ``recipes/NAME.py``, or None if there is no such recipe."""
    path = Path(script)
    if path.parent != Path("recipes") or not (ROOT / path).is_file():
        return None
    return load_script(str(path)).parse_args


def _eval_parse(module: str):
    """The ``parse_args`` of eval ``evals.NAME``, or None if there is no such eval."""
    import importlib

    name = module.removeprefix("evals.")
    if not module.startswith("evals.") or not (ROOT / "evals" / f"{name}.py").is_file():
        return None
    return importlib.import_module(module).parse_args


def _launch(argv: list[str]) -> str | None:
    """``accelerate launch ARGS``: the launcher's flags, then the script or module with its own parser."""
    from accelerate.commands.launch import launch_command_parser

    try:
        launch = launch_command_parser().parse_args(argv)
    except SystemExit as exc:
        return f"accelerate launch refused its flags (exit {exc.code})"
    if launch.module:
        if launch.training_script != "qualityguide.cli":
            return f"unknown module {launch.training_script!r}"
        return _parse(_cli_parse, launch.training_script_args)
    parse = _recipe_parse(launch.training_script)
    if parse is None:
        return f"{launch.training_script}: no such recipe"
    return _parse(parse, launch.training_script_args)


def check_command(argv: list[str]) -> str | None:
    """None if ``argv`` (a README command) parses, else why not; other programs are skipped (None)."""
    if argv[0] == "qualityguide":
        return _parse(_cli_parse, argv[1:])
    if argv[:2] == ["accelerate", "launch"]:
        return _launch(argv[2:])
    if argv[0] == "python" and len(argv) > 1:
        if argv[1] == "-m" and argv[2:3] == ["pytest"]:
            return None
        if argv[1] == "-m" and len(argv) > 2:
            parse = _eval_parse(argv[2])
            return f"{argv[2]}: no such eval" if parse is None else _parse(parse, argv[3:])
        parse = _recipe_parse(argv[1])
        return f"{argv[1]}: no such recipe" if parse is None else _parse(parse, argv[2:])
    if argv[0] in OTHER_PROGRAMS:
        return None
    return "not a command this test knows: add it to check_command"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def check_named_flags(snippet: str) -> str | None:
    """A prose ``qualityguide CMD ... --flag ...``: the (sub)command exists and has every ``--flag`` named."""
    from qualityguide.cli.commands import build_parser

    parser, words = build_parser(), snippet.split()[1:]
    while words and words[0] in _subparsers(parser):
        parser = _subparsers(parser)[words.pop(0)]
    if words and re.fullmatch(r"[a-z]+", words[0]) and _subparsers(parser):
        return f"no command {words[0]!r}"
    flags = {flag for action in parser._actions for flag in action.option_strings}
    missing = [flag for flag in re.findall(r"--[\w-]+", snippet) if flag not in flags]
    return f"{parser.prog} has no {', '.join(missing)}" if missing else None


def problems(text: str) -> list[tuple[str, str]]:
    """(command, why) for every README command in ``text`` that does not parse as written."""
    found = []
    for line in block_commands(text):
        found += [(line, why) for argv in simple_commands(line) if (why := check_command(argv))]
    for snippet in prose_snippets(text):
        if snippet.startswith(("python recipes/", "accelerate launch ")) or re.match(r"python -m evals\.\w+ ", snippet):
            found += [(snippet, why) for argv in simple_commands(snippet) if (why := check_command(argv))]
        elif re.match(r"qualityguide [a-z]", snippet) and (why := check_named_flags(snippet)):
            found.append((snippet, why))
    return found


def test_every_readme_command_parses_as_written():
    assert problems(README.read_text(encoding="utf-8")) == []


def test_the_readme_commands_are_all_found():
    """The extraction sees the commands it is meant to check, so the test above cannot pass by finding none."""
    text = README.read_text(encoding="utf-8")
    argvs = [argv for line in block_commands(text) for argv in simple_commands(line)]
    firsts = [argv[0] if argv[0] != "python" else argv[1].split("/")[0] for argv in argvs]
    assert firsts.count("qualityguide") >= 10 and firsts.count("accelerate") >= 3 and firsts.count("recipes") >= 1
    prose = [s for s in prose_snippets(text) if s.startswith("python recipes/")]
    assert any("--max_train_steps" in s for s in prose)  # the offline ACPO command, quoted across a line break


def test_the_check_catches_broken_commands():
    """Planted README text: a renamed flag, a missing required argument, a wrong launcher flag, a missing recipe, a
    placeholder and a flag named in prose that the command lacks are each reported; valid forms are not."""
    broken = [
        "qualityguide score photos/ --recursve",
        "qualityguide lgdm extract --cache feats/",
        "accelerate launch --num_procs 4 recipes/train_acpo_lora.py --model m --max_train_steps 2",
        "accelerate launch recipes/train_acpo_lora.py --model m --max-train-steps 2",
        "python recipes/train_nothing.py --model m",
        "accelerate launch -m qualityguide.cli lgdm extract ...",
        "python recipes/train_iqa_adapter.py --model m --dataset d --max_train_steps 2",  # needs a condition
        "python evals/guidance.py --limit 3",  # evals run as modules now
        "python -m evals.guidance --limit 2",  # refused by the eval's own checks (correlations need 3 pairs)
        "python -m evals.nothing --x 1",
    ]
    fine = [
        "pip install -e . && qualityguide demo  # a comment",
        "HF_HUB_OFFLINE=1 python -m pytest -q",
        "python -m evals.guidance --model tiny:sd --scorer niqe-embedded@192 --limit 3",
        "python recipes/train_acpo_lora.py --help",
        "accelerate launch --num_processes 2 -m qualityguide.cli score a.png --scorer niqe-embedded@192",
    ]
    text = "```bash\n" + "\n".join(broken + fine) + "\n```\n"
    text += "Prose: `qualityguide label DIR --scorer SPEC [--scorer SPEC ...]`, `qualityguide label DIR --scorers X`,\n"
    text += "`qualityguide <command>: error: ...`, `qualityguide scorers`, `qualityguide nonsense --x`, and\n"
    text += "`python -m evals.<name> ...` (a placeholder, not a command), `python -m evals.toy_task --stepz 2`, and\n"
    text += "`python recipes/guided_sampling.py --model tiny:sd\n--prompts p.txt --scorer s --scale 0.1 --stepz 2`.\n"
    reported = [command for command, _ in problems(text)]
    assert reported == broken + ["qualityguide label DIR --scorers X", "qualityguide nonsense --x",
                                 "python -m evals.toy_task --stepz 2",
                                 "python recipes/guided_sampling.py --model tiny:sd --prompts p.txt --scorer s "
                                 "--scale 0.1 --stepz 2"]


def recipe_flags(name: str) -> set[str]:
    """Every option string of a recipe's parser (aliases included), read from the parser itself."""
    captured = {}

    def grab(self, args=None, namespace=None):
        captured["parser"] = self
        raise SystemExit(0)

    recipe = load_script(f"recipes/{name}.py")
    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = grab
    try:
        with contextlib.suppress(SystemExit):
            recipe.parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = original
    return {option for action in captured["parser"]._actions for option in action.option_strings
            if option.startswith("--") and option != "--help" and action.help != argparse.SUPPRESS}


def readme_flag_table(name: str) -> str:
    match = re.search(rf"<!-- flags:{name} -->\n(.*?)<!-- /flags -->", README.read_text(encoding="utf-8"), re.DOTALL)
    assert match, f"README has no flag table for {name}"
    return match.group(1)


def test_the_recipes_flag_tables_list_every_flag_and_no_other():
    """Each recipe's README section lists its flags by purpose: every flag of its parser, none it lacks, and the
    model row first with diffusers' flag name first."""
    for name in ("train_iqa_adapter", "train_acpo_lora"):
        table = readme_flag_table(name)
        listed = set(re.findall(r"`(--[a-z0-9_]+)`", table)) - {"--help"}
        flags = recipe_flags(name)
        assert listed == flags, (name, sorted(flags - listed), sorted(listed - flags))
        rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
        assert rows[0].startswith("| model | `--pretrained_model_name_or_path`")
