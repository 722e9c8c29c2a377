"""Where a run's checkpoints live. Imports no torch, so the CLI can check the run lock before the
slow start-up (cli.py)."""

from __future__ import annotations

import os

from dsv4_train.config.schema import Config


def checkpoint_root(cfg: Config) -> str:
    """checkpoint.dir, or <run.dir>/checkpoints when it is unset."""
    return cfg.checkpoint.dir or os.path.join(cfg.run.dir, "checkpoints")
