"""The plan's parameter counts (plan/params.py, arithmetic from the config) equal the numel of the
real model built from the same config, exactly, for the tiny config and a mid-size one: the main
model and the MTP block separately, and per block (attention + mHC + norms + router + experts)."""

from __future__ import annotations

import dataclasses

import pytest

from dsv4_train.config.load import compose
from dsv4_train.plan.params import count_params

MID = dict(hidden_size=256, num_layers=4, num_attention_heads=8, head_dim=64, qk_rope_head_dim=16, q_lora_rank=128,
           o_groups=4, o_lora_rank=64, compress_ratios=[4, 128, 4, 0, 4], index_n_heads=8, index_head_dim=32,
           num_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=128, vocab_size=1024, num_hash_layers=1)


def _built_counts(model_cfg):
    import torch

    from dsv4_train.model.builder import build_model
    from dsv4_train.model.transformer_config import build_transformer_config

    torch.manual_seed(0)
    model = build_model(model_cfg=model_cfg, transformer_config=build_transformer_config(model_cfg=model_cfg))
    main = mtp = 0
    per_layer = {}
    for name, param in model.named_parameters():
        if name.startswith("mtp."):
            mtp += param.numel()
        else:
            main += param.numel()
        if name.startswith("layers."):
            index = int(name.split(".")[1])
            per_layer[index] = per_layer.get(index, 0) + param.numel()
    return main, mtp, per_layer


@pytest.mark.parametrize("overrides", [{}, MID], ids=["tiny", "mid"])
def test_plan_counts_equal_the_built_model(megatron_world1, overrides):
    model_cfg = dataclasses.replace(compose([]).model, **overrides)
    plan = count_params(model_cfg)
    main, mtp, per_layer = _built_counts(model_cfg)
    assert main == plan.main_total
    assert mtp == plan.mtp_total
    assert [per_layer[i] for i in sorted(per_layer)] == [block.total for block in plan.blocks]
