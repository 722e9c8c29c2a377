"""The V4 model of this rank as Megatron-Core trains it: built per virtual pipeline stage, cast for
the run's precision and wrapped in Megatron-Core's DDP. (The training loop is train/trainer.py.)"""

from __future__ import annotations

from typing import List

import torch

from dsv4_train.config.schema import Config
from dsv4_train.model import recompute
from dsv4_train.train.optimizer import distributed_optimizer_on


def build_model_chunks(cfg: Config, derived=None) -> List[torch.nn.Module]:
    """The V4 model on this rank, wrapped in Megatron-Core DDP: one chunk per virtual pipeline stage
    of this pipeline rank, laid out by `derived.stages_of_rank` (explicit `parallel.pipeline_layout`
    or the derived one)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from dsv4_train.config.derive import derive

    from dsv4_train.model.builder import build_model
    from dsv4_train.model.transformer_config import build_transformer_config

    from dsv4_train.runtime.distributed import pick_device

    par = cfg.parallel
    on_gpu = pick_device(cfg.run.device).type == "cuda"  # run.device decides, not what the host has
    transformer_config = build_transformer_config(
        model_cfg=cfg.model,
        tp=par.tp,
        pp=par.pp,
        vpp=par.vpp,
        ep=par.ep,
        etp=par.etp,
        cp=par.cp,
        sp=par.sp,
        precision=cfg.train.precision,
        moe_dispatcher=par.moe_dispatcher,
        use_cpu_initialization=not on_gpu,
    )
    # Megatron-LM's default (batch_p2p_comm = not overlap_p2p_comm): with PP=2 interleaved, both
    # neighbours are the same rank, and batched isend/irecv posted as [send_prev, recv_prev,
    # send_next, recv_next] on both sides pairs a forward activation with a backward gradient of the
    # same shape (measured on gloo: silently wrong losses). The unbatched path orders sends and
    # receives by even/odd rank and uses two groups, so each message meets its own receive.
    transformer_config.batch_p2p_comm = False
    if cfg.train.recompute == "full":
        transformer_config.recompute_granularity = "full"  # read by DSV4Model.forward
    recompute.configure(transformer_config, cfg.train.recompute, cfg.train.recompute_modules)
    if par.pp == 1:
        stages = [None]  # the whole model
    else:
        derived = derived or derive(cfg, world_size=torch.distributed.get_world_size())
        stages = derived.stages_of_rank(parallel_state.get_pipeline_model_parallel_rank())
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce(cfg),
        bucket_size=par.ddp_bucket_size,
        use_distributed_optimizer=distributed_optimizer_on(cfg),
        check_for_nan_in_grad=False,  # train/nonfinite.py skips such steps on every rank instead
    )
    chunks = []
    for index, stage in enumerate(stages):
        model = build_model(model_cfg=cfg.model, transformer_config=transformer_config, stage=stage)
        if on_gpu:
            model.cuda(torch.cuda.current_device())
        if cfg.train.precision == "bf16":
            # Megatron's mixed precision: bf16 params and activations, fp32 main params and Adam state
            # in the optimizer, fp32 logits/loss; the release's fp32 tensors (mHC, sinks, compressor
            # position biases, expert bias) stay fp32 (model/precision.py).
            from megatron.core.transformer.module import Float16Module

            from dsv4_train.model.precision import wrap_keeping_fp32

            model = wrap_keeping_fp32(model, lambda m: Float16Module(transformer_config, m))
        chunks.append(DistributedDataParallel(
            config=transformer_config, ddp_config=ddp_config, module=model,
            # Only the first chunk's buckets may overlap with the optimizer (Megatron convention).
            disable_bucketing=index > 0,
        ))
    return chunks


def overlap_grad_reduce(cfg: Config) -> bool:
    """As configured, else on when training on CUDA. (The parameter all-gather overlap is not offered:
    it leaves non-owner ranks' weights stale between the step and the next forward, which a
    checkpoint or evaluation in between would read.)"""
    from dsv4_train.runtime.distributed import pick_device

    if cfg.parallel.overlap_grad_reduce is not None:
        return cfg.parallel.overlap_grad_reduce
    return pick_device(cfg.run.device).type == "cuda"
