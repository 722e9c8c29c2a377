"""Muon through the real CLI in bf16 (Megatron's Float16 optimizer: fp32 main params, no
distributed optimizer): it saves, and a resume continues exactly.

Tolerance 1e-6 relative, as the fp32 resume tests: everything is restored bit for bit (measured
0.0). Before the fix in checkpoint/mcore_fixes.py this configuration could not save at all.
"""

import pytest

from tests.helpers import by_step, read_metrics, run_cli

BF16_MUON = ["conf=tiny_pretrain", "optim.optimizer=muon", "train.precision=bf16", "optim.warmup_steps=2",
             "optim.decay_steps=20", "logging.wandb=false"]


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}"


@pytest.mark.slow
def test_bf16_muon_resume_matches_uninterrupted_run(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _ok(run_cli([*BF16_MUON, "train.max_steps=5", f"run.dir={straight}"]))
    _ok(run_cli([*BF16_MUON, "train.max_steps=3", f"run.dir={resumed}"]))
    proc = run_cli([*BF16_MUON, "train.max_steps=5", f"run.dir={resumed}"])
    _ok(proc)
    assert "resumed from" in proc.stdout
    a, b = by_step(read_metrics(straight)), by_step(read_metrics(resumed))
    assert sorted(b) == list(range(1, 6))
    for step in (4, 5):
        for key in ("lm_loss", "mtp_loss", "grad_norm", "lr"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-6), (step, key, a[step][key], b[step][key])
