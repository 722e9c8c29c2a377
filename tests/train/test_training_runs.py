"""End-to-end training through the real CLI: loss falls, DP2 equals DP1, resume equals no stop."""

import math

import pytest

from tests.helpers import by_step, read_metrics, run_cli

# Short, fixed schedule: decay_steps is explicit so a run stopped early has the same LR curve.
COMMON = [
    "conf=tiny_pretrain",
    "optim.warmup_steps=2",
    "optim.decay_steps=20",
    "logging.wandb=false",
]
REQUIRED_KEYS = {"step", "lm_loss", "mtp_loss", "grad_norm", "lr", "tokens_per_sec"}


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}"


@pytest.mark.slow
def test_tiny_pretrain_trains_and_writes_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli([*COMMON, "train.max_steps=12", f"run.dir={run_dir}"])
    _ok(proc)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert REQUIRED_KEYS <= set(rows[0])
    assert all(math.isfinite(r["lm_loss"]) and math.isfinite(r["mtp_loss"]) for r in rows)
    # Learning signal: the mean of the last 4 steps is clearly below the first step's loss.
    first, last = rows[0]["lm_loss"], sum(r["lm_loss"] for r in rows[-4:]) / 4
    assert last < first - 0.3, (first, last)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "logs" / "rank_0.log").is_file()
    assert (run_dir / "checkpoints" / "latest").is_file()
    assert "step     12/12" in proc.stdout and "ETA" in proc.stdout
    # MTP loss weight: 0.3 until the LR starts decaying (after the 2 warm-up steps), then 0.1.
    assert [r["mtp_loss_weight"] for r in rows[:3]] == [0.3, 0.3, 0.1]


@pytest.mark.slow
def test_data_parallel_2_matches_single_process(tmp_path):
    """Same seed and global batch: DP2 (distributed optimizer) reproduces the 1-process run.

    Tolerance 1e-5 relative (fp32): the only difference is the order of the gradient all-reduce sum
    across 2 ranks, which perturbs the last bits; 5 Adam steps keep that far below 1e-5.
    """
    steps = 5
    args = [*COMMON, f"train.max_steps={steps}", "train.global_batch_size=4", "train.micro_batch_size=2",
            "checkpoint.save_final=false"]
    single, double = tmp_path / "dp1", tmp_path / "dp2"
    _ok(run_cli([*args, f"run.dir={single}"]))
    _ok(run_cli([*args, f"run.dir={double}"], nproc=2))
    a, b = by_step(read_metrics(single)), by_step(read_metrics(double))
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for step in a:
        for key in ("lm_loss", "mtp_loss", "grad_norm"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5), (step, key, a[step][key], b[step][key])


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["optim.optimizer=muon", "train.precision=bf16"]], ids=["adamw", "muon_bf16"])
def test_resume_matches_uninterrupted_run(tmp_path, extra):
    """Stop after step 3, resume to 6: steps 4-6 equal the uninterrupted run's.

    Tolerance: 1e-6 relative. Model, optimizer (incl. Adam step counts), scheduler, data position
    and RNG are restored exactly, so the only source of difference would be a restore bug.
    muon_bf16: Megatron's Float16 optimizer (fp32 main params, not distributed), which could not
    save before dsv4_train/mcore/optimizer_fixes.py; Muon momentum and AdamW state resume exactly (measured 0.0).
    """
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _ok(run_cli([*COMMON, *extra, "train.max_steps=6", f"run.dir={straight}"]))
    _ok(run_cli([*COMMON, *extra, "train.max_steps=3", f"run.dir={resumed}"]))
    proc = run_cli([*COMMON, *extra, "train.max_steps=6", f"run.dir={resumed}"])
    _ok(proc)
    assert "resumed from" in proc.stdout
    a, b = by_step(read_metrics(straight)), by_step(read_metrics(resumed))
    assert sorted(b) == list(range(1, 7)), "the resumed run appends steps 4-6 after 1-3"
    for step in (4, 5, 6):
        for key in ("lm_loss", "mtp_loss", "grad_norm", "lr"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-6), (step, key, a[step][key], b[step][key])


@pytest.mark.slow
def test_bf16_trains_saves_and_resumes(tmp_path):
    """bf16 (Megatron mixed precision: bf16 params/activations, fp32 main params + Adam state) runs,
    saves, and resumes from its own checkpoint."""
    run_dir = tmp_path / "bf16"
    _ok(run_cli([*COMMON, "train.precision=bf16", "train.max_steps=4", f"run.dir={run_dir}"]))
    proc = run_cli([*COMMON, "train.precision=bf16", "train.max_steps=6", f"run.dir={run_dir}"])
    _ok(proc)
    assert "resumed from" in proc.stdout
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(math.isfinite(r["lm_loss"]) for r in rows)
    # A fresh model predicts near-uniformly: step-1 loss within 2% of ln(vocab=512) also in bf16.
    assert rows[0]["lm_loss"] == pytest.approx(math.log(512), rel=2e-2)


@pytest.mark.slow
def test_full_recompute_matches_no_recompute(tmp_path):
    """train.recompute=full re-runs every block in backward: same numbers, less memory.

    Tolerance 1e-6 relative: the recomputed forward performs the same fp32 ops in the same order, so
    any difference would come from a recompute bug (RNG, double-counted router tokens, aux losses)."""
    args = [*COMMON, "train.max_steps=3", "checkpoint.save_final=false"]
    plain, recomputed = tmp_path / "plain", tmp_path / "recomputed"
    _ok(run_cli([*args, f"run.dir={plain}"]))
    _ok(run_cli([*args, "train.recompute=full", f"run.dir={recomputed}"]))
    a, b = by_step(read_metrics(plain)), by_step(read_metrics(recomputed))
    for step in (1, 2, 3):
        for key in ("lm_loss", "mtp_loss", "grad_norm", "indexer_loss"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-6), (step, key, a[step][key], b[step][key])
