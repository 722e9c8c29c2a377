"""The repository stands alone: comments, configs and docs cite the paper or files in the repository,
never notes that live outside it (the reference notes a developer may have had at hand)."""

from __future__ import annotations

import re

from tests.helpers import REPO

# Names of notes outside the repository and the "spec §N" form that cited one of them.
EXTERNAL_CITATION = re.compile(
    r"spec §|shared/reference|megatron_core_cpu|megatron_core_notes|dsv4_architecture|design_notes\.md"
    r"|perf_reliability|code_review\.md|official_checkpoint_format\.md|practices\.md")
SCANNED = ("dsv4_train", "tests", "bench", "conf", "recipes", "launch", "scripts", "docs", "hydra_plugins")
SUFFIXES = {".py", ".yaml", ".md", ".sh", ".toml", ".sbatch"}


def _scanned_files():
    this = __file__.rsplit("/", 1)[-1]
    for top in SCANNED:
        for path in sorted((REPO / top).rglob("*")):
            if path.is_file() and path.suffix in SUFFIXES and "_conf" not in path.parts and path.name != this:
                yield path
    yield REPO / "README.md"
    yield REPO / "pyproject.toml"


def test_no_citation_of_notes_outside_the_repository():
    hits = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
            for path in _scanned_files()
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
            if EXTERNAL_CITATION.search(line)]
    assert not hits, "cite the paper (paper §N) or a file in the repository instead:\n" + "\n".join(hits)


def test_the_scan_sees_a_planted_citation(tmp_path):
    """The pattern catches each form that was used before (a check that could never fire is no check)."""
    for planted in ("(spec §5.2)", "see megatron_core_cpu.md #31", "shared/reference/dsv4_architecture.md"):
        assert EXTERNAL_CITATION.search(f"# formula as in {planted}")
    assert not EXTERNAL_CITATION.search("# paper §2.2, model/mhc.py")


def test_architecture_doc_lists_every_module():
    """docs/architecture.md's module index names each module of the package (a package `__init__`
    only when it has a docstring) and nothing that no longer exists."""
    import ast

    package = REPO / "dsv4_train"
    modules = set()
    for path in package.rglob("*.py"):
        if "_conf" in path.parts:
            continue
        if path.name == "__init__.py" and not (ast.get_docstring(ast.parse(path.read_text())) or "").strip():
            continue
        modules.add(str(path.relative_to(package)))
    doc = (REPO / "docs" / "architecture.md").read_text()
    listed = set(re.findall(r"^\| `([\w/]+\.py)` \|", doc, flags=re.M))
    assert not modules - listed, f"add to docs/architecture.md's module index: {sorted(modules - listed)}"
    assert not listed - modules, f"no longer in the package: {sorted(listed - modules)}"
