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


@pytest.mark.parametrize("layer, allowed", [
    ("diffusion", {"qualityguide.errors", "qualityguide.diffusion"}),
    ("features", {"qualityguide.errors", "qualityguide.images", "qualityguide.scorers", "qualityguide.diffusion",
                  "qualityguide.features"}),
    ("train", {"qualityguide.errors", "qualityguide.images", "qualityguide.diffusion", "qualityguide.identity",
               "qualityguide.train"}),
])
def test_lower_layers_import_nothing_above_them(layer, allowed):
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for module in _imports(path):
            assert any(module == a or module.startswith(a + ".") for a in allowed), (path.name, module)


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
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
