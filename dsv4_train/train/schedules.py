"""Step-indexed schedules of a run other than the learning rate (Megatron's scheduler owns that):
the staged data schedule (`train.stages`) and the MTP loss weight."""

from __future__ import annotations

from dataclasses import replace

from dsv4_train.train.stages import set_indexer_phase


class MtpWeightSchedule:
    """MTP loss weight: `model.mtp_loss_weight`, then `mtp_loss_weight_after_decay` once the LR decays
    (paper §4.2.2)."""

    def __init__(self, model_cfg, decay_start_step):
        self.model_cfg = model_cfg
        self.decay_start_step = decay_start_step

    def weight_at(self, step: int) -> float:
        decaying = self.decay_start_step is not None and step > self.decay_start_step
        return self.model_cfg.mtp_loss_weight_after_decay if decaying else self.model_cfg.mtp_loss_weight

    def apply(self, model_chunks, step: int) -> float:
        weight = self.weight_at(step)
        for chunk in model_chunks:
            while hasattr(chunk, "module"):  # the DSV4Model inside the DDP / Float16Module wrappers
                chunk = chunk.module
            setter = getattr(chunk, "set_mtp_loss_weight", None)
            if setter is not None:
                setter(weight)
        return weight


class StagedData:
    """The data of the current stage of `train.stages`, rebuilt at each boundary from the samples the
    run has consumed, so a resume anywhere (a boundary included) reads what an uninterrupted run reads."""

    def __init__(self, *, cfg, derived, first_step: int, dp_rank: int, dp_size: int):
        self.cfg = cfg
        self.derived = derived
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.num_stages = len(derived.train_stages)
        self.stage = derived.train_stage_at(first_step)
        self.data = self._build(self.stage, completed_steps=first_step - 1)

    def _build(self, stage, completed_steps: int):
        from dsv4_train.data import build_data

        return build_data(
            data_cfg=self.cfg.data, train_cfg=stage_data_view(self.cfg.train, stage), vocab_size=self.cfg.model.vocab_size,
            seed=self.cfg.run.seed, dp_rank=self.dp_rank, dp_size=self.dp_size,
            consumed_samples=stage_consumed_samples(stage, completed_steps),
        )

    def moved_to(self, step: int) -> bool:
        """Switch to the stage of `step` (True when that is a new stage)."""
        if step <= self.stage.last_step:
            return False
        self.stage = self.derived.train_stage_at(step)
        self.data = self._build(self.stage, completed_steps=step - 1)
        return True

    def enter(self, model_chunks, *, announce: bool) -> None:
        """Set the model to the current stage (its indexer phase) and say so when there are stages."""
        stage = self.stage
        set_indexer_phase(model_chunks, stage.indexer_phase)
        if announce and self.num_stages > 1:
            print(
                f"{stage.name} of {self.num_stages}: seq_length {stage.seq_length}, global batch "
                f"{stage.global_batch_size} ({stage.num_microbatches} micro-batches/step), indexer "
                f"{stage.indexer_phase}" + (" (only the indexer trains)" if stage.indexer_phase == "warmup" else ""),
                flush=True,
            )


def stage_data_view(train_cfg, stage):
    """The train keys `build_data` reads, for one stage: its sample shape, and a run length that
    covers the stage's data offset plus its own steps."""
    return replace(train_cfg, seq_length=stage.seq_length, global_batch_size=stage.global_batch_size,
                   max_steps=stage.data_offset_steps + stage.num_steps, stages=[])


def stage_consumed_samples(stage, completed_steps: int) -> int:
    """Samples of the stage's dataset already consumed after `completed_steps` steps of the run."""
    return (stage.data_offset_steps + max(completed_steps - (stage.first_step - 1), 0)) * stage.global_batch_size
