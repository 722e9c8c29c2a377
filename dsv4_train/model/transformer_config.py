"""Build Megatron-Core's `TransformerConfig` from our V4 `ModelConfig` and the parallel layout.

Everything Megatron-Core parts read (MoE router/experts, embedding, output layer, norms, the
schedule's aux/MTP loss scaling) comes from this one object. V4 values that Megatron has a field for
are mapped onto that field; V4-only values stay in `ModelConfig` and are read by our modules.

Notes on the mapping (paper §2.1):
* SwiGLU clamp: Megatron's `activation_func_clamp_value` clamps the gate (max=L) and the linear half
  (-L..L) in the unfused GLU path only, hence `bias_activation_fusion=False`.
* `moe_router_topk_scaling_factor` = `routed_scaling_factor`; sqrtsoftplus + expert bias = noaux_tc.
* The sequence-wise balance loss is Megatron's `seq_aux_loss` (coefficient alpha); with alpha = 0 the
  load-balancing type is "none" (pure aux-loss-free balancing).
* `num_moe_experts` and `mtp_num_layers` being set is what makes Megatron's pipeline schedule set the
  MoEAuxLossAutoScaler / MTPLossAutoScaler scales per micro-batch (schedules.forward_step_calc_loss).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from dsv4_train.config.model import ModelConfig

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_transformer_config(
    *,
    model_cfg: ModelConfig,
    tp: int = 1,
    pp: int = 1,
    vpp: Optional[int] = None,
    ep: int = 1,
    etp: Optional[int] = None,
    cp: int = 1,
    sp: bool = False,
    precision: str = "fp32",
    moe_dispatcher: str = "auto",
    use_cpu_initialization: Optional[bool] = None,
    calculate_per_token_loss: bool = False,
):
    """Return a Megatron-Core TransformerConfig for this V4 model and layout.

    `use_cpu_initialization=None` means: on CPU when no CUDA device is present.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    if precision not in _DTYPES:
        raise ValueError(
            f"precision={precision!r} is not supported; train.precision must be one of {sorted(_DTYPES)}."
        )
    if moe_dispatcher not in ("auto", "alltoall", "allgather"):
        raise ValueError(
            f"parallel.moe_dispatcher={moe_dispatcher!r} is not supported; use 'auto', 'alltoall' or 'allgather'."
        )
    if moe_dispatcher == "auto":
        # Without expert parallelism there is nothing to exchange: the all-gather dispatcher's
        # permute/unpermute is the lighter bookkeeping (measured ~0.3 ms less per MoE layer on CPU).
        moe_dispatcher = "allgather" if ep == 1 else "alltoall"
    if model_cfg.score_function != "sqrtsoftplus":
        raise ValueError(
            f"model.score_function={model_cfg.score_function!r}: DeepSeek-V4 routes with 'sqrtsoftplus' "
            "(paper §2.1, §4.2.3); set model.score_function=sqrtsoftplus."
        )
    if not model_cfg.norm_topk_prob or model_cfg.num_experts_per_tok < 2:
        # Megatron normalises the selected scores only for top-k > 1 (moe_utils.topk_routing_...).
        raise ValueError(
            "model.norm_topk_prob must be true and model.num_experts_per_tok >= 2: V4 normalises the "
            f"top-k weights (got norm_topk_prob={model_cfg.norm_topk_prob}, "
            f"num_experts_per_tok={model_cfg.num_experts_per_tok})."
        )
    if use_cpu_initialization is None:
        use_cpu_initialization = not torch.cuda.is_available()
    dtype = _DTYPES[precision]
    seq_aux = model_cfg.seq_aux_loss_coeff
    mtp_layers = model_cfg.mtp_num_layers if model_cfg.mtp_num_layers > 0 else None

    return TransformerConfig(
        # Shape.
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        kv_channels=model_cfg.head_dim,
        ffn_hidden_size=model_cfg.moe_intermediate_size,
        # Parallel layout.
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        context_parallel_size=cp,
        sequence_parallel=sp,
        # Numerics.
        params_dtype=dtype,
        bf16=(dtype == torch.bfloat16),
        pipeline_dtype=dtype,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=True,
        init_method_std=model_cfg.init_std,
        normalization="RMSNorm",
        layernorm_epsilon=model_cfg.rms_norm_eps,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # SwiGLU with V4's clamp (paper §2.1, §4.2.3), unfused so the clamp is applied.
        gated_linear_unit=True,
        activation_func=F.silu,
        activation_func_clamp_value=model_cfg.swiglu_limit,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
        calculate_per_token_loss=calculate_per_token_loss,
        # MoE (paper §2.1, §4.2.1).
        num_moe_experts=model_cfg.num_routed_experts,
        moe_ffn_hidden_size=model_cfg.moe_intermediate_size,
        moe_shared_expert_intermediate_size=(
            model_cfg.moe_intermediate_size * model_cfg.num_shared_experts
            if model_cfg.num_shared_experts > 0
            else None
        ),
        moe_router_topk=model_cfg.num_experts_per_tok,
        moe_router_score_function="sqrtsoftplus",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=model_cfg.expert_bias_update_rate,
        moe_router_topk_scaling_factor=model_cfg.routed_scaling_factor,
        moe_router_load_balancing_type="seq_aux_loss" if seq_aux > 0 else "none",
        moe_aux_loss_coeff=seq_aux,
        moe_router_dtype="fp32",
        moe_token_dispatcher_type=moe_dispatcher,
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        # MTP (paper §2.1, §4.2.2); the weight is switched at run time by DSV4Model.set_mtp_loss_weight.
        mtp_num_layers=mtp_layers,
        mtp_loss_scaling_factor=model_cfg.mtp_loss_weight,
    )
