"""`python -m dsv4_train`: a single run is composed once, typed, validated, derived and its inputs
checked before anything is written, then run by Hydra in its output directory with that same config.

    compose (Hydra, with the hydra node) -> type -> validate (launched world size) -> derive
      -> check inputs (read-only) -> Hydra's run_job (output dir, .hydra/, logging) -> cli.execute

A mistake in any step before run_job ends the process with one message and exit status 2, before
Hydra creates an output directory. Sweeps (`-m`), `--cfg`, `--help`, `--info` and another primary
config go to `@hydra.main` after the sweep pre-flight (config/errors.py `preflight`): a sweep's
jobs are composed by its sweeper, one per point, so the pre-flight checks every point first.
"""

from __future__ import annotations

import copy
import os
import sys
from typing import Callable, Optional, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

ASKS_FOR_SWEEP = object()
TASK_NAME = "__main__"  # what `@hydra.main` names the job of `python -m dsv4_train` (its log file)


def _hydra_owns(args) -> bool:
    """Commands that `@hydra.main` handles itself (sweeps, printing, help, other primary configs)."""
    return bool(args.multirun or args.cfg or args.help or args.hydra_help or args.info
                or args.shell_completion or args.config_path or args.config_name or args.config_dir)


def _job_config(cfg: DictConfig) -> DictConfig:
    """Fix the job's output directory as Hydra's `run_job` will (so `run.dir`, which defaults to it,
    resolves now) and return the job's config: `cfg` without its hydra node."""
    from hydra.core.hydra_config import HydraConfig

    with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
        cfg.hydra.runtime.output_dir = os.path.abspath(str(OmegaConf.select(cfg, "hydra.run.dir")))
    HydraConfig.instance().set_config(cfg)
    job = copy.deepcopy(cfg)
    with read_write(job), open_dict(job):
        del job["hydra"]
    return job


def run_single(overrides: Sequence[str]):
    """Compose once and run one job (see the module docstring). Returns the task's return value,
    or ASKS_FOR_SWEEP when the composed config asks for one (a recipe's `hydra.mode: MULTIRUN`)."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_automatic_config_search_path, run_and_report
    from hydra.core.utils import run_job
    from hydra.types import HydraContext, RunMode
    from hydra._internal.callbacks import Callbacks

    from dsv4_train import cli
    from dsv4_train.config.errors import EXIT_CONFIG_ERROR, refuse_sweep_values, report
    from dsv4_train.config.load import CONFIG_DIR, CONFIG_NAME, to_typed

    search_path = create_automatic_config_search_path(None, None, CONFIG_DIR)
    hydra = Hydra.create_main_hydra2(task_name=TASK_NAME, config_search_path=search_path)
    try:
        refuse_sweep_values(overrides)
        cfg = hydra.compose_config(CONFIG_NAME, list(overrides), run_mode=RunMode.RUN, with_log_configuration=True)
        if cfg.hydra.mode == RunMode.MULTIRUN:
            return ASKS_FOR_SWEEP
        job = _job_config(cfg)
        typed = to_typed(job)
        prepared = cli.prepare(typed)
        cli.preflight_inputs(typed)
    except Exception as exc:  # every composition / validation / input mistake ends here, no traceback
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        report(exc)
        raise SystemExit(EXIT_CONFIG_ERROR)
    yaml_text = OmegaConf.to_yaml(job, resolve=True)
    callbacks = Callbacks(cfg)
    callbacks.on_run_start(config=cfg, config_name=CONFIG_NAME)
    result = run_and_report(lambda: run_job(
        hydra_context=HydraContext(config_loader=hydra.config_loader, callbacks=callbacks),
        task_function=lambda _composed: cli.run_task(prepared, yaml_text=yaml_text, in_sweep=False,
                                                     inputs_checked=True),
        config=cfg, job_dir_key="hydra.run.dir", job_subdir_key=None, configure_logging=True))
    callbacks.on_run_end(config=cfg, config_name=CONFIG_NAME, job_return=result)
    return run_and_report(lambda: result.return_value)  # re-raises what the job raised


def main(hydra_entry: Callable[[], object], argv: Optional[Sequence[str]] = None):
    """`hydra_entry`: the `@hydra.main` task (dsv4_train/__main__.py) for what Hydra runs itself."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra

    argv = list(sys.argv[1:] if argv is None else argv)
    args = get_args_parser().parse_args(argv)
    if not _hydra_owns(args):
        try:
            ran = run_single(args.overrides)
        finally:
            GlobalHydra.instance().clear()
        if ran is not ASKS_FOR_SWEEP:
            return ran
    from dsv4_train.cli import preflight_inputs
    from dsv4_train.config.errors import run_with_friendly_errors

    return run_with_friendly_errors(hydra_entry, argv, extra_check=preflight_inputs)
