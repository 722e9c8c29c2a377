"""Activation memory of each recompute mode: measured allocation peak vs the plan (one process, fp32).

    python bench/bench_recompute_memory.py [--hidden 64] [--seq 64] [--batch 2] [--experts-ffn 32]

One forward + backward of the whole V4 model from `conf=tiny_pretrain` (widths overridable) per mode;
gradients already exist (a warm-up step), so the peak (dsv4_train.plan.measured) is what the step
allocates beyond weights and gradients: activations, logits and working sets. The plan's number is
`plan.memory.rank_memory(...)["activations_gib"]` for the same config and mode.
"""

from __future__ import annotations

import argparse

import torch

from dsv4_train import mcore

mcore.apply(cpu=True)


def measure(overrides, mode: str, modules):
    from dsv4_train.config.derive import derive
    from dsv4_train.config.load import compose
    from dsv4_train.model import aux_losses, recompute
    from dsv4_train.model.builder import build_model
    from dsv4_train.model.transformer_config import build_transformer_config
    from dsv4_train.plan.measured import allocation_peak
    from dsv4_train.plan.memory import GIB, rank_memory

    cfg = compose(["conf=tiny_pretrain", "train.precision=fp32", f"train.recompute={mode}",
                   f"train.recompute_modules=[{','.join(modules)}]", *overrides])
    config = build_transformer_config(model_cfg=cfg.model)
    if mode == "full":
        config.recompute_granularity = "full"
    recompute.configure(config, mode, modules)
    torch.manual_seed(0)
    model = build_model(model_cfg=cfg.model, transformer_config=config).train()
    ids = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.train.seq_length),
                        generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, dims=1)

    def step():
        model.zero_grad(set_to_none=False)  # gradients exist: not counted as activations
        model(ids, labels=labels).sum().backward()
        aux_losses.drain()

    step()
    measured = allocation_peak(step)
    planned = rank_memory(cfg, derive(cfg, world_size=1), recompute=mode)[0]["activations_gib"] * GIB
    return measured, planned


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--experts-ffn", type=int, default=32)
    args = parser.parse_args()
    from dsv4_train.runtime.distributed import init_single_process_for_tools

    init_single_process_for_tools(seed=1234)
    torch.set_num_threads(1)
    overrides = [f"model.hidden_size={args.hidden}", f"train.seq_length={args.seq}",
                 f"train.micro_batch_size={args.batch}", f"train.global_batch_size={args.batch}",
                 f"model.moe_intermediate_size={args.experts_ffn}"]
    for mode, modules in (("none", []), ("selective", ["mhc"]), ("selective", ["moe_act"]),
                          ("selective", []), ("full", [])):
        measured, planned = measure(overrides, mode, modules)
        name = mode + (f"[{','.join(modules)}]" if modules else "")
        print(f"{name:22s} measured {measured / 2**20:8.2f} MiB  plan {planned / 2**20:8.2f} MiB  "
              f"plan/measured {planned / measured:.2f}")


if __name__ == "__main__":
    main()
