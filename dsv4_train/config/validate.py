"""Cross-field checks of a composed config.

Types and unknown keys are already enforced by Hydra's struct mode; this module checks what a
schema cannot: divisibility of the parallel layout, the V4 layer schedule, batch arithmetic, the
LR schedule. `validate()` collects EVERY problem before raising, so one failed launch shows them
all; each problem names the field(s) and the fix.
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Optional

from dsv4_train.config.derive import RECOMPUTE_MODULES, default_layout, parse_layout, stage_settings
from dsv4_train.config.model import ATTENTION_BACKENDS, COMPILE_BACKENDS, SINKHORN_KERNELS
from dsv4_train.model.blocking import context_parallel_halo

PRECISIONS = ("fp32", "bf16")
RECOMPUTE_MODES = ("none", "selective", "full")
DECAY_STYLES = ("constant", "cosine", "linear", "wsd")
WSD_DECAY_STYLES = ("cosine", "linear", "exponential", "minus_sqrt")
OPTIMIZERS = ("adamw", "muon")
NS_DTYPES = ("fp32", "bf16")
INDEXER_PHASES = ("dense", "warmup", "sparse")
NONFINITE_POLICIES = ("skip", "stop")
MAX_SAMPLES = 10**12  # samples per run: the dataset index is built for every one of them
DISPATCHERS = ("auto", "alltoall", "allgather")
DEVICES = ("auto", "cpu", "cuda")
DATA_KINDS = ("embedded", "indexed", "mock")
WANDB_MODES = ("auto", "offline", "online", "disabled")
SCORE_FUNCTIONS = ("sqrtsoftplus", "sigmoid", "softmax")
EXPERT_COMPUTE = ("auto", "grouped", "sequential", "batched")
CHECKPOINT_LOAD_KEYWORDS = ("auto", "none")
CHECKPOINT_VERIFY = ("full", "size", "off")


class ConfigError(ValueError):
    """A config that composes but cannot run; `problems` lists each one."""

    def __init__(self, problems: List[str]):
        self.problems = list(problems)
        n = len(self.problems)
        head = f"invalid configuration ({n} problem{'s' if n != 1 else ''}):"
        super().__init__(head + "".join(f"\n  - {p}" for p in self.problems))


def _one_of(problems, name, value, allowed):
    if value not in allowed:
        problems.append(f"{name}={value!r} is not allowed; use one of {', '.join(map(str, allowed))}.")


def _positive(problems, name, value):
    if value is None or value <= 0:
        problems.append(f"{name}={value} must be a positive integer.")


def check_model(m, problems: List[str]) -> None:
    for name in (
        "vocab_size", "hidden_size", "num_layers", "num_attention_heads", "head_dim",
        "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window", "index_n_heads",
        "index_head_dim", "hc_mult", "hc_sinkhorn_iters", "num_routed_experts",
        "num_experts_per_tok", "moe_intermediate_size",
    ):
        _positive(problems, f"model.{name}", getattr(m, name))
    if m.index_topk <= 0:
        problems.append(f"model.index_topk={m.index_topk} must be > 0 (compressed entries kept per query in CSA).")
    if m.mtp_num_layers < 0 or m.num_shared_experts < 0 or m.num_hash_layers < 0:
        problems.append(
            "model.mtp_num_layers, model.num_shared_experts and model.num_hash_layers must be >= 0 "
            f"(got {m.mtp_num_layers}, {m.num_shared_experts}, {m.num_hash_layers})."
        )
    if m.qk_rope_head_dim % 2 or not (0 < m.qk_rope_head_dim <= m.head_dim):
        problems.append(
            f"model.qk_rope_head_dim={m.qk_rope_head_dim} must be even and in (0, model.head_dim="
            f"{m.head_dim}]; RoPE rotates pairs of the last qk_rope_head_dim dims of each head."
        )
    if m.o_groups > 0 and m.num_attention_heads % m.o_groups:
        problems.append(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by model.o_groups="
            f"{m.o_groups}; each output group must own a whole number of heads."
        )
    expected = m.num_layers + m.mtp_num_layers
    if len(m.compress_ratios) != expected:
        problems.append(
            f"model.compress_ratios has {len(m.compress_ratios)} entries but needs num_layers + "
            f"mtp_num_layers = {m.num_layers} + {m.mtp_num_layers} = {expected} (one per main layer, "
            "then one per MTP layer)."
        )
    bad = sorted({r for r in m.compress_ratios if r < 0})
    if bad:
        problems.append(
            f"model.compress_ratios contains {bad}; use 0 (sliding window only), 4 (CSA) or another "
            "positive ratio (HCA)."
        )
    if m.num_hash_layers > m.num_layers:
        problems.append(
            f"model.num_hash_layers={m.num_hash_layers} exceeds model.num_layers={m.num_layers}."
        )
    if m.num_experts_per_tok > m.num_routed_experts:
        problems.append(
            f"model.num_experts_per_tok={m.num_experts_per_tok} exceeds model.num_routed_experts="
            f"{m.num_routed_experts}."
        )
    if not 0 < m.qk_rope_head_dim <= m.index_head_dim:
        problems.append(
            f"model.index_head_dim={m.index_head_dim} must be >= model.qk_rope_head_dim={m.qk_rope_head_dim} "
            "(RoPE covers the last qk_rope_head_dim channels of each indexer head)."
        )
    if m.score_function != "sqrtsoftplus":
        problems.append(
            f"model.score_function={m.score_function!r}: DeepSeek-V4 routes with sqrt(softplus) scores; set "
            "model.score_function=sqrtsoftplus."
        )
    if not m.norm_topk_prob or m.num_experts_per_tok < 2:
        problems.append(
            f"model.norm_topk_prob={m.norm_topk_prob} and model.num_experts_per_tok={m.num_experts_per_tok}: V4 "
            "normalises the weights of its top-k experts, which needs norm_topk_prob=true and num_experts_per_tok >= 2."
        )
    bad_floats = [name for name in ("indexer_loss_coeff", "routed_scaling_factor", "swiglu_limit",
                                    "expert_bias_update_rate", "seq_aux_loss_coeff", "mtp_loss_weight",
                                    "mtp_loss_weight_after_decay", "rms_norm_eps", "init_std", "hc_eps")
                  if not _finite_non_negative(getattr(m, name, 0.0))]
    if bad_floats:
        problems.append(f"model.{', model.'.join(bad_floats)} must be finite and >= 0.")
    _one_of(problems, "model.indexer_phase", m.indexer_phase, INDEXER_PHASES)
    _one_of(problems, "model.score_function", m.score_function, SCORE_FUNCTIONS)
    _one_of(problems, "model.moe_expert_compute", m.moe_expert_compute, EXPERT_COMPUTE)
    _one_of(problems, "model.attention_backend", m.attention_backend, ATTENTION_BACKENDS)
    _one_of(problems, "model.sinkhorn_kernel", m.sinkhorn_kernel, SINKHORN_KERNELS)
    _one_of(problems, "model.compile_backend", m.compile_backend, COMPILE_BACKENDS)
    if m.attention_block_size < 0:
        problems.append(f"model.attention_block_size={m.attention_block_size} must be >= 0 (0 = automatic).")
    if not (0.0 <= m.mtp_loss_weight and 0.0 <= m.mtp_loss_weight_after_decay):
        problems.append("model.mtp_loss_weight and model.mtp_loss_weight_after_decay must be >= 0.")


def _finite_non_negative(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0)


def check_parallel(cfg, world_size: Optional[int], problems: List[str]) -> None:
    p, m, t = cfg.parallel, cfg.model, cfg.train
    for name in ("tp", "pp", "cp", "ep"):
        _positive(problems, f"parallel.{name}", getattr(p, name))
    if p.etp is not None:
        _positive(problems, "parallel.etp", p.etp)
    if p.vpp is not None:
        _positive(problems, "parallel.vpp", p.vpp)
    if any(getattr(p, n) is None or getattr(p, n) <= 0 for n in ("tp", "pp", "cp", "ep")):
        return  # the arithmetic below would divide by zero
    _one_of(problems, "parallel.moe_dispatcher", p.moe_dispatcher, DISPATCHERS)

    if p.world_size is not None and world_size is not None and p.world_size != world_size:
        problems.append(
            f"parallel.world_size={p.world_size} but the job was launched with {world_size} "
            f"processes; launch {p.world_size} processes or set parallel.world_size={world_size} "
            "(or null) after checking the layout."
        )
    ws = world_size if world_size is not None else p.world_size
    model_ranks = p.tp * p.pp * p.cp
    dp = None
    if ws is not None:
        if ws % model_ranks:
            problems.append(
                f"world size {ws} is not divisible by parallel.tp * parallel.pp * parallel.cp = "
                f"{p.tp}*{p.pp}*{p.cp} = {model_ranks}; change the layout or the number of processes."
            )
        else:
            dp = ws // model_ranks

    for name in ("num_attention_heads", "index_n_heads", "o_groups"):
        value = getattr(m, name)
        if value and value % p.tp:
            problems.append(
                f"model.{name}={value} is not divisible by parallel.tp={p.tp}; pick a tp that divides it."
            )
    if m.num_routed_experts % p.ep:
        problems.append(
            f"model.num_routed_experts={m.num_routed_experts} is not divisible by parallel.ep={p.ep}."
        )
    etp = p.etp if p.etp is not None else p.tp
    if dp is not None and etp > 0 and (p.tp * p.cp * dp) % (p.ep * etp):
        problems.append(
            f"parallel.ep * parallel.etp = {p.ep}*{etp} does not divide tp * cp * dp = "
            f"{p.tp}*{p.cp}*{dp} (Megatron folds experts into the attention tp/cp/dp ranks); "
            "lower ep or etp, or raise dp."
        )
    if p.sp and p.tp == 1:
        problems.append("parallel.sp=true requires parallel.tp > 1; set parallel.sp=false or raise tp.")
    check_tensor_parallel_sizes(cfg, etp, problems)
    if p.vpp is not None and p.vpp > 1 and p.pp == 1:
        problems.append(f"parallel.vpp={p.vpp} requires parallel.pp > 1; set parallel.vpp=null.")
    vpp = p.vpp or 1
    if m.num_layers < p.pp * vpp:
        problems.append(
            f"model.num_layers={m.num_layers} is smaller than parallel.pp * vpp = {p.pp}*{vpp} pipeline stages; "
            "every stage needs at least one layer: lower parallel.pp or parallel.vpp."
        )
    elif p.pipeline_layout:
        found: List[str] = []
        check_layout(p.pipeline_layout, cfg, vpp, found)
        if found:
            example = default_layout(num_layers=m.num_layers, mtp_num_layers=m.mtp_num_layers, pp=p.pp, vpp=vpp)
            found[-1] += (f" A layout that fits this model: parallel.pipeline_layout=\"{example}\" (or null: "
                          "derived the same way).")
        problems.extend(found)
    if dp is not None and t.micro_batch_size > 0 and t.global_batch_size % (t.micro_batch_size * dp):
        problems.append(
            f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size"
            f" * dp = {t.micro_batch_size}*{dp}; pick a multiple of {t.micro_batch_size * dp}."
        )
    elif dp is not None and t.micro_batch_size > 0 and vpp > 1:
        micro_batches = t.global_batch_size // (t.micro_batch_size * dp)
        if micro_batches % p.pp:
            # Megatron's interleaved schedule runs micro-batches in groups of pp per virtual stage.
            problems.append(
                f"parallel.vpp={vpp} (interleaved pipeline) needs the micro-batches per step, "
                f"train.global_batch_size / (train.micro_batch_size * dp) = {t.global_batch_size}/"
                f"({t.micro_batch_size}*{dp}) = {micro_batches}, to be a multiple of parallel.pp={p.pp}; "
                f"raise train.global_batch_size to a multiple of {t.micro_batch_size * dp * p.pp} or set parallel.vpp=null."
            )
    if t.seq_length % p.cp:
        problems.append(f"train.seq_length={t.seq_length} is not divisible by parallel.cp={p.cp}.")
    elif p.cp > 1:
        local = t.seq_length // p.cp
        bad = sorted({r for r in m.compress_ratios if r > 0 and local % r})
        if bad:
            problems.append(
                f"the per-CP-rank sequence train.seq_length / cp = {local} is not divisible by "
                f"compress ratios {bad}; compressed blocks must not straddle CP ranks."
            )
        halo = context_parallel_halo(m.sliding_window, m.compress_ratios)
        if halo > local:
            # The halo comes from the previous CP rank only (parallel/context.py, model/blocking.py).
            problems.append(
                f"the attention reaches {halo} tokens back (model.sliding_window={m.sliding_window}, compression "
                f"blocks of model.compress_ratios), more than one CP rank holds (train.seq_length / parallel.cp = "
                f"{t.seq_length}/{p.cp} = {local}); lower parallel.cp so that every rank holds at least {halo} "
                "tokens, or raise train.seq_length."
            )


def check_tensor_parallel_sizes(cfg, etp: int, problems: List[str]) -> None:
    """Tensor / expert-tensor parallel rules that Megatron-Core would otherwise raise deep inside."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    for name, value in (("vocab_size", m.vocab_size), ("hidden_size", m.hidden_size)):
        # Embedding / output head / MTP are split by vocab rows; MTP e_proj/h_proj by hidden columns.
        if value and value % p.tp:
            problems.append(
                f"model.{name}={value} is not divisible by parallel.tp={p.tp} (the vocab-parallel "
                "embedding and output head split the vocab, MTP's e_proj/h_proj the hidden size); "
                "pick a tp that divides it."
            )
    shared = m.moe_intermediate_size * m.num_shared_experts
    if shared and shared % p.tp:
        problems.append(
            f"the shared expert width model.moe_intermediate_size * num_shared_experts = {shared} is "
            f"not divisible by parallel.tp={p.tp}; pick a tp that divides it."
        )
    if etp > 0 and m.moe_intermediate_size % etp:
        problems.append(
            f"model.moe_intermediate_size={m.moe_intermediate_size} is not divisible by the expert "
            f"tensor-parallel size {etp} (parallel.etp, or parallel.tp when etp is null); set "
            "parallel.etp to a divisor (e.g. parallel.etp=1)."
        )
    if p.tp > 1 and p.cp > 0 and t.seq_length % (p.cp * p.tp):
        # With sp=false the MoE sub-layers still split each rank's sequence over tp (model/moe.py).
        where = "the layers" if p.sp else "every MoE sub-layer (Megatron's MoE is sequence-parallel)"
        problems.append(
            f"parallel.tp={p.tp} splits each CP rank's sequence over the TP ranks in {where}: "
            f"train.seq_length={t.seq_length} must be divisible by parallel.cp * parallel.tp = "
            f"{p.cp}*{p.tp} = {p.cp * p.tp}; change train.seq_length, parallel.tp or parallel.cp."
        )


