"""Values derived once from a validated config: parallel sizes, micro-batches, schedule points and
the pipeline layout (which layers live on which (pp rank, virtual stage)).

The layout uses Megatron-Core's `pipeline_model_parallel_layout` string syntax ("E" embedding,
"t" decoder layer, "m" MTP layer, "L" loss, "|" between virtual stages listed in stage order,
"(..)*n" and "x*n" repeat, commas are cosmetic); `layout_str` is always filled so the model builder
can hand Megatron an explicit layout. It is parsed here in plain Python so that planning and
validation never import megatron.core.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional

LAYOUT_CHARS = {"E": "embedding", "t": "decoder", "m": "mtp", "L": "loss"}


@dataclass
class StageLayout:
    """One virtual pipeline stage: the layers it builds."""

    pp_rank: int
    vpp_stage: int
    decoder_layers: List[int]  # global main-layer indices
    mtp_layers: List[int]  # MTP depth indices (0-based)
    has_embedding: bool
    has_loss: bool
    hash_layers: List[int]  # the hash-routed decoder layers of this stage


@dataclass(frozen=True)
class TrainStage:
    """One resolved stage of the training schedule: steps first_step..last_step (1-based, inclusive).

    Data: each stage reads its own dataset of `seq_length`-token samples; it starts at the sample that
    follows the tokens the earlier stages consumed (`data_offset_steps` whole steps of this stage's
    shape), so a longer stage continues through the corpus instead of re-reading its start.
    """

    number: int  # 1-based position in the schedule (console and metrics)
    source: Optional[int]  # index into train.stages; None = the top-level keys
    first_step: int
    last_step: int
    seq_length: int
    global_batch_size: int
    indexer_phase: str
    num_microbatches: int  # per optimizer step, per DP rank
    data_offset_steps: int

    @property
    def num_steps(self) -> int:
        return self.last_step - self.first_step + 1

    @property
    def name(self) -> str:
        where = "top-level keys" if self.source is None else f"train.stages[{self.source}]"
        return f"stage {self.number} ({where}, steps {self.first_step}-{self.last_step})"


@dataclass
class Derived:
    world_size: int
    dp: int  # data-parallel size of the dense part
    ep: int
    etp: int  # expert tensor parallel (defaults to tp)
    edp: int  # expert data-parallel: tp * cp * dp / (ep * etp)
    vpp: int  # virtual stages per pp rank (1 when not interleaved)
    num_microbatches: int  # per optimizer step, per DP rank
    tokens_per_step: int  # global_batch_size * seq_length
    decay_start_step: Optional[int]  # first step of LR decay (MTP weight switch); None = never
    decay_end_step: int
    layout_str: str  # Megatron pipeline_model_parallel_layout string
    stages: List[StageLayout] = field(default_factory=list)  # ordered by (vpp_stage, pp_rank)
    train_stages: List[TrainStage] = field(default_factory=list)  # the schedule, in step order

    def train_stage_at(self, step: int) -> TrainStage:
        """The stage that trains 1-based `step` (steps past the schedule belong to the last stage)."""
        for stage in self.train_stages:
            if step <= stage.last_step:
                return stage
        return self.train_stages[-1]

    def stage(self, pp_rank: int, vpp_stage: int = 0) -> StageLayout:
        for s in self.stages:
            if s.pp_rank == pp_rank and s.vpp_stage == vpp_stage:
                return s
        raise KeyError((pp_rank, vpp_stage))

    def stages_of_rank(self, pp_rank: int) -> List[StageLayout]:
        return [s for s in self.stages if s.pp_rank == pp_rank]


def parse_layout(layout: str) -> List[List[str]]:
    """Megatron's layout grammar -> one list of layer kinds per virtual stage (stage order).

    Raises ValueError on characters outside E/t/m/L.
    """
    text = layout.replace(",", "").replace(" ", "")
    for pattern in (r"\(([^)]+)\)\*(\d+)", r"(.)\*(\d+)"):
        text = re.sub(pattern, lambda x: x.group(1) * int(x.group(2)), text)
    stages = []
    for stage in text.split("|"):
        kinds = []
        for ch in stage:
            if ch not in LAYOUT_CHARS:
                raise ValueError(
                    f"parallel.pipeline_layout={layout!r} contains {ch!r}; use only E (embedding), "
                    "t (decoder layer), m (MTP layer), L (loss), '|' between stages, (..)*n and x*n."
                )
            kinds.append(LAYOUT_CHARS[ch])
        stages.append(kinds)
    return stages


def default_layout(*, num_layers: int, mtp_num_layers: int, pp: int, vpp: int) -> str:
    """The decoder layers over pp*vpp virtual stages; the embedding on the first, MTP and the loss on
    the last.

    An even split when the layers divide; otherwise every stage gets at least one layer and each
    further layer goes to the stage with the least work so far, counting the embedding as one layer
    and the MTP block plus the output layer as `mtp_num_layers + 1` (so the first and last stages
    are lighter, as hand-written layouts for V4-Flash are).
    """
    n_stages = pp * vpp
    if num_layers % n_stages == 0:
        counts = [num_layers // n_stages] * n_stages
    else:
        extra = [0] * n_stages
        extra[0] += 1
        extra[-1] += mtp_num_layers + 1
        counts = [1] * n_stages
        for _ in range(num_layers - n_stages):
            lightest = min(range(n_stages), key=lambda i: (counts[i] + extra[i], i))
            counts[lightest] += 1
    parts = []
    for i, count in enumerate(counts):
        s = ("E" if i == 0 else "") + "t" * count
        if i == n_stages - 1:
            s += "m" * mtp_num_layers + "L"
        parts.append(s)
    return "|".join(compress_stage(p) for p in parts)


def compress_stage(stage: str) -> str:
    """'Ettt' -> 'Et*3' (readability only)."""
    return re.sub(r"(t{2,})", lambda x: f"t*{len(x.group(1))}", stage)


def build_stages(layout: str, *, pp: int, num_hash_layers: int) -> List[StageLayout]:
    """Assign global layer indices to each virtual stage of a parsed layout."""
    parsed = parse_layout(layout)
    stages = []
    next_decoder = next_mtp = 0
    for i, kinds in enumerate(parsed):
        decoder, mtp = [], []
        for kind in kinds:
            if kind == "decoder":
                decoder.append(next_decoder)
                next_decoder += 1
            elif kind == "mtp":
                mtp.append(next_mtp)
                next_mtp += 1
        st = StageLayout(
            pp_rank=i % pp,
            vpp_stage=i // pp,
            decoder_layers=decoder,
            mtp_layers=mtp,
            has_embedding="embedding" in kinds,
            has_loss="loss" in kinds,
            hash_layers=[j for j in decoder if j < num_hash_layers],
        )
        stages.append(st)
    return stages


def decay_points(cfg) -> tuple:
    """(decay_start_step, decay_end_step) of the LR schedule.

    decay_steps defaults to max_steps - warmup_steps; cosine/linear decay from warmup_steps to
    warmup_steps + decay_steps; WSD holds the peak and decays over its last wsd_decay_steps (default
    20% of decay_steps); constant never decays (None).
    """
    o, t = cfg.optim, cfg.train
    decay_steps = o.decay_steps if o.decay_steps is not None else max(t.max_steps - o.warmup_steps, 0)
    end = o.warmup_steps + decay_steps
    if o.decay_style == "constant":
        return None, end
    if o.decay_style == "wsd":
        wsd = o.wsd_decay_steps if o.wsd_decay_steps is not None else int(0.2 * decay_steps)
        return end - wsd, end
    return o.warmup_steps, end


def stage_settings(cfg) -> List[tuple]:
    """[(source, start_step, seq_length, global_batch_size, indexer_phase)] with nulls filled in from
    the previous stage; the top-level keys form an implicit first stage unless a stage starts at 0.
    Stages that begin at or after train.max_steps are listed too (validation checks them)."""
    t = cfg.train
    current = (None, 0, t.seq_length, t.global_batch_size, cfg.model.indexer_phase)
    settings = [current]
    for index, stage in enumerate(getattr(t, "stages", None) or []):
        current = (
            index,
            stage.start_step,
            stage.seq_length if stage.seq_length is not None else current[2],
            stage.global_batch_size if stage.global_batch_size is not None else current[3],
            stage.indexer_phase if stage.indexer_phase is not None else current[4],
        )
        if stage.start_step == 0:
            settings = []
        settings.append(current)
    return settings


def resolve_train_stages(cfg, dp: int) -> List[TrainStage]:
    """The stages that run within train.max_steps, with their step ranges and data offsets."""
    t = cfg.train
    settings = [s for s in stage_settings(cfg) if s[1] < t.max_steps]
    stages: List[TrainStage] = []
    tokens_before = 0
    for number, (source, start, seq, gbs, phase) in enumerate(settings, start=1):
        last = settings[number][1] if number < len(settings) else t.max_steps
        tokens_per_step = seq * gbs
        stages.append(TrainStage(
            number=number, source=source, first_step=start + 1, last_step=last, seq_length=seq,
            global_batch_size=gbs, indexer_phase=phase,
            num_microbatches=gbs // (t.micro_batch_size * dp),
            data_offset_steps=-(-tokens_before // tokens_per_step),
        ))
        tokens_before += (last - start) * tokens_per_step
    return stages


def derive(cfg, *, world_size: Optional[int] = None) -> Derived:
    """Derived values of a config already passed through validate().

    world_size None uses cfg.parallel.world_size, else 1 (a single process).
    """
    p, m, t = cfg.parallel, cfg.model, cfg.train
    if world_size is None:
        world_size = p.world_size if getattr(p, "world_size", None) else 1
    etp = p.etp if p.etp is not None else p.tp
    model_ranks = p.tp * p.pp * p.cp
    assert world_size % model_ranks == 0, "validate() must run before derive()"
    dp = world_size // model_ranks
    edp = (p.tp * p.cp * dp) // (p.ep * etp)
    vpp = p.vpp or 1
    layout = p.pipeline_layout or default_layout(
        num_layers=m.num_layers, mtp_num_layers=m.mtp_num_layers, pp=p.pp, vpp=vpp
    )
    start, end = decay_points(cfg)
    return Derived(
        world_size=world_size,
        dp=dp,
        ep=p.ep,
        etp=etp,
        edp=edp,
        vpp=vpp,
        num_microbatches=t.global_batch_size // (t.micro_batch_size * dp),
        tokens_per_step=t.global_batch_size * t.seq_length,
        decay_start_step=start,
        decay_end_step=end,
        layout_str=layout,
        stages=build_stages(layout, pp=p.pp, num_hash_layers=m.num_hash_layers),
        train_stages=resolve_train_stages(cfg, dp),
    )


# Selective recompute's modules (model/recompute.py implements them). Here, torch-free, because
# validation and the plan read them before torch is imported.
RECOMPUTE_MODULES = ("mhc", "moe_act")


def selected_modules(recompute: str, modules) -> tuple:
    """The modules a run recomputes: none unless selective; an empty list means all of them."""
    if recompute != "selective":
        return ()
    return tuple(modules) if modules else RECOMPUTE_MODULES
