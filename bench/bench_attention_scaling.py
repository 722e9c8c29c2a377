"""Peak memory and time of ONE V4 attention layer (forward + backward) against the sequence length.

    OMP_NUM_THREADS=1 python bench/bench_attention_scaling.py [--seqs 1024,2048,...] [--out FILE.json]

Flash's attention geometry at reduced width: window 128, CSA ratio 4 with top-512 (indexer phase
"sparse"), HCA ratio 128; 8 query heads of 64, indexer 16 heads of 32, hidden 256. CPU, one thread,
batch 1. Each point runs in a fresh process: one warm-up step, one timed step, then one step under
torch's profiler whose allocation events give the peak of bytes allocated during the step (inputs
and weights excluded; deterministic, unlike RSS). The dense reference runs where its predicted
score tensors fit `--dense-max-gib`. Prints a table, the log-log slopes (peak memory and time vs
s) per kind and backend, dense/blockwise ratios, and the plan's estimate of the same layer
(`dsv4_train.plan.memory.attention_layer_bytes`) next to the measured peak.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
warnings.filterwarnings("ignore")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

KINDS = {"swa": 0, "csa": 1, "hca": 2}  # layer index in GEOMETRY["compress_ratios"]
GEOMETRY = dict(
    name="flash-geometry-reduced-width", hidden_size=256, num_layers=3, num_attention_heads=8, head_dim=64,
    qk_rope_head_dim=16, q_lora_rank=64, o_groups=2, o_lora_rank=32, sliding_window=128,
    compress_ratios=[0, 4, 128], index_n_heads=16, index_head_dim=32, index_topk=512, indexer_phase="sparse",
    max_position_embeddings=1 << 20,
)


def model_config(backend: str, **overrides):
    from dsv4_train.config.model import ModelConfig

    return ModelConfig(**{**GEOMETRY, "attention_backend": backend, **overrides})


def measure_point(kind: str, backend: str, seq: int, batch: int = 1, **overrides) -> dict:
    """One layer, fwd + bwd, in this process: {time_s, peak_bytes}."""
    import torch

    from dsv4_train.runtime.distributed import init_single_process_for_tools

    torch.set_num_threads(1)
    init_single_process_for_tools(seed=1234)  # also applies the CPU layer before Megatron imports
    from dsv4_train.model import aux_losses
    from dsv4_train.model.attention import HybridAttention
    from dsv4_train.model.transformer_config import build_transformer_config
    from dsv4_train.plan.measured import allocation_peak

    cfg = model_config(backend, **overrides)
    module = HybridAttention(config=build_transformer_config(model_cfg=cfg), model_cfg=cfg, layer_index=KINDS[kind])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(seq, batch, cfg.hidden_size, generator=gen).requires_grad_(True)
    upstream = torch.randn(seq, batch, cfg.hidden_size, generator=gen)

    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        (module(x) * upstream).sum().backward()
        aux_losses.drain()

    step()  # warm-up: caches (masks, RoPE tables), gradient buffers
    start = time.perf_counter()
    step()
    elapsed = time.perf_counter() - start
    return {"time_s": elapsed, "peak_bytes": allocation_peak(step)}


def dense_score_bytes(kind: str, seq: int) -> float:
    """What the dense reference allocates for its [H, T, T + N] fp32 scores (x3: logits, probs, grad)."""
    ratio = GEOMETRY["compress_ratios"][KINDS[kind]]
    keys = seq + (seq // ratio if ratio else 0)
    return 3 * 4 * GEOMETRY["num_attention_heads"] * seq * keys


def plan_bytes(kind: str, backend: str, seq: int) -> float:
    from dsv4_train.plan.memory import attention_layer_bytes

    return attention_layer_bytes(
        model_config(backend), ratio=GEOMETRY["compress_ratios"][KINDS[kind]], seq_length=seq,
        micro_batch=1, backend=backend, act_bytes=4,
    )


def slope(points) -> float:
    """Least-squares slope of log(y) against log(x)."""
    xs = [math.log(x) for x, _ in points]
    ys = [math.log(y) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="1024,2048,4096,8192,16384,32768")
    parser.add_argument("--kinds", default="swa,csa,hca")
    parser.add_argument("--backends", default="blockwise,dense")
    parser.add_argument("--dense-max-gib", type=float, default=8.0)
    parser.add_argument("--out", default="")
    parser.add_argument("--point", nargs=3, metavar=("KIND", "BACKEND", "SEQ"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        kind, backend, seq = args.point
        print(json.dumps(measure_point(kind, backend, int(seq))))
        return

    rows = []
    for kind in args.kinds.split(","):
        for backend in args.backends.split(","):
            for seq in [int(s) for s in args.seqs.split(",")]:
                if backend == "dense" and dense_score_bytes(kind, seq) > args.dense_max_gib * 2**30:
                    continue
                proc = subprocess.run(
                    [sys.executable, __file__, "--point", kind, backend, str(seq)],
                    capture_output=True, text=True, cwd=ROOT,
                )
                if proc.returncode:
                    print(f"{kind} {backend} {seq}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                    continue
                point = json.loads(proc.stdout.strip().splitlines()[-1])
                point.update(kind=kind, backend=backend, seq=seq, plan_bytes=plan_bytes(kind, backend, seq))
                rows.append(point)
                print(f"{kind:4s} {backend:9s} s={seq:6d}  peak {point['peak_bytes'] / 2**20:9.1f} MiB  "
                      f"plan {point['plan_bytes'] / 2**20:9.1f} MiB ({point['plan_bytes'] / point['peak_bytes']:.2f}x)  "
                      f"time {point['time_s']:8.3f} s", flush=True)

    print("\nlog-log slopes vs s (all points of each series):")
    for kind in args.kinds.split(","):
        for backend in args.backends.split(","):
            series = [r for r in rows if r["kind"] == kind and r["backend"] == backend]
            if len(series) >= 2:
                print(f"  {kind:4s} {backend:9s} memory {slope([(r['seq'], r['peak_bytes']) for r in series]):.2f}  "
                      f"time {slope([(r['seq'], r['time_s']) for r in series]):.2f}  "
                      f"(s = {series[0]['seq']}..{series[-1]['seq']})")
    print("\ndense / blockwise at equal s:")
    for r in rows:
        if r["backend"] != "dense":
            continue
        twin = next((b for b in rows if b["backend"] == "blockwise" and b["kind"] == r["kind"] and b["seq"] == r["seq"]), None)
        if twin:
            print(f"  {r['kind']:4s} s={r['seq']:6d}  memory {r['peak_bytes'] / twin['peak_bytes']:6.1f}x  "
                  f"time {r['time_s'] / twin['time_s']:6.2f}x")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"geometry": GEOMETRY, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
