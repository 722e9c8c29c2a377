"""Per-step telemetry of a real tiny run (train/telemetry.py).

* Every step of metrics.jsonl has model_tflops, hardware_tflops, moe_load_imbalance,
  expert_bias_absmax and max_memory_gib; no mfu on CPU unless run.peak_tflops is given.
* model_tflops is the plan's FLOPs per token x the step's tokens / step time / processes, to float
  rounding (1e-9 relative: the same arithmetic on the same logged numbers).
* The noaux_tc bias moves by exactly gamma per step per expert (sign update), so after k steps its
  largest magnitude is at most k x gamma, and the imbalance max/mean is >= 1.
* train.profile_steps writes a Chrome trace that parses as JSON with events.
"""

from __future__ import annotations

import json

import pytest

from dsv4_train.config.load import compose
from dsv4_train.plan.flops import flops_per_token
from dsv4_train.train.telemetry import PEAK_BF16_TFLOPS, device_peak_tflops
from tests.helpers import read_metrics, run_cli

pytestmark = pytest.mark.slow  # one tiny training run shared by the module

STEPS = 4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("telemetry") / "run"
    result = run_cli([f"train.max_steps={STEPS}", "optim.warmup_steps=1", "train.log_interval=1",
                      "train.profile_steps=[2,3]", "run.peak_tflops=0.5", f"run.dir={run_dir}"], timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir, read_metrics(run_dir), result.stdout


def test_every_step_has_the_telemetry(run):
    _, rows, stdout = run
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    cfg = compose([])
    per_token = flops_per_token(cfg.model, seq_length=cfg.train.seq_length, tp=1)["total"]
    gamma = cfg.model.expert_bias_update_rate
    for row in rows:
        expected = per_token * cfg.train.global_batch_size * cfg.train.seq_length / row["step_time_s"] / 1e12
        assert row["model_tflops"] == pytest.approx(expected, rel=1e-9)
        assert row["hardware_tflops"] == row["model_tflops"]  # no recompute in this run
        assert row["mfu"] == pytest.approx(row["model_tflops"] / 0.5, rel=1e-12)
        assert row["moe_load_imbalance"] >= 1.0
        assert 0 < row["expert_bias_absmax"] <= row["step"] * gamma * (1 + 1e-6)
        assert 0.05 < row["max_memory_gib"] < 16
    assert "TFLOP/s" in stdout and "MFU" in stdout


def test_profiler_trace_opens(run):
    run_dir, _, stdout = run
    trace = run_dir / "profile" / "rank_0_steps_2-3.json"
    assert f"profiler trace of steps 2-3: {trace}" in stdout
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name", "").startswith("aten::") for e in events)


def test_peak_table_and_override():
    import torch

    assert device_peak_tflops(123.0, torch.device("cpu")) == 123.0
    assert device_peak_tflops(None, torch.device("cpu")) is None
    assert PEAK_BF16_TFLOPS["H100"] == 989.4 and PEAK_BF16_TFLOPS["GB200"] > PEAK_BF16_TFLOPS["B200"]
