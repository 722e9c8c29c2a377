"""Before anything is written: the run and checkpoint directories are writable and the checkpoint
disk can hold a checkpoint (estimated from the parameter count: weights plus optimizer state)."""

from __future__ import annotations

import os
import shutil

from dsv4_train.plan.params import count_params

GIB = 1024**3


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_writable(path: str, *, what: str) -> None:
    existing = _nearest_existing(path)
    if not os.path.isdir(existing):
        raise ValueError(f"{what}={path}: {existing} exists and is not a directory; choose another {what}.")
    if not os.access(existing, os.W_OK | os.X_OK):  # permissions, a read-only mount, `chattr +i`
        raise ValueError(f"{what}={path}: {existing} is not writable by this process (permissions, a read-only "
                         f"file system or an immutable directory); choose a writable {what} or fix its permissions.")


def checkpoint_bytes(cfg) -> int:
    """One full checkpoint: every parameter's weight and its optimizer state (fp32 Adam moments, plus
    fp32 master weights under bf16)."""
    params = count_params(cfg.model)
    total = params.main_total + params.mtp_total
    per_param = (2 + 12) if cfg.train.precision == "bf16" else (4 + 8)
    return total * per_param


def check_space(path: str, needed: int, *, what: str) -> None:
    free = shutil.disk_usage(_nearest_existing(path)).free
    if free < needed:
        raise ValueError(
            f"{what}={path} has {free / GIB:.2f} GiB free but one checkpoint of this model needs about "
            f"{needed / GIB:.2f} GiB (weights and optimizer state); free space or choose another {what}."
        )


def check_output_dirs(cfg, checkpoint_root: str) -> None:
    check_writable(cfg.run.dir, what="run.dir")
    check_writable(checkpoint_root, what="checkpoint.dir")
    saves = cfg.checkpoint.save_final or cfg.checkpoint.save_interval > 0 or cfg.checkpoint.save_initial
    if saves:
        check_space(checkpoint_root, checkpoint_bytes(cfg), what="checkpoint.dir")
