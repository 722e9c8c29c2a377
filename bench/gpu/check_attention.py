"""GPU check of the V4 attention kernel paths (one prepared run on one GPU, a few minutes).

    bash bench/gpu/check_attention.sh            # on the GPU machine (installs the carried wheels)
    python bench/gpu/check_attention.py --device cpu --smoke   # the same code path on CPU, tiny sizes

1. Numerics on the device: `flex` (compiled FlexAttention) and `blockwise` against the `dense`
   reference, fp32, tiny config, every attention kind and indexer phase: max relative difference of
   the output and of every parameter gradient.
2. Speed and memory: one layer with Flash's attention geometry (hidden 4096, 64 heads of 512,
   window 128, CSA ratio 4 + top-512 with a 64 x 128 indexer, HCA ratio 128), bf16, batch 1,
   forward + backward at s = 4K / 16K / 64K (--seqs): time, peak memory (`max_memory_allocated`) and
   the plan's estimate of the same layer. Prints one JSON line per measurement (and writes them to
   --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "model"))

FLASH_ATTENTION = dict(
    hidden_size=4096, num_attention_heads=64, head_dim=512, qk_rope_head_dim=64, q_lora_rank=1024,
    o_groups=8, o_lora_rank=1024, sliding_window=128, index_n_heads=64, index_head_dim=128, index_topk=512,
    compress_ratios=[0, 4, 128], num_layers=3, max_position_embeddings=1 << 20,
)
KINDS = {"swa": (0, "sparse"), "csa_dense": (1, "dense"), "csa_sparse": (1, "sparse"), "hca": (2, "sparse")}


def _relative(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def build(model_cfg, layer_index, device, dtype, seed=0):
    import torch

    from dsv4_train.model.attention import HybridAttention
    from dsv4_train.model.transformer_config import build_transformer_config

    torch.manual_seed(seed)
    config = build_transformer_config(model_cfg=model_cfg, precision="bf16" if dtype == torch.bfloat16 else "fp32",
                                      use_cpu_initialization=True)
    return HybridAttention(config=config, model_cfg=model_cfg, layer_index=layer_index).to(device=device, dtype=dtype)


def numerics(device, emit):
    import torch

    from conftest import tiny_model_config
    from dsv4_train.model import aux_losses

    for (layer_index, phase), backend in [(v, b) for v in [(0, "sparse"), (1, "dense"), (1, "warmup"), (1, "sparse"), (2, "sparse")]
                                          for b in ("flex", "blockwise")]:
        ref_cfg = tiny_model_config(init_std=0.2, indexer_phase=phase, attention_backend="dense")
        cfg = dataclasses.replace(ref_cfg, attention_backend=backend, attention_block_size=16)
        gen = torch.Generator().manual_seed(4)
        x = torch.randn(64, 2, ref_cfg.hidden_size, generator=gen).to(device)
        upstream = torch.randn(64, 2, ref_cfg.hidden_size, generator=gen).to(device)
        results = []
        for model_cfg in (ref_cfg, cfg):
            module = build(model_cfg, layer_index, device, torch.float32, seed=3)
            xi = x.clone().requires_grad_(True)
            out = module(xi)
            (out * upstream).sum().backward()
            aux = aux_losses.drain()
            results.append((out.detach(), {n: p.grad for n, p in module.named_parameters() if p.grad is not None}, aux))
        (out_ref, grads_ref, aux_ref), (out, grads, aux) = results
        worst_grad = max(_relative(grads[n], g) for n, g in grads_ref.items())
        emit({"check": "numerics", "backend": backend, "layer": layer_index, "phase": phase,
              "out_rel": _relative(out, out_ref), "worst_grad_rel": worst_grad,
              "indexer_loss": [aux.get("indexer_loss"), aux_ref.get("indexer_loss")]})


def speed(device, seqs, emit, smoke):
    import torch

    from dsv4_train.config.model import ModelConfig
    from dsv4_train.model import aux_losses
    from dsv4_train.plan.memory import attention_layer_bytes, plan_backend

    geometry = dict(FLASH_ATTENTION)
    if smoke:
        geometry.update(hidden_size=128, num_attention_heads=4, head_dim=64, qk_rope_head_dim=16, q_lora_rank=32,
                        o_groups=2, o_lora_rank=16, index_n_heads=4, index_head_dim=32, index_topk=16)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for kind, (layer_index, phase) in KINDS.items():
        cfg = ModelConfig(**geometry, indexer_phase=phase, attention_backend="auto")
        module = build(cfg, layer_index, device, dtype)
        for seq in seqs:
            x = torch.randn(seq, 1, cfg.hidden_size, device=device, dtype=dtype, requires_grad=True)
            upstream = torch.randn_like(x)

            def step():
                module.zero_grad(set_to_none=True)
                (module(x) * upstream).sum().backward()
                aux_losses.drain()

            try:
                step()  # compile / warm-up
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                start = time.perf_counter()
                step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - start
                peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else None
                ratio = cfg.compress_ratios[layer_index]
                ran = module.backend(device, seq_len=seq, batch=1)  # auto: dense when one query block covers seq
                planned = attention_layer_bytes(
                    cfg, ratio=ratio, seq_length=seq, micro_batch=1, act_bytes=2 if dtype == torch.bfloat16 else 4,
                    backend=plan_backend(cfg, ratio=ratio, seq_length=seq, micro_batch=1, tp=1),
                )
                emit({"check": "speed", "kind": kind, "backend": ran, "seq": seq, "time_s": elapsed,
                      "peak_gib": None if peak is None else peak / 2**30, "plan_gib": planned / 2**30})
            except Exception as error:  # report and go on: one failing size must not hide the others
                emit({"check": "speed", "kind": kind, "seq": seq, "error": f"{type(error).__name__}: {error}"[:500]})
            del x, upstream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seqs", default="4096,16384,65536")
    parser.add_argument("--smoke", action="store_true", help="tiny widths and lengths (a CPU dry run)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    import torch

    from dsv4_train.runtime.distributed import init_single_process_for_tools

    init_single_process_for_tools(seed=0)
    device = torch.device(args.device)
    if device.type == "cpu":  # torch has no FlexAttention backward on CPU: run its reference instead
        import torch.nn.attention.flex_attention as flex

        flex._validate_device = lambda *a: None
    lines = []

    def emit(record):
        lines.append(record)
        print(json.dumps(record), flush=True)

    emit({"torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"})
    numerics(device, emit)
    speed(device, [int(s) for s in ("256,512" if args.smoke else args.seqs).split(",")], emit, args.smoke)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write("\n".join(json.dumps(r) for r in lines) + "\n")


if __name__ == "__main__":
    main()
