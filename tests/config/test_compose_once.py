"""A single run is composed, typed and validated exactly once (dsv4_train/entry.py), and its inputs
are checked once: counted in a real one-step training run through the real entry point."""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, cli_env

# Wraps the four steps with counters, then runs the real entry (as `python -m dsv4_train` does).
COUNTING_ENTRY = r"""
import json, sys
from hydra._internal.hydra import Hydra
import dsv4_train.cli as cli
import dsv4_train.config.load as load
import dsv4_train.config.validate as validate
from dsv4_train.__main__ import hydra_entry
from dsv4_train.entry import main

calls = {"compose_config": 0, "to_typed": 0, "validate": 0, "preflight_inputs": 0}
def counted(owner, name):
    original = getattr(owner, name)
    def wrapper(*args, **kwargs):
        calls[name] += 1
        return original(*args, **kwargs)
    setattr(owner, name, wrapper)
for owner, name in [(Hydra, "compose_config"), (load, "to_typed"), (validate, "validate"), (cli, "preflight_inputs")]:
    counted(owner, name)
try:
    main(hydra_entry, sys.argv[1:])
finally:
    print("CALLS " + json.dumps(calls))
"""


@pytest.mark.slow
def test_a_run_composes_types_validates_and_checks_inputs_once(tmp_path):
    args = ["train.max_steps=1", "optim.warmup_steps=0", f"run.dir={tmp_path / 'run'}",
            f"hydra.run.dir={tmp_path / 'hydra'}", "checkpoint.save_final=false"]
    proc = subprocess.run([sys.executable, "-c", COUNTING_ENTRY, *args], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = json.loads(proc.stdout.split("CALLS ", 1)[1].splitlines()[0])
    assert calls == {"compose_config": 1, "to_typed": 1, "validate": 1, "preflight_inputs": 1}, calls
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count('"step": 1') == 1
