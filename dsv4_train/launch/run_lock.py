"""One run per directory: an OS file lock on `run.dir` (and on `checkpoint.dir` when it lies elsewhere).

Two launches into one run directory would kill each other mid-save, interleave `metrics.jsonl` and
leave a `config.yaml` that matches neither. Rank 0 takes an exclusive `flock` on `<dir>/.dsv4.lock`
before it writes anything and holds it until the process exits (the kernel drops it on any exit,
kill -9 included, so a dead run never blocks the next). The file records who holds it, so the
refusal names the host, pid and start time. flock works on local disks, NFSv4 and Lustre mounted
with `-o flock`.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from typing import List

LOCK_NAME = ".dsv4.lock"
_held: List[int] = []  # open descriptors: the locks live as long as the process


def acquire(directory: str, *, what: str) -> None:
    """Lock `directory` for this process; ValueError naming the holder when another run has it."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        message = _in_use(directory, what, _read_holder(fd))
        os.close(fd)
        raise ValueError(message) from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode())
    os.fsync(fd)
    _held.append(fd)


def check_free(directory: str, *, what: str) -> None:
    """Refuse at once (before slow start-up work) when a live run holds `directory`; creates nothing."""
    path = os.path.join(directory, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return  # no lock file: nobody has run here (acquire() settles any race later)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ValueError(_in_use(directory, what, _read_holder(fd))) from None
    finally:
        os.close(fd)  # closing drops a lock we just took


def _in_use(directory: str, what: str, holder: str) -> str:
    return (f"{what}={directory} is in use by another run ({holder}); wait for it to finish or stop it, "
            f"or give this run another {what}.")


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"host {info['host']}, pid {info['pid']}, started {info['started']}"
    except (ValueError, KeyError, OSError):
        return "holder unknown"


def release_all() -> None:
    """Drop this process's locks (tests; a finished process drops them anyway)."""
    while _held:
        os.close(_held.pop())
