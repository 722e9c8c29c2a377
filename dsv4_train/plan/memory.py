"""Per-GPU memory estimate of a parallel layout (pure arithmetic, Megatron conventions).

Static memory (Megatron `theoretical_memory_usage`): bf16 training keeps bf16 weights (2 B/param),
fp32 main grads (4 B) and fp32 master weights + two Adam moments (12 B); fp32 training keeps fp32
weights (4 B), fp32 grads (4 B) and two moments (8 B). The distributed optimizer shards the
optimizer part over the data-parallel ranks that hold a replica: dp * cp for dense parameters,
expert-DP for routed experts. Dense parameters are split by TP, routed experts by EP * ETP, layers
by the pipeline layout. With Muon (train/muon.py): one fp32 momentum (4 B) for every matrix, Adam's
two moments (8 B) for the embedding and head, sharded by whole parameters over the same ranks; the
fp32 master weights of bf16 (4 B) are not sharded (Megatron's Float16 optimizer keeps them whole).
Norms and mHC scalars (<0.01% of the parameters) are counted as matrices.

Activations (bytes per micro-batch, per rank) are an estimate of the tensors autograd keeps for a
V4 block, per token: the mHC residual streams (n_hc * d) and collapsed inputs of both sub-layers;
what the attention sub-layer keeps with the configured backend (`attention_kept_per_token`: linear
in the sequence for blockwise/flex, plus the [H, T, T+N] probabilities for dense); the router logits
and, per routed copy, the dispatched input, fc1 output and SwiGLU output. On top, once per rank, the
largest attention backward working set (`attention_working_bytes`: the core's gradient buffers and
one query block's scores). One attention layer's estimate is checked against the measured
allocation peak in tests/plan. MoE/mHC parts are divided by TP when sequence parallel is on and
everything by CP. Recompute
modes: "none"; "selective" drops what model/recompute.py's modules drop (`mhc`: the norm outputs,
mixed streams and Sinkhorn matrices; `moe_act`: the routed experts' SwiGLU output); "full" keeps
only each block's input streams. bench/bench_recompute_memory.py compares with measured peaks. Pipeline rank r holds
min(pp - r, num_microbatches) micro-batches in flight (1F1B), times 1 + (pp-1)/(pp*vpp) when
interleaved. A fixed allowance covers the CUDA context, NCCL buffers and fragmentation.
"""

from __future__ import annotations

from dsv4_train.config.model import CSA_RATIO
from dsv4_train.model.blocking import (
    attention_block_elements,
    auto_runs_dense,
    block_shapes,
    indexer_block_elements,
    query_block,
)
from dsv4_train.config.derive import RECOMPUTE_MODULES, selected_modules
from dsv4_train.plan.params import count_params

GIB = 1024**3
OVERHEAD_BYTES = 5 * GIB  # CUDA context + NCCL + allocator fragmentation (assumption)
WORKING_COPIES = 6  # score-sized tensors alive at once in a block's backward (measured: scores, probs, dP, dS, temporaries)
INDEXER_WORKING_COPIES = 3  # per-head index scores, their ReLU and its gradient


def bytes_per_param(precision: str) -> dict:
    if precision == "bf16":
        return {"weights": 2, "grads": 4, "optimizer": 12}
    return {"weights": 4, "grads": 4, "optimizer": 8}


def plan_backend(m, *, ratio: int, seq_length: int, micro_batch: int, tp: int) -> str:
    """The attention backend a GPU run of `m` uses for a layer of compression `ratio` ("auto" =
    dense when one query block covers the sequence, `model/blocking.py::auto_runs_dense`, the rule
    the model applies; else flex on CUDA). Flex keeps what the blockwise path keeps (q, keys,
    output, log-sum-exp; CSA's sparse phase is the same gather path)."""
    if m.attention_backend == "dense" or (m.attention_backend == "auto" and auto_runs_dense(
        m, ratio=ratio, seq_len=seq_length, batch=micro_batch, tp=tp, phase=m.indexer_phase
    )):
        return "dense"
    return "blockwise"


def sinkhorn_kept_per_token(m) -> float:
    """Values one mHC's Sinkhorn projection keeps per token (model/sinkhorn.py `_SinkhornComb`: the
    softmax and each of the 2 * iters - 1 normalised [n, n] matrices and their [n] sums)."""
    n = m.hc_mult
    return n * n + (2 * m.hc_sinkhorn_iters - 1) * (n * n + n)


