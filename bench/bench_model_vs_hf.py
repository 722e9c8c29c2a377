"""Step time (forward + backward) of our tiny V4 vs transformers' DeepseekV4ForCausalLM on the same
config and weights, on CPU with one thread. Prints the median over timed steps after warm-up.

    OMP_NUM_THREADS=1 TORCHDYNAMO_DISABLE=1 python bench/bench_model_vs_hf.py [--steps 10] [--warmup 3]

Both models run in one process, so both pay the CPU compatibility layer's TorchFunctionMode
(dsv4_train.runtime.cpu_compat) per torch call. Ours does strictly more work per step than the
oracle: the MTP block (one more V4 block + head) and, in train mode, the seq-balance loss and the
indexer KL loss; `--no-mtp-work` reports ours in eval mode (no aux losses) for the closest match.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def _time(step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="print the top ops of one of our steps")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from dsv4_train.bridge import load_hf
    from tests.bridge.hf_oracle import CASES, build_hf, input_ids, save_hf

    case = CASES[0]  # the tiny default config (spec §14)
    hf = build_hf(case).train()
    directory = save_hf(hf, tempfile.mkdtemp(prefix="bench_v4_"))
    ours = load_hf(directory)
    ids = input_ids(case)
    labels = torch.roll(ids, -1, dims=1)

    def hf_step():
        hf.zero_grad(set_to_none=True)
        hf(ids, labels=ids).loss.backward()

    def ours_step():
        ours.zero_grad(set_to_none=True)
        ours(ids, labels=labels)[:, :-1].mean().backward()

    hf_s = _time(hf_step, args.steps, args.warmup)
    ours.eval()
    ours_eval_s = _time(ours_step, args.steps, args.warmup)
    ours.train()
    ours_train_s = _time(ours_step, args.steps, args.warmup)
    print(f"config {case.name}: batch {ids.shape[0]} x seq {ids.shape[1]}, threads {torch.get_num_threads()}")
    print(f"transformers DeepseekV4ForCausalLM  fwd+bwd median {hf_s * 1e3:8.1f} ms")
    print(f"ours, eval mode (LM + MTP)          fwd+bwd median {ours_eval_s * 1e3:8.1f} ms  ratio {ours_eval_s / hf_s:.2f}x")
    print(f"ours, train mode (+ aux losses)     fwd+bwd median {ours_train_s * 1e3:8.1f} ms  ratio {ours_train_s / hf_s:.2f}x")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            ours_step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
