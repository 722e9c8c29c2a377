"""One-paragraph messages for configuration mistakes, and the sweep pre-flight.

Hydra reports composition errors as several lines plus a config search path, and errors raised
inside the task with a traceback. `friendly_message` turns them into one message naming the key or
value and the fix, from the facts Hydra and OmegaConf attach to their exceptions (the missing config
file and its options, the full key). A single run is checked in dsv4_train/entry.py; for `-m`,
`--cfg` and `--help`, `run_with_friendly_errors` composes every sweep point with the compose API
*before* handing over to `@hydra.main`, so a mistake in any of them ends the process with exit
status 2 before any output directory is created.
"""

from __future__ import annotations

import fnmatch
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from dsv4_train.config.keys import UnknownKeyError, did_you_mean
from dsv4_train.config.validate import ConfigError

EXIT_CONFIG_ERROR = 2


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def friendly_message(exc: BaseException) -> str:
    """A single paragraph (or, for ConfigError, one line per problem) describing a config mistake."""
    if isinstance(exc, ConfigError):
        return str(exc)
    if isinstance(exc, UnknownKeyError):
        return _one_line(str(exc))
    from hydra.errors import MissingConfigException, OverrideParseException

    text = str(exc)
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        group, _, value = exc.missing_cfg_file.rpartition("/")
        if group == "conf":
            what = f"Unknown recipe conf={value}"
            where = "recipes/"
        elif group:
            what = f"Unknown option {group}={value}"
            where = f"conf/{group}/"
        else:
            what, where = f"Cannot find config '{exc.missing_cfg_file}'", "conf/"
        avail = f" Available: {', '.join(exc.options)}." if exc.options else ""
        return f"{what}: there is no {where}{value}.yaml.{avail} Pick one of them (or add the file)."
    if isinstance(exc, OverrideParseException):
        first = text.splitlines()[0] if text else ""
        return (
            f"{_one_line(first)}: command-line overrides look like key=value (train.max_steps=10), "
            "group=option (model=flash, conf=flash_pretrain), or +key=value to add a new key."
        )
    cause = _root_cause(exc)
    ctext = str(cause)
    key = getattr(cause, "full_key", None)  # OmegaConf's errors carry the dotted key
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and key and key.startswith("hydra.sweeper.params."):
        from dsv4_train.config.sweep_space import new_params_key_message

        return new_params_key_message(key)
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and key:
        section = "hydra" if key.startswith("hydra.") else "job"
        return (
            f"Unknown config key '{key}': {_one_line(ctext.splitlines()[0])}.{did_you_mean(key, cause)} "
            f"Check the spelling; `python -m dsv4_train --cfg {section}` prints every key."
        )
    if isinstance(cause, ValidationError) and key:
        return (
            f"Wrong type for '{key}': {_one_line(ctext.splitlines()[0])}. Give a value of the "
            f"field's type (see dsv4_train/config/schema.py or `--cfg job`)."
        )
    lines = [ln for ln in (text + "\n" + ctext).splitlines() if ln.strip() and not ln.startswith("\t")]
    return _one_line(" ".join(dict.fromkeys(lines)))  # keep order, drop repeats


# ---------------------------------------------------------------------------------------------
# Pre-flight composition for the @hydra.main entry point.


def _glob_values(override, config_dir: str) -> List[str]:
    group_dir = Path(config_dir) / override.key_or_group
    options = sorted(p.stem for p in group_dir.glob("*.yaml"))
    glob = override.value()
    keep = [o for o in options if any(fnmatch.fnmatch(o, g) for g in glob.include)]
    return [o for o in keep if not any(fnmatch.fnmatch(o, g) for g in glob.exclude)]


def _interval_ends(override) -> List[str]:
    interval = override.value()
    if not interval.start < interval.end:
        raise ValueError(
            f"{override.input_line}: the search interval of {override.key_or_group} is empty (start "
            f"{interval.start} >= end {interval.end}); give interval(low, high) with low < high."
        )
    return [str(interval.start), str(interval.end)]


