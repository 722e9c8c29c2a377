"""Layout-parity harness: the same tiny V4 training run in one process and in a parallel layout.

The reference run (1 process) saves its freshly initialised weights as step 0
(`checkpoint.save_initial=true`) and trains; a layout run loads exactly those weights
(`checkpoint.load=<step 0> checkpoint.load_model_only=true`, resharded by dist_checkpointing) and
trains with the same seed, data and global batch. Per-step lm_loss, mtp_loss and grad_norm are then
compared. Everything goes through the real CLI, as `torchrun --nproc_per_node=N -m dsv4_train`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

from tests.helpers import by_step, read_metrics, run_cli

STEPS = 5
# fp32; window, CSA top-k and HCA blocks all cross a 2-way split of the 64-token sequence.
BASE = [
    "conf=tiny_pretrain",
    f"train.max_steps={STEPS}",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.precision=fp32",
    "optim.warmup_steps=2",
    "optim.decay_steps=20",
    "logging.wandb=false",
    "checkpoint.save_final=false",
]
COMPARED = ("lm_loss", "mtp_loss", "grad_norm")


def _check(proc) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}"


def reference_run(root: Path, extra: Sequence[str] = ()) -> Dict[str, object]:
    run_dir = root / "reference"
    _check(run_cli([*BASE, *extra, f"run.dir={run_dir}", "checkpoint.save_initial=true"]))
    return {"metrics": by_step(read_metrics(run_dir)), "initial": run_dir / "checkpoints" / "step_00000000"}


def layout_run(root: Path, name: str, reference: Dict[str, object], overrides: Sequence[str], nproc: int,
               extra: Sequence[str] = (), env: Optional[dict] = None) -> Dict[int, dict]:
    run_dir = root / name
    proc = run_cli(
        [*BASE, *extra, *overrides, f"run.dir={run_dir}", f"checkpoint.load={reference['initial']}",
         "checkpoint.load_model_only=true"],
        nproc=nproc, env=env,
    )
    _check(proc)
    return by_step(read_metrics(run_dir))


def max_relative_differences(reference: Dict[int, dict], other: Dict[int, dict]) -> Dict[str, float]:
    assert sorted(reference) == sorted(other) == list(range(1, STEPS + 1)), (sorted(reference), sorted(other))
    worst = {}
    for key in COMPARED:
        worst[key] = max(abs(other[s][key] - reference[s][key]) / max(abs(reference[s][key]), 1e-12) for s in reference)
    return worst


def format_table(rows: List[tuple]) -> str:
    lines = [f"{'layout':<28}{'nproc':>6}" + "".join(f"{k:>14}" for k in COMPARED)]
    for name, nproc, worst in rows:
        lines.append(f"{name:<28}{nproc:>6}" + "".join(f"{worst[k]:>14.2e}" for k in COMPARED))
    return "\n".join(lines)
