"""Entry-point set-up: bitsandbytes' CPU kernel lookup stays off the hub, and every entry point quiets third parties."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest

from qualityguide import runtime

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = sorted(ROOT.glob("recipes/*.py")) + sorted(p for p in ROOT.glob("evals/*.py")
                                                           if "\ndef main(" in p.read_text())


def _lookup_touches_hub(monkeypatch) -> bool:
    """Does ``kernels.get_kernel`` for bitsandbytes' CPU kernel (what importing bitsandbytes calls on CPUs with
    AVX512-BF16) reach a hub resolver, with the hub treated as online?"""
    from huggingface_hub import constants
    from kernels import get_kernel
    from kernels._internals import resolver

    calls = []

    def hub(self, **kwargs):
        calls.append(type(self).__name__)
        raise ConnectionError("no hub in tests")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HubResolver", "HubCacheResolver", "LatestHubResolver"):
        monkeypatch.setattr(getattr(resolver, name), "resolve", hub)
    with pytest.raises(OSError):  # the local override has no build (FileNotFoundError), or the hub stub refused
        get_kernel(runtime.BNB_CPU_KERNEL, version=1)
    return bool(calls)


def test_bitsandbytes_cpu_kernel_lookup_stays_off_the_hub(monkeypatch):
    pytest.importorskip("kernels")
    monkeypatch.delenv("LOCAL_KERNELS", raising=False)
    assert _lookup_touches_hub(monkeypatch)  # what bitsandbytes' import does without the switch
    runtime.keep_bitsandbytes_off_the_hub()
    assert os.environ["LOCAL_KERNELS"] == f"{runtime.BNB_CPU_KERNEL}={os.devnull}"
    assert not _lookup_touches_hub(monkeypatch)


def test_local_kernels_the_user_set_are_kept(monkeypatch):
    monkeypatch.setenv("LOCAL_KERNELS", "someone/relu=/opt/relu")
    runtime.keep_bitsandbytes_off_the_hub()
    assert os.environ["LOCAL_KERNELS"] == f"someone/relu=/opt/relu:{runtime.BNB_CPU_KERNEL}={os.devnull}"
    mine = f"{runtime.BNB_CPU_KERNEL}=/opt/bnb"
    monkeypatch.setenv("LOCAL_KERNELS", mine)
    runtime.keep_bitsandbytes_off_the_hub()
    assert os.environ["LOCAL_KERNELS"] == mine


def test_importing_qualityguide_changes_no_logging_or_environment():
    import subprocess

    code = ("import logging, os; before = dict(os.environ); import qualityguide, qualityguide.cli; "
            "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items()); "
            "assert logging.getLogger('kernels').level == logging.getLogger('bitsandbytes').level == 0")
    run = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr


class _Called(Exception):
    pass


@pytest.mark.parametrize("path", ENTRY_POINTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_recipe_and_eval_main_quiets_third_parties_first(path, monkeypatch):
    """Each main calls the shared function before it parses or loads anything (so before bitsandbytes' import)."""
    if path.parent.name == "evals":  # evals are a package, imported by name (the one way tests load them)
        module = importlib.import_module(f"evals.{path.stem}")
    else:
        spec = importlib.util.spec_from_file_location(f"_entry_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)
        spec.loader.exec_module(module)

    def called(*args, **kwargs):
        raise _Called

    monkeypatch.setattr(runtime, "quiet_third_party", called)
    if hasattr(module, "quiet_third_party"):
        monkeypatch.setattr(module, "quiet_third_party", called)
    monkeypatch.setattr(sys, "argv", [str(path), "--definitely-not-an-option"])
    with pytest.raises(_Called):
        module.main()


def _raises(error: BaseException):
    def main() -> int:
        raise error
    return main


def test_run_main_gives_one_line_and_the_exit_codes_the_cli_and_recipes_promise(capsys):
    from qualityguide.errors import InputError, TrainingError
    from qualityguide.train.checkpoints import RESUME_HINT

    assert runtime.run_main(lambda: 0, "qualityguide score") == 0 and capsys.readouterr().err == ""
    assert runtime.run_main(_raises(InputError("--top-k=0: must be >= 1")), "qualityguide score") == 2
    assert capsys.readouterr().err == "qualityguide score: error: --top-k=0: must be >= 1\n"
    assert runtime.run_main(_raises(InputError("bad"))) == 2 and capsys.readouterr().err == "error: bad\n"
    # a subclass mapped to its own code keeps it; the rest of QualityGuideError stays a usage error (2)
    codes = {TrainingError: 1}
    assert runtime.run_main(_raises(TrainingError("loss is nan at step 3")), exit_codes=codes) == 1
    assert capsys.readouterr().err == "error: loss is nan at step 3\n"
    assert runtime.run_main(_raises(InputError("bad")), exit_codes=codes) == 2
    capsys.readouterr()
    assert runtime.run_main(_raises(KeyboardInterrupt()), "guided_sampling") == 130
    assert capsys.readouterr().err == "interrupted; rerun the same command to resume\n"
    assert runtime.run_main(_raises(KeyboardInterrupt()), resume_hint=RESUME_HINT) == 130
    assert capsys.readouterr().err == f"interrupted; {RESUME_HINT}\n"
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        runtime.run_main(_raises(ZeroDivisionError()), "qualityguide score")


@pytest.mark.parametrize("name", ["guided_sampling", "train_iqa_adapter", "train_acpo_lora"])
def test_every_recipe_exits_through_run_main(name):
    source = (ROOT / "recipes" / f"{name}.py").read_text()
    tail = source[source.index('if __name__ == "__main__":'):]
    # guided_sampling calls run_main; the training recipes' cli() calls train.setup.run_training, which does
    assert "run_main(" in tail or ("run_training(" in source and "sys.exit(cli())" in tail), tail
    assert "except QualityGuideError" not in source  # one exit wrapper, not a copy per recipe
