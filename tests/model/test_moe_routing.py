"""Routing properties (paper §2.1, §4.2.1): hash routing by token id only, the deterministic hash table,
and the expert-bias update through Megatron's finalize_model_grads."""

from __future__ import annotations

import torch

from dsv4_train.model.router import build_hash_table
from v4_model_helpers import build_tiny, tokens


def test_hash_table_distinct_balanced_deterministic():
    table = build_hash_table(vocab_size=1000, num_experts=24, topk=6, seed=3)
    assert table.shape == (1000, 6) and table.dtype == torch.int64
    rows = table.sort(dim=1).values
    assert bool((rows[:, 1:] != rows[:, :-1]).all()), "a token must get distinct experts"
    load = torch.bincount(table.flatten(), minlength=24)
    assert load.max() - load.min() <= 1, load  # exact balance up to one token
    assert torch.equal(table, build_hash_table(vocab_size=1000, num_experts=24, topk=6, seed=3))
    assert not torch.equal(table, build_hash_table(vocab_size=1000, num_experts=24, topk=6, seed=4))


def _record_routing(model):
    maps = {}

    def keep(k):
        def hook(module, inputs, output):
            maps[k] = output[1].detach()  # routing_map [s*b, E]; returns None: output unchanged

        return hook

    hooks = [layer.ffn.router.register_forward_hook(keep(k)) for k, layer in enumerate(model.layers)]
    return maps, hooks


def test_hash_routing_depends_on_token_id_only(megatron_world1):
    """Every position of a hash layer is routed to tid2eid[its token] (checks the [s, b] plumbing),
    so the same id gets the same experts in any context; scored layers depend on context."""
    model = build_tiny(seed=0)
    cfg = model.model_cfg
    first = tokens(cfg, seed=1)
    second = first.clone()
    second[:, :10] = tokens(cfg, seed=2)[:, :10]  # same tokens from position 10 on, new prefix
    for ids in (first, second):
        maps, hooks = _record_routing(model)
        with torch.no_grad():
            model(ids)
        for h in hooks:
            h.remove()
        for k in range(cfg.num_hash_layers):
            routing = maps[k].view(ids.shape[1], ids.shape[0], -1)  # [s, b, E] (Megatron token order)
            expected = torch.zeros_like(routing)
            table = model.layers[k].ffn.router.tid2eid
            expected.scatter_(-1, table[ids.t()], True)
            assert torch.equal(routing, expected), f"hash layer {k}"
        if ids is first:
            first_maps = maps
    # Contrast: scored layers see the new prefix through attention, so some token from position 10
    # on is routed differently (otherwise this test could not tell hash from scored routing).
    differs = [
        not first_maps[k].view(64, 2, -1)[10:].equal(maps[k].view(64, 2, -1)[10:])
        for k in range(cfg.num_hash_layers, cfg.num_layers)
    ]
    assert any(differs)


def test_expert_bias_update_through_finalize_model_grads(megatron_world1):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    model = build_tiny(seed=0)
    cfg = model.model_cfg
    ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(), module=model)
    ddp.train()
    scored = [layer.ffn.router for layer in list(model.layers) + [m.block for m in model.mtp]
              if not layer.ffn.hash_routed]
    hashed = [layer.ffn.router for layer in model.layers if layer.ffn.hash_routed]
    assert len(scored) == cfg.num_layers - cfg.num_hash_layers + cfg.mtp_num_layers
    assert all(not hasattr(r, "expert_bias") for r in hashed), "hash routers must stay out of the update"
    before = [r.expert_bias.clone() for r in scored]
    tables = [r.tid2eid.clone() for r in hashed]

    ids = tokens(cfg)
    ddp.zero_grad_buffer()
    ddp(ids, labels=torch.roll(ids, -1, dims=1)).mean().backward()
    counts = [r.local_tokens_per_expert.clone() for r in scored]
    # Every token is routed to top-k experts once per layer (main layers see b*s tokens).
    assert all(c.sum().item() == ids.numel() * cfg.num_experts_per_tok for c in counts)
    finalize_model_grads([ddp])

    gamma = cfg.expert_bias_update_rate
    moved = 0
    for router, old, count in zip(scored, before, counts):
        step = router.expert_bias - old
        overloaded, underloaded = count > count.mean(), count < count.mean()
        assert bool(overloaded.any()), "with routing this uneven, some expert is overloaded"
        assert torch.equal(step[overloaded], torch.full_like(step[overloaded], -gamma))
        assert torch.equal(step[underloaded], torch.full_like(step[underloaded], gamma))
        assert torch.equal(step[count == count.mean()], torch.zeros_like(step[count == count.mean()]))
        assert router.local_tokens_per_expert.abs().sum().item() == 0, "counters reset for the next step"
        moved += int(overloaded.sum())
    assert moved > 0
    assert all(torch.equal(r.tid2eid, t) for r, t in zip(hashed, tables))


def test_float64_routing_is_megatrons_in_float64():
    """model/router.py's float64 routing computes what Megatron's `topk_routing_with_score_function`
    computes (which rounds its scores to fp32): the same experts, and weights within fp32 rounding
    (4e-7 relative, measured <= 1.1e-7: fp32 roundings of softplus, sqrt, the sum and the
    division; a wrong normalisation, bias or scale is off by > 1e-2; without the expert bias the
    experts differ), for selected and precomputed (hash) experts."""
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    from dsv4_train.model.router import float64_topk_routing

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 8, generator=gen, dtype=torch.float64)
    bias = torch.randn(8, generator=gen) * 0.1
    hashed = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(50)])
    for score in ("sqrtsoftplus", "sigmoid"):
        for kwargs in ({"expert_bias": bias}, {"precomputed_indices": hashed}):
            ours = float64_topk_routing(logits, 2, score_function=score, scaling_factor=1.5, **kwargs)
            theirs = topk_routing_with_score_function(logits, 2, score_function=score, scaling_factor=1.5, **kwargs)
            assert ours[0].dtype == torch.float64 and torch.equal(ours[1], theirs[1]), (score, kwargs.keys())
            assert float((ours[0] - theirs[0]).abs().max() / theirs[0].abs().max()) <= 4e-7, (score, kwargs.keys())