def check_layout(layout: str, cfg, vpp: int, problems: List[str]) -> None:
    p, m = cfg.parallel, cfg.model
    try:
        stages = parse_layout(layout)
    except ValueError as e:
        problems.append(str(e))
        return
    name = f"parallel.pipeline_layout={layout!r}"
    if len(stages) != p.pp * vpp:
        problems.append(
            f"{name} has {len(stages)} stages but parallel.pp * vpp = {p.pp}*{vpp} = {p.pp * vpp}; "
            "write one '|'-separated stage per (virtual) pipeline stage."
        )
    flat = [k for s in stages for k in s]
    n_dec, n_mtp = flat.count("decoder"), flat.count("mtp")
    if n_dec != m.num_layers or n_mtp != m.mtp_num_layers:
        problems.append(
            f"{name} places {n_dec} decoder layers (t) and {n_mtp} MTP layers (m) but the model has "
            f"model.num_layers={m.num_layers} and model.mtp_num_layers={m.mtp_num_layers}."
        )
    if not flat or flat[0] != "embedding" or flat.count("embedding") != 1:
        problems.append(f"{name} must start with exactly one E (embedding).")
    if not flat or flat[-1] != "loss" or flat.count("loss") != 1:
        problems.append(f"{name} must end with exactly one L (loss).")
    if "mtp" in flat and "decoder" in flat[flat.index("mtp"):]:
        problems.append(f"{name} puts decoder layers after an MTP layer; MTP layers come last.")
    if any("mtp" in s and "loss" not in s for s in stages):
        problems.append(
            f"{name} puts MTP layers (m) on a stage without the loss (L); the MTP block needs the "
            "output layer and the labels of the last stage: write them in the last stage, e.g. '...|t*2,mL'."
        )


