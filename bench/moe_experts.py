"""Forward + backward time of one V4 MoE layer (scored router, shared expert, routed experts) on CPU
with one thread, for each routed-expert path: `sequential` (Megatron's SequentialMLP behind its
token dispatcher), `batched` (padded bmm's over weights stacked each step, model/experts.py) and
`grouped` (stacked weights, one torch._grouped_mm per projection, model/grouped_experts.py).
All three run the same weights on the same tokens in one process; prints medians and the ratio
to `sequential` side by side.

    OMP_NUM_THREADS=1 TORCHDYNAMO_DISABLE=1 python bench/moe_experts.py [--tokens 4096] [--hidden 512]
        [--experts 64] [--topk 6] [--ffn 256] [--rounds 3] [--block 3]

Measured 2026-12-05 on a shared 2-core CPU box (load average ~6-10, so medians drift ~10%), torch
2.13 CPU, median ms (ratio to sequential):
    defaults (4096 tokens, hidden 512, 64 experts, top-6, ffn 256):
        sequential 959 (1.00)   batched 1392 (1.45)   grouped 938 (0.98)
    --tokens 1024 --hidden 256 --experts 16 --topk 4 --ffn 128:
        sequential 56.5 (1.00)  batched 69.2 (1.23)   grouped 55.3 (0.98)
On CPU the matmuls dominate at these sizes and PyTorch's CPU `_grouped_mm` is a loop of mm's, so
grouped only matches sequential (and beats batched, which pads and re-stacks); on the tiny model
(8 experts, 128 tokens), where per-expert overhead matters, a whole-model fwd+bwd measured grouped
54.9 ms vs batched 63.0 / sequential 63.4.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

PATHS = ("sequential", "batched", "grouped")


def _layers(args):
    """{path: V4MoELayer} with identical weights (loaded from the sequential layer's state dict)."""
    import dataclasses

    from omegaconf import OmegaConf

    from dsv4_train.config.model import ModelConfig
    from dsv4_train.model.moe import V4MoELayer
    from dsv4_train.model.transformer_config import build_transformer_config

    tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "model", "tiny.yaml")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(tiny)))
    cfg = dataclasses.replace(cfg, hidden_size=args.hidden, num_routed_experts=args.experts,
                              num_experts_per_tok=args.topk, moe_intermediate_size=args.ffn)
    config = build_transformer_config(model_cfg=cfg)
    layers = {}
    for path in PATHS:
        torch.manual_seed(0)
        layer_cfg = dataclasses.replace(cfg, moe_expert_compute=path)
        layers[path] = V4MoELayer(config=config, model_cfg=layer_cfg, layer_number=cfg.num_hash_layers + 1,
                                  hash_routed=False).train()
    for path in PATHS[1:]:
        layers[path].load_state_dict(layers["sequential"].state_dict())
    return layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--topk", type=int, default=6)
    parser.add_argument("--ffn", type=int, default=256, help="moe_intermediate_size")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--block", type=int, default=3, help="consecutive timed steps per path and round")
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from dsv4_train.runtime.distributed import init_single_process_for_tools

    init_single_process_for_tools(seed=1234)
    layers = _layers(args)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, 1, args.hidden, generator=gen)  # [s, b, d]
    upstream = torch.randn(args.tokens, 1, args.hidden, generator=gen)

    def step(layer):
        layer.zero_grad(set_to_none=True)
        inp = x.clone().requires_grad_(True)
        out = layer(inp)
        out.backward(upstream)
        return out

    outs = {path: step(layer).detach() for path, layer in layers.items()}
    for path in PATHS[1:]:
        diff = (outs[path] - outs["sequential"]).abs().max().item() / outs["sequential"].abs().max().item()
        print(f"check: {path} output vs sequential, max rel diff {diff:.1e}")
    for layer in layers.values():
        for _ in range(args.warmup):
            step(layer)
    times = {path: [] for path in PATHS}
    for _ in range(args.rounds):  # rounds alternate the paths, so machine drift hits them alike
        for path, layer in layers.items():
            for _ in range(args.block):
                start = time.perf_counter()
                step(layer)
                times[path].append(time.perf_counter() - start)
    base = statistics.median(times["sequential"])
    print(f"\nMoE layer fwd+bwd, {args.tokens} tokens, hidden {args.hidden}, {args.experts} experts, top-{args.topk}, "
          f"ffn {args.ffn}, 1 thread, torch {torch.__version__}")
    print(f"{'path':<12}{'median ms':>12}{'min ms':>10}{'vs sequential':>16}")
    for path in PATHS:
        median = statistics.median(times[path])
        print(f"{path:<12}{median * 1e3:>12.1f}{min(times[path]) * 1e3:>10.1f}{median / base:>15.2f}x")


if __name__ == "__main__":
    main()
