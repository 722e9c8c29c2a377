"""Checks of a multirun's sweep settings before any job starts (called by config/errors.py's preflight).

A sweep's search space comes from the command line (`optim.lr=interval(1e-4, 1e-2)`) or, for an
Optuna sweep (conf/hydra/sweeper/dsv4_optuna.yaml), from `hydra.sweeper.params` in YAML or as a whole
dict on the command line. Each mistake below is refused with one message naming the key and the fix:

* an override Hydra cannot parse, an empty `choice()` / `range()` / `interval()`;
* a `hydra.sweeper.params={...}` dict whose sweeps are not quoted strings;
* `hydra.sweeper.params.<key>=...`: the search space's keys are dotted config keys (`optim.lr`),
  which a dotted override path cannot reach (Hydra would sweep over its own settings, or fail on
  the missing node);
* a sweep over a `hydra.*` setting (Hydra refuses it);
* a search-space key in `hydra.sweeper.params` that is not a config key;
* Optuna settings the plugin would only assert on (n_trials, n_jobs < 1, max_failure_rate outside
  [0, 1]) and `n_jobs > 1` with the local launcher (see `check_optuna_settings`).
The hydra.* overrides are checked here, on the Hydra node; the job configs composed for validation
are composed without them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional, Sequence

PARAMS = "hydra.sweeper.params"
SWEEP_FORMS = "choice(a, b, ...), range(start, stop[, step]), interval(low, high) or tag(log, interval(low, high))"


def parse(overrides: Sequence[str], where: Optional[str] = None) -> list:
    """Hydra's parsed overrides; an unparsable one is a ValueError naming it (and `where` it came from)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    parsed = []
    for line in overrides:
        try:
            parsed += parser.parse_overrides([line])
        except OverrideParseException as exc:
            raise ValueError(_unparsable(line, exc, where)) from None
    return parsed


def _unparsable(line: str, exc: Exception, where: Optional[str]) -> str:
    key = line.split("=", 1)[0]
    origin = f" (in {where})" if where else ""
    empty = re.search(r"\b(choice|range|interval)\(\s*\)", line)
    if empty:
        return (f"'{line}'{origin}: the sweep over {key} is empty: {empty.group(1)}() needs values. Give "
                f"{key} a non-empty sweep, e.g. choice(1e-3, 3e-3), range(2, 22, 4) or interval(1e-4, 1e-2).")
    first = " ".join(str(exc).splitlines()[0].split()) if str(exc) else "cannot be parsed"
    return (f"'{line}'{origin}: {first}. A value is key=value, a sweep key=a,b or key={SWEEP_FORMS}; "
            "quote the whole override in the shell.")


def how_to_give(space_key: str, value: str = "interval(1e-4, 1e-2)") -> str:
    """The ways to give one search-space entry, for messages."""
    return (f"Give the search space as a sweep override, '{space_key}={value}', or as a dict, "
            f"'++{PARAMS}={{{space_key}: \"{value}\"}}' ('++': the dict may add keys), or in the recipe's "
            f"YAML under {PARAMS}.")


def new_params_key_message(full_key: str) -> str:
    """Hydra's struct error for `hydra.sweeper.params={new.key: ...}` (without '++')."""
    space_key = full_key[len(PARAMS) + 1:]
    return f"'{space_key}' is not in {PARAMS} yet, and a plain override cannot add keys. " + how_to_give(space_key)


def check_hydra_overrides(parsed: list) -> None:
    """Refuse setting the search space key by key, and sweeping over Hydra's own settings."""
    for o in parsed:
        key = o.key_or_group
        if key.startswith(PARAMS + "."):
            space_key, value = key[len(PARAMS) + 1:], o.input_line.split("=", 1)[1]
            raise ValueError(
                f"'{o.input_line}': {PARAMS} cannot be set key by key (its keys are dotted config keys "
                f"such as optim.lr, which an override path splits). {how_to_give(space_key, value)}"
            )
        if key == PARAMS and isinstance(o.value(), dict):
            unquoted = [k for k, v in o.value().items() if not isinstance(v, (str, int, float, bool, type(None)))]
            if unquoted:
                raise ValueError(
                    f"'{o.input_line}': the search space of {', '.join(map(str, unquoted))} is not quoted; inside "
                    f"the {PARAMS} dict each sweep is a string: {{{unquoted[0]}: \"interval(1e-4, 1e-2)\"}}."
                )
        if o.is_hydra_override() and o.is_sweep_override():
            raise ValueError(
                f"'{o.input_line}': Hydra cannot sweep over its own settings ({key}). Give {key} a single "
                f"value; sweep over config keys instead (e.g. optim.lr=1e-3,3e-3)."
            )


def is_config_key(key: str, config_dir: str) -> bool:
    """A key of the schema (dsv4_train/config/schema.py), or a config group (model, conf, ...)."""
    from dsv4_train.config.keys import schema_fields

    if "." not in key and (Path(config_dir) / key).is_dir():
        return True
    return key.split(".")[-1] in schema_fields(key)


def search_space(sweeper, cli: list, config_dir: str) -> List[str]:
    """hydra.sweeper.params as sweep overrides, each parsed and its key checked; a key the command
    line also gives is left to the command line (it wins in the plugin too)."""
    from dsv4_train.config.keys import UnknownKeyError, did_you_mean

    cli_keys = {o.key_or_group for o in cli if not o.is_hydra_override()}
    lines = []
    for key, value in (sweeper.get("params") or {}).items():
        key = str(key)
        if key in cli_keys:
            continue
        line = f"{key}={value}"
        parse([line], where=PARAMS)
        if not is_config_key(key, config_dir):
            raise UnknownKeyError(
                f"{PARAMS} searches over '{key}', which is not a config key.{did_you_mean(key)} Fix the key "
                f"in the search space (recipe YAML or the {PARAMS} override); `python -m dsv4_train --cfg "
                "job` prints every key.",
                [key],
            )
        lines.append(line)
    return lines


def check_optuna_settings(hydra_cfg) -> None:
    """Optuna settings the plugin would only assert on or misuse."""
    sweeper = hydra_cfg.sweeper
    for name in ("n_trials", "n_jobs"):
        if int(sweeper[name]) < 1:
            raise ValueError(f"hydra.sweeper.{name}={sweeper[name]} must be at least 1.")
    if not 0.0 <= float(sweeper.max_failure_rate) <= 1.0:
        raise ValueError(f"hydra.sweeper.max_failure_rate={sweeper.max_failure_rate} must be in [0, 1] "
                         "(the fraction of a batch's trials that may fail before the sweep stops).")
    launcher = str(hydra_cfg.launcher.get("_target_", ""))
    if int(sweeper.n_jobs) > 1 and launcher.endswith(".BasicLauncher"):
        n = sweeper.n_jobs
        raise ValueError(
            f"hydra.sweeper.n_jobs={n} asks Optuna for {n} trials at a time, but the local launcher "
            f"(hydra/launcher=basic) runs them one after another: nothing runs in parallel, and each "
            f"batch's {n} points are chosen without the results of the others. Set hydra.sweeper.n_jobs=1, "
            "or run the trials in parallel as Slurm jobs with hydra/launcher=dsv4_slurm."
        )
