"""The training run: start-up (`Trainer.start`), then a short loop over components with one job each:
the runtime, the model chunks (train/loop.py::build_model_chunks), the optimizer and LR schedule
(train/optimizer.py), the staged data and the MTP weight schedule (train/schedules.py), one step
(train/step.py), metrics (train/metrics.py, train/telemetry.py), the non-finite policy
(train/nonfinite.py) and the checkpointer (train/checkpointer.py).

Everything expensive happens after the config, the data inputs and the requested checkpoint have been
checked, so a bad input fails in seconds without writing anything. `Trainer.hooks` are called as
`hook(step, metrics)` after every step, on every rank (metrics are identical across ranks).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Callable, List

from dsv4_train.checkpoint.io import TrainState
from dsv4_train.runtime import distributed as dist_runtime
from dsv4_train.train.aux_metrics import collect_aux_metrics
from dsv4_train.train.checkpointer import EXIT_SAVE_FAILED, Checkpointer, CheckpointWriteError
from dsv4_train.train.evaluate import evaluate
from dsv4_train.train.metrics import MetricsSink
from dsv4_train.train.nonfinite import EXIT_NONFINITE, NonFinitePolicy, NonFiniteStop
from dsv4_train.train.schedules import MtpWeightSchedule, StagedData
from dsv4_train.train.stages import train_only_indexer
from dsv4_train.train.step import StepResult, train_step
from dsv4_train.train.telemetry import StepProfiler, StepTelemetry


class StopDuringStartUp(Exception):
    """A stop signal arrived before the first step."""


@dataclass
class Trainer:
    cfg: object
    runtime: object
    watcher: object
    start_state: TrainState
    model_chunks: list
    optimizer: object
    scheduler: object
    data: StagedData
    mtp: MtpWeightSchedule
    checkpointer: Checkpointer
    sink: MetricsSink
    telemetry: StepTelemetry
    profiler: StepProfiler
    policy: NonFinitePolicy
    hooks: List[Callable[[int, dict], None]] = field(default_factory=list)

    def run(self) -> int:
        """Train to `train.max_steps`; returns the exit code (0, EXIT_PREEMPTED, EXIT_NONFINITE, EXIT_SAVE_FAILED)."""
        state, exit_code = self.start_state, 0
        self.data.enter(self.model_chunks, announce=self.runtime.is_main)
        try:
            for step in range(state.step + 1, self.cfg.train.max_steps + 1):
                if self.data.moved_to(step):
                    self.data.enter(self.model_chunks, announce=self.runtime.is_main)
                stage = self.data.stage
                self.watcher.step_in_flight = step
                result, step_time = self._train_one_step(step, stage)
                state = TrainState(step=step, consumed_samples=state.consumed_samples + stage.global_batch_size,
                                   mtp_loss_weight=self.mtp.weight_at(step))
                metrics = self._record(step, stage, state, result, step_time)
                for hook in self.hooks:
                    hook(step, metrics)
                if self.watcher.should_stop():
                    exit_code = self._save_for_preemption(state)
                    break
                if self.checkpointer.interval_due(step):
                    self.checkpointer.save(state)
            else:
                if self.checkpointer.final_due(state, self.start_state):
                    self.checkpointer.save(state)
        except NonFiniteStop as stop:
            self._say(f"dsv4-train: stopped: {stop}", file=sys.stderr)
            exit_code = EXIT_NONFINITE
        except CheckpointWriteError as error:
            self._say(f"dsv4-train: error: {error}", file=sys.stderr)
            exit_code = EXIT_SAVE_FAILED
        finally:
            self.profiler.close()
            self.sink.close()
            dist_runtime.shutdown()
        return exit_code

    def _train_one_step(self, step: int, stage):
        """One optimizer step (or a skipped one: `train.skip_steps`); returns (StepResult, seconds)."""
        train_cfg = self.cfg.train
        self.mtp.apply(self.model_chunks, step)
        self.profiler.before_step(step)
        t0 = time.monotonic()
        run_step = partial(
            train_step, data_iterator=self.data.data.train_iterator, model_chunks=self.model_chunks,
            optimizer=self.optimizer, scheduler=self.scheduler, num_microbatches=stage.num_microbatches,
            seq_length=stage.seq_length, micro_batch_size=train_cfg.micro_batch_size, hc_mult=self.cfg.model.hc_mult,
            drain_aux_losses=lambda: collect_aux_metrics(stage.num_microbatches), step=step,
        )
        if step in train_cfg.skip_steps:
            result = skip_batches(self.data.data.train_iterator, stage.num_microbatches, self.optimizer)
        elif stage.indexer_phase == "warmup":
            result = train_only_indexer(self.model_chunks, self.optimizer, run_step)
        else:
            result = run_step()
        step_time = time.monotonic() - t0
        trace = self.profiler.after_step(step)
        if trace:
            self._say(f"profiler trace of steps {train_cfg.profile_steps[0]}-{step}: {trace}")
        return result, step_time

    def _record(self, step: int, stage, state: TrainState, result: StepResult, step_time: float) -> dict:
        """The step's metrics (logged to the console / metrics.jsonl / wandb), the spike and skip
        policy, and the evaluation when due."""
        train_cfg = self.cfg.train
        tokens = stage.global_batch_size * stage.seq_length
        metrics = {
            "step": step, "lm_loss": result.lm_loss, "mtp_loss": result.aux.get("mtp_loss", float("nan")),
            "grad_norm": result.grad_norm, "lr": result.lr, "tokens_per_sec": tokens / max(step_time, 1e-9),
            "step_time_s": step_time, "consumed_samples": state.consumed_samples,
            "mtp_loss_weight": state.mtp_loss_weight, "stage": stage.number, "seq_length": stage.seq_length,
            "indexer_phase": stage.indexer_phase,
        }
        for name, value in result.aux.items():
            metrics.setdefault(name, value)
        metrics.update(self.telemetry.measure(seq_length=stage.seq_length, step_time=step_time, tokens=tokens))
        metrics["skipped"] = int(not result.update_successful)
        spiked_over = None if metrics["skipped"] else self.policy.after_good_step(result.lm_loss)
        if spiked_over is not None:
            metrics["loss_spike"] = 1
            self._say(f"loss spike at step {step}: lm_loss {result.lm_loss:.4f} > train.spike_factor="
                      f"{train_cfg.spike_factor} x running mean {spiked_over:.4f}")
        if evaluation_due(train_cfg, step):
            metrics.update(evaluate(
                make_iterator=self.data.data.make_valid_iterator, model_chunks=self.model_chunks,
                eval_iters=train_cfg.eval_iters, num_microbatches=stage.num_microbatches,
                seq_length=stage.seq_length, micro_batch_size=train_cfg.micro_batch_size,
                hc_mult=self.cfg.model.hc_mult, collect_aux=collect_aux_metrics,
            ))
        self.sink.log(metrics, print_line=(step % train_cfg.log_interval == 0 or step == train_cfg.max_steps))
        if metrics["skipped"] and step not in train_cfg.skip_steps:
            self._say(f"step {step}: non-finite loss or gradient on some rank; the step was skipped on every rank")
            self.policy.after_skip(step)
        return metrics

    def _save_for_preemption(self, state: TrainState) -> int:
        from dsv4_train.launch.preemption import EXIT_PREEMPTED

        self._say(f"preemption requested: saving at step {state.step} and exiting with {EXIT_PREEMPTED}")
        self.checkpointer.save(state)
        self.watcher.requeue_if_slurm()
        self.watcher.ignore_further_signals()
        return EXIT_PREEMPTED

    def _say(self, text: str, file=None) -> None:
        if self.runtime.is_main:
            print(text, file=file or sys.stdout, flush=True)

    @classmethod
    def start(cls, cfg, derived, *, watcher, runtime) -> "Trainer":
        """Resume planning (checkpoint verified), model parallel groups, data of the first stage, model,
        optimizer, restore; raises StopDuringStartUp when a stop signal arrives on the way."""
        from megatron.core import parallel_state

        from dsv4_train.checkpoint.resume import checkpoint_root, choose_verified, plan_resume, restore_or_save_initial
        from dsv4_train.train.loop import build_model_chunks
        from dsv4_train.train.optimizer import build_optimizer
        from dsv4_train.train.step import wire_model_config

        ckpt_root = checkpoint_root(cfg)
        # Before any model is built: fails fast when an explicitly requested checkpoint is missing.
        load_path, model_only, start = plan_resume(cfg, ckpt_root)
        verified = choose_verified(cfg, ckpt_root, load_path, is_main=runtime.is_main)  # collective
        if verified != load_path:
            load_path, model_only, start = plan_resume(cfg, ckpt_root, load_path=verified)
        par = cfg.parallel
        dist_runtime.init_model_parallel(tp=par.tp, pp=par.pp, vpp=par.vpp, ep=par.ep, etp=par.etp, cp=par.cp)
        dist_runtime.seed_everything(cfg.run.seed)
        data = StagedData(cfg=cfg, derived=derived, first_step=start.step + 1,
                          dp_rank=parallel_state.get_data_parallel_rank(),
                          dp_size=parallel_state.get_data_parallel_world_size())
        if watcher.should_stop():
            raise StopDuringStartUp

        model_chunks = build_model_chunks(cfg, derived)
        optimizer, scheduler = build_optimizer(model_chunks, cfg=cfg)
        wire_model_config(model_chunks, optimizer)
        start = restore_or_save_initial(cfg, ckpt_root, load_path, model_only, start, model_chunks=model_chunks,
                                        optimizer=optimizer, scheduler=scheduler, is_main=runtime.is_main)
        sink = MetricsSink(run_dir=cfg.run.dir, logging_cfg=cfg.logging, is_main=runtime.is_main,
                           config_dict=asdict(cfg), max_steps=cfg.train.max_steps, num_stages=data.num_stages,
                           resume_step=start.step)
        if watcher.should_stop():
            sink.close()
            raise StopDuringStartUp
        if runtime.is_main:
            print(f"training {cfg.model.name} on {runtime.world_size} process(es) ({runtime.device.type}/"
                  f"{runtime.backend}), dp={parallel_state.get_data_parallel_world_size()}, micro-batches/step="
                  f"{data.stage.num_microbatches}, data: {data.data.describe()}", flush=True)
            if cfg.model.compile:
                print("model.compile=true: the first steps compile each kind of block (minutes on CPU; the step "
                      "line's time includes it), later steps run the compiled graphs", flush=True)
        return cls(
            cfg=cfg, runtime=runtime, watcher=watcher, start_state=start, model_chunks=model_chunks,
            optimizer=optimizer, scheduler=scheduler, data=data,
            mtp=MtpWeightSchedule(cfg.model, derived.decay_start_step),
            checkpointer=Checkpointer(checkpoint_cfg=cfg.checkpoint, max_steps=cfg.train.max_steps, root=ckpt_root,
                                      model_chunks=model_chunks, optimizer=optimizer, scheduler=scheduler,
                                      device=runtime.device, resumed_from=load_path),
            sink=sink,
            telemetry=StepTelemetry(cfg=cfg, model_chunks=model_chunks, device=runtime.device,
                                    world_size=runtime.world_size),
            profiler=StepProfiler(cfg.train.profile_steps, run_dir=cfg.run.dir, rank=runtime.rank,
                                  device=runtime.device),
            policy=NonFinitePolicy(cfg.train),
        )


def run_training(cfg, derived) -> int:
    """Train; returns the process exit code (0, EXIT_PREEMPTED after a preemption save, EXIT_NONFINITE)."""
    from dsv4_train.launch.preemption import PreemptionWatcher

    watcher = PreemptionWatcher.install()  # a stop signal during start-up is honoured too
    runtime = dist_runtime.init_process_group(device_request=cfg.run.device,
                                              timeout_s=int(cfg.run.dist_timeout_minutes * 60))
    try:
        trainer = Trainer.start(cfg, derived, watcher=watcher, runtime=runtime)
    except StopDuringStartUp:
        return _stop_during_start_up(watcher, runtime)
    return trainer.run()


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


def evaluation_due(train_cfg, step: int) -> bool:
    """Every eval_interval steps and at the last step, when evaluation is on (eval_iters > 0)."""
    if train_cfg.eval_iters <= 0:
        return False
    return step == train_cfg.max_steps or (train_cfg.eval_interval > 0 and step % train_cfg.eval_interval == 0)
