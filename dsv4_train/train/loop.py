"""The training run, start to finish: runtime → model → optimizer → resume → data → steps → save.

Everything expensive happens after the config, the data inputs and the requested checkpoint have
been checked, so a bad input fails in seconds without writing anything.
"""

from __future__ import annotations

import dataclasses

import sys
import time
from dataclasses import asdict, replace
from functools import partial
from typing import List

import torch

from dsv4_train.checkpoint.io import TrainState, save_checkpoint
from dsv4_train.checkpoint.resume import checkpoint_root, choose_verified, plan_resume, restore_or_save_initial
from dsv4_train.config.schema import Config
from dsv4_train.model import recompute
from dsv4_train.runtime import distributed as dist_runtime
from dsv4_train.train.evaluate import evaluate
from dsv4_train.train.metrics import MetricsSink
from dsv4_train.train.optimizer import build_optimizer, distributed_optimizer_on
from dsv4_train.train.stages import set_indexer_phase, train_only_indexer
from dsv4_train.train.telemetry import StepProfiler, StepTelemetry
from dsv4_train.train.nonfinite import EXIT_NONFINITE, NonFinitePolicy, NonFiniteStop, parameters_are_finite
from dsv4_train.train.step import StepResult, train_step, wire_model_config


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
    model_cfg = cfg.model
    if cfg.optim.optimizer == "muon" and model_cfg.moe_expert_compute == "auto":
        # Muon orthogonalises each expert's matrices; it walks per-expert modules (not yet the stacked
        # grouped weights). Same checkpoints either way.
        model_cfg = dataclasses.replace(model_cfg, moe_expert_compute="sequential")
    for index, stage in enumerate(stages):
        model = build_model(model_cfg=model_cfg, transformer_config=transformer_config, stage=stage)
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