def check_recompute_modules(t, problems: List[str]) -> None:
    unknown = [name for name in t.recompute_modules if name not in RECOMPUTE_MODULES]
    if unknown:
        problems.append(
            f"train.recompute_modules has unknown module(s) {unknown}; allowed: {list(RECOMPUTE_MODULES)}."
        )
    if t.recompute_modules and t.recompute != "selective":
        problems.append(
            f"train.recompute_modules={list(t.recompute_modules)} needs train.recompute=selective "
            f"(it is {t.recompute}); set train.recompute=selective or train.recompute_modules=[]."
        )


def check_train(cfg, problems: List[str]) -> None:
    t, o, m = cfg.train, cfg.optim, cfg.model
    for name in ("max_steps", "global_batch_size", "micro_batch_size", "seq_length", "log_interval"):
        _positive(problems, f"train.{name}", getattr(t, name))
    _one_of(problems, "train.precision", t.precision, PRECISIONS)
    _one_of(problems, "train.recompute", t.recompute, RECOMPUTE_MODES)
    check_recompute_modules(t, problems)
    if t.micro_batch_size > 0 and t.global_batch_size > 0 and t.global_batch_size % t.micro_batch_size:
        problems.append(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size={t.micro_batch_size}."
        )
    if t.seq_length > 0:
        # Any length works without CP: trailing tokens that do not fill a block are not compressed
        # (paper §3.4.3); CP needs whole blocks per rank (check_parallel).
        if t.seq_length > m.max_position_embeddings:
            problems.append(
                f"train.seq_length={t.seq_length} exceeds model.max_position_embeddings="
                f"{m.max_position_embeddings}."
            )

    not_finite = [f"optim.{name}={getattr(o, name)}" for name in ("lr", "min_lr", "weight_decay", "adam_beta1",
                                                                "adam_beta2", "adam_eps", "clip_grad")
                  if not math.isfinite(getattr(o, name))]
    if not_finite:
        problems.append(f"{', '.join(not_finite)}: NaN or infinite; give finite values (e.g. optim.clip_grad=1.0; "
                        "0 turns clipping off).")
    if t.max_steps > 0 and t.global_batch_size > 0 and t.max_steps * t.global_batch_size > MAX_SAMPLES:
        problems.append(
            f"train.max_steps={t.max_steps} x train.global_batch_size={t.global_batch_size} = "
            f"{t.max_steps * t.global_batch_size:.3g} samples is beyond any dataset index (at most {MAX_SAMPLES:.0e}); "
            "lower train.max_steps."
        )
    _one_of(problems, "optim.optimizer", o.optimizer, OPTIMIZERS)
    _one_of(problems, "optim.muon_ns_dtype", o.muon_ns_dtype, NS_DTYPES)
    if not (math.isfinite(o.muon_momentum) and 0.0 <= o.muon_momentum < 1.0):
        problems.append(f"optim.muon_momentum={o.muon_momentum} must be in [0, 1).")
    _one_of(problems, "optim.decay_style", o.decay_style, DECAY_STYLES)
    _one_of(problems, "optim.wsd_decay_style", o.wsd_decay_style, WSD_DECAY_STYLES)
    if o.lr <= 0 or o.min_lr < 0:
        problems.append(f"optim.lr={o.lr} must be > 0 and optim.min_lr={o.min_lr} >= 0.")
    if o.lr < o.min_lr:
        problems.append(f"optim.lr={o.lr} is below optim.min_lr={o.min_lr}; lower min_lr or raise lr.")
    if o.warmup_steps < 0 or o.warmup_steps > t.max_steps:
        problems.append(
            f"optim.warmup_steps={o.warmup_steps} must be in [0, train.max_steps={t.max_steps}]."
        )
    if o.decay_steps is not None and o.decay_steps < 0:
        problems.append(f"optim.decay_steps={o.decay_steps} must be >= 0 or null.")
    if o.decay_style == "wsd" and o.wsd_decay_steps is not None:
        decay = o.decay_steps if o.decay_steps is not None else t.max_steps - o.warmup_steps
        if not (0 <= o.wsd_decay_steps <= decay):
            problems.append(
                f"optim.wsd_decay_steps={o.wsd_decay_steps} must be in [0, decay steps={decay}] "
                "(decay steps = optim.decay_steps or train.max_steps - optim.warmup_steps)."
            )
    if not (0.0 <= o.adam_beta1 < 1.0 and 0.0 <= o.adam_beta2 < 1.0):
        problems.append(f"optim.adam_beta1={o.adam_beta1} and optim.adam_beta2={o.adam_beta2} must be in [0, 1).")
    if o.adam_eps <= 0 or o.clip_grad < 0 or o.weight_decay < 0:
        problems.append("optim.adam_eps must be > 0, optim.clip_grad and optim.weight_decay >= 0.")


