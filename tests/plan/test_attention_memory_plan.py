"""The plan's attention memory model against what one attention layer really allocates.

One HybridAttention layer of each kind with Flash's attention geometry at reduced width (window
128, CSA ratio 4 with top-512, HCA ratio 128; bench/bench_attention_scaling.py uses the same), fp32,
batch 1, forward + backward on CPU; the measured peak is the profiler's allocation peak of the step
(`dsv4_train.plan.measured`). `plan.memory.attention_layer_bytes` must agree within 20% at three
sequence lengths (measured: 0.84-1.19x over 1K..16K).
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from bench_attention_scaling import KINDS, model_config  # noqa: E402

from dsv4_train.plan.measured import allocation_peak  # noqa: E402
from dsv4_train.plan.memory import attention_layer_bytes  # noqa: E402

TOLERANCE = 0.2  # the bound; the model itemises kept tensors, the working set is a calibrated count
SEQS = (1024, 2048, 4096)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_plan_prices_one_attention_layer_within_20_percent(megatron_world1, kind):
    from dsv4_train.model import aux_losses
    from dsv4_train.model.attention import HybridAttention
    from dsv4_train.model.transformer_config import build_transformer_config

    torch.set_num_threads(1)
    cfg = model_config("blockwise")
    ratio = cfg.compress_ratios[KINDS[kind]]
    torch.manual_seed(0)
    module = HybridAttention(config=build_transformer_config(model_cfg=cfg), model_cfg=cfg, layer_index=KINDS[kind])
    for seq in SEQS:
        x = torch.randn(seq, 1, cfg.hidden_size, requires_grad=True)
        upstream = torch.randn(seq, 1, cfg.hidden_size)

        def step():
            module.zero_grad(set_to_none=True)
            x.grad = None
            (module(x) * upstream).sum().backward()
            aux_losses.drain()

        step()  # warm-up: cached masks and RoPE tables are not activations
        measured = allocation_peak(step)
        planned = attention_layer_bytes(cfg, ratio=ratio, seq_length=seq, micro_batch=1, backend="blockwise", act_bytes=4)
        assert abs(planned / measured - 1) <= TOLERANCE, (kind, seq, planned / 2**20, measured / 2**20)
