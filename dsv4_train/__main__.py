"""`python -m dsv4_train conf=<recipe> [key=value ...]`: compose the config with Hydra and run it.

A single run goes through dsv4_train/entry.py (composed once, checked before anything is written).
Sweeps (`-m`), `--cfg` and `--help` go through `hydra_entry` below, Hydra's own entry, after the
sweep pre-flight has composed and validated every point (config/errors.py); each sweep job is then
typed, validated and derived once inside Hydra.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from dsv4_train.config.errors import exit_on_config_error
from dsv4_train.config.load import CONFIG_DIR, to_typed


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base=None)
@exit_on_config_error
def hydra_entry(cfg: DictConfig) -> float:
    from dsv4_train.cli import prepare, run_task

    return run_task(prepare(to_typed(cfg)), yaml_text=OmegaConf.to_yaml(cfg, resolve=True), in_sweep=_in_multirun())


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def main() -> None:
    from dsv4_train.entry import main as entry_main

    entry_main(hydra_entry)


if __name__ == "__main__":
    main()
