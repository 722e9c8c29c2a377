"""When and how the training loop writes checkpoints: every `checkpoint.save_interval` steps, at the
end (`checkpoint.save_final`) and on preemption; never from non-finite parameters; an OS error names
the path in one line. Pruning (`checkpoint.keep_last`) never deletes the checkpoint the run resumed
from (`resumed_from`): after a fallback past a damaged latest checkpoint it may be the only verified
one, and it stays until a later run resumes from a newer one."""

from __future__ import annotations

from dsv4_train.checkpoint.io import TrainState, save_checkpoint
from dsv4_train.train.nonfinite import NonFiniteStop, parameters_are_finite


class Checkpointer:
    def __init__(self, *, checkpoint_cfg, max_steps: int, root, model_chunks, optimizer, scheduler, device,
                 resumed_from=None):
        self.cfg = checkpoint_cfg
        self.max_steps = max_steps
        self.root = root
        self.model_chunks = model_chunks
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = device
        self.resumed_from = resumed_from

    def interval_due(self, step: int) -> bool:
        """A periodic save at this step (the last step is the final save's)."""
        interval = self.cfg.save_interval
        return bool(interval) and step % interval == 0 and step != self.max_steps

    def final_due(self, state: TrainState, start: TrainState) -> bool:
        return self.cfg.save_final and state.step > start.step

    def save(self, state: TrainState) -> None:
        if not parameters_are_finite(self.model_chunks, self.device):
            raise NonFiniteStop(
                f"step {state.step}: the parameters are not finite, so no checkpoint is written (the last one is "
                "kept). Resume from it with a lower optim.lr."
            )
        try:
            save_checkpoint(self.root, model_chunks=self.model_chunks, optimizer=self.optimizer,
                            scheduler=self.scheduler, state=state, keep_last=self.cfg.keep_last,
                            protect=(self.resumed_from,))
        except OSError as error:  # ENOSPC, EACCES, ...: name the path, keep the message to one line
            raise ValueError(
                f"writing the checkpoint of step {state.step} failed: {error.strerror or error} "
                f"({error.filename or self.root}); the earlier checkpoints are intact. Free space or fix the "
                "permissions, then run the same command to resume."
            ) from None