def activation_elements_per_token(
    m, *, ratio: int, tp: int, sp: bool, recompute: str, seq_length: int, act_bytes: int, modules=RECOMPUTE_MODULES,
    micro_batch: int = 1,
) -> float:
    """Elements kept per token by one block for backward, on one TP rank.

    Attention: `attention_kept_per_token` (the sub-layer works on the whole sequence, gathered
    under SP; head-split parts divided by TP). MoE and mHC: token copies per routed expert, the
    streams and norm outputs (sequence-split under SP).
    """
    d, n = m.hidden_size, m.hc_mult
    streams = 2 * n * d  # mHC input streams of both sub-layers
    if recompute == "full":
        return n * d / (tp if sp else 1)
    modules = modules if recompute == "selective" else ()
    # Sequence-split parts (replicated over TP unless sequence parallel).
    seq_parts = streams + 2 * d + 2 * d  # collapsed sub-layer inputs; outputs (the expansion's post * f keeps them)
    if "mhc" not in modules:  # model/recompute.py drops these with `mhc`
        seq_parts += 2 * d + 2 * n * d + 2 * sinkhorn_kept_per_token(m)  # RMSNorm outputs, mixed streams, Sinkhorn
    seq_parts += 2 * m.num_routed_experts  # fp32 router logits
    k = m.num_experts_per_tok
    f = m.moe_intermediate_size
    routed_act = 0 if "moe_act" in modules else f  # the SwiGLU output fc2 keeps
    moe = k * (d + 2 * f + routed_act) + m.num_shared_experts * (d + 3 * f)  # the shared expert: no recompute
    seq_parts += moe  # expert inputs are token copies; EP moves them, it does not shrink them
    attention = attention_kept_per_token(
        m, ratio=ratio, tp=tp, seq_length=seq_length, act_bytes=act_bytes,
        backend=plan_backend(m, ratio=ratio, seq_length=seq_length, micro_batch=micro_batch, tp=tp),
    )
    return seq_parts / (tp if sp else 1) + attention