def check_io(cfg, problems: List[str]) -> None:
    d, c, r, lg = cfg.data, cfg.checkpoint, cfg.run, cfg.logging
    _one_of(problems, "run.device", r.device, DEVICES)
    _one_of(problems, "data.kind", d.kind, DATA_KINDS)
    _one_of(problems, "logging.wandb_mode", lg.wandb_mode, WANDB_MODES)
    if d.kind == "indexed" and not d.paths and not r.plan_only:  # a plan needs no data
        problems.append(
            "data.kind=indexed needs data.paths (prefixes of .bin/.idx files made by "
            "dsv4-preprocess), e.g. data.paths='[/data/corpus_text_document]'."
        )
    if d.document_mask and d.kind == "mock":
        problems.append("data.document_mask=true needs documents with EOD tokens; data.kind=mock has none (use embedded or indexed data).")
    t = cfg.train
    _one_of(problems, "train.on_nonfinite", t.on_nonfinite, NONFINITE_POLICIES)
    if t.max_skipped_steps < 0:
        problems.append(f"train.max_skipped_steps={t.max_skipped_steps} must be >= 0.")
    if not (math.isfinite(t.spike_factor) and t.spike_factor >= 0):
        problems.append(f"train.spike_factor={t.spike_factor} must be >= 0 (0 = no spike detection).")
    bad_skips = [s for s in t.skip_steps if not 1 <= s <= t.max_steps]
    if bad_skips:
        problems.append(f"train.skip_steps has {bad_skips} outside [1, train.max_steps={t.max_steps}].")
    if t.profile_steps and (len(t.profile_steps) != 2 or not 1 <= t.profile_steps[0] <= t.profile_steps[1]):
        problems.append(
            f"train.profile_steps={list(t.profile_steps)} must be [first, last] with 1 <= first <= last "
            "(steps to trace), or [] for no profiling."
        )
    if not r.dist_timeout_minutes > 0:
        problems.append(f"run.dist_timeout_minutes={r.dist_timeout_minutes} must be > 0.")
    if cfg.parallel.ddp_bucket_size is not None and cfg.parallel.ddp_bucket_size <= 0:
        problems.append(f"parallel.ddp_bucket_size={cfg.parallel.ddp_bucket_size} must be > 0 (parameters per bucket) or null.")
    if r.peak_tflops is not None and not r.peak_tflops > 0:
        problems.append(f"run.peak_tflops={r.peak_tflops} must be > 0 (TFLOP/s of one accelerator) or null.")
    if t.eval_interval < 0 or t.eval_iters < 0:
        problems.append(
            f"train.eval_interval={t.eval_interval} and train.eval_iters={t.eval_iters} must be >= 0 "
            "(eval_iters 0 = no validation; eval_interval 0 = only at the end)."
        )
    elif t.eval_iters > 0 and d.kind != "mock" and _valid_weight(d.split) == 0:
        problems.append(
            f"train.eval_iters={t.eval_iters} needs a validation split, but data.split={d.split!r} gives it no "
            "weight; use e.g. data.split=98,2,0 or train.eval_iters=0."
        )
    if d.num_workers < 0:
        problems.append(f"data.num_workers={d.num_workers} must be >= 0.")
    if c.save_interval < 0 or c.keep_last < 1:
        problems.append(
            f"checkpoint.save_interval={c.save_interval} must be >= 0 and checkpoint.keep_last="
            f"{c.keep_last} >= 1."
        )
    _one_of(problems, "checkpoint.verify", c.verify, CHECKPOINT_VERIFY)
    check_objective(cfg, problems)
    if not c.load or not c.load.strip():
        problems.append("checkpoint.load is empty; use auto, none or a checkpoint directory.")
    if not r.dir:
        problems.append("run.dir is empty; give the run an output directory.")
    if cfg.model.attention_backend == "flex" and not r.plan_only and not _cuda_training(r.device):
        problems.append(
            "model.attention_backend=flex needs CUDA to train (torch has no FlexAttention backward on "
            "CPU); use model.attention_backend=auto (blockwise on CPU: exact, linear memory) or blockwise."
        )


