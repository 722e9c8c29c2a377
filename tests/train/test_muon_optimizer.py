"""The Muon + AdamW optimizer on the tiny V4 model, inside Megatron's optimizer wrapper: the paper's
parameter split, and two steps of every parameter class against formulas written out here, with
per-expert modules (sequential) and with the grouped experts' stacked weights (each expert's gate, up
and down matrix orthogonalised on its own)."""

from __future__ import annotations

import pytest
import torch

from dsv4_train.config.load import compose
from tests.train.muon_reference import paper_orthogonal_update

LR, WD = 1e-2, 0.1
# Classes by name: AdamW (paper §2.4 and this repo's choice for sinks / `ape`) and Muon.
ADAMW_NAMES = ("word_embeddings", "output_layer", "norm.weight", "hc_attn.base", "hc_attn.scale",
               "hc_ffn.base", "hc_ffn.scale", "hc_head.base", "hc_head.scale", "attn_sink", ".ape")


def _reference_update(name, direction, o_groups):
    """The paper's update of each logical matrix, assembled in the parameter's shape."""
    if name.endswith(("fc1_weight", "fc2_weight")):  # grouped experts: [experts, rows, cols]
        return torch.stack([_reference_update(name.replace("_weight", ".weight"), expert, o_groups)
                            for expert in direction])
    if name.endswith("wo_a.weight"):
        pieces = direction.chunk(o_groups, dim=0)
    elif name.endswith("fc1.weight"):
        pieces = direction.chunk(2, dim=0)  # SwiGLU gate and up halves
    else:
        pieces = (direction,)
    return torch.cat([paper_orthogonal_update(x) for x in pieces])


@pytest.fixture(scope="module", params=["sequential", "grouped"])
def built(megatron_world1, request):
    from dsv4_train.train.loop import build_model_chunks
    from dsv4_train.train.optimizer import build_optimizer

    cfg = compose(["conf=tiny_pretrain", "optim.optimizer=muon", "optim.clip_grad=0", f"optim.weight_decay={WD}",
                   f"model.moe_expert_compute={request.param}"])
    torch.manual_seed(0)
    chunks = build_model_chunks(cfg)
    optimizer, _ = build_optimizer(chunks, cfg=cfg)
    return cfg, chunks, optimizer


def _inner(optimizer):
    from dsv4_train.train.muon import MuonWithAdamW

    subs = [getattr(sub, "optimizer") for sub in getattr(optimizer, "chained_optimizers", [optimizer])]
    assert subs and all(isinstance(sub, MuonWithAdamW) for sub in subs)
    return subs


def test_parameter_split(built):
    cfg, chunks, optimizer = built
    muon = {p for sub in _inner(optimizer) for p in sub.layouts}
    names = dict((p, n) for n, p in chunks[0].named_parameters())
    adamw = sorted(n for p, n in names.items() if p not in muon)
    assert all(any(k in n for k in ADAMW_NAMES) for n in adamw), adamw
    assert all(names[p].endswith(".fn") or names[p].endswith("weight") for p in muon)
    stacked = {names[p] for p in muon if p.dim() != 2}
    assert all(name.endswith(("experts.fc1_weight", "experts.fc2_weight")) for name in stacked), stacked
    experts = (("experts.fc1_weight", "experts.fc2_weight") if cfg.model.moe_expert_compute == "grouped"
               else ("experts.local_experts.7.linear_fc1.weight", "experts.local_experts.7.linear_fc2.weight"))
    for must in ("hc_attn.fn", *experts, "router.weight", "wo_a.weight",
                 "compressor.wkv.weight", "indexer.wq_b.weight", "e_proj.weight", "hc_head.fn"):
        assert any(must in names[p] for p in muon), must
    assert not any("expert_bias" in n for n in names.values())  # a buffer of the load balancer


def test_two_steps_match_paper_formulas(built):
    # fp32 optimizer vs an fp64 reference of the same formulas: 1e-6 absolute on weights of size
    # <= ~1 after two steps of lr 1e-2 (fp32 rounding of the 10 Newton-Schulz matmuls is ~1e-7).
    cfg, chunks, optimizer = built
    named = list(chunks[0].named_parameters())
    ref = {n: p.detach().double().clone() for n, p in named}
    mom = {n: torch.zeros_like(w) for n, w in ref.items()}
    m1 = {n: torch.zeros_like(w) for n, w in ref.items()}
    m2 = {n: torch.zeros_like(w) for n, w in ref.items()}
    groups = {id(p): g for sub in _inner(optimizer) for g in sub.param_groups for p in g["params"]}
    muon = {id(p) for sub in _inner(optimizer) for p in sub.layouts}
    gen = torch.Generator().manual_seed(1)
    for step in (1, 2):
        for group in optimizer.param_groups:
            group["lr"] = LR
        for n, p in named:
            p.main_grad.copy_(torch.randn(p.shape, generator=gen))
        optimizer.step()
        for n, p in named:
            g, wd = p.main_grad.double(), groups[id(p)]["weight_decay"]
            if id(p) in muon:
                mom[n] = 0.95 * mom[n] + g
                direction = g + 0.95 * mom[n]
                update = _reference_update(n, direction, cfg.model.o_groups)
                ref[n] = ref[n] * (1 - LR * wd) - LR * update
            else:
                m1[n] = 0.9 * m1[n] + 0.1 * g
                m2[n] = 0.95 * m2[n] + 0.05 * g * g
                denom = (m2[n] / (1 - 0.95**step)).sqrt() + cfg.optim.adam_eps
                ref[n] = ref[n] * (1 - LR * wd) - LR * (m1[n] / (1 - 0.9**step)) / denom
            err = (p.detach().double() - ref[n]).abs().max().item()
            assert err <= 1e-6, (step, n, err)
    # Weight decay reached the matrices (the reference would not notice a group without it).
    assert all(groups[id(p)]["weight_decay"] == WD for n, p in named if id(p) in muon)


def test_plan_counts_the_muon_matrices_of_the_built_model(built):
    # The plan's arithmetic inventory (plan/muon.py) against the optimizer's split of the real
    # model: exact, both are parameter counts.
    from dsv4_train.plan.muon import muon_param_count

    cfg, _, optimizer = built
    assert sum(p.numel() for sub in _inner(optimizer) for p in sub.layouts) == muon_param_count(cfg.model)
