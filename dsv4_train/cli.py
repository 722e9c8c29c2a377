"""What `python -m dsv4_train` does with a composed config: validate and derive (`prepare`), then plan
or train (`execute`).

User errors (ValueError and its subclasses: config, data, checkpoint) end the process with one
message paragraph and exit code 2, without a traceback and before anything is written.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional, TextIO

from dsv4_train.config.schema import Config

EXIT_USER_ERROR = 2


class _Tee:
    """Mirror a console stream into a per-rank log file in the run directory."""

    def __init__(self, stream: TextIO, log: TextIO):
        self._stream, self._log = stream, log

    def write(self, text: str) -> int:
        self._log.write(text)
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()
        self._log.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _prepare_run_dir(cfg: Config, yaml_text: str, rank: int) -> None:
    os.makedirs(os.path.join(cfg.run.dir, "logs"), exist_ok=True)
    if rank == 0:
        tmp = os.path.join(cfg.run.dir, "config.yaml.tmp")
        with open(tmp, "w") as f:
            f.write(yaml_text)
        os.replace(tmp, os.path.join(cfg.run.dir, "config.yaml"))
    log = open(os.path.join(cfg.run.dir, "logs", f"rank_{rank}.log"), "a", buffering=1)
    sys.stdout = _Tee(sys.stdout, log)
    sys.stderr = _Tee(sys.stderr, log)


def preflight_inputs(cfg: Config) -> None:
    """Read-only checks of what the run will open: data inputs and a requested checkpoint."""
    if cfg.run.plan_only:
        return
    check_run_directories_free(cfg)  # first: a busy run.dir is refused before torch even starts
    from dsv4_train.checkpoint.io import resolve_load_path
    from dsv4_train.data.checks import check_data_inputs
    from dsv4_train.launch.output_dirs import check_output_dirs
    from dsv4_train.checkpoint.resume import checkpoint_root, plan_resume

    check_output_dirs(cfg, checkpoint_root(cfg))
    check_data_inputs(data_cfg=cfg.data, vocab_size=cfg.model.vocab_size)
    if cfg.checkpoint.load_model_only and cfg.checkpoint.load in ("auto", "none"):
        raise ValueError(
            f"checkpoint.load_model_only=true needs checkpoint.load=<path of the checkpoint to take the "
            f"weights from>, not {cfg.checkpoint.load!r}."
        )
    resolve_load_path(cfg.checkpoint.load, checkpoint_root(cfg))
    plan_resume(cfg, checkpoint_root(cfg))  # e.g. a checkpoint of another model shape: refused now


def _locked_directories(cfg: Config) -> list:
    """(directory, config key): run.dir, and checkpoint.dir when it lies outside run.dir."""
    from dsv4_train.checkpoint.paths import checkpoint_root

    run_dir, ckpt = os.path.abspath(cfg.run.dir), os.path.abspath(checkpoint_root(cfg))
    inside = os.path.commonpath([ckpt, run_dir]) == run_dir
    return [(cfg.run.dir, "run.dir")] + ([] if inside else [(checkpoint_root(cfg), "checkpoint.dir")])


def check_run_directories_free(cfg: Config) -> None:
    """Refuse a run.dir (or checkpoint.dir) another live run holds; rank 0 only, as rank 0 holds the
    lock for the run and its sibling ranks would see it taken."""
    from dsv4_train.launch import run_lock
    from dsv4_train.launch.env import discover

    if discover().rank == 0:
        for directory, key in _locked_directories(cfg):
            run_lock.check_free(directory, what=key)


def lock_run_directories(cfg: Config) -> None:
    """One run per run.dir (and per checkpoint.dir), held until this process exits."""
    from dsv4_train.launch import run_lock

    for directory, key in _locked_directories(cfg):
        run_lock.acquire(directory, what=key)


def quiet_library_logs() -> None:
    """Keep the console to our progress lines: Megatron-Core logs its whole config at INFO and warns
    about optional kernels (TE, Apex) that a CPU run never uses."""
    import logging
    import warnings

    logging.getLogger("megatron").setLevel(logging.ERROR)
    for category in (UserWarning, DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)


@dataclass(frozen=True)
class PreparedRun:
    """A validated config and what is derived from it: all the runtime needs to start."""

    cfg: Config
    derived: object  # config/derive.py Derived
    world_size: Optional[int]  # None: a plan on one process describes the layout's own world


def prepare(cfg: Config) -> PreparedRun:
    """Validate `cfg` for the launched world (every rule, config/validate.py) and derive from it."""
    from dsv4_train.config.derive import derive
    from dsv4_train.config.validate import validate
    from dsv4_train.launch.env import discover

    launched = discover().world_size
    world_size = None if (cfg.run.plan_only and launched == 1) else launched
    validate(cfg, world_size=world_size)
    return PreparedRun(cfg, derive(cfg, world_size=world_size), world_size)


def execute(run: PreparedRun, *, yaml_text: str, inputs_checked: bool = False):
    """Run the plan or the training of a prepared run. Returns (exit code, objective) for a training
    run (train/objective.py), the exit code for a plan. `inputs_checked`: `preflight_inputs` already
    ran in this process (the single-run entry checks them before Hydra writes anything)."""
    quiet_library_logs()
    from dsv4_train.launch.env import discover
    from dsv4_train.launch.preemption import PreemptionWatcher

    PreemptionWatcher.install()  # from here on a stop signal is recorded, never a silent kill
    cfg, process = run.cfg, discover()
    if cfg.run.plan_only:
        from dsv4_train.plan import make_plan, print_plan, refusal, write_plan

        plan = make_plan(cfg, world_size=run.world_size)
        if process.rank == 0:
            print_plan(plan)
            os.makedirs(cfg.run.dir, exist_ok=True)
            write_plan(plan, os.path.join(cfg.run.dir, "plan.json"))
        message = refusal(plan)
        if message:
            raise ValueError(message)
        return 0
    from dsv4_train.runtime.distributed import pick_device

    if pick_device(cfg.run.device).type == "cpu":
        from dsv4_train import mcore

        mcore.apply(cpu=True)  # before anything imports Megatron-Core (run.device=cpu on a GPU host too)
    if not inputs_checked:
        preflight_inputs(cfg)
    if process.rank == 0:
        lock_run_directories(cfg)
    _prepare_run_dir(cfg, yaml_text, process.rank)
    from dsv4_train.train.trainer import run_training
    from dsv4_train.train.objective import record_run

    return record_run(cfg, lambda: run_training(cfg, run.derived), is_main=process.rank == 0)


def run_task(run: PreparedRun, *, yaml_text: str, in_sweep: bool, inputs_checked: bool = False) -> float:
    """The Hydra task around `execute`: a user error is one message (exit 2, or a failed trial in a
    sweep, which goes on); returns the objective a sweeper optimises (NaN: failed or diverged)."""
    try:
        outcome = execute(run, yaml_text=yaml_text, inputs_checked=inputs_checked)
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
    if code and not in_sweep:
        _record_exit_code(code)
        sys.exit(code)
    return objective


EXIT_CODE_FILE_ENV = "DSV4_EXIT_CODE_FILE"


def _record_exit_code(code: int) -> None:
    """Write a documented exit code (docs/launching.md) where a launcher that reports every worker
    failure as 1 (torchrun) can read it back: launch/torchrun.sh sets the file."""
    path = os.environ.get(EXIT_CODE_FILE_ENV)
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            f.write(f"{code}\n")


def report_user_error(error: BaseException) -> None:
    message = " ".join(str(error).split("\n")) if "\n" not in str(error).strip() else str(error).strip()
    print(f"dsv4-train: error: {message}", file=sys.stderr, flush=True)
