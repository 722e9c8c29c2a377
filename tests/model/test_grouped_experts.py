"""The grouped routed experts (model/grouped_experts.py) against Megatron's SequentialMLP.

Same weights, same expert-sorted tokens: outputs and every weight / input / prob gradient must
agree within 1e-6 of each tensor's largest entry in fp32. Both compute the same dot products per
row; a grouped GEMM and a per-expert mm may block the reductions differently (a few ulps, ~1e-7
relative measured) and the fused SwiGLU backward writes silu' as sig * (1 + g * (1 - sig)) like
torch's, nothing larger. bf16 is checked at 2e-2 (bf16 epsilon 7.8e-3: one extra rounding of the
activations in either order). Checkpoints: both directions (sequential -> grouped and back), as
torch state dicts and as Megatron dist checkpoints, must reproduce the weights exactly.
"""

from __future__ import annotations

import pytest
import torch

from v4_model_helpers import assert_close_to_max as _close
from v4_model_helpers import build_tiny, run_experts, tiny_cfg, tokens

COUNTS = {
    "uneven_with_empty_experts": [5, 0, 1, 9, 0, 3, 2, 7],
    "one_expert_only": [0, 0, 0, 0, 0, 0, 0, 6],
    "no_tokens": [0] * 8,
}


def _pair(dtype=torch.float32):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.experts import SequentialMLP

    from dsv4_train.model.grouped_experts import GroupedExperts
    from dsv4_train.model.moe import _mlp_submodules
    from dsv4_train.model.transformer_config import build_transformer_config

    cfg = tiny_cfg()
    assert cfg.num_routed_experts == 8, "COUNTS assume the tiny config's 8 experts"
    config = build_transformer_config(model_cfg=cfg, precision="bf16" if dtype == torch.bfloat16 else "fp32")
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    torch.manual_seed(0)
    sequential = SequentialMLP(cfg.num_routed_experts, config, _mlp_submodules(), pg_collection=pgs)
    grouped = GroupedExperts(cfg.num_routed_experts, config, _mlp_submodules(), pg_collection=pgs)
    with torch.no_grad():  # larger weights than the init so the SwiGLU clamp (swiglu_limit) really cuts
        for param in sequential.parameters():
            param.normal_(0.0, 0.5)
    assert not grouped.load_state_dict(sequential.state_dict()).missing_keys
    return cfg, sequential.to(dtype), grouped.to(dtype)


def _run(module, hidden, counts, probs):
    weights = {k: v for k, v in module.state_dict(keep_vars=True).items() if k.endswith(".weight")}
    return (*run_experts(module, hidden, counts, probs), weights)


def _per_expert_grads(module, weights):
    """Per-expert weight gradients by state-dict key (the grouped module's are views of its stacked grads)."""
    from dsv4_train.model.grouped_experts import GroupedExperts

    if not isinstance(module, GroupedExperts):
        return {k: v.grad for k, v in weights.items()}
    out = {}
    for i in range(module.num_local_experts):
        out[f"local_experts.{i}.linear_fc1.weight"] = module.fc1_weight.grad[i]
        out[f"local_experts.{i}.linear_fc2.weight"] = module.fc2_weight.grad[i]
    return out


