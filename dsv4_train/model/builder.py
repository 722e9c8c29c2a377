"""Build the V4 model for this rank from the typed model config and Megatron's TransformerConfig."""

from __future__ import annotations

from dsv4_train.config.model import ModelConfig
from dsv4_train.model.model import DSV4Model


def _check_consistent(model_cfg: ModelConfig, transformer_config) -> None:
    pairs = {
        "hidden_size": (model_cfg.hidden_size, transformer_config.hidden_size),
        "num_layers": (model_cfg.num_layers, transformer_config.num_layers),
        "num_routed_experts": (model_cfg.num_routed_experts, transformer_config.num_moe_experts),
        "num_experts_per_tok": (model_cfg.num_experts_per_tok, transformer_config.moe_router_topk),
    }
    bad = {k: v for k, v in pairs.items() if v[0] != v[1]}
    if bad:
        raise ValueError(
            "The TransformerConfig was not built from this ModelConfig (model vs transformer config: "
            f"{bad}); build it with dsv4_train.model.transformer_config.build_transformer_config."
        )
    expected = model_cfg.num_layers + model_cfg.mtp_num_layers
    if len(model_cfg.compress_ratios) != expected:
        raise ValueError(
            f"model.compress_ratios has {len(model_cfg.compress_ratios)} entries but needs "
            f"num_layers + mtp_num_layers = {expected} (one per main layer, then one per MTP layer)."
        )


def build_model(*, model_cfg: ModelConfig, transformer_config, pre_process: bool = True, post_process: bool = True,
                stage=None) -> DSV4Model:
    """stage: the `StageLayout` of one (pp rank, virtual stage) when pipeline-parallel (it then
    decides pre/post-process); None builds the whole model."""
    _check_consistent(model_cfg, transformer_config)
    return DSV4Model(config=transformer_config, model_cfg=model_cfg, pre_process=pre_process,
                     post_process=post_process, stage=stage)
