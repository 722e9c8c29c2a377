"""Stop cleanly when the scheduler asks: a signal sets a flag, ranks agree at a step boundary.

Protocol (the training loop's side is three lines):

    watcher = PreemptionWatcher.install()
    ...
    if watcher.should_stop():          # every rank, at every step boundary
        save_checkpoint(step)          # collective; "latest" moves only once the save is complete
        watcher.requeue_if_slurm()     # rank 0 runs `scontrol requeue $SLURM_JOB_ID` under Slurm
        sys.exit(EXIT_PREEMPTED)

Why a flag and an all-reduce: a signal can arrive on some ranks and not others, or between two
collectives; saving from inside a handler would deadlock or corrupt a collective in flight. The
handler therefore only records the signal, and `should_stop()` all-reduces the flag (MAX) over the
default process group so every rank takes the same branch at the same step.

Which signal: the Slurm template asks for SIGUSR1 120 s before the time limit
(`#SBATCH --signal=USR1@120`, delivered to every task of every step); Slurm preemption and
`scancel` send SIGTERM; torchrun forwards SIGTERM (and SIGINT) to its workers. SIGINT is left to
Python so Ctrl-C still interrupts at once.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from types import FrameType
from typing import Iterable, Optional

import torch

log = logging.getLogger(__name__)

EXIT_PREEMPTED: int = 75
"""Exit code of a run that stopped on a signal after saving a checkpoint (EX_TEMPFAIL: "try again").

Relaunching the same command resumes from that checkpoint. `launch/torchrun.sh` and the Slurm
template pass it through; any other non-zero code means the run failed.
"""

REQUEUE_ENV = "DSV4_REQUEUE"
"""Set to 0 to stop `requeue_if_slurm()` from requeueing (the run still saves and exits 75)."""

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class PreemptionWatcher:
    """Records stop signals and turns them into one agreed decision per step boundary."""

    _installed: Optional["PreemptionWatcher"] = None

    def __init__(self) -> None:
        self._received: Optional[int] = None  # signal number of the first stop signal
        self._agreed = False
        # The loop sets `step_in_flight` as each step starts, so the log says when the signal landed
        # and the save step can be checked against it (the step in flight, or the next one when it
        # lands between a step's agreement and the next step's start).
        self.step_in_flight: Optional[int] = None  # None: before the first step (start-up)
        self.received_during_step: Optional[int] = None

    @classmethod
    def install(cls, signals: Iterable[int] = DEFAULT_SIGNALS) -> "PreemptionWatcher":
        """Install the flag-setting handler for `signals` (main thread only) and return the watcher.

        Calling it again returns the same watcher, so a second install cannot lose a flag.
        """
        if cls._installed is None:
            cls._installed = cls()
        watcher = cls._installed
        for signum in signals:
            signal.signal(signum, watcher._on_signal)
        return watcher

    @classmethod
    def uninstall(cls) -> None:
        """Restore default handlers for the stop signals and forget the watcher (tests, tools)."""
        if cls._installed is not None:
            for signum in DEFAULT_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
        cls._installed = None

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        # Only set a flag: no I/O beyond one line on stderr, no collectives, no locks.
        if self._received is None:
            self._received = signum
            self.received_during_step = self.step_in_flight
            when = "during start-up" if self.step_in_flight is None else f"during step {self.step_in_flight}"
            sys.stderr.write(
                f"[dsv4_train] received {signal.Signals(signum).name} {when}: will save a checkpoint and exit "
                f"with code {EXIT_PREEMPTED} at the next step boundary\n"
            )

    @property
    def received_signal(self) -> Optional[int]:
        """The first stop signal this process received, or None."""
        return self._received

    def should_stop(self) -> bool:
        """True on every rank iff any rank has received a stop signal (a collective when distributed).

        Must be called by all ranks of the default process group at the same step boundaries.
        """
        if self._agreed:
            return True
        local = 1 if self._received is not None else 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            device = torch.device("cpu")
            if torch.distributed.get_backend() == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            flag = torch.tensor([local], dtype=torch.int32, device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            local = int(flag.item())
        self._agreed = local > 0
        return self._agreed

    @staticmethod
    def ignore_further_signals() -> None:
        """Once the stop is saved and agreed: later stop signals are ignored, so that the exit code stays
        EXIT_PREEMPTED. (Python restores the default action of signals it handled while it finalises;
        a SIGTERM then, e.g. srun's --kill-on-bad-exit reacting to a sibling rank that exited 75
        first, would turn this rank's exit into 143. An ignored signal stays ignored.)"""
        for signum in DEFAULT_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)

    def requeue_if_slurm(self) -> None:
        """Hand over after the checkpoint is saved: requeue the Slurm job once.

        Waits for every rank (so no rank is still writing when Slurm tears the job down), then on
        global rank 0 runs `scontrol requeue $SLURM_JOB_ID` when running under Slurm and
        DSV4_REQUEUE is not 0. A failed requeue is logged, never raised: the checkpoint is safe and
        the job can be resubmitted by hand.
        """
        rank = 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            rank = torch.distributed.get_rank()
        if rank != 0:
            return
        job_id = os.environ.get("SLURM_JOB_ID")
        if not job_id or os.environ.get(REQUEUE_ENV, "1") == "0":
            return
        # An array task is requeued by its own id: SLURM_JOB_ID is that id inside an array task.
        try:
            result = subprocess.run(
                ["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            log.warning("could not requeue Slurm job %s (%s); resubmit it by hand to resume", job_id, err)
            return
        if result.returncode != 0:
            log.warning(
                "`scontrol requeue %s` failed (%s); resubmit the job by hand to resume",
                job_id,
                result.stderr.strip() or f"exit {result.returncode}",
            )
        else:
            log.warning("requeued Slurm job %s; the relaunch resumes from the saved checkpoint", job_id)
