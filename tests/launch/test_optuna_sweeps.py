"""Sweeps that answer the question (train/objective.py, launch/optuna_sweep.py, dsv4_train/report.py).

* A 6-trial Optuna sweep of the tiny model, killed (SIGKILL) while its 4th trial trains, and re-run
  with the same command: the 3 finished trials are not re-run (their result.json untouched) and 3 new
  trials finish the budget; every finished trial's Optuna value equals the objective recomputed from
  its own metrics.jsonl (mean lm_loss of the last 3 steps), exactly.
* A grid multirun with an absurd learning rate first: that run ends `diverged` (no objective), the
  next one still runs, and the report lists both with report.md, report.csv and PNG plots.
* An Optuna sweep through the Slurm launcher (stand-in Slurm tools) runs 2 trials with objectives.
* Bad sweep input is refused before any trial (config/sweep_space.py, config/errors.py): a search-space
  key that does not exist, an empty choice/range/interval, hydra.sweeper.params set key by key or
  adding keys without '++', a recipe's YAML search space out of range, unknown or out-of-range sweeper
  options, n_jobs>1 with the local launcher, an objective metric the run does not produce; valid
  spaces (command line, '++' dict, a recipe's own keys) pass.
* A resumed sweep's sampler draws new points (not the first trials' again).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, cli_env, read_metrics
from tests.launch.launch_helpers import calls, describe, slurm_env

optuna = pytest.importorskip("optuna")

TRIAL = ["train.max_steps=4", "optim.warmup_steps=1", "optim.min_lr=0", "run.objective.last_n=3",
         "checkpoint=none"]
OPTUNA = ["-m", "hydra/sweeper=dsv4_optuna", "hydra.sweeper.n_trials=6", "hydra.sweeper.sampler.seed=7",
          "optim.lr=tag(log, interval(1e-4, 1e-2))"]


def _cli(args, env=None, timeout=900):
    return subprocess.run([sys.executable, "-m", "dsv4_train", *args], cwd=REPO, env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def _report(sweep_dir):
    """python -m dsv4_train.report on a sweep directory; it must succeed and write every file."""
    report = subprocess.run([sys.executable, "-m", "dsv4_train.report", str(sweep_dir)], cwd=REPO, env=cli_env(),
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    for name in ("report.md", "report.csv", "loss_curves.png"):
        assert (sweep_dir / name).stat().st_size > 0, name
    assert (sweep_dir / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(report.stdout)  # the measured table, shown with pytest -s
    return report


def _recomputed(job_dir) -> float:
    losses = [r["lm_loss"] for r in read_metrics(job_dir)]
    return sum(losses[-3:]) / 3


@pytest.mark.slow
def test_optuna_sweep_killed_and_resumed(tmp_path):
    sweep = tmp_path / "sweep"
    args = [*OPTUNA, *TRIAL, f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen([sys.executable, "-m", "dsv4_train", *args], cwd=REPO, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while not (sweep / "3" / "metrics.jsonl").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {job: (sweep / job / "result.json").stat().st_mtime_ns for job in ("0", "1", "2")}
    assert not (sweep / "3" / "result.json").exists()
    partial = _report(sweep).stdout.splitlines()  # a killed sweep still reports what it has
    assert [line.split()[-1] for line in partial[1:5]] == ["ok", "ok", "ok", "incomplete"]

    resumed_at = time.time_ns()
    resumed = _cli(args)
    assert resumed.returncode == 0, describe(resumed)
    for job, mtime in finished.items():
        assert (sweep / job / "result.json").stat().st_mtime_ns == mtime, f"trial {job} was re-run"
    study = optuna.load_study(study_name="tiny_pretrain", storage=f"sqlite:///{sweep}/optuna.db")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 6 and len(study.trials) == 7  # + the killed one, marked failed
    assert [t.number for t in study.trials if t.state == optuna.trial.TrialState.FAIL] == [3]
    # All 6 trials are TPE start-up (random) draws (n_startup_trials=10): with the sampler re-created
    # from seed 7 the resumed trials 4-6 would repeat trials 0-2's lr exactly; re-seeded after the 4
    # recorded trials (launch/optuna_sweep.py: sampler_seeded_after) they are new points.
    first = {t.params["optim.lr"] for t in study.trials[:4]}
    resumed_lrs = [t.params["optim.lr"] for t in study.trials[4:]]
    assert not first & set(resumed_lrs), f"resumed trials repeat earlier suggestions: {resumed_lrs} vs {first}"
    for trial in complete:
        job = sweep / str(trial.number)
        result = json.loads((job / "result.json").read_text())
        assert result["status"] == "ok" and result["metric"] == "lm_loss"
        assert trial.value == result["objective"] == _recomputed(job)
        written = (job / "result.json").stat().st_mtime_ns
        assert (written < resumed_at) == (trial.number < 3), f"trial {trial.number} ran in the wrong invocation"
        print(f"trial {trial.number}: optim.lr={trial.params['optim.lr']:.6g} optuna value={trial.value!r} "
              f"recomputed from metrics.jsonl={_recomputed(job)!r} result.json written "
              f"{'before' if written < resumed_at else 'after'} the re-run started")
    rows = _report(sweep).stdout.splitlines()
    assert sorted(line.split()[0] for line in rows[1:8]) == ["0", "1", "2", "3", "4", "5", "6"]
    assert (sweep / "objective_vs_optim.lr.png").stat().st_size > 0


def test_resumed_sampler_does_not_repeat_the_first_suggestions():
    """The resumed sampler's seed (launch/optuna_sweep.py): the same seed re-created repeats the first
    start-up draws (the defect this guards against); the re-seeded one draws new points, and the same
    points on every re-run of the same sweep state (deterministic)."""
    from optuna.distributions import LogUniformDistribution

    from dsv4_train.launch.optuna_sweep import sampler_seeded_after

    lr = LogUniformDistribution(1e-4, 1e-2)

    def draws(seed, n):
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))  # in memory
        return [study.ask({"optim.lr": lr}).params["optim.lr"] for _ in range(n)]

    first = draws(7, 3)
    assert draws(7, 3) == first  # the defect: a re-created sampler with seed 7 draws these again
    resumed = draws(sampler_seeded_after(7, 4), 3)
    assert not set(first) & set(resumed)
    assert draws(sampler_seeded_after(7, 4), 3) == resumed  # deterministic
    assert sampler_seeded_after(7, 0) == 7 and sampler_seeded_after(None, 4) is None
    assert len({sampler_seeded_after(7, n) for n in range(1, 50)}) == 49  # each resume point its own seed


@pytest.mark.slow
def test_the_recipes_sweep_writes_and_resumes_in_its_own_sweep_dir(tmp_path):
    """`python -m dsv4_train -m conf=tiny_lr_sweep` (one short trial) run twice from a fresh directory:
    both invocations use the recipe's hydra.sweep.dir (multirun/tiny_lr_sweep, relative to the working
    directory; conf/config.yaml's timestamped default must not win), and the second finds the study
    there, complete, and runs nothing (resuming with new trials: test_optuna_sweep_killed_and_resumed)."""
    env = cli_env({"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    command = [sys.executable, "-m", "dsv4_train", "-m", "conf=tiny_lr_sweep", "hydra.sweeper.n_trials=1",
               "train.max_steps=4", "train.eval_iters=1",
               'hydra.sweeper.params={optim.warmup_steps: "range(1, 3)"}']  # a recipe key: merged without '++'
    sweep = tmp_path / "multirun" / "tiny_lr_sweep"
    first = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, describe(first)
    written = (sweep / "0" / "result.json").stat().st_mtime_ns
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "sweep already complete: 1 of n_trials=1" in again.stdout, describe(again)
    assert sorted(p.name for p in (tmp_path / "multirun").iterdir()) == ["tiny_lr_sweep"]
    assert not (sweep / "1").exists() and (sweep / "0" / "result.json").stat().st_mtime_ns == written
    study = optuna.load_study(study_name="tiny_lr_sweep", storage=f"sqlite:///{sweep}/optuna.db")
    [trial] = study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.params["optim.warmup_steps"] in (1, 2)  # the command line's search space reached Optuna
    result = json.loads((sweep / "0" / "result.json").read_text())
    assert result["metric"] == "val_loss" and trial.value == result["objective"]


@pytest.mark.slow
def test_grid_sweep_with_a_diverging_run_and_the_report(tmp_path):
    sweep = tmp_path / "grid"
    run = _cli(["-m", "optim.lr=1e4,3e-3", *TRIAL, "train.max_skipped_steps=0", f"hydra.sweep.dir={sweep}"])
    assert run.returncode == 0, describe(run)
    diverged, good = (json.loads((sweep / j / "result.json").read_text()) for j in ("0", "1"))
    assert diverged["status"] == "diverged" and diverged["objective"] is None
    assert good["status"] == "ok" and good["objective"] == _recomputed(sweep / "1")
    lines = _report(sweep).stdout.splitlines()
    assert lines[0].split()[:2] == ["job", "optim.lr"] and lines[1].split()[:2] == ["1", "0.003"]
    assert "diverged" in lines[2]
    assert (sweep / "objective_vs_optim.lr.png").stat().st_size > 0


@pytest.mark.slow
def test_optuna_sweep_goes_on_after_diverged_trials(tmp_path):
    # TPE's seeded start-up draws give lr=1e4, 1e4, 3e-3 for seed 6: two diverged trials come first.
    sweep = tmp_path / "optuna_diverging"
    run = _cli(["-m", "hydra/sweeper=dsv4_optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.seed=6",
                "optim.lr=choice(1e4, 3e-3)", *TRIAL, "train.max_skipped_steps=0", f"hydra.sweep.dir={sweep}"])
    assert run.returncode == 0, describe(run)
    study = optuna.load_study(study_name="tiny_pretrain", storage=f"sqlite:///{sweep}/optuna.db")
    FAIL, COMPLETE = optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE
    assert [(t.params["optim.lr"], t.state) for t in study.trials] == [(1e4, FAIL), (1e4, FAIL), (3e-3, COMPLETE)]
    statuses = [json.loads((sweep / str(t.number) / "result.json").read_text())["status"] for t in study.trials]
    assert statuses == ["diverged", "diverged", "ok"]
    assert study.trials[2].value == _recomputed(sweep / "2")
    report = _report(sweep)
    assert [line.split()[-1] for line in report.stdout.splitlines()[1:4]] == ["ok", "diverged", "diverged"]


@pytest.mark.slow
def test_optuna_sweep_through_the_slurm_launcher(tmp_path):
    from dsv4_train.launch import slurm_sweep

    if not slurm_sweep.HAVE_SUBMITIT:
        pytest.skip("hydra-submitit-launcher (optional extra) not installed")
    sweep = tmp_path / "slurm"
    env = slurm_env(tmp_path / "state", {"FAKE_SLURM_BACKGROUND": "1"})
    run = _cli(["-m", "hydra/sweeper=dsv4_optuna", "hydra.sweeper.n_trials=2", "optim.lr=interval(1e-3, 3e-3)",
                "hydra/launcher=dsv4_slurm", "hydra.launcher.nodes=1", "hydra.launcher.tasks_per_node=1",
                "hydra.launcher.gpus_per_node=1", *TRIAL, f"hydra.sweep.dir={sweep}"], env)
    assert run.returncode == 0, describe(run)
    study = optuna.load_study(study_name="tiny_pretrain", storage=f"sqlite:///{sweep}/optuna.db")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert len(calls(tmp_path / "state", "sbatch")) == 2  # one Slurm job per trial, through the stand-in sbatch
    for trial in study.trials:
        assert math.isfinite(trial.value) and trial.value == _recomputed(sweep / str(trial.number))


@pytest.mark.parametrize("args,expected", [
    (["optim.lr=interval(1e-2, 1e-4)"], "the search interval of optim.lr is empty"),
    (["run.objective.metric=val_loss"], "run.objective.metric=val_loss needs evaluation"),
    (["hydra.sweeper.n_trial=3"], "Unknown config key 'hydra.sweeper.n_trial'"),
    (["hydra.sweeper.params.optim.lr=interval(1e-4,1e-2)"], "hydra.sweeper.params cannot be set key by key"),
    (["hydra.sweeper.n_jobs=2"], "the local launcher (hydra/launcher=basic) runs them one after another"),
])
def test_bad_sweeps_are_refused_before_any_trial(tmp_path, args, expected):
    """Through the CLI: exit 2, one message, no traceback, no sweep directory."""
    result = _cli(["-m", "hydra/sweeper=dsv4_optuna", *args, f"hydra.sweep.dir={tmp_path / 's'}"], timeout=300)
    assert result.returncode == 2 and expected in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "s").exists()
    assert result.stderr.count("dsv4-train:") == 1, result.stderr  # one message (validate lists its problems)


def test_a_recipes_yaml_search_space_is_checked_before_any_trial(tmp_path):
    # recipes/tiny_lr_sweep.yaml searches optim.warmup_steps over range(2, 22, 4): its values 14 and 18
    # exceed a 10-step run (validate: warm-up within train.max_steps); the first is named, before any trial.
    result = _cli(["-m", "conf=tiny_lr_sweep", "train.max_steps=10", f"hydra.sweep.dir={tmp_path / 's'}"],
                  timeout=300)
    assert result.returncode == 2 and "optim.warmup_steps=14 must be in [0, train.max_steps=10]" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "s").exists()


def _preflight(args, monkeypatch, capsys):
    """The entry point's pre-composition (config/errors.py) in this process, with a task that fails the
    test if it runs: returns (exit code, stderr)."""
    from dsv4_train.cli import preflight_inputs
    from dsv4_train.config.errors import run_with_friendly_errors

    def trial():
        raise AssertionError("a trial started")

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit:
        run_with_friendly_errors(trial, argv=["-m", "hydra/sweeper=dsv4_optuna", *args],
                                 extra_check=preflight_inputs)
    return exit.value.code, capsys.readouterr().err


PARAMS_DICT = "++hydra.sweeper.params={optim.lr: %s}"


@pytest.mark.parametrize("args,needles", [
    # the search space given key by key on the command line: any key, known or not
    (["hydra.sweeper.params.optim.lrr=interval(1e-4,1e-2)"],
     ["cannot be set key by key", "'optim.lrr=interval(1e-4,1e-2)'", "'++hydra.sweeper.params={optim.lrr:"]),
    (["hydra.sweeper.params.optim.lr='interval(1e-4,1e-2)'"], ["cannot be set key by key"]),
    # a dict that adds keys without '++' (Hydra's struct error, made one sentence)
    (['hydra.sweeper.params={optim.lr: "interval(1e-4,1e-2)"}'],
     ["'optim.lr' is not in hydra.sweeper.params yet", "'++hydra.sweeper.params={optim.lr:"]),
    # bad search spaces, on the command line and in hydra.sweeper.params
    (["optim.lr=choice()"], ["the sweep over optim.lr is empty: choice() needs values"]),
    ([PARAMS_DICT % '"choice()"'], ["(in hydra.sweeper.params)", "the sweep over optim.lr is empty"]),
    (["++hydra.sweeper.params={optim.lrr: \"interval(1e-4,1e-2)\"}"],
     ["hydra.sweeper.params searches over 'optim.lrr'", "Did you mean optim.lr?"]),
    (["optim.lrr=interval(1e-4, 1e-2)"], ["Unknown config key 'optim.lrr'"]),
    ([PARAMS_DICT % "tag(log, interval(1e-4, 1e-2))"], ["the search space of optim.lr is not quoted"]),
    ([PARAMS_DICT % '"interval(1e-2, 1e-4)"'], ["the search interval of optim.lr is empty"]),
    (["optim.warmup_steps=range(22, 2, 4)"], ["the sweep over optim.warmup_steps has no values"]),
    ([PARAMS_DICT % '"interval(1e-4, 1e-2"'], ["(in hydra.sweeper.params)", "'optim.lr=interval(1e-4, 1e-2'"]),
    # sweeper options
    (["hydra.sweeper.n_trial=3"], ["Unknown config key 'hydra.sweeper.n_trial'", "Did you mean hydra.sweeper.n_trials?",
                                   "--cfg hydra"]),
    (["hydra.sweeper.n_trials=3,4"], ["cannot sweep over its own settings (hydra.sweeper.n_trials)"]),
    (["hydra.sweeper.n_jobs=0"], ["hydra.sweeper.n_jobs=0 must be at least 1"]),
    (["hydra.sweeper.n_trials=0"], ["hydra.sweeper.n_trials=0 must be at least 1"]),
    (["hydra.sweeper.max_failure_rate=2"], ["hydra.sweeper.max_failure_rate=2.0 must be in [0, 1]"]),
    (["hydra.sweeper.n_jobs=3", "hydra.sweeper.n_trials=6"], ["hydra.sweeper.n_jobs=3", "hydra.sweeper.n_jobs=1",
                                                             "hydra/launcher=dsv4_slurm"]),
])
def test_bad_search_spaces_and_sweeper_options_are_one_message(args, needles, monkeypatch, capsys):
    code, err = _preflight(args, monkeypatch, capsys)
    assert code == 2 and all(n in err for n in needles), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("args", [
    ["optim.lr=tag(log, interval(1e-3, 1e-2))"],
    [PARAMS_DICT % '"tag(log, interval(1e-3, 1e-2))"', "optim.warmup_steps=range(1, 3)"],
    ["conf=tiny_lr_sweep", 'hydra.sweeper.params={optim.lr: "interval(1e-3, 2e-3)"}'],  # a recipe's key: no '++'
    ["conf=tiny_lr_sweep", "optim.lr=1e-3"],  # the command line fixes a key the recipe searches
    # the example of conf/hydra/sweeper/dsv4_optuna.yaml
    ['++hydra.sweeper.params={optim.lr: "tag(log, interval(3e-4, 1e-2))", optim.warmup_steps: "range(2, 20)"}'],
    ["hydra.sweeper.n_jobs=2", "hydra/launcher=dsv4_slurm"],  # parallel trials as Slurm jobs
])
def test_good_search_spaces_pass_the_preflight(args, monkeypatch):
    """The same checks let valid sweeps through to Hydra (a stand-in task; nothing trains)."""
    from dsv4_train.launch import slurm_sweep

    if "hydra/launcher=dsv4_slurm" in args and not slurm_sweep.HAVE_SUBMITIT:
        pytest.skip("hydra-submitit-launcher (optional extra) not installed")
    from dsv4_train.config.errors import run_with_friendly_errors

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    assert run_with_friendly_errors(lambda: "handed to Hydra", argv=["-m", "hydra/sweeper=dsv4_optuna", *args]) \
        == "handed to Hydra"
