"""The one typed configuration schema of a dsv4-train run.

Every YAML file under `conf/` and `recipes/` is data for these dataclasses; Hydra composes them in
struct mode, so an unknown key or a wrongly typed value fails at compose time naming the key.
Cross-field rules live in `validate.py`; derived values (DP size, micro-batches, ...) in `derive.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from dsv4_train.config.model import ModelConfig


@dataclass
class ObjectiveConfig:
    """The number a run reports to a sweep (its task return value, and `result.json`)."""

    # auto: the final val_loss when train.eval_iters > 0, else the mean lm_loss of the last `last_n`
    # steps; or a metrics.jsonl key (val_* keys: their final value; others: the mean of the last_n steps).
    metric: str = "auto"
    direction: str = "minimize"  # minimize | maximize
    last_n: int = 10


@dataclass
class RunConfig:
    """Where the run writes and how it starts."""

    dir: str = "runs/default"  # output directory: resolved config, metrics.jsonl, logs, checkpoints
    name: str = "dsv4"
    seed: int = 1234
    plan_only: bool = False  # print the parameter/FLOPs/memory plan and exit without building anything heavy
    device: str = "auto"  # auto | cpu | cuda
    # Dense bf16 peak TFLOP/s of one accelerator for the `mfu` metric; None = a table of common GPUs
    # (train/telemetry.py), no MFU on CPU.
    peak_tflops: Optional[float] = None
    # How long a collective may wait for the other ranks before the job fails (NCCL/gloo timeout).
    dist_timeout_minutes: float = 10.0
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)


@dataclass
class ParallelConfig:
    """Parallel layout. world size = tp * pp * cp * dp; experts use ep * etp * edp = tp * cp * dp."""

    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None  # virtual stages per pipeline rank (interleaved schedule)
    ep: int = 1
    etp: Optional[int] = None  # expert tensor parallel; None = same as tp
    cp: int = 1
    sp: bool = False  # sequence parallel (requires tp > 1)
    distributed_optimizer: bool = True
    # Overlap the gradient reduce-scatter / all-reduce with the backward (bucket by bucket).
    # null = on with CUDA (Megatron-LM's cluster default), off on CPU.
    overlap_grad_reduce: Optional[bool] = None
    ddp_bucket_size: Optional[int] = None  # parameters per gradient bucket; null = Megatron's (max(40M, 1M x dp) when overlapping)
    moe_dispatcher: str = "auto"  # auto (allgather without EP, else alltoall) | alltoall | allgather
    pipeline_layout: Optional[str] = None  # explicit layout; None derives one
    # Megatron layout syntax, e.g. "Et*11|t*11|t*11|t*10,mL" (E embedding, t layer, m MTP, L loss,
    # '|' between virtual stages in stage order). Needed when num_layers is not divisible by pp*vpp.
    world_size: Optional[int] = None  # the world size this layout is written for; checked against
    # the launched one, and used by run.plan_only when nothing is launched. None = whatever is launched.


@dataclass
class OptimConfig:
    """AdamW, or Muon for matrices with AdamW for the rest (paper §2.4), with linear warm-up, then
    constant / cosine / WSD / linear decay."""

    optimizer: str = "adamw"  # adamw | muon (Muon: hidden matrices; AdamW: embeddings, head, norms, mHC scalars)
    lr: float = 3.0e-4
    min_lr: float = 3.0e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1.0e-8
    clip_grad: float = 1.0
    warmup_steps: int = 10
    decay_style: str = "cosine"  # constant | cosine | linear | wsd
    decay_steps: Optional[int] = None  # None = train.max_steps - warmup_steps
    wsd_decay_steps: Optional[int] = None  # length of the final WSD decay; None = 20% of decay_steps
    wsd_decay_style: str = "cosine"  # shape of the final WSD decay: cosine | linear | exponential | minus_sqrt
    muon_momentum: float = 0.95  # Muon's Nesterov momentum mu
    muon_ns_dtype: str = "fp32"  # dtype of the Newton-Schulz iteration: fp32 | bf16


@dataclass
class StageConfig:
    """One stage of a staged schedule (paper §4.2: 4K -> 16K -> 64K, indexer dense -> warm-up -> sparse).

    A stage begins after `start_step` optimizer steps (its first step is start_step + 1); a field left
    null keeps the previous stage's value (the first stage's: the top-level train/model keys)."""

    start_step: int = 0
    seq_length: Optional[int] = None
    global_batch_size: Optional[int] = None
    indexer_phase: Optional[str] = None  # dense | warmup (only the indexer trains) | sparse


@dataclass
class TrainConfig:
    """Steps, batch and precision."""

    max_steps: int = 100
    global_batch_size: int = 8  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 2  # sequences per forward pass on one rank
    seq_length: int = 64
    precision: str = "fp32"  # fp32 | bf16
    log_interval: int = 1
    # Activation recompute: none | selective (the modules in recompute_modules) | full (every block
    # recomputed from its input streams). Also the assumption of the memory plan.
    recompute: str = "none"
    # With recompute=selective: which parts to recompute (model/recompute.py: mhc, moe_act);
    # [] = all of them.
    recompute_modules: List[str] = field(default_factory=list)
    deterministic: bool = False
    # Validation loss: eval_iters global batches of the validation split (0 = never), every
    # eval_interval steps (0 = only at the end of training) and at the end.
    eval_interval: int = 0
    eval_iters: int = 0
    # Staged schedule: sequence length, batch and indexer phase switch at stage boundaries. Empty = one
    # stage from train.seq_length, train.global_batch_size and model.indexer_phase.
    stages: List[StageConfig] = field(default_factory=list)
    # A step with a NaN/Inf loss or gradient on any rank: skip (no update anywhere) or stop the run.
    on_nonfinite: str = "skip"
    max_skipped_steps: int = 10  # consecutive skipped steps before the run stops as diverged
    spike_factor: float = 3.0  # log a loss above this x the running mean of recent steps; 0 = off
    skip_steps: List[int] = field(default_factory=list)  # steps whose batch is read and not trained on
    # [first, last]: write a torch profiler trace of these steps to <run.dir>/profile/; [] = off.
    profile_steps: List[int] = field(default_factory=list)


@dataclass
class DataConfig:
    """Where tokens come from."""

    kind: str = "embedded"  # embedded | indexed | mock
    paths: List[str] = field(default_factory=list)  # indexed dataset prefixes (without .bin/.idx), optionally weighted "w prefix"
    tokenizer: Optional[str] = None  # tokenizer.json; None = the embedded byte-level BPE
    split: str = "98,2,0"
    cache_dir: Optional[str] = None  # None = <repo>/.cache/data (embedded corpus, tokenizer, index caches)
    num_workers: int = 0
    eod_token: Optional[str] = None  # end-of-document token of data.tokenizer; None = first known one (<|endoftext|>, DeepSeek's, </s>, ...)
    # Packed documents attend to and are compressed within themselves (segments end at each EOD
    # token; RoPE restarts per document): V4's sample-level attention masking.
    document_mask: bool = False


@dataclass
class LoggingConfig:
    """Console, metrics.jsonl and optional wandb."""

    wandb: bool = False
    wandb_project: str = "dsv4-train"
    wandb_mode: str = "auto"  # auto (online when a wandb API key is configured, else offline) | offline | online | disabled
    wandb_group: Optional[str] = None
    console: bool = True


@dataclass
class CheckpointConfig:
    """Saving and resuming with megatron.core.dist_checkpointing."""

    save_interval: int = 0  # steps between saves; 0 = only at the end
    save_final: bool = True
    load: str = "auto"  # auto (latest complete in <run.dir>/checkpoints) | none | <path to a checkpoint dir>
    dir: Optional[str] = None  # None = <run.dir>/checkpoints
    keep_last: int = 2  # complete checkpoints kept; the one this run resumed from is kept too (train/checkpointer.py)
    # Save the freshly initialised weights as step 0 before training (reference weights for
    # layout-parity checks, or a fixed starting point for a sweep).
    save_initial: bool = False
    # Load only the model weights from checkpoint.load and start at step 0 with a fresh optimizer,
    # scheduler and data position (fine-tuning from a pre-trained checkpoint).
    load_model_only: bool = False
    # Before loading: full (sizes and CRC32 of every file against the checkpoint's manifest) | size | off.
    # A failing latest checkpoint of this run falls back to the newest one that passes.
    verify: str = "full"


@dataclass
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