# Top-level keys a stage overrides, and the stage field each becomes.
_STAGE_FIELDS = {"train.seq_length": "seq_length", "train.global_batch_size": "global_batch_size",
                 "model.indexer_phase": "indexer_phase"}


def check_stages(cfg, world_size: Optional[int], problems: List[str]) -> None:
    """train.stages: ordered, known phases, and every stage's shape under the same rules as the
    top-level keys (each rule stays in its check_* function; a stage is checked as the config it runs)."""
    stages = list(cfg.train.stages or [])
    if not stages:
        return
    found: List[str] = []
    for i, stage in enumerate(stages):
        where = f"train.stages[{i}]"
        if stage.start_step < 0:
            found.append(f"{where}.start_step={stage.start_step} must be >= 0 (optimizer steps before the stage begins).")
        if i and stage.start_step <= stages[i - 1].start_step:
            found.append(
                f"{where}.start_step={stage.start_step} does not come after train.stages[{i - 1}].start_step="
                f"{stages[i - 1].start_step}; list the stages by increasing start_step, one stage per start."
            )
        if stage.indexer_phase is not None:
            _one_of(found, f"{where}.indexer_phase", stage.indexer_phase, INDEXER_PHASES)
        for name in ("seq_length", "global_batch_size"):
            value = getattr(stage, name)
            if value is not None and value <= 0:
                found.append(f"{where}.{name}={value} must be a positive integer (or null: keep the previous stage's).")
    problems.extend(found)
    if found:
        return
    top_level = set(problems)
    for source, start, seq, gbs, phase in stage_settings(cfg):
        if source is None:
            continue
        view = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, seq_length=seq, global_batch_size=gbs, stages=[]),
            model=dataclasses.replace(cfg.model, indexer_phase=phase),
        )
        stage_problems: List[str] = []
        check_parallel(view, world_size, stage_problems)
        check_train(view, stage_problems)
        for problem in stage_problems:
            if problem in top_level:
                continue  # the same rule on the same value: already reported for the top-level keys
            for key, name in _STAGE_FIELDS.items():
                problem = problem.replace(f"{key}=", f"train.stages[{source}].{name}=")
            problems.append(f"train.stages[{source}] (from step {start + 1}): {problem}")


