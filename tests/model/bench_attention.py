"""Time forward+backward of one HybridAttention layer per mode vs transformers' DeepseekV4Attention.

Not a test (not collected by pytest). Run:
    OMP_NUM_THREADS=1 TORCHDYNAMO_DISABLE=1 python tests/model/bench_attention.py [--batch 2 --seq 64]
Tiny config (conf/model/tiny.yaml), fp32 CPU, one thread; prints the median of `--repeats` runs.
Both modules run under the CPU compatibility layer's TorchFunctionMode (per-op Python overhead).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _time(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from dsv4_train.runtime.distributed import init_single_process_for_tools

    init_single_process_for_tools(seed=0)
    import hf_attention_oracle as oracle
    from conftest import tiny_model_config, transformer_config_for
    from dsv4_train.model import aux_losses
    from dsv4_train.model.attention import HybridAttention

    cfg = tiny_model_config()
    x = torch.randn(args.batch, args.seq, cfg.hidden_size)
    print(f"tiny config, b={args.batch}, s={args.seq}, fp32, 1 thread, median of {args.repeats}")
    for layer_index, label in ((0, "sliding window"), (1, "CSA sparse (+indexer loss)"), (2, "HCA ratio 16")):
        hf_cfg, hf_attn = oracle.random_hf_attention(cfg, layer_index, seed=layer_index)
        ours = HybridAttention(config=transformer_config_for(cfg), model_cfg=cfg, layer_index=layer_index)
        oracle.copy_hf_into_ours(hf_attn, ours)

        def step_ours():
            x_ = x.clone().requires_grad_()
            oracle.run_ours(ours, x_).sum().backward()
            aux_losses.drain()

        def step_hf():
            x_ = x.clone().requires_grad_()
            oracle.run_hf(hf_cfg, hf_attn, x_).sum().backward()

        t_ours, t_hf = _time(step_ours, args.repeats), _time(step_hf, args.repeats)
        print(f"  {label:28s} ours {t_ours * 1e3:7.2f} ms   HF {t_hf * 1e3:7.2f} ms   ratio {t_ours / t_hf:4.2f}")


if __name__ == "__main__":
    main()
