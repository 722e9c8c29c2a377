"""The metrics sink: console line contents, metrics.jsonl rows, and the wandb mode choice."""

import json

from dsv4_train.config.schema import LoggingConfig
from dsv4_train.train.metrics import MetricsSink, console_line, resolve_wandb_mode


def test_console_line_has_every_progress_field():
    line = console_line(
        {"step": 7, "lm_loss": 5.25, "mtp_loss": 5.5, "grad_norm": 1.25, "lr": 3e-4, "tokens_per_sec": 1234.0},
        max_steps=10, eta_s=65,
    )
    for part in ("step      7/10", "lm_loss 5.2500", "mtp_loss 5.5000", "grad_norm 1.250", "lr 3.000e-04",
                 "tok/s 1,234", "ETA 01:05"):
        assert part in line, (part, line)


def test_jsonl_rows_are_written_on_the_main_rank_only(tmp_path):
    main = MetricsSink(run_dir=str(tmp_path / "a"), logging_cfg=LoggingConfig(), is_main=True, config_dict={}, max_steps=2)
    other = MetricsSink(run_dir=str(tmp_path / "b"), logging_cfg=LoggingConfig(), is_main=False, config_dict={}, max_steps=2)
    for sink in (main, other):
        sink.log({"step": 1, "lm_loss": 6.0}, print_line=False)
        sink.close()
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "lm_loss": 6.0}]
    assert not (tmp_path / "b").exists()


def test_wandb_auto_mode_is_online_only_with_a_key(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online"
    assert resolve_wandb_mode("disabled") == "disabled"


def test_eta_is_timed_after_the_first_step(tmp_path, monkeypatch, capsys):
    """A slow first step (start-up costs) must not inflate the ETA: steps 2 and 3 take 1 s each, so
    at step 3 of 10 the ETA is 7 s, not (10 + 1 + 1) / 3 x 7 = 28 s."""
    from dsv4_train.train import metrics as metrics_module

    clock = iter([0.0, 100.0, 101.0, 102.0])  # the sink's creation, then the end of steps 1, 2, 3
    monkeypatch.setattr(metrics_module.time, "monotonic", lambda: next(clock))
    sink = MetricsSink(run_dir=str(tmp_path), logging_cfg=LoggingConfig(), is_main=True, config_dict={}, max_steps=10)
    for step in (1, 2, 3):
        sink.log({"step": step, "lm_loss": 6.0, "step_time_s": 10.0 if step == 1 else 1.0}, print_line=True)
    sink.close()
    lines = capsys.readouterr().out.splitlines()
    assert "ETA 01:30" in lines[0] and "ETA 00:07" in lines[2], lines
