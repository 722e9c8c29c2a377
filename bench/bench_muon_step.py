"""Muon's cost on CPU: Newton-Schulz time per step as a fraction of a `tiny_pretrain` step.

Side by side in one run (one thread each):
  1. `tiny_pretrain` through the real CLI with `optim.optimizer=adamw` and with `muon`: median step time
     after --warmup steps (metrics.jsonl `step_time_s`) and the last-10-step mean `lm_loss`;
  2. the hybrid Newton-Schulz (train/muon_math.py, 10 iterations) on every Muon matrix of the same
     model, as the optimizer groups them (one batched stack per (rows, cols) kind; plan/muon.py's
     inventory), timed alone: its median over --repeats is the Newton-Schulz time per step.

    OMP_NUM_THREADS=1 python bench/bench_muon_step.py [--steps 40] [--warmup 5] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def cli_run(optimizer: str, steps: int, warmup: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", WANDB_MODE="disabled")
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, "run")
        cmd = [sys.executable, "-m", "dsv4_train", "conf=tiny_pretrain", f"train.max_steps={steps}",
               f"optim.optimizer={optimizer}", f"run.dir={run_dir}", "checkpoint.save_final=false"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{optimizer} run failed:\n{proc.stderr[-3000:]}")
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if '"lm_loss"' in line]
    timed = [r["step_time_s"] for r in rows if r["step"] > warmup]
    return {"median_step_time_s": statistics.median(timed),
            "last10_mean_lm_loss": statistics.mean(r["lm_loss"] for r in rows[-10:])}


def newton_schulz_time(repeats: int) -> tuple:
    import torch

    from dsv4_train.config.load import compose
    from dsv4_train.plan.muon import model_matrices, newton_schulz_flops
    from dsv4_train.train.muon_math import hybrid_newton_schulz

    torch.set_num_threads(1)
    model = compose(["conf=tiny_pretrain"]).model
    stacks = [torch.randn(count, rows, cols) for rows, cols, count in model_matrices(model)]
    times = []
    for _ in range(repeats + 1):  # the first pass warms up the allocator
        start = time.perf_counter()
        for stack in stacks:
            hybrid_newton_schulz(stack)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), newton_schulz_flops(model), sum(s.numel() for s in stacks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    adamw = cli_run("adamw", args.steps, args.warmup)
    muon = cli_run("muon", args.steps, args.warmup)
    ns_seconds, ns_flops, muon_params = newton_schulz_time(args.repeats)
    print(json.dumps({
        "benchmark": "Muon vs AdamW, tiny_pretrain, CPU, 1 thread",
        "steps": args.steps,
        "adamw": adamw,
        "muon": muon,
        "muon_params": muon_params,
        "newton_schulz_flops_per_step": ns_flops,
        "newton_schulz_time_per_step_s": round(ns_seconds, 5),
        "newton_schulz_fraction_of_muon_step": round(ns_seconds / muon["median_step_time_s"], 4),
        "muon_step_over_adamw_step": round(muon["median_step_time_s"] / adamw["median_step_time_s"], 4),
    }, indent=2))


if __name__ == "__main__":
    main()
