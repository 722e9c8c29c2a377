"""Step time (forward + backward) of our tiny V4 vs transformers' DeepseekV4ForCausalLM on the same
config and weights, on CPU with one thread. Prints medians over timed steps after warm-up.

    OMP_NUM_THREADS=1 python bench/bench_model_vs_hf.py [--rounds 3] [--block 10] [--sinkhorn-iters N]

Rows (timed in rounds of consecutive steps per model, so machine drift hits them alike):
* transformers: `hf(ids, labels=ids).loss.backward()` in train mode, run WITHOUT our CPU
  compatibility layer's per-call hook (HF does not need it; this is its best case).
* ours, same work: our model in eval mode (no MTP, no aux losses, like HF's forward) producing
  logits, then the same shifted cross-entropy -> backward. This is the like-for-like comparison
  the target (ours <= 0.6x HF) is about. `model.attention_backend=auto` runs the dense attention
  path here (64 tokens fit one query block);
* ours, same work, blockwise: the same with the linear-memory attention path forced (what `auto`
  runs once a sequence spans more than one query block).
* ours, same work, compiled Sinkhorn: the same with `model.sinkhorn_kernel=compiled` (mHC's two
  Sinkhorn step loops as torch.compile kernels, what `auto` runs on CUDA; compiled once at start,
  ~25 s; eager if TORCHDYNAMO_DISABLE=1 is set, and the row says so).
* ours, same work, compiled blocks: the same with `model.compile=true` (each V4 block as
  torch.compile graphs, model/block_compile.py; compiled during warm-up, ~1-2 min on CPU, not
  timed; eager if TORCHDYNAMO_DISABLE=1 is set, and the row says so).
* ours, V4 training forward: train mode with labels: LM loss + the MTP block and its loss + the
  indexer KL and sequence-balance losses (work HF's model does not do), for reference.
* ours, V4 training, compiled blocks: the same with `model.compile=true`.
* forward only (no grad): HF's loss forward and ours (logits + the same cross-entropy), the
  forward's share of the ratio.

`--sinkhorn-iters N` sets mHC's Sinkhorn iterations in BOTH models (the release uses 20): with 1,
the comparison isolates everything but the Sinkhorn loop (where the two implementations differ most).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _medians_over_rounds(steps: dict, *, rounds: int, block: int, warmup: int) -> dict:
    """Each round runs every step function `block` times in a row (as training runs consecutive
    steps of one model); rounds alternate the models, so slow machine drift hits all of them.
    Returns {name: (median, min)} over all timed steps."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            for _ in range(block):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--block", type=int, default=10, help="consecutive timed steps per model and round")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="print the top ops of one same-work step of ours")
    parser.add_argument("--sinkhorn-iters", type=int, default=None,
                        help="mHC Sinkhorn iterations in both models (default: the config's 20)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from dsv4_train.bridge import load_hf
    from dsv4_train.mcore import cpu_compat
    from tests.bridge.hf_oracle import CASES, build_hf, input_ids, save_hf

    case = CASES[0]  # the tiny default config (conf/model/tiny.yaml)
    if args.sinkhorn_iters is not None:
        case = dataclasses.replace(case, extra={**case.extra, "hc_sinkhorn_iters": args.sinkhorn_iters})
    hf = build_hf(case).train()
    directory = save_hf(hf, tempfile.mkdtemp(prefix="bench_v4_"))
    ours_lm = load_hf(directory).eval()
    ours_blockwise = load_hf(directory).eval()
    from dsv4_train.model.attention import HybridAttention  # after load_hf: Megatron imports need the CPU layer

    for module in ours_blockwise.modules():
        if isinstance(module, HybridAttention):
            module.backend_choice = "blockwise"
    ours_compiled = load_hf(directory).eval()
    from dsv4_train.model.mhc import HyperConnection

    for module in ours_compiled.modules():
        if isinstance(module, HyperConnection):
            module.sinkhorn_kernel = "compiled"
    from dsv4_train.model import aux_losses
    from dsv4_train.model.block import V4Block
    from dsv4_train.model.block_compile import compile_block

    def with_compiled_blocks(model):
        for module in model.modules():
            if isinstance(module, V4Block):
                compile_block(module)  # what model.compile=true does at build
        return model

    ours_compiled_blocks = with_compiled_blocks(load_hf(directory).eval())
    ours_train = load_hf(directory).train()
    ours_train_compiled = with_compiled_blocks(load_hf(directory).train())
    ids = input_ids(case)
    labels = torch.roll(ids, -1, dims=1)  # ours: position t predicts t+1; the last column is dropped

    def hf_step():
        with cpu_compat.mode_suspended():
            hf.zero_grad(set_to_none=True)
            hf(ids, labels=ids).loss.backward()

    def same_work(model):
        model.zero_grad(set_to_none=True)
        logits = model(ids)  # [b, s, V]
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()

    def ours_same_work():
        same_work(ours_lm)

    def hf_forward():
        with cpu_compat.mode_suspended(), torch.no_grad():
            hf(ids, labels=ids)

    def ours_forward():
        with torch.no_grad():
            logits = ours_lm(ids)
            F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    def training(model):
        model.zero_grad(set_to_none=True)
        model(ids, labels=labels)[:, :-1].mean().backward()
        aux_losses.drain()  # what the training loop does each step (the records would pile up)

    results = _medians_over_rounds(
        {"hf": hf_step, "same": ours_same_work, "blockwise": lambda: same_work(ours_blockwise),
         "compiled": lambda: same_work(ours_compiled), "blocks": lambda: same_work(ours_compiled_blocks),
         "train": lambda: training(ours_train), "train_blocks": lambda: training(ours_train_compiled),
         "hf_fwd": hf_forward, "fwd": ours_forward},
        rounds=args.rounds, block=args.block, warmup=args.warmup,
    )
    hf_s = results["hf"][0]
    iters = ours_lm.model_cfg.hc_sinkhorn_iters  # as loaded from the HF config: both models run it
    print(f"config {case.name}: batch {ids.shape[0]} x seq {ids.shape[1]}, Sinkhorn iterations {iters}, "
          f"threads {torch.get_num_threads()}, "
          f"{args.rounds} rounds x {args.block} consecutive steps per model after {args.warmup} warm-up")
    rows = [
        ("transformers DeepseekV4ForCausalLM", "hf"),
        ("ours, same work (LM loss only)", "same"),
        ("ours, same work, blockwise attention", "blockwise"),
        ("ours, same work, compiled Sinkhorn" + (" (NOT: dynamo disabled)" if os.environ.get("TORCHDYNAMO_DISABLE") == "1" else ""),
         "compiled"),
        ("ours, same work, compiled blocks" + (" (NOT: dynamo disabled)" if os.environ.get("TORCHDYNAMO_DISABLE") == "1" else ""),
         "blocks"),
        ("ours, V4 training forward (+MTP, aux)", "train"),
        ("ours, V4 training, compiled blocks" + (" (NOT: dynamo disabled)" if os.environ.get("TORCHDYNAMO_DISABLE") == "1" else ""),
         "train_blocks"),
    ]
    for label, key in rows:
        median, fastest = results[key]
        print(f"{label:40s} fwd+bwd median {median * 1e3:7.1f} ms  min {fastest * 1e3:7.1f} ms  "
              f"ratio {median / hf_s:.2f}x")
    hf_fwd_s = results["hf_fwd"][0]
    for label, key in (("transformers, forward only", "hf_fwd"), ("ours, same work, forward only", "fwd")):
        median, fastest = results[key]
        print(f"{label:40s} fwd     median {median * 1e3:7.1f} ms  min {fastest * 1e3:7.1f} ms  "
              f"ratio {median / hf_fwd_s:.2f}x")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            ours_same_work()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
