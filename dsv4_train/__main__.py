"""`python -m dsv4_train conf=<recipe> [key=value ...]`: compose the config with Hydra and run it.

Before Hydra creates any output directory, the command line is composed, typed and validated, and
the data inputs and a requested checkpoint are checked (`run_with_friendly_errors`); a mistake ends
the process with one message and exit status 2.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from dsv4_train.config.load import CONFIG_DIR, exit_on_config_error, run_with_friendly_errors, to_typed


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base=None)
@exit_on_config_error
def _hydra_entry(cfg: DictConfig) -> float:
    from dsv4_train.cli import EXIT_USER_ERROR, execute, report_user_error

    in_sweep = _in_multirun()
    try:
        outcome = execute(to_typed(cfg), yaml_text=OmegaConf.to_yaml(cfg, resolve=True))
    except ValueError as error:  # data / checkpoint input errors found inside the job
        report_user_error(error)
        if in_sweep:
            return float("nan")  # a failed trial (result.json says why); the sweep goes on
        sys.exit(EXIT_USER_ERROR)
    except Exception:
        if not in_sweep:
            raise
        import traceback

        traceback.print_exc()  # into this job's log; result.json records the error
        return float("nan")
    finally:
        from dsv4_train.launch import run_lock

        run_lock.release_all()  # a sweep runs its jobs in one process, each in its own run.dir
    code, objective = outcome if isinstance(outcome, tuple) else (outcome, float("nan"))
    if in_sweep:
        return objective  # what a sweeper (Optuna) optimises; NaN marks a failed or diverged trial
    if code:
        sys.exit(code)
    return objective


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def main() -> None:
    from dsv4_train.cli import preflight_inputs

    run_with_friendly_errors(_hydra_entry, extra_check=preflight_inputs)


if __name__ == "__main__":
    main()
