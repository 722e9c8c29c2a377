"""Plan numbers against the spec's parameter counts and Megatron-Bridge's FLOPs rows."""

import json

import pytest

from dsv4_train.config.load import compose
from dsv4_train.plan import format_plan, make_plan, write_plan


@pytest.fixture(scope="module")
def flash():
    return make_plan(compose(["conf=flash_pretrain"]))


@pytest.fixture(scope="module")
def pro():
    return make_plan(compose(["conf=pro_pretrain"]))


def _close(value, target, rel):
    return abs(value - target) <= rel * target


# Tolerance 0.5%: the spec (§1.3) quotes totals rounded to 4 significant digits (284.3B, 1.57T,
# 13.8B, 49.8B); 0.5% covers that rounding but catches any missing tensor family (the smallest,
# e.g. one compressor per layer, is ~0.1-2%; mHC is ~0.2%; the indexer ~1%).
def test_flash_params(flash):
    assert _close(flash["params_total"], 284.3e9, 0.005)
    assert _close(flash["params_active"], 13.8e9, 0.005)
    assert _close(flash["params_total"] + flash["params_mtp"], 290.9e9, 0.005)


def test_pro_params(pro):
    assert _close(pro["params_total"], 1.57e12, 0.005)
    assert _close(pro["params_active"], 49.8e9, 0.005)
    assert _close(pro["params_with_mtp"], 1.60e12, 0.005)


def test_flash_flops_match_megatron_bridge_rows(flash):
    # NVIDIA's V4-Flash rows imply 706 TF/s / 7,776 tok/s = 90.8 GFLOP/token at 4K (perf §2.3);
    # 0.5% covers the 3-4 significant digits of the published numbers.
    assert _close(flash["flops_per_token"], 706e12 / 7776, 0.005)
    assert flash["flops_per_token_without_mtp"] < flash["flops_per_token"]


def test_flops_scale_with_sequence_length():
    short = make_plan(compose(["conf=flash_pretrain", "train.seq_length=4096"]))
    long = make_plan(compose(["conf=flash_pretrain", "train.seq_length=16384"]))
    grow = long["flops_breakdown"]["core_attention"] - short["flops_breakdown"]["core_attention"]
    assert grow > 0 and long["flops_breakdown"]["mlp"] == short["flops_breakdown"]["mlp"]


def test_recipes_fit_80gb_by_independent_arithmetic(flash, pro):
    """The recipes' worst rank fits an 80 GB GPU, checked with our own arithmetic from the per-rank
    parameter counts (which tests/plan/test_params_vs_model.py ties to real models), not by reading the
    plan's verdict: bf16 weights (2 B) and fp32 main grads (4 B) per parameter exactly; the optimizer at
    least 8 B (fp32 master + one Muon momentum) per parameter, sharded over dp (dense) and expert-dp
    (experts); the total at least the sum of its terms."""
    gib = 2**30
    for plan in (flash, pro):
        layout, rows = plan["layout"], plan["memory_per_rank"]["full"]
        # Every parameter is on exactly one (pp, tp/ep) shard; the MTP stage keeps its own copy of the
        # shared embedding when the pipeline has more than one stage (Megatron's MTP layout).
        shards = sum(r["params_dense"] * layout["tp"] + r["params_expert"] * layout["ep"] * layout["etp"] for r in rows)
        assert shards == plan["params_with_mtp"] + (plan["params_embedding"] if layout["pp"] > 1 else 0)
        for r in rows:
            params = r["params_dense"] + r["params_expert"]
            assert abs(r["weights_gib"] - 2 * params / gib) < 1e-9 and abs(r["grads_gib"] - 4 * params / gib) < 1e-9
            sharded = r["params_dense"] / layout["dp"] + r["params_expert"] / layout["edp"]
            assert r["optimizer_gib"] >= 8 * sharded / gib, r  # more where fp32 islands / Adam-trained tensors sit
            if plan["optimizer"] == "muon":  # Muon (not Megatron's distributed optimizer): fp32 master
                # weights of every local parameter (4 B, whole) plus a sharded fp32 momentum (4 B)
                assert r["optimizer_gib"] >= (4 * params + 4 * sharded) / gib, r
            floor = r["weights_gib"] + r["grads_gib"] + r["optimizer_gib"] + r["activations_gib"]
            assert floor <= r["total_gib"] < 80e9 / gib, r
        assert plan["fits"], format_plan(plan)


def test_memory_responds_to_layout():
    small = make_plan(compose(["conf=flash_pretrain", "parallel.ep=8", "parallel.world_size=64"]))
    assert not small["fits"]  # 64 GPUs cannot hold Flash's fp32 optimizer state
    no_dist = make_plan(compose(["conf=flash_pretrain", "parallel.distributed_optimizer=false"]))
    flash = make_plan(compose(["conf=flash_pretrain"]))
    assert no_dist["max_rank_memory_gib"] > flash["max_rank_memory_gib"]
    mem = flash["memory_per_rank"]
    worst = {m: max(r["total_gib"] for r in rows) for m, rows in mem.items()}
    assert worst["full"] < worst["selective"] < worst["none"]


def test_tiny_plan_and_write(tmp_path):
    plan = make_plan(compose([]))
    assert plan["params_total"] > plan["params_active"] > 0 and plan["fits"]
    path = write_plan(plan, tmp_path / "plan.json")
    assert json.loads(path.read_text())["params_total"] == plan["params_total"]
    assert "params" in format_plan(plan)


def test_muon_plan_accounts_its_state_and_newton_schulz(flash):
    # The recipes train with Muon (optim/muon_flash): one momentum instead of two moments per matrix.
    adamw = make_plan(compose(["conf=flash_pretrain", "optim=v4_flash"]))
    assert flash["optimizer"] == "muon" and adamw["optimizer"] == "adamw"
    for muon_rank, adamw_rank in zip(flash["memory_per_rank"]["full"], adamw["memory_per_rank"]["full"]):
        assert muon_rank["optimizer_gib"] < adamw_rank["optimizer_gib"]
    # Newton-Schulz is a small fraction of the model's FLOPs at 75.5M tokens per step (measured 0.43%).
    assert 0 < flash["newton_schulz_flops_per_step"] < 0.01 * flash["flops_per_step"]
    assert adamw["newton_schulz_flops_per_step"] == 0 and "Newton-Schulz" in format_plan(flash)


def test_newton_schulz_flops_of_one_matrix():
    # 10 iterations on [64, 256] (or its transpose): X Xᵀ 2*64²*256, its square 2*64³, times X 2*64²*256.
    from dsv4_train.plan.muon import matrix_flops

    expected = 10 * (2 * 64**2 * 256 + 2 * 64**3 + 2 * 64**2 * 256)
    assert matrix_flops(64, 256) == matrix_flops(256, 64) == expected
