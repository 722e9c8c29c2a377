"""Upgrade canaries of the Megatron-Core seam (dsv4_train/mcore/): every upstream function or class that a
patch replaces or relies on still has the source the patch was written against (megatron-core 0.19.2).
On an upgrade these fail first, each naming the patch to re-check, instead of a patch silently doing
the wrong thing."""

from __future__ import annotations

import pytest

from dsv4_train import mcore
from dsv4_train.mcore import upstream


@pytest.mark.parametrize("target", sorted(upstream.UPSTREAM))
def test_upstream_source_is_what_the_patch_was_written_against(target):
    recorded, patch = upstream.UPSTREAM[target]
    assert upstream.fingerprint(target) == recorded, (
        f"{target} changed upstream: re-check {patch} against the new source, then update its fingerprint")


def test_a_changed_source_changes_the_fingerprint(monkeypatch):
    target = "megatron.core.tensor_parallel.mappings:_gather_along_first_dim"
    original = upstream.source_of(target)
    monkeypatch.setattr(upstream, "source_of", lambda t: original.replace("dim_size[0]", "dim_size[1]"))
    assert "dim_size[0]" in original and upstream.fingerprint(target) != upstream.UPSTREAM[target][0]


def test_a_removed_function_is_named():
    with pytest.raises(LookupError, match="no_such_function"):
        upstream.source_of("megatron.core.tensor_parallel.mappings:no_such_function")


def test_other_megatron_core_versions_are_refused(monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.20.0")
    with pytest.raises(RuntimeError, match="megatron-core 0.19.2 but megatron-core 0.20.0"):
        mcore.check_version()


def test_model_code_imports_no_runtime_code():
    """The model package depends on the seam's compute context only, never on the runtime or the CPU layer."""
    from tests.helpers import REPO

    offenders = [f"{path.name}: {line.strip()}" for path in sorted((REPO / "dsv4_train" / "model").glob("*.py"))
                 for line in path.read_text().splitlines()
                 if "import" in line and ("dsv4_train.runtime" in line or "cpu_compat" in line)]
    assert not offenders, offenders