def refuse_sweep_values(overrides: Sequence[str]) -> None:
    """A run (no -m) given a comma-separated or range value: say how to sweep or quote it (Hydra
    would refuse it at composition with a generic 'Ambiguous value')."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for o in OverridesParser.create().parse_overrides(list(overrides)):
        if o.is_sweep_override():
            raise ValueError(
                f"The override '{o.input_line}' gives several values: add -m (--multirun) to sweep over "
                "the values, quote it (key='a,b') for a string, or write key=[a,b] for a list."
            )


def override_sets(overrides: Sequence[str], *, multirun: bool, config_dir: str) -> List[List[str]]:
    """The override lists to pre-compose: the overrides themselves, or for a sweep one list per
    swept value (the other sweeps at their first value), which checks every value once."""
    if not multirun:
        refuse_sweep_values(overrides)
        return [list(overrides)]
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob, IntervalSweep

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    choices = []
    for o in parsed:
        if not o.is_sweep_override():
            choices.append([o.input_line])
            continue
        prefix = o.get_key_element()
        if isinstance(o.value(), IntervalSweep):  # an Optuna search interval: check both ends
            values = _interval_ends(o)
        else:
            values = (
                _glob_values(o, config_dir) if isinstance(o.value(), Glob) else list(o.sweep_string_iterator())
            )
        if not values:
            raise ValueError(f"{o.input_line}: the sweep over {o.key_or_group} has no values; give it a non-empty "
                             "range (start below stop for a positive step) or list.")
        choices.append([f"{prefix}={v}" for v in values] or [])
    base = [c[0] for c in choices if c]
    sets = [base]
    for i, c in enumerate(choices):
        for alt in c[1:]:
            s = list(base)
            s[[j for j, cc in enumerate(choices) if cc].index(i)] = alt
            sets.append(s)
    return sets


def preflight(argv: Sequence[str], extra_check: Optional[Callable[[object], None]] = None) -> None:
    """Compose, type and validate what `argv` asks for; raise on the first mistake.

    extra_check(typed_config) runs after validation for checks that read the file system (data
    inputs, a requested checkpoint); it must not write anything."""
    from hydra._internal.utils import get_args_parser

    from dsv4_train.config import load
    from dsv4_train.config.validate import validate

    args = get_args_parser().parse_args(list(argv))
    if args.help or args.hydra_help or args.info or args.shell_completion:
        return
    if args.config_path or args.config_name or args.config_dir:
        return  # a different primary config: leave it all to Hydra
    # The launched world: torchrun's WORLD_SIZE, srun's SLURM_NTASKS, else a single process.
    from dsv4_train.launch.env import discover

    world = discover().world_size
    # A sweep handed to another launcher (e.g. Slurm) runs on other machines: that launcher checks
    # each point against its own world size.
    launcher = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("hydra/launcher=")), "basic")
    if launcher == "dsv4_slurm":
        import importlib.util

        if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
            raise ValueError(
                "hydra/launcher=dsv4_slurm needs hydra-submitit-launcher, an optional extra: install it "
                "with `scripts/install.sh slurm` (or `pip install hydra-submitit-launcher`)."
            )
    overrides_to_check = list(args.overrides)
    if args.multirun:
        from dsv4_train.config import sweep_space

        parsed = sweep_space.parse(args.overrides)
        sweep_space.check_hydra_overrides(parsed)
        hydra_cfg = _hydra_config(parsed)  # also refuses an unknown sweeper option
        # The hydra.* overrides are checked on the Hydra node just now; the job configs below are
        # composed without them (a hydra.sweeper.params dict would be merged into a null node there).
        overrides_to_check = [o.input_line for o in parsed if not o.is_hydra_override()]
        if str(hydra_cfg.sweeper.get("_target_", "")).endswith("ResumableOptunaSweeper"):
            require_optuna_plugin()
            sweep_space.check_optuna_settings(hydra_cfg)
            overrides_to_check += sweep_space.search_space(hydra_cfg.sweeper, parsed, load.CONFIG_DIR)
    remote_sweep = args.multirun and any(
        o.startswith("hydra/launcher=") and o.split("=", 1)[1] != "basic" for o in args.overrides
    )
    for overrides in override_sets(overrides_to_check, multirun=args.multirun, config_dir=load.CONFIG_DIR):
        typed = load.to_typed(load.compose_dict(overrides))
        if not args.cfg:  # --cfg only prints; do not refuse to show an invalid config
            # A plan made on one process describes the layout's own world (parallel.world_size).
            plan_world = None if ((typed.run.plan_only and world == 1) or remote_sweep) else world
            validate(typed, world_size=plan_world)
            if extra_check is not None:
                extra_check(typed)


def _hydra_config(parsed):
    """The `hydra` node the command line composes to (a recipe may choose the sweeper and set its
    options), without running Hydra; sweep values are left out."""
    from dsv4_train.config import load

    plain = [o.input_line for o in parsed if not o.is_sweep_override()]
    with load.initialize_config_dir(config_dir=load.CONFIG_DIR, version_base=None, job_name="dsv4"):
        return load.hydra_compose(config_name=load.CONFIG_NAME, overrides=plain, return_hydra_config=True).hydra


def require_optuna_plugin() -> None:
    import importlib.util

    if importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None:
        raise ValueError(
            "hydra/sweeper=dsv4_optuna needs hydra-optuna-sweeper, an optional extra: install it with "
            "`scripts/install.sh sweep` (or pip install 'dsv4-train[sweep]')."
        )


def report(exc: BaseException, stream=None) -> None:
    print(f"dsv4-train: configuration error: {friendly_message(exc)}", file=stream or sys.stderr)


def run_with_friendly_errors(
    hydra_entry: Callable[[], object],
    argv: Optional[Sequence[str]] = None,
    extra_check: Optional[Callable[[object], None]] = None,
):
    """Pre-compose the command line, report a mistake in one message (exit 2), else run Hydra.

    hydra_entry: the `@hydra.main`-decorated function, called without arguments (it reads
    sys.argv). argv: the arguments after the program name; default sys.argv[1:].
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        preflight(argv, extra_check)
    except Exception as exc:  # every composition / validation failure ends here, no traceback
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        report(exc)
        raise SystemExit(EXIT_CONFIG_ERROR)
    saved = sys.argv
    sys.argv = [saved[0] if saved else "dsv4-train", *argv]
    try:
        return hydra_entry()
    finally:
        sys.argv = saved


def exit_on_config_error(task: Callable) -> Callable:
    """Decorator for the Hydra task: a ConfigError raised inside (e.g. validate() with the real
    world size) prints one message and exits 2 instead of Hydra's traceback report."""
    import functools

    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except (ConfigError, UnknownKeyError) as exc:
            report(exc)
            raise SystemExit(EXIT_CONFIG_ERROR)

    return wrapper