def check_objective(cfg, problems: List[str]) -> None:
    """run.objective names a metric this run produces (train/objective.py)."""
    from dsv4_train.train.objective import EVAL_METRICS, PER_STEP_METRICS

    o = cfg.run.objective
    _one_of(problems, "run.objective.metric", o.metric, ("auto",) + PER_STEP_METRICS + EVAL_METRICS)
    _one_of(problems, "run.objective.direction", o.direction, ("minimize", "maximize"))
    if o.metric in EVAL_METRICS and cfg.train.eval_iters <= 0:
        problems.append(
            f"run.objective.metric={o.metric} needs evaluation, but train.eval_iters=0 never evaluates; set "
            "train.eval_iters (e.g. 4) or use run.objective.metric=auto (lm_loss without evaluation)."
        )
    if o.last_n < 1:
        problems.append(f"run.objective.last_n={o.last_n} must be >= 1 (steps averaged for a per-step metric).")


def _valid_weight(split: str) -> float:
    try:
        parts = [float(w) for w in str(split).replace("/", ",").split(",")]
    except ValueError:
        return 1.0  # malformed: the data builder names the problem
    return parts[1] if len(parts) > 1 else 0.0


def _cuda_training(device: str) -> bool:
    if device == "cpu":
        return False
    import torch  # only when a run is about to start (plans stay torch-free)

    return torch.cuda.is_available()


def validate(cfg, *, world_size: Optional[int] = None) -> None:
    """Raise ConfigError listing every problem of `cfg` (a typed Config); return None if sound.

    world_size: the number of launched processes; None checks the layout against
    cfg.parallel.world_size if set, and skips the world-size rules otherwise.
    """
    problems: List[str] = []
    check_model(cfg.model, problems)
    check_parallel(cfg, world_size, problems)
    check_train(cfg, problems)
    check_io(cfg, problems)
    check_stages(cfg, world_size, problems)
    if problems:
        raise ConfigError(problems)
