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
