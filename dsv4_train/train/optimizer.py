"""Optimizer and learning-rate schedule: Megatron-Core's, configured from `OptimConfig`.

AdamW through `get_megatron_optimizer` (distributed optimizer, fp32 main params for bf16, gradient
clipping) and `OptimizerParamScheduler` for linear warm-up followed by constant / cosine / linear /
WSD decay. `optim.optimizer=muon` keeps Megatron's wrappers (main params, clipping, zero-grad, the
param groups the scheduler drives) and swaps the torch optimizer inside for train/muon.py's
Muon + AdamW. Megatron's distributed optimizer cuts matrices into flat ranges, so with Muon
`parallel.distributed_optimizer` shards the state by whole parameters instead (train/muon.py).
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


def distributed_optimizer_on(cfg: Config) -> bool:
    """Megatron's distributed optimizer shards flat parameter ranges, which cut Muon's matrices."""
    return cfg.parallel.distributed_optimizer and cfg.optim.optimizer != "muon"


def _main_to_model(sub) -> dict:
    """Optimizer (main) parameter -> model parameter: bf16 params have fp32 main copies."""
    pairs = {}
    for model_group, main_group in zip(getattr(sub, "float16_groups", []), getattr(sub, "fp32_from_float16_groups", [])):
        pairs.update(zip(main_group, model_group))
    return pairs


def _data_parallel_group(model_param):
    """The group DDP all-reduces this parameter's gradient over (routed experts: expert-DP)."""
    from megatron.core import parallel_state

    if getattr(model_param, "allreduce", True):
        return parallel_state.get_data_parallel_group(with_context_parallel=True)
    return parallel_state.get_expert_data_parallel_group()


def _install_muon(optimizer, model_chunks: List[torch.nn.Module], cfg: Config) -> None:
    """Replace the torch AdamW inside each Megatron (sub-)optimizer by Muon + AdamW on the same groups."""
    from dsv4_train.train.muon import NS_DTYPES, MuonWithAdamW, assign_owners, matrix_layout, uses_muon

    names = {param: name for chunk in model_chunks for name, param in chunk.named_parameters()}
    o_groups_local = cfg.model.o_groups // cfg.parallel.tp
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if sub.optimizer is None:  # no parameters on this rank
            continue
        main_to_model = _main_to_model(sub)
        layouts, replicas = {}, []
        for group in sub.optimizer.param_groups:
            for main in group["params"]:
                model_param = main_to_model.get(main, main)
                name = names[model_param]
                if uses_muon(name, model_param):
                    layouts[main] = matrix_layout(name, model_param, o_groups_local=o_groups_local)
                replicas.append((main, _data_parallel_group(model_param)))
        owners = assign_owners(replicas) if cfg.parallel.distributed_optimizer else None
        o = cfg.optim
        sub.optimizer = MuonWithAdamW(
            sub.optimizer.param_groups, layouts, lr=o.lr, weight_decay=o.weight_decay,
            betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, momentum=o.muon_momentum,
            ns_dtype=NS_DTYPES[o.muon_ns_dtype], owners=owners,
        )
        sub.init_state_fn = lambda inner, config=None: inner.init_state()


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
        use_distributed_optimizer=distributed_optimizer_on(cfg),
    )
    optimizer = get_megatron_optimizer(config, model_chunks, config_overrides=_param_groups(config))
    if optim.optimizer == "muon":
        _install_muon(optimizer, model_chunks, cfg)
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
