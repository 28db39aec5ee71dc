"""The dependency arrows of the package (README "How the code is laid out")."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qualityguide"


def _imports(path: Path) -> set[str]:
    """Every qualityguide module a file imports (relative imports resolved), at any depth of the file."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    package = parts if path.name == "__init__.py" else parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                found.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module and node.module.startswith("qualityguide"):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("qualityguide"))
    return found


def _layer_files(layer: str) -> list[Path]:
    """The files of a layer: a package folder, or one root module (``"files"`` -> ``files.py``)."""
    folder = PACKAGE / layer
    return sorted(folder.rglob("*.py")) if folder.is_dir() else [PACKAGE / f"{layer}.py"]


@pytest.mark.parametrize("layer, allowed", [
    ("errors", set()),
    ("files", {"qualityguide.errors"}),
    ("runtime", {"qualityguide.errors"}),
    ("diffusion", {"qualityguide.errors", "qualityguide.diffusion"}),
    ("scorers", {"qualityguide.errors", "qualityguide.files", "qualityguide.runtime", "qualityguide.images",
                 "qualityguide.diffusion", "qualityguide.scorers"}),
    ("evaluation", {"qualityguide.errors", "qualityguide.files", "qualityguide.runtime", "qualityguide.images",
                    "qualityguide.diffusion", "qualityguide.scorers", "qualityguide.evaluation"}),
    ("train", {"qualityguide.errors", "qualityguide.files", "qualityguide.runtime", "qualityguide.images",
               "qualityguide.diffusion", "qualityguide.identity",
               "qualityguide.train"}),
])
def test_lower_layers_import_nothing_above_them(layer, allowed):
    files = _layer_files(layer)
    assert files and all(path.is_file() for path in files), layer
    for path in files:
        for module in _imports(path):
            assert any(module == a or module.startswith(a + ".") for a in allowed), (path.name, module)


def test_scorers_never_import_lgdm():
    """``lgdm:`` specs reach LGDM through the prefix registry the package root fills, not an upward import."""
    for path in sorted((PACKAGE / "scorers").rglob("*.py")):
        assert not any(m.startswith("qualityguide.lgdm") for m in _imports(path)), path.name


def test_only_the_cli_imports_the_cli():
    """The command line sits on top: library code that needed a piece of it would drag argparse glue along."""
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name != "cli":
            assert not any(m == "qualityguide.cli" or m.startswith("qualityguide.cli.") for m in _imports(path)), path


def test_the_package_root_holds_at_most_eight_modules():
    assert len(sorted(PACKAGE.glob("*.py"))) <= 8, sorted(p.name for p in PACKAGE.glob("*.py"))


def test_lgdm_and_guidance_are_siblings_over_the_diffusion_layer():
    for sibling, other in (("lgdm", "qualityguide.guidance"), ("guidance", "qualityguide.lgdm")):
        for path in sorted((PACKAGE / sibling).rglob("*.py")):
            assert not any(m == other or m.startswith(other + ".") for m in _imports(path)), (path, other)


def test_adapter_stays_off_the_sampling_and_assessment_paths():
    """The adapter builds on diffusion, features and train; it needs neither LGDM nor the guidance callback."""
    for path in sorted((PACKAGE / "adapter").rglob("*.py")):
        for module in _imports(path):
            assert not module.startswith(("qualityguide.lgdm", "qualityguide.guidance", "qualityguide.finetune",
                                          "qualityguide.testing")), (path.name, module)


def test_finetune_stays_off_the_other_capabilities():
    """ACPO builds on diffusion, scorers, identity and train; it needs neither LGDM, the callback nor the adapter."""
    for path in sorted((PACKAGE / "finetune").rglob("*.py")):
        for module in _imports(path):
            assert not module.startswith(("qualityguide.lgdm", "qualityguide.guidance", "qualityguide.adapter",
                                          "qualityguide.testing", "qualityguide.cli")), (path.name, module)


def test_importing_the_library_loads_neither_testing_nor_the_callback():
    code = ("import sys, qualityguide, qualityguide.lgdm, qualityguide.pipelines, qualityguide.scorers; "
            "print(sorted(m for m in sys.modules if m.startswith(('qualityguide.testing', 'qualityguide.guidance'))))")
    assert _fresh_python(code) == "[]"


def _fresh_python(code: str) -> str:
    """What ``code`` prints in a fresh interpreter (stripped), where no module is imported yet; it must exit 0."""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def test_every_old_module_path_is_the_module_that_holds_its_code_now():
    """``import qualityguide.scoring`` (and every other moved path) gives the moved module itself, imported lazily."""
    code = ("import importlib, sys, qualityguide\n"
            "eager = sorted(set(qualityguide.MOVED_MODULES) & set(sys.modules))\n"
            "for old, new in qualityguide.MOVED_MODULES.items():\n"
            "    module = importlib.import_module(old)\n"
            "    assert module is importlib.import_module(new) and module.__name__ == new, (old, module)\n"
            "    assert module.__spec__.name == new, (old, module.__spec__)\n"
            "    assert sys.modules[old] is module, old\n"
            "from qualityguide.scoring import decode_path\n"
            "from qualityguide import scoring\n"
            "assert scoring.decode_path is decode_path and decode_path.__module__ == 'qualityguide.cli.scorefile'\n"
            "print(eager)")
    assert _fresh_python(code) == "[]"  # nothing was imported before it was asked for


def _resolve(dotted: str) -> object:
    """The module or attribute a dotted name in the docs stands for (the longest importable module, then attributes)."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            found = getattr(found, name)
        return found
    raise ModuleNotFoundError(dotted)


def test_every_module_path_the_docs_show_resolves():
    import re

    root = PACKAGE.parent
    text = "\n".join((root / name).read_text() for name in ("README.md", "docs/design.md"))
    names = sorted(set(re.findall(r"qualityguide(?:\.[A-Za-z_]\w*)+(?![\w/])", text)))
    assert "qualityguide.scoring.decode_path" in names
    for name in names:
        assert _resolve(name) is not None, name


def test_lgdm_specs_load_through_the_registry_without_importing_lgdm_first(tmp_path):
    code = ("import sys\n"
            "from qualityguide.scorers import SCORER_PREFIXES, known_specs, load_scorer\n"
            "from qualityguide.errors import InputError\n"
            "assert 'lgdm' in SCORER_PREFIXES and 'lgdm:<dir>' in known_specs(), known_specs()\n"
            "assert not any(m.startswith('qualityguide.lgdm') for m in sys.modules)\n"
            f"for spec, weights in [({'lgdm:' + str(tmp_path / 'no-such-head')!r}, None), ('lgdm:./x', 'w.pth'), "
            "('lgdn', None)]:\n"
            "    try:\n"
            "        load_scorer(spec, weights=weights)\n"
            "    except InputError as exc:\n"
            "        print(exc)\n")
    missing, weights, unknown = _fresh_python(code).splitlines()
    assert missing.startswith(f"LGDM head folder {tmp_path / 'no-such-head'} does not exist"), missing
    assert weights == "scorer 'lgdm:./x': the head folder holds the weights; drop --weights", weights
    assert "lgdm:<dir>" in unknown, unknown
