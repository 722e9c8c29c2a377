"""What changes in the running model at a boundary of the staged schedule (`train.stages`).

The schedule itself (which stage trains which step, its sequence length, batch and data offset) is
derived from the config (`config/derive.py::resolve_train_stages`). Here are the run-time switches:

* the CSA indexer phase of every attention layer (dense -> warmup -> sparse, paper §4.2);
* the indexer warm-up freeze: only the lightning indexer trains, as in DeepSeek Sparse Attention's
  warm-up (paper §4.2.2, "warm-up stage trains only the indexer ... all else frozen"). The frozen
  parameters are taken out of the optimizer's parameter groups for the step, so they get no update,
  no weight decay, no Adam-moment change and no share of the clipped gradient norm; the noaux_tc
  expert-bias update pauses too. Megatron-Core has no per-step freeze, hence this module.

RoPE needs no switch: the frequencies (YaRN included) are fixed by the model config, as in the release,
and the rotary tables are computed from each batch's positions, so a longer stage just uses more of them.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, List, Set, Tuple

import torch


def set_indexer_phase(model_chunks: List[torch.nn.Module], phase: str) -> None:
    from dsv4_train.model.attention import HybridAttention

    for chunk in model_chunks:
        for module in chunk.modules():
            if isinstance(module, HybridAttention):
                module.indexer_phase = phase


def indexer_parameters(model_chunks: List[torch.nn.Module]) -> Set[int]:
    """ids of the lightning indexers' parameters (the only ones the warm-up trains)."""
    from dsv4_train.model.indexer import LightningIndexer

    return {
        id(param)
        for chunk in model_chunks for module in chunk.modules() if isinstance(module, LightningIndexer)
        for param in module.parameters()
    }


def _model_and_main_params(optimizer) -> Iterator[Tuple[torch.nn.Parameter, torch.Tensor]]:
    """(model parameter, the tensor the inner torch optimizer updates for it) for every parameter of
    a Megatron-Core optimizer (chained, distributed, mixed-precision or fp32)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import ChainedOptimizer, Float16OptimizerWithFloat16Params

    if isinstance(optimizer, ChainedOptimizer):
        for part in optimizer.chained_optimizers:
            yield from _model_and_main_params(part)
    elif isinstance(optimizer, DistributedOptimizer):
        for model_groups, main_groups in ((optimizer.model_float16_groups, optimizer.shard_fp32_from_float16_groups),
                                          (optimizer.model_fp32_groups, optimizer.shard_fp32_groups)):
            for model_group, main_group in zip(model_groups, main_groups):
                yield from zip(model_group, main_group)
    elif isinstance(optimizer, Float16OptimizerWithFloat16Params):
        for model_group, main_group in zip(optimizer.float16_groups, optimizer.fp32_from_float16_groups):
            yield from zip(model_group, main_group)
        for group in optimizer.fp32_from_fp32_groups:
            yield from ((param, param) for param in group)
    else:  # FP32Optimizer: the torch optimizer steps the model parameters themselves
        for group in optimizer.optimizer.param_groups:
            yield from ((param, param) for param in group["params"])


def _torch_optimizers(optimizer) -> list:
    from megatron.core.optimizer.optimizer import ChainedOptimizer

    if isinstance(optimizer, ChainedOptimizer):
        return [inner for part in optimizer.chained_optimizers for inner in _torch_optimizers(part)]
    return [optimizer.optimizer] if getattr(optimizer, "optimizer", None) is not None else []


def _routers(model_chunks):
    for chunk in model_chunks:
        for module in chunk.modules():
            if hasattr(module, "expert_bias") and hasattr(module, "local_tokens_per_expert"):
                yield module


def train_only_indexer(model_chunks: List[torch.nn.Module], optimizer, run_step: Callable[[], Any]):
    """Run one training step (`run_step()`, returning a StepResult) in which the optimizer updates
    the lightning indexers only (the indexer warm-up).

    Megatron's distributed optimizer keeps one Adam step count for all parameters, so after a
    successful step the frozen parameters' count advances with the others; their moments stay as
    they were (zeros when they have none yet, which is what Adam holds before any gradient).
    """
    trainable = indexer_parameters(model_chunks)
    frozen = [main for param, main in _model_and_main_params(optimizer) if id(param) not in trainable]
    frozen_ids = {id(main) for main in frozen}
    saved = []
    for inner in _torch_optimizers(optimizer):
        for group in inner.param_groups:
            saved.append((group, group["params"]))
            group["params"] = [p for p in group["params"] if id(p) not in frozen_ids]
    routers = list(_routers(model_chunks))
    for router in routers:
        router.frozen_expert_bias = True  # read by Megatron's finalize_model_grads
    try:
        result = run_step()
    finally:
        for group, params in saved:
            group["params"] = params
        for router in routers:
            router.frozen_expert_bias = False
            router.local_tokens_per_expert.zero_()  # the counts of frozen steps steer no later update
    if result.update_successful:
        for inner in _torch_optimizers(optimizer):
            for group in inner.param_groups:
                for param in group["params"]:
                    if id(param) in frozen_ids:
                        _advance_step_count(inner.state[param], param)
    return result


def _advance_step_count(state: dict, param: torch.Tensor) -> None:
    if "step" in state:
        state["step"] = state["step"] + 1
        return
    state["step"] = torch.tensor(1.0, dtype=torch.float32)
    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
