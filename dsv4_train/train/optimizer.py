"""Optimizer and learning-rate schedule: Megatron-Core's, configured from `OptimConfig`.

AdamW through `get_megatron_optimizer` (distributed optimizer, fp32 main params for bf16, gradient
clipping) and `OptimizerParamScheduler` for linear warm-up followed by constant / cosine / linear /
WSD decay.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from dsv4_train.config.schema import OptimConfig, ParallelConfig, TrainConfig

_DECAY_STYLES = {"constant": "constant", "cosine": "cosine", "linear": "linear", "wsd": "WSD"}


def lr_decay_end_step(optim: OptimConfig, train: TrainConfig) -> int:
    """Step at which the LR reaches min_lr (Megatron counts it from step 0, warm-up included)."""
    decay_steps = optim.decay_steps if optim.decay_steps is not None else train.max_steps - optim.warmup_steps
    return optim.warmup_steps + max(decay_steps, 1)


def wsd_decay_steps(optim: OptimConfig, train: TrainConfig) -> int:
    decay_total = lr_decay_end_step(optim, train) - optim.warmup_steps
    return optim.wsd_decay_steps if optim.wsd_decay_steps is not None else max(1, int(0.2 * decay_total))


def lr_decay_start_step(optim: OptimConfig, train: TrainConfig) -> Optional[int]:
    """First step whose LR is below the peak; None when the LR never decays (constant)."""
    if optim.decay_style == "constant":
        return None
    if optim.decay_style == "wsd":
        return lr_decay_end_step(optim, train) - wsd_decay_steps(optim, train)
    return optim.warmup_steps


def build_optimizer(
    model_chunks: List[torch.nn.Module],
    *,
    optim: OptimConfig,
    train: TrainConfig,
    parallel: ParallelConfig,
):
    """Returns (MegatronOptimizer, OptimizerParamScheduler)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    bf16 = train.precision == "bf16"
    config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=parallel.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, model_chunks)
    style = _DECAY_STYLES[optim.decay_style]
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=lr_decay_end_step(optim, train),
        lr_decay_style=style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(train.max_steps, 1),
        wd_incr_style="constant",
        wsd_decay_steps=wsd_decay_steps(optim, train) if style == "WSD" else None,
        lr_wsd_decay_style="linear" if style == "WSD" else None,
    )
    return optimizer, scheduler
