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
