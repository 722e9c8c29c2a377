"""The training run, start to finish: runtime → model → optimizer → resume → data → steps → save.

Everything expensive happens after the config, the data inputs and the requested checkpoint have
been checked, so a bad input fails in seconds without writing anything.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from typing import List, Optional

import torch

from dsv4_train.checkpoint.io import TrainState, find_latest, weights_only, load_checkpoint, resolve_load_path, save_checkpoint
from dsv4_train.config.schema import Config
from dsv4_train.runtime import distributed as dist_runtime
from dsv4_train.train.metrics import MetricsSink
from dsv4_train.train.optimizer import build_optimizer
from dsv4_train.train.step import train_step, wire_model_config


def checkpoint_root(cfg: Config) -> str:
    return cfg.checkpoint.dir or os.path.join(cfg.run.dir, "checkpoints")


def build_model_chunks(cfg: Config) -> List[torch.nn.Module]:
    """The V4 model on this rank, wrapped in Megatron-Core DDP (one chunk per virtual stage)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from dsv4_train.model.builder import build_model
    from dsv4_train.model.transformer_config import build_transformer_config

    par = cfg.parallel
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
    )
    model = build_model(model_cfg=cfg.model, transformer_config=transformer_config, pre_process=True, post_process=True)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if cfg.train.precision == "bf16":
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(transformer_config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=par.distributed_optimizer,
        check_for_nan_in_grad=True,
    )
    return [DistributedDataParallel(config=transformer_config, ddp_config=ddp_config, module=model)]


def _unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _set_mtp_weight(model_chunks, weight: float) -> None:
    for chunk in model_chunks:
        setter = getattr(_unwrap(chunk), "set_mtp_loss_weight", None)
        if setter is not None:
            setter(weight)


