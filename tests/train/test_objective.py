"""result.json and the objective of a run (train/objective.py), for each way a run can end.

`record_run` wraps the training function; here that function writes its metrics.jsonl with the real
MetricsSink (as the training loop does) and then returns an exit code or raises, so each status is
produced exactly as in a run. The end-to-end sweeps are in tests/launch/test_optuna_sweeps.py.
"""

import json
import math

import pytest

from dsv4_train.config.load import compose
from dsv4_train.config.schema import LoggingConfig
from dsv4_train.launch.preemption import EXIT_PREEMPTED
from dsv4_train.train.metrics import MetricsSink
from dsv4_train.train.nonfinite import EXIT_NONFINITE
from dsv4_train.train.objective import record_run

# Five logged steps of 8 samples; step 4 was skipped (non-finite) and must not count in the mean.
ROWS = [{"step": s, "lm_loss": loss, "consumed_samples": 8 * s, "seq_length": 64}
        for s, loss in enumerate([6.0, 5.0, 4.0, float("nan"), 3.0], start=1)]
ROWS[3]["skipped"] = True


def _cfg(tmp_path, *overrides):
    return compose([f"run.dir={tmp_path / 'run'}", "run.objective.last_n=3", "train.seq_length=64", *overrides])


def _training(cfg, rows, outcome):
    def run():
        sink = MetricsSink(run_dir=cfg.run.dir, logging_cfg=LoggingConfig(console=False), is_main=True,
                           config_dict={}, max_steps=len(rows))
        for row in rows:
            sink.log(dict(row), print_line=False)
        sink.close()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome
    return run


def _result(cfg) -> dict:
    with open(f"{cfg.run.dir}/result.json") as f:
        return json.load(f)


def test_a_finished_run_reports_its_objective_tokens_and_wall_time(tmp_path):
    cfg = _cfg(tmp_path)
    code, objective = record_run(cfg, _training(cfg, ROWS, 0), is_main=True)
    result = _result(cfg)
    # The mean of the last 3 non-skipped steps (2, 3, 5) in float64, as a user recomputes it: exact.
    assert code == 0 and objective == result["objective"] == (5.0 + 4.0 + 3.0) / 3
    assert result["status"] == "ok" and result["reason"] is None and result["metric"] == "lm_loss"
    assert result["tokens_seen"] == 5 * 8 * 64 and result["steps"] == 5
    assert result["final_metrics"]["lm_loss"] == 3.0 and result["wall_time_s"] > 0


def test_the_final_val_loss_is_the_objective_when_the_run_evaluates(tmp_path):
    cfg = _cfg(tmp_path, "train.eval_iters=2")
    rows = [*ROWS, {"step": 3, "val_loss": 3.0}, {"step": 5, "val_loss": 3.5}]  # the final one, not the best
    _, objective = record_run(cfg, _training(cfg, rows, 0), is_main=True)
    assert objective == 3.5 and _result(cfg)["metric"] == "val_loss"


@pytest.mark.parametrize("outcome,status,reason", [
    (EXIT_NONFINITE, "diverged", "stopped on non-finite loss or gradients"),
    (EXIT_PREEMPTED, "preempted", "stopped on a signal after saving"),
    (7, "failed", "exit code 7"),
    (RuntimeError("rank 0 lost its data loader"), "failed", "RuntimeError: rank 0 lost its data loader"),
])
def test_a_run_that_did_not_finish_has_a_status_a_reason_and_no_objective(tmp_path, outcome, status, reason):
    cfg = _cfg(tmp_path)
    run = _training(cfg, ROWS, outcome)
    if isinstance(outcome, BaseException):
        with pytest.raises(RuntimeError):  # re-raised: the caller decides (a sweep records NaN and goes on)
            record_run(cfg, run, is_main=True)
    else:
        code, objective = record_run(cfg, run, is_main=True)
        assert code == outcome and math.isnan(objective)
    result = _result(cfg)
    assert result["status"] == status and result["reason"].startswith(reason) and result["objective"] is None
    assert ("traceback" in result) == isinstance(outcome, BaseException)


def test_a_non_finite_objective_is_reported_as_diverged(tmp_path):
    cfg = _cfg(tmp_path, "run.objective.last_n=1")
    rows = [{**ROWS[0]}, {"step": 2, "lm_loss": float("inf"), "consumed_samples": 16, "seq_length": 64}]
    code, objective = record_run(cfg, _training(cfg, rows, 0), is_main=True)
    result = _result(cfg)
    assert code == 0 and math.isnan(objective)
    assert result["status"] == "diverged" and result["reason"] == "lm_loss is not finite"


def test_only_the_main_rank_writes_result_json(tmp_path):
    cfg = _cfg(tmp_path)
    _, objective = record_run(cfg, _training(cfg, [], 0), is_main=False)
    assert math.isnan(objective) and not (tmp_path / "run" / "result.json").exists()
