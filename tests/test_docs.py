"""Citations of design documents resolve: the cited file is in the repository and the cited section exists.

Code, docstrings, --help texts and the README cite "docs/design.md section N"; a citation of a document that a
clone does not have (a design or style file kept outside the repository) leaves the reader with nothing to open.
"""

import posixpath
import re
import subprocess
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESIGN = "docs/design.md"
SUFFIXES = (".py", ".md", ".toml")
# A cited design or style document: a bare file name or a path whose last part is "design" or "style" + ".md", any case.
DOC_NAME = re.compile(r"[\w./-]*\b(?:design|style)\.md\b", re.IGNORECASE)
# "docs/design.md section 4", also across a line break and as "sections 4 and 6" / "sections 4, 6".
SECTION_CITATION = re.compile(r"docs/design\.md\s+sections?\s+(\d+(?:(?:\s*,\s*|\s+and\s+)\d+)*)")
HEADING = re.compile(r"^## (\d+)\. \S", re.MULTILINE)


def tracked_files() -> list[str]:
    """Repository-relative paths (``/``-separated) of the tracked files."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: which files the repository holds is unknown")
    return [name for name in out.decode("utf-8", "surrogateescape").split("\0") if name]


def cited_documents(text: str) -> list[str]:
    """Every design or style document ``text`` names, as written."""
    return DOC_NAME.findall(text)


def resolves(name: str, citing: str, tracked: set[str]) -> bool:
    """Whether ``name``, cited in the tracked file ``citing``, is a tracked file: a path relative to the repository
    root or to the citing file's folder (case-sensitive, so a wrong case fails on every file system)."""
    if name.startswith("/"):
        return False
    candidates = {posixpath.normpath(name), posixpath.normpath(str(PurePosixPath(citing).parent / name))}
    return bool(candidates & tracked)


def cited_sections(text: str) -> list[int]:
    """The section numbers of every "docs/design.md section N" citation in ``text``."""
    return [int(n) for match in SECTION_CITATION.findall(text) for n in re.findall(r"\d+", match)]


def design_sections() -> list[int]:
    return [int(n) for n in HEADING.findall((ROOT / DESIGN).read_text(encoding="utf-8"))]


def _texts() -> dict[str, str]:
    return {name: (ROOT / name).read_text(encoding="utf-8") for name in tracked_files() if name.endswith(SUFFIXES)}


def test_design_document_is_tracked_and_numbered_from_one():
    assert DESIGN in tracked_files()
    sections = design_sections()
    assert len(sections) >= 5 and sections == list(range(1, len(sections) + 1))


def test_every_cited_design_or_style_document_is_in_the_repository():
    tracked = set(tracked_files())
    dangling = [(citing, name) for citing, text in _texts().items() for name in cited_documents(text)
                if not resolves(name, citing, tracked)]
    assert dangling == []


def test_every_design_section_citation_names_an_existing_section():
    sections = set(design_sections())
    citations = {citing: cited_sections(text) for citing, text in _texts().items()}
    missing = [(citing, n) for citing, numbers in citations.items() for n in numbers if n not in sections]
    assert missing == []
    assert sum(map(len, citations.values())) >= 10  # the code does cite it; a broken pattern would find nothing


def test_the_readme_links_the_design_document():
    assert re.search(r"\]\(docs/design\.md\)", (ROOT / "README.md").read_text(encoding="utf-8"))


def test_the_checks_catch_what_they_are_for():
    """The scanners on planted text: documents outside the repository, wrong case, wrapped and multiple citations."""
    tracked = {"README.md", DESIGN, "qualityguide/lgdm/model.py"}
    outside, style = "DESIGN" + ".md", "STYLE" + ".md"  # spelled in parts so this file cites neither
    text = f"as in {outside} section 2; see ../shared/{outside.lower()} and docs/{style}, or {DESIGN}."
    names = cited_documents(text)
    assert names == [outside, f"../shared/{outside.lower()}", f"docs/{style}", DESIGN]
    assert [resolves(n, "qualityguide/lgdm/model.py", tracked) for n in names] == [False, False, False, True]
    assert not resolves("docs/Design" + ".md", "README.md", tracked)
    assert not resolves("/work/shared/" + outside, "README.md", tracked)
    assert not resolves("../" + DESIGN, "README.md", tracked)
    assert resolves("../../" + DESIGN, "qualityguide/lgdm/model.py", tracked)
    assert resolves("./" + DESIGN, "README.md", tracked)
    wrapped = f"path ({DESIGN}\n    section 6; Abud et al.) and {DESIGN} sections 4 and 7, {DESIGN} section 12."
    assert cited_sections(wrapped) == [6, 4, 7, 12]
    assert cited_sections(f"{DESIGN} is the design document") == []
