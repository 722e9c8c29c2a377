"""A run plan without hardware: parameter counts, FLOPs per token and per-GPU memory of the
configured model and parallel layout, from arithmetic alone (no model is built, no torch import).

    plan = make_plan(cfg, world_size=64); print_plan(plan); write_plan(plan, "run/plan.json")
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from dsv4_train.config.derive import derive
from dsv4_train.config.validate import RECOMPUTE_MODES, validate
from dsv4_train.plan.flops import flops_per_token
from dsv4_train.plan.muon import newton_schulz_flops
from dsv4_train.plan.memory import GIB, plan_backend, rank_memory
from dsv4_train.plan.params import count_params

GPU_MEMORY_GIB = 80 * 1000**3 / GIB  # an "80 GB" GPU (H100/A100), in GiB


def make_plan(
    cfg,
    *,
    world_size: Optional[int] = None,
    recompute: Optional[str] = None,
    gpu_memory_gib: float = GPU_MEMORY_GIB,
) -> dict:
    """Validate `cfg` for `world_size` (None: cfg.parallel.world_size, else 1) and compute the plan.

    Returns a JSON-serialisable dict: model/layout summary, params_total (main model without MTP),
    params_active (main model, per token: embedding + head + everything but the unused routed
    experts), params_mtp, params_with_mtp, flops_per_token (+ breakdown, Megatron-Bridge
    conventions, MTP included), memory per pipeline rank for each recompute mode, and whether the
    worst rank fits `gpu_memory_gib` under `recompute`.
    """
    recompute = recompute or cfg.train.recompute
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute={recompute!r}; use one of {RECOMPUTE_MODES}")
    if world_size is None:
        world_size = cfg.parallel.world_size or 1
    # A plan reads no data: check the config as run.plan_only=true would run it.
    validate(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, plan_only=True)), world_size=world_size)
    d = derive(cfg, world_size=world_size)
    m, p, t = cfg.model, cfg.parallel, cfg.train
    params = count_params(m)
    k = m.num_experts_per_tok
    flops = flops_per_token(m, seq_length=t.seq_length, tp=p.tp)
    memory = {mode: rank_memory(cfg, d, recompute=mode) for mode in RECOMPUTE_MODES}
    stages = [_stage_plan(cfg, stage, world_size, recompute, gpu_memory_gib) for stage in d.train_stages]
    worst = max(r["total_gib"] for r in memory[recompute])
    dense_attention = any(
        plan_backend(m, ratio=r, seq_length=t.seq_length // p.cp, micro_batch=t.micro_batch_size, tp=p.tp) == "dense"
        for r in set(m.compress_ratios)
    )
    return {
        "model": m.name,
        "layout": {
            "world_size": world_size,
            "tp": p.tp, "pp": p.pp, "vpp": d.vpp, "cp": p.cp, "dp": d.dp,
            "ep": d.ep, "etp": d.etp, "edp": d.edp, "sp": p.sp,
            "distributed_optimizer": p.distributed_optimizer,
            "pipeline_layout": d.layout_str,
            "stages": [
                {"pp_rank": s.pp_rank, "vpp_stage": s.vpp_stage, "decoder_layers": s.decoder_layers,
                 "mtp_layers": s.mtp_layers, "hash_layers": s.hash_layers,
                 "embedding": s.has_embedding, "loss": s.has_loss}
                for s in d.stages
            ],
        },
        "batch": {
            "seq_length": t.seq_length,
            "micro_batch_size": t.micro_batch_size,
            "global_batch_size": t.global_batch_size,
            "num_microbatches": d.num_microbatches,
            "tokens_per_step": d.tokens_per_step,
            "precision": t.precision,
        },
        "schedule": {"decay_start_step": d.decay_start_step, "decay_end_step": d.decay_end_step},
        "params_total": params.main_total,
        "params_active": params.main_active(k),
        "params_mtp": params.mtp_total,
        "params_with_mtp": params.main_total + params.mtp_total,
        "params_embedding": params.embedding,
        "params_output_layer": params.output_layer,
        "flops_per_token": flops["total"],
        "flops_per_token_without_mtp": flops["total_without_mtp"],
        "flops_breakdown": {k_: v for k_, v in flops.items() if not k_.startswith("total")},
        "flops_per_step": flops["total"] * d.tokens_per_step,
        "optimizer": cfg.optim.optimizer,
        "newton_schulz_flops_per_step": newton_schulz_flops(m) if cfg.optim.optimizer == "muon" else 0.0,
        "memory_assumptions": (
            f"{t.precision} weights, fp32 main grads, "
            + _optimizer_state_words(cfg)
            + ("; dense attention (keeps [H, s, s+N] fp32 scores)" if dense_attention
               else "; blockwise/flex attention (linear in s, one query block's scores at a time)")
            + "; 1F1B in-flight micro-batches; 5 GiB overhead"
        ),
        "memory_per_rank": memory,
        "recompute": recompute,
        "gpu_memory_gib": gpu_memory_gib,
        "max_rank_memory_gib": worst,
        "train_stages": stages,
        "fits": worst <= gpu_memory_gib and all(st["fits"] for st in stages),
    }


def stage_config(cfg, stage, **parallel):
    """`cfg` as it runs during `stage` (its sequence length, batch and indexer phase), optionally
    with other parallel sizes."""
    return dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, seq_length=stage.seq_length, global_batch_size=stage.global_batch_size,
                                  stages=[]),
        model=dataclasses.replace(cfg.model, indexer_phase=stage.indexer_phase),
        parallel=dataclasses.replace(cfg.parallel, **parallel),
    )


def _worst_rank_gib(cfg, world_size: int, recompute: str) -> float:
    return max(r["total_gib"] for r in rank_memory(cfg, derive(cfg, world_size=world_size), recompute=recompute))


def _stage_plan(cfg, stage, world_size: int, recompute: str, gpu_memory_gib: float) -> dict:
    view = stage_config(cfg, stage)
    worst = {mode: _worst_rank_gib(view, world_size, mode) for mode in RECOMPUTE_MODES}
    row = {
        "stage": stage.number, "name": stage.name, "first_step": stage.first_step, "last_step": stage.last_step,
        "seq_length": stage.seq_length, "global_batch_size": stage.global_batch_size,
        "indexer_phase": stage.indexer_phase, "tokens_per_step": stage.seq_length * stage.global_batch_size,
        "max_rank_memory_gib": worst[recompute], "max_rank_memory_gib_by_recompute": worst,
        "fits": worst[recompute] <= gpu_memory_gib,
    }
    if not row["fits"]:
        row["fix"] = _stage_fix(cfg, stage, world_size, recompute, gpu_memory_gib, worst)
    return row


def _stage_fix(cfg, stage, world_size: int, recompute: str, gpu_memory_gib: float, worst: dict) -> str:
    """The cheapest change that makes `stage` fit: full recompute, else a larger context-parallel size
    (same world size: CP takes ranks from DP), else more GPUs."""
    fixes = []
    if recompute != "full" and worst["full"] <= gpu_memory_gib:
        fixes.append(f"train.recompute=full ({worst['full']:.1f} GiB)")
    p = cfg.parallel
    cp = p.cp * 2
    while p.tp * p.pp * cp <= world_size:
        candidate = stage_config(cfg, stage, cp=cp)
        try:
            validate(dataclasses.replace(candidate, run=dataclasses.replace(cfg.run, plan_only=True)),
                     world_size=world_size)
        except ValueError:
            cp *= 2
            continue
        need = _worst_rank_gib(candidate, world_size, recompute)
        if need <= gpu_memory_gib:
            fixes.append(f"parallel.cp={cp} ({need:.1f} GiB; CP ranks come from data parallelism)")
            break
        cp *= 2
    if not fixes:
        fixes.append("more GPUs (a larger parallel.world_size with larger parallel.cp or parallel.ep)")
    return " or ".join(fixes)


def refusal(plan: dict) -> Optional[str]:
    """The message that refuses a plan whose stage does not fit, naming the stage and the fix."""
    bad = [st for st in plan["train_stages"] if not st["fits"]]
    if not bad:
        return None
    lines = [
        f"{st['name']} with seq_length {st['seq_length']} and indexer {st['indexer_phase']} needs "
        f"{st['max_rank_memory_gib']:.1f} GiB on its worst rank with train.recompute={plan['recompute']}, more than "
        f"the {plan['gpu_memory_gib']:.1f} GiB of a GPU; fix: {st['fix']}."
        for st in bad
    ]
    return "the plan does not fit: " + " ".join(lines)


def _b(n: float) -> str:
    """Human scale: 1.234T, 12.34B (G for FLOPs reads the same), 0.51M."""
    return f"{n / 1e12:.3f}T" if n >= 1e12 else f"{n / 1e9:.2f}G" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _optimizer_state_words(cfg) -> str:
    p, bf16 = cfg.parallel, cfg.train.precision == "bf16"
    if cfg.optim.optimizer == "muon":
        return (("fp32 master (whole) + " if bf16 else "") + "Muon momentum / Adam moments (head, embedding)"
                + (" sharded by whole parameters over dp*cp (dense) / expert-dp (experts)"
                   if p.distributed_optimizer else " replicated"))
    return (("fp32 master + Adam moments" if bf16 else "fp32 Adam moments")
            + (" sharded by the distributed optimizer over dp*cp (dense) / expert-dp (experts)"
               if p.distributed_optimizer else " replicated (no distributed optimizer)"))


def format_plan(plan: dict) -> str:
    lay, bat = plan["layout"], plan["batch"]
    lines = [
        f"plan: model={plan['model']}  world={lay['world_size']}  tp={lay['tp']} pp={lay['pp']} "
        f"vpp={lay['vpp']} cp={lay['cp']} dp={lay['dp']} ep={lay['ep']} etp={lay['etp']} "
        f"edp={lay['edp']} sp={lay['sp']}",
        f"  pipeline layout   {lay['pipeline_layout']}",
        f"  batch             seq {bat['seq_length']} x micro {bat['micro_batch_size']} x "
        f"{bat['num_microbatches']} micro-batches x dp = {bat['global_batch_size']} seqs "
        f"({bat['tokens_per_step'] / 1e6:.2f}M tokens/step), {bat['precision']}",
        f"  params            total {_b(plan['params_total'])} (without MTP)  active "
        f"{_b(plan['params_active'])}  MTP {_b(plan['params_mtp'])}  with MTP "
        f"{_b(plan['params_with_mtp'])}",
        f"  model FLOPs/token {_b(plan['flops_per_token'])}FLOP (with MTP; "
        f"{_b(plan['flops_per_token_without_mtp'])}FLOP without; Megatron-Bridge convention)",
        *([f"  Newton-Schulz     {_b(plan['newton_schulz_flops_per_step'])}FLOP/step "
           f"({plan['newton_schulz_flops_per_step'] / plan['flops_per_step']:.2%} of the model's)"]
          if plan["optimizer"] == "muon" else []),
        f"  memory per GPU (GiB), recompute={plan['recompute']}; {plan['memory_assumptions']}",
        "    pp_rank   dense     experts   weights  grads   optim   activ   total",
    ]
    for r in plan["memory_per_rank"][plan["recompute"]]:
        lines.append(
            f"    {r['pp_rank']:>7}   {_b(r['params_dense']):>8}  {_b(r['params_expert']):>8}  "
            f"{r['weights_gib']:7.1f} {r['grads_gib']:7.1f} {r['optimizer_gib']:7.1f} "
            f"{r['activations_gib']:7.1f} {r['total_gib']:7.1f}"
        )
    worst = {mode: max(r["total_gib"] for r in rows) for mode, rows in plan["memory_per_rank"].items()}
    lines.append(
        "  worst rank by recompute mode: "
        + ", ".join(f"{mode} {gib:.1f}" for mode, gib in worst.items())
        + f" GiB; limit {plan['gpu_memory_gib']:.1f} GiB -> "
        + ("FITS" if plan["fits"] else "DOES NOT FIT")
    )
    if len(plan["train_stages"]) > 1:
        lines.append("  stages (worst rank GiB by recompute mode)")
        for st in plan["train_stages"]:
            by_mode = ", ".join(f"{mode} {gib:.1f}" for mode, gib in st["max_rank_memory_gib_by_recompute"].items())
            lines.append(
                f"    {st['stage']}: steps {st['first_step']}-{st['last_step']}  seq {st['seq_length']} x "
                f"{st['global_batch_size']} ({st['tokens_per_step'] / 1e6:.2f}M tokens/step), indexer "
                f"{st['indexer_phase']}: {by_mode} -> " + ("fits" if st["fits"] else "DOES NOT FIT")
            )
    return "\n".join(lines)


def print_plan(plan: dict) -> None:
    print(format_plan(plan))


def write_plan(plan: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan, indent=2) + "\n")
    return path
