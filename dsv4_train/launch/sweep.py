"""Which Hydra sweep this job belongs to: the wandb group that ties a sweep's runs together."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def sweep_group() -> Optional[str]:
    """A name shared by every job of the current Hydra multirun (local or Slurm), else None.

    It is derived from the sweep directory (`hydra.sweep.dir`, e.g. multirun/tiny_pretrain/
    2025-01-01_12-00-00 -> "tiny_pretrain/2025-01-01_12-00-00"), which Hydra fixes once per sweep
    and hands to every job, including submitit jobs on other nodes.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    parts = Path(str(hydra_cfg.sweep.dir)).parts
    return "/".join(parts[-2:]) if parts else None


def wandb_group(configured: Optional[str]) -> Optional[str]:
    """logging.wandb_group if set, else the sweep's group inside a multirun, else None."""
    return configured or sweep_group()