def _collect_aux_metrics(num_microbatches: int) -> dict:
    """Per-step auxiliary values: the MTP loss (Megatron's MTP tracker, averaged over micro-batches,
    layers and data-parallel ranks) and our aux losses (indexer KL), made identical on every rank."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    from dsv4_train.model import aux_losses

    values = {}
    tracker = MTPLossLoggingHelper.tracker
    if "loss_values" in tracker:
        MTPLossLoggingHelper.reduce_metrics_in_tracker()
        per_layer = tracker["loss_values"].detach().float().cpu()
        values["mtp_loss"] = float(per_layer.sum()) / num_microbatches / max(len(per_layer), 1)
        MTPLossLoggingHelper.clean_metrics_in_tracker()
    values.update(aux_losses.drain())
    # Only the ranks that computed a value hold it (e.g. the last pipeline stage): share it.
    for name in sorted(values):
        tensor = torch.tensor([values[name]], dtype=torch.float64)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        values[name] = tensor.item()
    return values


def _read_marker(path: str) -> dict:
    with open(os.path.join(path, "dsv4_complete.json")) as f:
        return json.load(f)


def run_training(cfg: Config, derived) -> int:
    """Train; returns the process exit code (0, or EXIT_PREEMPTED after a preemption save)."""
    from dsv4_train.data import build_data
    from dsv4_train.launch.preemption import EXIT_PREEMPTED, PreemptionWatcher

    runtime = dist_runtime.init_process_group(device_request=cfg.run.device)
    train_cfg = cfg.train
    ckpt_root = checkpoint_root(cfg)
    # Fails fast (before any model is built) when an explicitly requested checkpoint is missing.
    load_path = resolve_load_path(cfg.checkpoint.load, ckpt_root)
    model_only = cfg.checkpoint.load_model_only
    own_latest = find_latest(ckpt_root)
    if model_only and own_latest is not None:
        # Started from pre-trained weights earlier and has saved since: resume this run instead.
        load_path, model_only = own_latest, False
    start = TrainState()
    if load_path is not None and not model_only and not weights_only(load_path):
        marker = _read_marker(load_path)
        start = TrainState(step=int(marker["step"]), consumed_samples=int(marker["consumed_samples"]))

    par = cfg.parallel
    dist_runtime.init_model_parallel(tp=par.tp, pp=par.pp, vpp=par.vpp, ep=par.ep, etp=par.etp, cp=par.cp)
    dist_runtime.seed_everything(cfg.run.seed)

    from megatron.core import parallel_state

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    data = build_data(
        data_cfg=cfg.data,
        train_cfg=train_cfg,
        vocab_size=cfg.model.vocab_size,
        seed=cfg.run.seed,
        dp_rank=dp_rank,
        dp_size=dp_size,
        consumed_samples=start.consumed_samples,
    )

    model_chunks = build_model_chunks(cfg)
    optimizer, scheduler = build_optimizer(model_chunks, cfg=cfg)
    wire_model_config(model_chunks, optimizer)
    if load_path is not None:
        start = load_checkpoint(load_path, model_chunks=model_chunks, optimizer=optimizer, scheduler=scheduler,
                                model_only=model_only)
        if model_only or weights_only(load_path):
            optimizer.reload_model_params()  # fp32 main copies (bf16 training) follow the loaded weights
        if runtime.is_main:
            what = "loaded model weights from" if model_only else "resumed from"
            print(f"{what} {load_path} at step {start.step}", flush=True)
    elif cfg.checkpoint.save_initial:
        # Weights only: a fresh optimizer has no state to save yet.
        save_checkpoint(ckpt_root, model_chunks=model_chunks, optimizer=None, scheduler=None,
                        state=start, keep_last=0)

    decay_start = derived.decay_start_step

    def mtp_weight_for(step: int) -> float:
        decaying = decay_start is not None and step > decay_start
        return cfg.model.mtp_loss_weight_after_decay if decaying else cfg.model.mtp_loss_weight

    sink = MetricsSink(
        run_dir=cfg.run.dir,
        logging_cfg=cfg.logging,
        is_main=runtime.is_main,
        config_dict=_config_dict(cfg),
        max_steps=train_cfg.max_steps,
    )
    watcher = PreemptionWatcher.install()
    if runtime.is_main:
        print(
            f"training {cfg.model.name} on {runtime.world_size} process(es) ({runtime.device.type}/{runtime.backend}), "
            f"dp={dp_size}, micro-batches/step={derived.num_microbatches}, data: {data.describe()}",
            flush=True,
        )

    state = start
    global_tokens = train_cfg.global_batch_size * train_cfg.seq_length
    exit_code = 0
    try:
        for step in range(start.step + 1, train_cfg.max_steps + 1):
            _set_mtp_weight(model_chunks, mtp_weight_for(step))
            t0 = time.monotonic()
            result = train_step(
                data_iterator=data.train_iterator,
                model_chunks=model_chunks,
                optimizer=optimizer,
                scheduler=scheduler,
                num_microbatches=derived.num_microbatches,
                seq_length=train_cfg.seq_length,
                micro_batch_size=train_cfg.micro_batch_size,
                drain_aux_losses=lambda: _collect_aux_metrics(derived.num_microbatches),
            )
            step_time = time.monotonic() - t0
            state = TrainState(
                step=step,
                consumed_samples=state.consumed_samples + train_cfg.global_batch_size,
                mtp_loss_weight=mtp_weight_for(step),
            )
            metrics = {
                "step": step,
                "lm_loss": result.lm_loss,
                "mtp_loss": result.aux.get("mtp_loss", float("nan")),
                "grad_norm": result.grad_norm,
                "lr": result.lr,
                "tokens_per_sec": global_tokens / max(step_time, 1e-9),
                "step_time_s": step_time,
                "consumed_samples": state.consumed_samples,
            }
            for name, value in result.aux.items():
                metrics.setdefault(name, value)
            sink.log(metrics, print_line=(step % train_cfg.log_interval == 0 or step == train_cfg.max_steps))

            interval = cfg.checkpoint.save_interval
            if interval and step % interval == 0 and step != train_cfg.max_steps:
                save_checkpoint(ckpt_root, model_chunks=model_chunks, optimizer=optimizer, scheduler=scheduler,
                                state=state, keep_last=cfg.checkpoint.keep_last)
            if watcher.should_stop():
                if runtime.is_main:
                    print(f"preemption requested: saving at step {step} and exiting with {EXIT_PREEMPTED}", flush=True)
                save_checkpoint(ckpt_root, model_chunks=model_chunks, optimizer=optimizer, scheduler=scheduler,
                                state=state, keep_last=cfg.checkpoint.keep_last)
                watcher.requeue_if_slurm()
                exit_code = EXIT_PREEMPTED
                break
        else:
            if cfg.checkpoint.save_final and state.step > start.step:
                save_checkpoint(ckpt_root, model_chunks=model_chunks, optimizer=optimizer, scheduler=scheduler,
                                state=state, keep_last=cfg.checkpoint.keep_last)
    finally:
        sink.close()
        dist_runtime.shutdown()
    return exit_code


def _config_dict(cfg: Config) -> dict:
    return asdict(cfg)
