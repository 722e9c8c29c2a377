"""CPU step-time benchmark of `tiny_pretrain` through the real CLI.

Runs the recipe for --steps steps in a fresh run directory (one thread, no torch.compile),
reads metrics.jsonl, and reports the median step time and tokens/s over the steps after --warmup.

    OMP_NUM_THREADS=1 python bench/bench_tiny_pretrain.py [--steps 30] [--warmup 5] [--nproc 1]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="extra config overrides")
    args = parser.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", WANDB_MODE="disabled")
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, "run")
        entry = ["-m", "dsv4_train"]
        if args.nproc > 1:
            entry = ["-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", "-m", "dsv4_train"]
        cmd = [sys.executable, *entry, "conf=tiny_pretrain", f"train.max_steps={args.steps}",
               f"run.dir={run_dir}", "checkpoint.save_final=false", *args.overrides]
        start = time.monotonic()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.monotonic() - start
        if proc.returncode != 0:
            sys.exit(f"benchmark run failed:\n{proc.stderr[-3000:]}")
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
    timed = [r for r in rows if r["step"] > args.warmup]
    step_times = [r["step_time_s"] for r in timed]
    median = statistics.median(step_times)
    tokens_per_step = rows[0]["tokens_per_sec"] * rows[0]["step_time_s"]
    print(json.dumps({
        "benchmark": "tiny_pretrain CPU step time",
        "nproc": args.nproc,
        "threads_per_process": 1,
        "steps_timed": len(timed),
        "median_step_time_s": round(median, 4),
        "min_step_time_s": round(min(step_times), 4),
        "max_step_time_s": round(max(step_times), 4),
        "tokens_per_step": round(tokens_per_step),
        "median_tokens_per_sec": round(tokens_per_step / median, 1),
        "wall_time_s_incl_startup": round(wall, 1),
        "first_lm_loss": rows[0]["lm_loss"],
        "last_lm_loss": rows[-1]["lm_loss"],
    }, indent=2))


if __name__ == "__main__":
    main()
