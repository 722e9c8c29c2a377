"""`python -m dsv4_train conf=<recipe> [key=value ...]`: compose the config with Hydra and run it."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from dsv4_train.config.load import CONFIG_DIR, to_typed


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base=None)
def _hydra_entry(cfg: DictConfig) -> None:
    from dsv4_train.cli import EXIT_USER_ERROR, execute, report_user_error

    try:
        typed = to_typed(cfg)
        code = execute(typed, yaml_text=OmegaConf.to_yaml(cfg, resolve=True))
    except ValueError as error:
        report_user_error(error)
        sys.exit(EXIT_USER_ERROR)
    if code:
        sys.exit(code)


def main() -> None:
    _hydra_entry()


if __name__ == "__main__":
    main()