def rank_memory(cfg, derived, *, recompute: str = "selective") -> list:
    """Per pipeline rank: dict of parameter counts and bytes (weights, grads, optimizer,
    activations, overhead, total). Selective: the modules of `train.recompute_modules` ([] = all)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    params = count_params(m)
    bpp = bytes_per_param(t.precision)
    muon = cfg.optim.optimizer == "muon"
    act_bytes = 2 if t.precision == "bf16" else 4
    dense_shard = derived.dp * p.cp if p.distributed_optimizer else 1
    expert_shard = derived.edp if p.distributed_optimizer else 1
    tokens = t.micro_batch_size * t.seq_length / p.cp
    seq_local = t.seq_length // p.cp  # each CP rank's queries (keys: its halo + the gathered entries)
    modules = selected_modules("selective", t.recompute_modules)
    per_token = dict(tp=p.tp, sp=p.sp, recompute=recompute, seq_length=seq_local, act_bytes=act_bytes, modules=modules,
                     micro_batch=t.micro_batch_size)
    vpp = derived.vpp
    interleave = 1 + (p.pp - 1) / (p.pp * vpp) if vpp > 1 else 1.0
    ratios = m.compress_ratios
    out = []
    for rank in range(p.pp):
        dense = expert = adamw = 0.0  # adamw: embedding and head (part of dense)
        act_per_mb = 0.0
        for st in derived.stages_of_rank(rank):
            for i in st.decoder_layers:
                b = params.blocks[i]
                dense += b.dense / p.tp
                expert += b.routed_experts / (p.ep * derived.etp)
                act_per_mb += tokens * activation_elements_per_token(m, ratio=ratios[i], **per_token)
            for j in st.mtp_layers:
                b = params.mtp_blocks[j]
                dense += (b.dense + params.mtp_extra) / p.tp
                expert += b.routed_experts / (p.ep * derived.etp)
                act_per_mb += tokens * activation_elements_per_token(m, ratio=ratios[m.num_layers + j], **per_token)
            if st.has_embedding:
                dense += params.embedding / p.tp
                adamw += params.embedding / p.tp
            if st.mtp_layers and not st.has_embedding:
                dense += params.embedding / p.tp  # MTP's copy of the shared embedding
                adamw += params.embedding / p.tp
            if st.has_loss:
                dense += (params.output_layer + params.final) / p.tp
                adamw += params.output_layer / p.tp
        in_flight = min(p.pp - rank, derived.num_microbatches) * interleave
        activations = act_per_mb * act_bytes * in_flight
        layer_ratios = [ratios[i] for st in derived.stages_of_rank(rank) for i in st.decoder_layers]
        layer_ratios += [ratios[m.num_layers + j] for st in derived.stages_of_rank(rank) for j in st.mtp_layers]
        if recompute == "full" and layer_ratios:  # one block re-materialised at a time
            activations += max(
                tokens * activation_elements_per_token(m, ratio=r, **{**per_token, "recompute": "none"})
                for r in set(layer_ratios)
            ) * act_bytes
        if layer_ratios:  # the largest attention backward working set, one layer at a time
            activations += max(
                attention_working_bytes(
                    m, ratio=r, tp=p.tp, seq_length=seq_local, micro_batch=t.micro_batch_size,
                    backend=plan_backend(m, ratio=r, seq_length=seq_local, micro_batch=t.micro_batch_size, tp=p.tp),
                )
                for r in set(layer_ratios)
            )
        if any(st.has_loss for st in derived.stages_of_rank(rank)):
            vocab = m.vocab_size / p.tp
            activations += tokens * vocab * 4 * (1 + m.mtp_num_layers)  # fp32 logits
        weights = (dense + expert) * bpp["weights"]
        grads = (dense + expert) * bpp["grads"]
        if muon:
            master = (dense + expert) * (4 if t.precision == "bf16" else 0)
            optimizer = master + ((dense + adamw) / dense_shard + expert / expert_shard) * 4  # momentum; Adam's 2nd moment
        else:
            optimizer = (dense / dense_shard + expert / expert_shard) * bpp["optimizer"]
        total = weights + grads + optimizer + activations + OVERHEAD_BYTES
        out.append(
            {
                "pp_rank": rank,
                "params_dense": int(dense),
                "params_expert": int(expert),
                "weights_gib": weights / GIB,
                "grads_gib": grads / GIB,
                "optimizer_gib": optimizer / GIB,
                "activations_gib": activations / GIB,
                "overhead_gib": OVERHEAD_BYTES / GIB,
                "total_gib": total / GIB,
            }
        )
    return out


def attention_kept_per_token(m, *, ratio: int, tp: int, backend: str, seq_length: int, act_bytes: int) -> float:
    """Elements (of act_bytes each) one attention sub-layer keeps for backward per token on one TP rank.

    Mirrors what model/attention.py keeps: the q path (q_a, q_norm, up-projection, per-head norm,
    RoPE, the core's q and output, the grouped output), the shared KV, the compressors' block values
    and gates, the indexer's compressor and the CSA top-k indices (int32); with the dense backend
    also the [H, T, T + N] fp32 probabilities (quadratic in the sequence length).
    """
    heads, c, r = m.num_attention_heads / tp, m.head_dim, m.qk_rope_head_dim
    kept = 4 * heads * c + 2 * m.q_lora_rank + 5 * c + m.o_groups * m.o_lora_rank / tp + 6 * r + 2 * heads + 2
    if ratio > 0:
        overlap = 2 if ratio == CSA_RATIO else 1
        kept += 2 * overlap * c + 3 * c / ratio  # block values + gate logits, entries
    if ratio == CSA_RATIO and m.indexer_phase != "dense":
        kept += 4 * m.index_head_dim + 3 * m.index_head_dim / ratio
        if m.indexer_phase == "sparse":
            kept += m.index_topk * 4 / act_bytes  # int32 indices
    if backend == "dense":
        keys = seq_length + (seq_length // ratio if ratio else 0)
        kept += heads * keys * 4 / act_bytes
    return kept


def attention_working_bytes(m, *, ratio: int, tp: int, backend: str, seq_length: int, micro_batch: int) -> float:
    """Transient bytes of one attention sub-layer's backward (freed when it ends): the gradients the
    core produces beyond the inputs already freed (measured: half of one fp32 [H, T, c] tensor at the
    peak) plus the largest block working set (scores, probabilities and their gradients, gathered
    entries) of the core or of the indexer; dense: 3 score-sized tensors."""
    heads, c = m.num_attention_heads / tp, m.head_dim
    b, t = micro_batch, seq_length
    grads = 2 * b * t * heads * c
    if backend == "dense":
        keys = t + (t // ratio if ratio else 0)
        return grads + 3 * 4 * b * heads * t * (keys + 1)
    shape, indexer = block_shapes(m, ratio=ratio, seq_len=t, batch=b, tp=tp, phase=m.indexer_phase)
    block = min(t, query_block(shape, attention_block_elements, m.attention_block_size))
    working = WORKING_COPIES * attention_block_elements(block, **shape) * 4
    if indexer is not None:
        block = min(t, query_block(indexer, indexer_block_elements, m.attention_block_size))
        working = max(working, INDEXER_WORKING_COPIES * indexer_block_elements(block, **indexer) * 4)
    return grads + working


def attention_layer_bytes(m, *, ratio: int, seq_length: int, micro_batch: int, backend: str, act_bytes: int, tp: int = 1) -> float:
    """Peak bytes of one attention sub-layer's forward + backward (what `bench/bench_attention_scaling.py`
    measures): everything kept for backward plus the backward's working set."""
    kept = attention_kept_per_token(m, ratio=ratio, tp=tp, backend=backend, seq_length=seq_length, act_bytes=act_bytes)
    working = attention_working_bytes(m, ratio=ratio, tp=tp, backend=backend, seq_length=seq_length, micro_batch=micro_batch)
    return kept * act_bytes * micro_batch * seq_length + working
