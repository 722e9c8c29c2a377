"""Optimizer and learning-rate schedule: Megatron-Core's, configured from `OptimConfig`.

AdamW through `get_megatron_optimizer` (distributed optimizer, fp32 main params for bf16, gradient
clipping) and `OptimizerParamScheduler` for linear warm-up followed by constant / cosine / linear /
WSD decay.
"""

from __future__ import annotations

from typing import List

import torch

from dsv4_train.config.derive import decay_points
from dsv4_train.config.schema import Config
from dsv4_train.model.precision import KEEP_FP32_ATTR

_DECAY_STYLES = {"constant": "constant", "cosine": "cosine", "linear": "linear", "wsd": "WSD"}


def _param_groups(config) -> dict:
    """Megatron's standard groups (no weight decay on 1-D tensors and biases), plus the release's
    fp32 tensors of a bf16 model (model/precision.py) in groups of their own with the same
    hyper-parameters: Megatron's distributed optimizer orders a mixed bf16/fp32 group's main
    parameters bf16-first but indexes them in model order, so mixing them in one group mismatches
    their optimizer states (a size error at the first checkpoint)."""
    from megatron.core.optimizer import ParamKey, get_standard_config_overrides

    overrides = get_standard_config_overrides(config)
    overrides[ParamKey(attr=KEEP_FP32_ATTR)] = {"max_lr": config.lr}  # same value: a group key only
    return overrides


def build_optimizer(
    model_chunks: List[torch.nn.Module],
    *,
    cfg: Config,
):
    """Returns (MegatronOptimizer, OptimizerParamScheduler) for the run's `optim` section."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    optim, train, parallel = cfg.optim, cfg.train, cfg.parallel
    decay_start, decay_end = decay_points(cfg)
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
    optimizer = get_megatron_optimizer(config, model_chunks, config_overrides=_param_groups(config))
    style = _DECAY_STYLES[optim.decay_style]
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=max(decay_end, optim.warmup_steps + 1),
        lr_decay_style=style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(train.max_steps, 1),
        wd_incr_style="constant",
        # The schedule follows the current config on resume (a longer train.max_steps or new decay
        # keys take effect); only the step count comes from the checkpoint (checkpoint/io.py says
        # what changed).
        override_opt_param_scheduler=True,
        use_checkpoint_opt_param_scheduler=False,
        wsd_decay_steps=(decay_end - decay_start) if style == "WSD" else None,
        lr_wsd_decay_style=optim.wsd_decay_style if style == "WSD" else None,
    )
    return optimizer, scheduler