def _unwrap(chunk):
    """The DSV4Model inside the DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _set_mtp_weight(model_chunks, weight: float) -> None:
    for chunk in model_chunks:
        setter = getattr(_unwrap(chunk), "set_mtp_loss_weight", None)
        if setter is not None:
            setter(weight)


def _collect_aux_metrics(num_microbatches: int) -> dict:
    """Per-step auxiliary values, identical on every rank: the MTP loss (Megatron's MTP tracker,
    averaged over micro-batches, depths and DP x CP ranks) and our aux losses (indexer KL), pooled
    as sum / count over every rank that recorded them.

    Only some ranks hold a value (MTP on the last pipeline stage; a stage may hold no CSA layer), so
    the union of names is agreed first and then ONE all-reduce carries every (sum, count): no rank
    waits on a reduction another rank skips. Under CP an aux-loss record is the rank's share (the
    CP sum is the loss), hence the factor cp.
    """
    from megatron.core import parallel_state
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    from dsv4_train.model import aux_losses

    pooled = {}  # name -> [sum, count] on this rank
    tracker = MTPLossLoggingHelper.tracker
    if "loss_values" in tracker and tracker.get("avg_group") is not None:
        MTPLossLoggingHelper.reduce_metrics_in_tracker()
        per_layer = tracker["loss_values"].detach().float().cpu()
        pooled["mtp_loss"] = [float(per_layer.sum()) / num_microbatches / max(len(per_layer), 1), 1.0]
        MTPLossLoggingHelper.clean_metrics_in_tracker()
    counts = aux_losses.pending()
    cp = parallel_state.get_context_parallel_world_size()
    for name, mean in aux_losses.drain().items():
        pooled[name] = [mean * counts[name] * cp, float(counts[name])]
    if not torch.distributed.is_initialized():
        return {name: s / c for name, (s, c) in pooled.items()}
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, sorted(pooled))
    names = sorted(set().union(*everyone))
    totals = torch.tensor([pooled.get(n, [0.0, 0.0]) for n in names], dtype=torch.float64).reshape(-1, 2)
    torch.distributed.all_reduce(totals)
    return {n: float(s / max(c, 1.0)) for n, (s, c) in zip(names, totals.tolist())}


def run_training(cfg: Config, derived) -> int:
    """Train; returns the process exit code (0, or EXIT_PREEMPTED after a preemption save)."""
    from dsv4_train.data import build_data
    from dsv4_train.launch.preemption import EXIT_PREEMPTED, PreemptionWatcher

    watcher = PreemptionWatcher.install()  # a stop signal during start-up is honoured too (below)
    runtime = dist_runtime.init_process_group(device_request=cfg.run.device,
                                              timeout_s=int(cfg.run.dist_timeout_minutes * 60))
    train_cfg = cfg.train
    ckpt_root = checkpoint_root(cfg)
    # Before any model is built: fails fast when an explicitly requested checkpoint is missing.
    load_path, model_only, start = plan_resume(cfg, ckpt_root)
    verified = choose_verified(cfg, ckpt_root, load_path, is_main=runtime.is_main)  # collective
    if verified != load_path:
        load_path, model_only, start = plan_resume(cfg, ckpt_root, load_path=verified)

    par = cfg.parallel
    dist_runtime.init_model_parallel(tp=par.tp, pp=par.pp, vpp=par.vpp, ep=par.ep, etp=par.etp, cp=par.cp)
    dist_runtime.seed_everything(cfg.run.seed)

    from megatron.core import parallel_state

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()

    def stage_data(stage, completed_steps: int):
        return build_data(
            data_cfg=cfg.data, train_cfg=stage_data_view(train_cfg, stage), vocab_size=cfg.model.vocab_size,
            seed=cfg.run.seed, dp_rank=dp_rank, dp_size=dp_size,
            consumed_samples=stage_consumed_samples(stage, completed_steps),
        )

    stage = derived.train_stage_at(start.step + 1)
    data = stage_data(stage, start.step)
    if watcher.should_stop():
        return _stop_during_start_up(watcher, runtime)

    model_chunks = build_model_chunks(cfg, derived)
    optimizer, scheduler = build_optimizer(model_chunks, cfg=cfg)
    wire_model_config(model_chunks, optimizer)
    start = restore_or_save_initial(cfg, ckpt_root, load_path, model_only, start,
                                    model_chunks=model_chunks, optimizer=optimizer, scheduler=scheduler,
                                    is_main=runtime.is_main)

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
        num_stages=len(derived.train_stages),
        resume_step=start.step,
    )
    if watcher.should_stop():
        sink.close()
        return _stop_during_start_up(watcher, runtime)
    if runtime.is_main:
        print(
            f"training {cfg.model.name} on {runtime.world_size} process(es) ({runtime.device.type}/{runtime.backend}), "
            f"dp={dp_size}, micro-batches/step={stage.num_microbatches}, data: {data.describe()}",
            flush=True,
        )
    num_stages = len(derived.train_stages)

    def enter_stage(stage) -> None:
        set_indexer_phase(model_chunks, stage.indexer_phase)
        if runtime.is_main and num_stages > 1:
            print(
                f"{stage.name} of {num_stages}: seq_length {stage.seq_length}, global batch "
                f"{stage.global_batch_size} ({stage.num_microbatches} micro-batches/step), indexer "
                f"{stage.indexer_phase}" + (" (only the indexer trains)" if stage.indexer_phase == "warmup" else ""),
                flush=True,
            )

    def run_evaluation() -> dict:
        return evaluate(
            make_iterator=data.make_valid_iterator, model_chunks=model_chunks, eval_iters=train_cfg.eval_iters,
            num_microbatches=stage.num_microbatches, seq_length=stage.seq_length,
            micro_batch_size=train_cfg.micro_batch_size, hc_mult=cfg.model.hc_mult, collect_aux=_collect_aux_metrics,
        )

    telemetry = StepTelemetry(cfg=cfg, model_chunks=model_chunks, device=runtime.device, world_size=runtime.world_size)
    profiler = StepProfiler(train_cfg.profile_steps, run_dir=cfg.run.dir, rank=runtime.rank, device=runtime.device)
    policy = NonFinitePolicy(train_cfg)

    def save(state) -> None:
        if not parameters_are_finite(model_chunks, runtime.device):
            raise NonFiniteStop(
                f"step {state.step}: the parameters are not finite, so no checkpoint is written (the last one is "
                "kept). Resume from it with a lower optim.lr."
            )
        try:
            save_checkpoint(ckpt_root, model_chunks=model_chunks, optimizer=optimizer, scheduler=scheduler,
                            state=state, keep_last=cfg.checkpoint.keep_last)
        except OSError as error:  # ENOSPC, EACCES, ...: name the path, keep the message to one line
            raise ValueError(
                f"writing the checkpoint of step {state.step} failed: {error.strerror or error} "
                f"({error.filename or ckpt_root}); the earlier checkpoints are intact. Free space or fix the "
                "permissions, then run the same command to resume."
            ) from None

    state = start
    exit_code = 0
    enter_stage(stage)
    try:
        for step in range(start.step + 1, train_cfg.max_steps + 1):
            if step > stage.last_step:
                stage = derived.train_stage_at(step)
                data = stage_data(stage, step - 1)
                enter_stage(stage)
            _set_mtp_weight(model_chunks, mtp_weight_for(step))
            profiler.before_step(step)
            t0 = time.monotonic()
            run_step = partial(
                train_step,
                data_iterator=data.train_iterator,
                model_chunks=model_chunks,
                optimizer=optimizer,
                scheduler=scheduler,
                num_microbatches=stage.num_microbatches,
                seq_length=stage.seq_length,
                micro_batch_size=train_cfg.micro_batch_size,
                hc_mult=cfg.model.hc_mult,
                drain_aux_losses=lambda: _collect_aux_metrics(stage.num_microbatches),
            )
            if step in train_cfg.skip_steps:
                result = skip_batches(data.train_iterator, stage.num_microbatches, optimizer)
            elif stage.indexer_phase == "warmup":
                result = train_only_indexer(model_chunks, optimizer, partial(run_step, step=step))
            else:
                result = run_step(step=step)
            step_time = time.monotonic() - t0
            trace = profiler.after_step(step)
            if trace and runtime.is_main:
                print(f"profiler trace of steps {train_cfg.profile_steps[0]}-{step}: {trace}", flush=True)
            state = TrainState(
                step=step,
                consumed_samples=state.consumed_samples + stage.global_batch_size,
                mtp_loss_weight=mtp_weight_for(step),
            )
            metrics = {
                "step": step,
                "lm_loss": result.lm_loss,
                "mtp_loss": result.aux.get("mtp_loss", float("nan")),
                "grad_norm": result.grad_norm,
                "lr": result.lr,
                "tokens_per_sec": stage.global_batch_size * stage.seq_length / max(step_time, 1e-9),
                "step_time_s": step_time,
                "consumed_samples": state.consumed_samples,
                "mtp_loss_weight": state.mtp_loss_weight,
                "stage": stage.number,
                "seq_length": stage.seq_length,
                "indexer_phase": stage.indexer_phase,
            }
            for name, value in result.aux.items():
                metrics.setdefault(name, value)
            metrics.update(telemetry.measure(seq_length=stage.seq_length, step_time=step_time,
                                             tokens=stage.global_batch_size * stage.seq_length))
            metrics["skipped"] = int(not result.update_successful)
            spiked_over = None if metrics["skipped"] else policy.after_good_step(result.lm_loss)
            if spiked_over is not None:
                metrics["loss_spike"] = 1
                if runtime.is_main:
                    print(f"loss spike at step {step}: lm_loss {result.lm_loss:.4f} > train.spike_factor="
                          f"{train_cfg.spike_factor} x running mean {spiked_over:.4f}", flush=True)
            if evaluation_due(train_cfg, step):
                metrics.update(run_evaluation())
            sink.log(metrics, print_line=(step % train_cfg.log_interval == 0 or step == train_cfg.max_steps))
            if metrics["skipped"] and step not in train_cfg.skip_steps:
                if runtime.is_main:
                    print(f"step {step}: non-finite loss or gradient on some rank; the step was skipped on every rank",
                          flush=True)
                policy.after_skip(step)

            interval = cfg.checkpoint.save_interval
            stopping = watcher.should_stop()
            if interval and step % interval == 0 and step != train_cfg.max_steps and not stopping:
                save(state)
            if stopping:
                if runtime.is_main:
                    print(f"preemption requested: saving at step {step} and exiting with {EXIT_PREEMPTED}", flush=True)
                save(state)
                watcher.requeue_if_slurm()
                watcher.ignore_further_signals()
                exit_code = EXIT_PREEMPTED
                break
        else:
            if cfg.checkpoint.save_final and state.step > start.step:
                save(state)
    except NonFiniteStop as stop:
        if runtime.is_main:
            print(f"dsv4-train: stopped: {stop}", file=sys.stderr, flush=True)
        exit_code = EXIT_NONFINITE
    finally:
        profiler.close()
        sink.close()
        dist_runtime.shutdown()
    return exit_code


def _stop_during_start_up(watcher, runtime) -> int:
    """A stop signal before the first step: nothing was trained since the last checkpoint, so exit
    with the preemption code (Slurm requeues) without saving."""
    from dsv4_train.launch.preemption import EXIT_PREEMPTED

    if runtime.is_main:
        print(f"stop signal during start-up: exiting with {EXIT_PREEMPTED} before the first step (nothing to save; "
              "the same command resumes)", flush=True)
    watcher.requeue_if_slurm()
    watcher.ignore_further_signals()
    dist_runtime.shutdown()
    return EXIT_PREEMPTED


def skip_batches(train_iterator, num_microbatches: int, optimizer) -> StepResult:
    """train.skip_steps: this rank's micro-batches of the step are read and dropped, nothing trains
    (a known-bad batch; the data position stays that of an ordinary step)."""
    for _ in range(num_microbatches):
        next(train_iterator)
    nan = float("nan")
    return StepResult(lm_loss=nan, grad_norm=nan, lr=float(optimizer.param_groups[0]["lr"]), num_tokens=0,
                      update_successful=False, aux={})


def stage_data_view(train_cfg, stage):
    """The train keys `build_data` reads, for one stage: its sample shape, and a run length that
    covers the stage's data offset plus its own steps."""
    return replace(train_cfg, seq_length=stage.seq_length, global_batch_size=stage.global_batch_size,
                   max_steps=stage.data_offset_steps + stage.num_steps, stages=[])


def stage_consumed_samples(stage, completed_steps: int) -> int:
    """Samples of the stage's dataset already consumed after `completed_steps` steps of the run."""
    return (stage.data_offset_steps + max(completed_steps - (stage.first_step - 1), 0)) * stage.global_batch_size


def evaluation_due(train_cfg, step: int) -> bool:
    """Every eval_interval steps and at the last step, when evaluation is on (eval_iters > 0)."""
    if train_cfg.eval_iters <= 0:
        return False
    return step == train_cfg.max_steps or (train_cfg.eval_interval > 0 and step % train_cfg.eval_interval == 0)


def _config_dict(cfg: Config) -> dict:
    return asdict(cfg)
