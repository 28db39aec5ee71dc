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
