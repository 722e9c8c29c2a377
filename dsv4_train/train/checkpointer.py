"""When and how the training loop writes checkpoints: every `checkpoint.save_interval` steps, at the
end (`checkpoint.save_final`) and on preemption; never from non-finite parameters; an OS error names
the path in one line. Pruning (`checkpoint.keep_last`) never deletes the checkpoint the run resumed
from (`resumed_from`): after a fallback past a damaged latest checkpoint it may be the only verified
one, and it stays until a later run resumes from a newer one."""

from __future__ import annotations

import errno
import os
import shutil
from typing import Optional

from dsv4_train.checkpoint.io import PARTIAL_SUFFIX, TrainState, _rank, list_complete, save_checkpoint, step_dir_name
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
        except (OSError, RuntimeError, CheckpointException) as error:  # ENOSPC, EACCES, EPERM: one line, the path
            partial = os.path.join(self.root, step_dir_name(state.step) + PARTIAL_SUFFIX)
            os_error = os_error_in(error) or diagnose_write_failure(partial, self.root)
            if os_error is None:
                raise
            if _rank() == 0:
                shutil.rmtree(partial, ignore_errors=True)  # an incomplete save: never loaded, only takes space
            raise CheckpointWriteError(
                f"writing the checkpoint of step {state.step} failed: {os_error.strerror or os_error} "
                f"({os_error.filename or partial}); the earlier checkpoints are intact and `latest` still names "
                "the newest of them. Free space or fix the permissions, then run the same command to resume."
            ) from None


def _tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(top, name)) for top, _dirs, names in os.walk(path) for name in names)


def diagnose_write_failure(partial: str, root: str) -> Optional[OSError]:
    """The OS error behind a failed checkpoint write that Megatron-Core's writer reports without it
    (torch's stream writer says only "unexpected pos"; filesystem_async.py then wraps that in a
    RuntimeError): the file system is full when its free space plus what the failed save already wrote
    is less than the newest complete checkpoint (or under 1 MiB when there is none yet); or the
    directory is not writable."""
    directory = partial if os.path.isdir(partial) else root
    if not os.path.isdir(directory):
        return None
    complete = list_complete(root)
    needed = _tree_bytes(complete[-1]) if complete else 1 << 20
    if shutil.disk_usage(directory).free + _tree_bytes(partial) < needed:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), partial)
    if not os.access(directory, os.W_OK | os.X_OK):
        return OSError(errno.EACCES, os.strerror(errno.EACCES), directory)
    return None
