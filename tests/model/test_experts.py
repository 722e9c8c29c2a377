"""The batched routed-expert path (model/experts.py) against Megatron's SequentialMLP.

Same weights, same expert-sorted tokens: outputs and every weight/input gradient must agree.
Tolerance 1e-6 relative to each tensor's largest entry in fp32: a padded bmm and a per-expert mm
multiply the same numbers but may block the dot products differently (a few ulps), nothing more;
bf16 is checked at 2e-2 (bf16 epsilon 7.8e-3, one rounding of the activations in either order).
"""

from __future__ import annotations

import pytest
import torch

from v4_model_helpers import assert_close_to_max as _close
from v4_model_helpers import run_experts, tiny_cfg


def _twins(dtype=torch.float32):
    from megatron.core.transformer.moe.experts import SequentialMLP

    from dsv4_train.model.experts import BatchedSequentialMLP
    from dsv4_train.model.moe import _mlp_submodules
    from dsv4_train.model.transformer_config import build_transformer_config
    from megatron.core.process_groups_config import ProcessGroupCollection

    cfg = tiny_cfg()
    config = build_transformer_config(model_cfg=cfg, precision="bf16" if dtype == torch.bfloat16 else "fp32")
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    torch.manual_seed(0)
    sequential = SequentialMLP(cfg.num_routed_experts, config, _mlp_submodules(), pg_collection=pgs)
    batched = BatchedSequentialMLP(cfg.num_routed_experts, config, _mlp_submodules(), pg_collection=pgs)
    batched.load_state_dict(sequential.state_dict())
    # Larger weights than the init so the SwiGLU clamp (swiglu_limit) really cuts.
    with torch.no_grad():
        for (_, a), (_, b) in zip(sequential.named_parameters(), batched.named_parameters()):
            a.normal_(0.0, 0.5)
            b.copy_(a)
    sequential.to(dtype)
    batched.to(dtype)
    return cfg, sequential, batched


def _run(module, hidden, counts, probs):
    out, hidden_grad, probs_grad = run_experts(module, hidden, counts, probs)
    return out, hidden_grad, probs_grad, {name: p.grad.clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize("counts_kind", ["uneven_with_empty_experts", "one_expert_only", "no_tokens"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_batched_experts_match_sequential(megatron_world1, counts_kind, dtype):
    cfg, sequential, batched = _twins(dtype)
    experts = cfg.num_routed_experts
    counts = {
        "uneven_with_empty_experts": [5, 0, 1, 9, 0, 3, 2, 7][:experts] + [0] * max(0, experts - 8),
        "one_expert_only": [0] * (experts - 1) + [6],
        "no_tokens": [0] * experts,
    }[counts_kind]
    tokens = sum(counts)
    gen = torch.Generator().manual_seed(1)
    hidden = (torch.randn(tokens, cfg.hidden_size, generator=gen) * 3.0).to(dtype)
    probs = torch.rand(tokens, generator=gen)
    rtol = 1e-6 if dtype == torch.float32 else 2e-2
    ref, got = _run(sequential, hidden, counts, probs), _run(batched, hidden, counts, probs)
    assert got[0].shape == ref[0].shape == (tokens, cfg.hidden_size) and got[0].dtype == dtype
    if tokens:
        _close(ref[0], got[0], rtol)
        _close(ref[1], got[1], rtol)
        _close(ref[2], got[2], rtol)
    for name, grad in ref[3].items():
        if grad.abs().max() == 0:
            assert got[3][name].abs().max() == 0, name  # experts without tokens get zero gradients
        else:
            _close(grad, got[3][name], rtol)
    if counts_kind == "uneven_with_empty_experts" and dtype == torch.float32:
        # The clamp really cut something (else the comparison would not cover it).
        fc1 = sequential.local_experts[3].linear_fc1.weight
        assert (hidden[6:15] @ fc1.t())[:, : fc1.shape[0] // 2].max().item() > cfg.swiglu_limit


def test_model_config_selects_expert_path(megatron_world1):
    from megatron.core.transformer.moe.experts import SequentialMLP

    from dsv4_train.model.experts import BatchedSequentialMLP, RecomputingSequentialMLP
    from v4_model_helpers import build_tiny

    from dsv4_train.model.grouped_experts import GroupedExperts

    batched = build_tiny(moe_expert_compute="batched")
    sequential = build_tiny(moe_expert_compute="sequential")
    grouped = build_tiny(moe_expert_compute="grouped")
    auto = build_tiny()  # auto = grouped
    assert type(batched.layers[0].ffn.experts) is BatchedSequentialMLP
    # Megatron's SequentialMLP; only its moe_act recompute (model/recompute.py) is ours.
    assert type(sequential.layers[0].ffn.experts) is RecomputingSequentialMLP
    assert RecomputingSequentialMLP.__bases__ == (SequentialMLP,)
    assert type(grouped.layers[0].ffn.experts) is GroupedExperts
    assert type(auto.layers[0].ffn.experts) is GroupedExperts
    # Same parameter names (batched) and state-dict keys (all three), so checkpoints are interchangeable.
    assert [n for n, _ in batched.named_parameters()] == [n for n, _ in sequential.named_parameters()]
    assert list(grouped.state_dict()) == list(sequential.state_dict()) == list(batched.state_dict())


@pytest.mark.parametrize("compute", ["grouped", "batched"])
@pytest.mark.parametrize("layer_index", [0, 3], ids=["hash_routed", "scored"])
def test_single_rank_moe_skips_dispatcher_with_same_result(megatron_world1, layer_index, compute):
    """On one rank the MoE layer routes and combines in the grouped / batched experts (no token dispatcher):
    output and every gradient equal Megatron's dispatcher path (same ops in the same order;
    tolerance 1e-6 of each tensor's max only guards against a different reduction blocking)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from v4_model_helpers import build_tiny, tokens

    model = build_tiny(moe_expert_compute=compute).eval()
    block = model.layers[min(layer_index, len(model.layers) - 1)]
    moe = block.ffn
    assert moe.dispatch_free
    ids = tokens(model.model_cfg, batch=2, seq=32).t().contiguous()  # [s, b]
    x = torch.randn(32, 2, model.model_cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    upstream = torch.randn(32, 2, model.model_cfg.hidden_size, generator=torch.Generator().manual_seed(4))

    def run(direct: bool):
        moe.zero_grad(set_to_none=True)
        inp = x.clone().requires_grad_(True)
        if moe.hash_routed:
            moe.router.set_token_ids(ids)
        out = moe._forward_single_rank(inp) if direct else MoELayer.forward(moe, inp)[0]
        out.backward(upstream)
        return out.detach(), inp.grad, {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}

    ref, got = run(direct=False), run(direct=True)
    _close(ref[0], got[0], 1e-6)
    _close(ref[1], got[1], 1e-6)
    assert ref[2].keys() == got[2].keys() and len(ref[2]) > 3
    for name, grad in ref[2].items():
        if grad.abs().max() > 0:
            _close(grad, got[2][name], 1e-6)
