"""When and how the training loop writes checkpoints: every `checkpoint.save_interval` steps, at the
end (`checkpoint.save_final`) and on preemption; never from non-finite parameters; an OS error names
the path in one line. Pruning (`checkpoint.keep_last`) never deletes the checkpoint the run resumed
from (`resumed_from`): after a fallback past a damaged latest checkpoint it may be the only verified
one, and it stays until a later run resumes from a newer one."""

from __future__ import annotations

from typing import Optional

from dsv4_train.checkpoint.io import TrainState, save_checkpoint
from dsv4_train.train.nonfinite import NonFiniteStop, parameters_are_finite

EXIT_SAVE_FAILED = 74  # EX_IOERR of sysexits.h (as 75, EXIT_PREEMPTED, is EX_TEMPFAIL); docs/launching.md


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (an OS error: no space, no permission, ...)."""


def os_error_in(error: BaseException) -> Optional[OSError]:
    """The OSError behind `error`: itself, its cause/context chain, or one of the per-rank failures of
    torch.distributed.checkpoint's CheckpointException (which wraps the writer's OSError)."""
    seen = set()
    todo = [error]
    while todo:
        current = todo.pop(0)
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError):
            return current
        todo += [current.__cause__, current.__context__]
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):  # rank -> WRAPPED_EXCEPTION, an (exception, traceback summary) pair
            todo += [f[0] if isinstance(f, tuple) and f else f for f in failures.values()]
    return None


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
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

        try:
            save_checkpoint(self.root, model_chunks=self.model_chunks, optimizer=self.optimizer,
                            scheduler=self.scheduler, state=state, keep_last=self.cfg.keep_last,
                            protect=(self.resumed_from,))
        except (OSError, CheckpointException) as error:  # ENOSPC, EACCES, EPERM: one line naming the path
            os_error = os_error_in(error)
            if os_error is None:
                raise
            raise CheckpointWriteError(
                f"writing the checkpoint of step {state.step} failed: {os_error.strerror or os_error} "
                f"({os_error.filename or self.root}); the earlier checkpoints are intact and `latest` still names "
                "the newest of them. Free space or fix the permissions, then run the same command to resume."
            ) from None
