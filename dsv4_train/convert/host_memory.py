"""Host memory of a conversion process: what it holds now, its peak, and glibc's give-back policy.

The peak is the process's own high-water mark (`VmHWM` in /proc/self/status), not `ru_maxrss`:
Linux carries the larger of the pre-exec image's high-water mark into `ru_maxrss` across `execve`,
so a converter started by a big process (a benchmark that generated the source, a notebook) would
report its parent's peak. `VmHWM` belongs to the process's own address space, which exec replaces.
"""

from __future__ import annotations

import os
from typing import List


def current_rss() -> int:
    """Resident set size now, in bytes."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """This process's peak resident set size in bytes (ru_maxrss where /proc is absent)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def peak_rss_per_rank() -> List[int]:
    """Collective: every rank's peak resident set size in bytes."""
    import torch

    everyone: List[int] = [0] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, peak_rss())
    return everyone


def return_freed_memory_to_the_os() -> None:
    """glibc keeps freed blocks below its dynamic mmap threshold (which grows up to 32 MiB) in the heap,
    so a stream of tensors of a few MiB ratchets the resident set up; a fixed 1 MiB threshold maps each
    large buffer on its own and unmaps it when freed. No-op off glibc."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
