"""The one seam between dsv4-train and Megatron-Core's private internals, for megatron-core 0.19.2 only.

* `cpu_compat.py`: the CPU layer (Megatron-Core on a CPU over gloo), applied when the run's device is
  the CPU.
* `optimizer_fixes.py`: two optimizer-checkpoint bugs of 0.19.2, fixed on every device.
* `compute_context.py`: how the CPU layer steps aside during model compute, without model code
  importing any of this.

`apply(cpu=...)` is called explicitly once per process at start-up, by
runtime/distributed.py::init_process_group (training, convert, tools, tests), before the first model is
built; it refuses any other megatron-core version (`check_version`). Each patch has an upgrade canary in
tests/mcore/ that fails when the upstream behaviour it works around changes.
"""

from __future__ import annotations

from dsv4_train.mcore.version import PINNED_VERSION, check_version  # noqa: F401 (the seam's guard)


def apply(*, cpu: bool) -> None:
    """Every patch this process needs, once (idempotent): the CPU layer when the run is on the CPU, then
    the optimizer fixes."""
    from dsv4_train.mcore import cpu_compat, optimizer_fixes

    check_version()
    if cpu:
        cpu_compat.apply(force=True)
    optimizer_fixes.apply()


def require_applied() -> None:
    """For code that relies on the optimizer fixes (checkpoint/io.py): fail loudly instead of silently
    saving or loading through the unfixed upstream paths."""
    from dsv4_train.mcore import optimizer_fixes

    if not optimizer_fixes.applied():
        raise RuntimeError("dsv4_train.mcore.apply() was not called at start-up "
                           "(runtime/distributed.py::init_process_group does it)")
