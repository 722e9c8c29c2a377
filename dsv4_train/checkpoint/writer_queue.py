"""Megatron-Core's checkpoint writer starts a multiprocessing Manager (a separate ~200 MB Python
process) for its write-results queue at the first save and never stops it; when the trainer is
killed (kill -9, OOM killer) the manager stays behind. We create that queue first, from a manager
whose server process asks the kernel to kill it when its parent dies (Linux PR_SET_PDEATHSIG), and
hand it to Megatron through the module global it fills lazily (`filesystem_async._results_queue`,
megatron-core 0.19.2)."""

from __future__ import annotations

import multiprocessing

from dsv4_train.runtime.process import die_with_parent

_manager = None


def install() -> None:
    """Before the first save: Megatron's results queue served by a manager that dies with us."""
    global _manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if _manager is not None or getattr(filesystem_async, "_results_queue", None) is not None:
        return
    from multiprocessing.managers import SyncManager

    _manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    _manager.start(initializer=die_with_parent)
    filesystem_async._results_queue = _manager.Queue()