@pytest.mark.parametrize("counts_kind", list(COUNTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grouped_experts_match_sequential(megatron_world1, counts_kind, dtype):
    cfg, sequential, grouped = _pair(dtype)
    counts = COUNTS[counts_kind]
    gen = torch.Generator().manual_seed(1)
    hidden = (torch.randn(sum(counts), cfg.hidden_size, generator=gen) * 3.0).to(dtype)
    probs = torch.rand(sum(counts), generator=gen)
    rtol = 1e-6 if dtype == torch.float32 else 2e-2
    ref, got = _run(sequential, hidden, counts, probs), _run(grouped, hidden, counts, probs)
    assert got[0].shape == ref[0].shape == (sum(counts), cfg.hidden_size) and got[0].dtype == dtype
    if sum(counts):
        for a, b in zip(ref[:3], got[:3]):
            _close(a, b, rtol)
    ref_grads, got_grads = _per_expert_grads(sequential, ref[3]), _per_expert_grads(grouped, got[3])
    assert ref_grads.keys() == got_grads.keys() and len(ref_grads) == 2 * cfg.num_routed_experts
    for name, grad in ref_grads.items():
        expert = int(name.split(".")[1])
        if counts[expert] == 0:  # no tokens: zero gradient in both
            assert grad.abs().max() == 0 and got_grads[name].abs().max() == 0, name
        else:
            assert grad.abs().max() > 0, name
            _close(grad, got_grads[name], rtol)
    if counts_kind == "uneven_with_empty_experts" and dtype == torch.float32:
        # The clamp really cut, on both halves (else the comparison would not cover it).
        fc1 = sequential.local_experts[3].linear_fc1.weight
        gate_up = hidden[6:15] @ fc1.t()
        gate, up = gate_up.chunk(2, dim=-1)
        assert gate.max().item() > cfg.swiglu_limit and up.abs().max().item() > cfg.swiglu_limit


def test_same_parameters_attributes_and_keys_as_sequential(megatron_world1):
    """Torch state-dict keys, per-expert values, parallel attributes (DDP buffer choice) and the
    Megatron sharded state dict (keys, offsets, shapes, replica ids, data) equal SequentialMLP's."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    _, sequential, grouped = _pair()
    assert list(sequential.state_dict()) == list(grouped.state_dict())
    for key, value in sequential.state_dict().items():
        assert (value is None and grouped.state_dict()[key] is None) or torch.equal(value, grouped.state_dict()[key])
    attributes = ("allreduce", "tensor_model_parallel", "partition_stride")
    fc1, fc2 = sequential.local_experts[0].linear_fc1.weight, sequential.local_experts[0].linear_fc2.weight
    for ref, stacked in ((fc1, grouped.fc1_weight), (fc2, grouped.fc2_weight)):
        assert {a: getattr(ref, a) for a in attributes} == {a: getattr(stacked, a) for a in attributes}
        assert stacked.partition_dim == ref.partition_dim + 1  # the leading expert dim

    def leaves(sharded):
        out = []
        for value in sharded.values():
            for leaf in (value.build() if isinstance(value, ShardedTensorFactory) else [value]):
                data = None if leaf.data is None else leaf.data.detach().clone()
                out.append((leaf.key, leaf.global_offset, leaf.global_shape, leaf.replica_id, data))
        return sorted(out, key=lambda leaf: (leaf[0], leaf[1]))

    ref, got = leaves(sequential.sharded_state_dict(prefix="ffn.")), leaves(grouped.sharded_state_dict(prefix="ffn."))
    assert [leaf[:4] for leaf in ref] == [leaf[:4] for leaf in got] and len(ref) == 5 * 8  # gate, up, fc2, 2 extras
    for a, b in zip(ref, got):
        assert (a[4] is None and b[4] is None) or torch.equal(a[4], b[4]), a[0]


def _model_output(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("direction", ["sequential_to_grouped", "grouped_to_sequential"])
def test_dist_checkpoint_moves_between_expert_paths(megatron_world1, tmp_path, direction):
    """A model-only dist checkpoint saved with one expert path loads into the other: identical
    weights (exact), identical logits up to the expert paths' reduction order (1e-5 of the max)."""
    from dsv4_train.checkpoint.io import TrainState, load_checkpoint, save_checkpoint

    source_kind, target_kind = direction.split("_to_")
    source = build_tiny(seed=0, moe_expert_compute=source_kind)
    target = build_tiny(seed=1, moe_expert_compute=target_kind)
    key = "layers.3.ffn.experts.local_experts.5.linear_fc1.weight"
    assert not torch.equal(source.state_dict()[key], target.state_dict()[key])  # different init seeds
    path = save_checkpoint(str(tmp_path), model_chunks=[source], optimizer=None, scheduler=None, state=TrainState())
    load_checkpoint(path, model_chunks=[target], optimizer=None, scheduler=None, model_only=True)
    src, dst = source.state_dict(), target.state_dict()
    assert src.keys() == dst.keys()
    for name, value in src.items():
        if value is not None and not name.endswith("_extra_state"):
            assert torch.equal(value, dst[name]), name
    ids = tokens(source.model_cfg, batch=2, seq=32)
    _close(_model_output(source, ids), _model_output(target, ids), 1e-5)


def test_model_with_grouped_experts_matches_sequential(megatron_world1):
    """Whole tiny model, same weights: the loss within 1e-6 relative and every parameter gradient
    within 1e-5 of its own largest entry or 1e-8 of the model's largest gradient entry, whichever
    is larger (fp32). The MoE layers differ by reduction order only; gradients that are sums of
    nearly cancelling terms (mHC `scale`/`base`, ~1e-7 against entries of ~1e-1 elsewhere) keep
    the terms' absolute rounding: measured 8e-5 of their own size, the same for batched vs
    sequential (the older path); an expert or routing bug moves gradients by far more than 1e-8."""
    from dsv4_train.model.grouped_experts import GroupedExperts

    sequential = build_tiny(seed=0, moe_expert_compute="sequential")
    grouped = build_tiny(seed=1)  # auto = grouped
    assert isinstance(grouped.layers[0].ffn.experts, GroupedExperts) and grouped.layers[0].ffn.dispatch_free
    grouped.load_state_dict(sequential.state_dict())
    ids = tokens(sequential.model_cfg, batch=2, seq=32)
    losses, grads = [], []
    for model in (sequential, grouped):
        model.train()
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        losses.append(loss.detach())
        # Per state-dict key (the grouped experts' per-expert entries are views of their stacked grads).
        per_key = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        for layer_name, module in model.named_modules():
            if isinstance(module, GroupedExperts) and module.fc1_weight.grad is not None:  # (MTP: no labels, no grad)
                per_key.pop(f"{layer_name}.fc1_weight"), per_key.pop(f"{layer_name}.fc2_weight")
                for i in range(module.num_local_experts):
                    per_key[f"{layer_name}.local_experts.{i}.linear_fc1.weight"] = module.fc1_weight.grad[i]
                    per_key[f"{layer_name}.local_experts.{i}.linear_fc2.weight"] = module.fc2_weight.grad[i]
        grads.append(per_key)
    _close(losses[0], losses[1], 1e-6)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 100
    largest = max(g.abs().max().item() for g in grads[0].values())
    for name, ref in grads[0].items():
        bound = max(1e-5 * ref.abs().max().item(), 1e-8 * largest)
        assert (ref - grads[1][name]).abs().max().item() <= bound, name


@pytest.mark.parametrize("limit,offset", [(1.5, 0.0), (None, 0.0), (1.5, 1.0)], ids=["clamped", "no_limit", "offset"])
def test_clamped_swiglu_gradients(limit, offset):
    """The forward against the formula written out (fp64, 1e-12: the same ops up to rounding
    order) and the hand-written backward against finite differences (torch.autograd.gradcheck,
    fp64, its default tolerances: atol 1e-5, rtol 1e-3 on the numerical Jacobian). Inputs avoid
    the clamp's kinks by 0.1 (finite differences are undefined there) while still crossing them."""
    from dsv4_train.model.swiglu import clamped_swiglu

    gen = torch.Generator().manual_seed(0)
    gate_up = torch.randn(7, 8, generator=gen, dtype=torch.float64) * 2.0
    if limit is not None:
        near_kink = ((gate_up.abs() - limit).abs() < 0.1)
        gate_up = torch.where(near_kink, gate_up + 0.25 * gate_up.sign(), gate_up)
        assert (gate_up.abs() > limit).any(), "the clamp must cut something"
    prob = torch.rand(7, generator=gen, dtype=torch.float64)
    gate, up = gate_up.chunk(2, dim=-1)
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    expected = torch.nn.functional.silu(gate) * (up + offset) * prob[:, None]
    assert (clamped_swiglu(gate_up, prob, limit, offset) - expected).abs().max().item() <= 1e-12
    assert torch.autograd.gradcheck(lambda g, p: clamped_swiglu(g, p, limit, offset),
                                    (gate_up.requires_grad_(True), prob.requires_grad_(True)))


def test_single_rank_path_refuses_tokens_without_top_k_experts(megatron_world1):
    """The dispatcher-free path sizes its (expert, token) list as tokens x top-k without a host
    sync; a router that gives a token fewer experts (here: a hash table repeating an expert, as an
    untrained all-zero table would) must raise instead of computing on padding indices."""
    model = build_tiny()
    moe = model.layers[0].ffn
    assert moe.hash_routed and moe.dispatch_free
    ids = tokens(model.model_cfg, batch=1, seq=16).t().contiguous()  # [s, b]
    x = torch.randn(16, 1, model.model_cfg.hidden_size)
    moe(x, token_ids=ids)  # the generated table: distinct experts per token
    with torch.no_grad():
        moe.router.tid2eid.zero_()
    with pytest.raises(RuntimeError, match="top-k"):
        moe(x, token_ids=ids)
