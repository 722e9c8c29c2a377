"""Peak RSS of a whole tiny V4 training run against the sequence length (CPU, one process, 1 thread).

    OMP_NUM_THREADS=1 python bench/bench_tiny_long_context.py [--seqs 2048,4096,8192,16384] [--steps 3]

`tiny_pretrain` with Flash's window and ratio pattern (`model.sliding_window=128`,
`model.compress_ratios=[0,4,128,4,128,0]`), micro-batch 1, global batch 1, a few steps, no
checkpoint; each length in a fresh process (`python -m dsv4_train`), its peak RSS from the kernel
(`ru_maxrss` of the child). Prints RSS, the last step's time and lm_loss, and the log-log slope of
RSS against the sequence length, with `model.attention_backend` as given (default: auto).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(seq: int, steps: int, backend: str, workdir: str) -> dict:
    run_dir = os.path.join(workdir, f"s{seq}_{backend}")
    command = [
        sys.executable, "-m", "dsv4_train", "conf=tiny_pretrain", f"run.dir={run_dir}",
        "model.sliding_window=128", "model.compress_ratios=[0,4,128,4,128,0]",
        f"model.max_position_embeddings={max(seq, 4096)}", f"model.attention_backend={backend}",
        f"train.seq_length={seq}", "train.micro_batch_size=1", "train.global_batch_size=1",
        f"train.max_steps={steps}", "optim.warmup_steps=1", "train.log_interval=1", "checkpoint.save_interval=0", "checkpoint.load=none",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"s={seq} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rss_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if rss_kib <= before:
        raise SystemExit("ru_maxrss of the children did not grow: run each length in a fresh bench process")
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        last = [json.loads(line) for line in handle][-1]
    return {"seq": seq, "rss_gib": rss_kib / 2**20, "wall_s": wall, "lm_loss": last.get("lm_loss"),
            "step_s": last.get("step_time_s", last.get("elapsed_s"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="2048,4096,8192,16384")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--point", type=int, help="measure one length (used by the bench itself)")
    args = parser.parse_args()
    if args.point:
        with tempfile.TemporaryDirectory() as workdir:
            print(json.dumps(run(args.point, args.steps, args.backend, workdir)))
        return
    rows = []
    for seq in [int(s) for s in args.seqs.split(",")]:
        # A fresh bench process per length: ru_maxrss of RUSAGE_CHILDREN is a running maximum.
        out = subprocess.run([sys.executable, __file__, "--point", str(seq), "--steps", str(args.steps),
                              "--backend", args.backend], capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            print(out.stdout, out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(out.returncode)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"s={seq:6d}  peak RSS {row['rss_gib']:6.2f} GiB  wall {row['wall_s']:7.1f} s  "
              f"last lm_loss {row['lm_loss']}", flush=True)
    if len(rows) >= 2:
        xs = [math.log(r["seq"]) for r in rows]
        ys = [math.log(r["rss_gib"]) for r in rows]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
        growth = rows[-1]["rss_gib"] / rows[0]["rss_gib"]
        print(f"log-log slope of peak RSS vs s: {slope:.2f}; RSS x{growth:.2f} for s x{rows[-1]['seq'] / rows[0]['seq']:.0f}")


if __name__ == "__main__":
    main()
