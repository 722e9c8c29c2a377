"""The one version guard of the Megatron-Core seam: every patch here targets one megatron-core release."""

from __future__ import annotations

PINNED_VERSION = "0.19.2"


def check_version() -> None:
    """Refuse a megatron-core other than the one these patches were written against (read from the
    package metadata, so nothing of Megatron-Core is imported before the CPU layer is in place)."""
    from importlib.metadata import version

    installed = version("megatron-core")
    if installed != PINNED_VERSION:
        raise RuntimeError(
            f"dsv4-train patches internals of megatron-core {PINNED_VERSION} but megatron-core {installed} is "
            f"installed; install megatron-core=={PINNED_VERSION} (scripts/install.sh)."
        )
