"""Non-finite steps and loss spikes (`train.on_nonfinite`, `train.max_skipped_steps`, `train.spike_factor`).

A step whose loss or any gradient is NaN/Inf on any rank is skipped on every rank: the ranks agree
through one all-reduce of a flag, the optimizer does not step, the LR schedule does not advance and
the noaux_tc expert biases (updated inside the backward's grad finalisation) are put back, so the
parameters are exactly those of a run that never trained on that batch. `stop` ends the run at the
first such step; `skip` ends it after more than `max_skipped_steps` in a row (a diverged run). A
checkpoint is never written from non-finite parameters. Megatron-Core's own NaN check raises inside
the backward instead, so it is off (loop.py) and this module decides.

Test hook: `DSV4_TEST_NAN_AT_STEP=<step>` makes that step's gradients NaN on rank 0 only.
"""

from __future__ import annotations

import math
import os
from collections import deque
from typing import List, Optional

import torch

EXIT_NONFINITE = 3  # documented in docs/launching.md


class NonFiniteStop(RuntimeError):
    """The run must stop: non-finite values under the configured policy."""


def _grad_buffers(model_chunks) -> list:
    return [b for chunk in model_chunks for b in (list(getattr(chunk, "buffers", [])) +
                                                   list(getattr(chunk, "expert_parallel_buffers", [])))]


def _any_rank(flag: bool, device) -> bool:
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item() > 0)


def step_is_finite(model_chunks, lm_loss: float, device) -> bool:
    """True on every rank iff the loss and every rank's gradients are finite."""
    # One host read for all buffers (not one per buffer), then one all-reduce of the flag.
    finite = [torch.isfinite(buffer.grad_data).all() for buffer in _grad_buffers(model_chunks)]
    bad = not math.isfinite(lm_loss) or (bool(finite) and not bool(torch.stack(finite).all()))
    return not _any_rank(bad, device)


def parameters_are_finite(model_chunks, device) -> bool:
    bad = any(not bool(torch.isfinite(p).all()) for chunk in model_chunks for p in chunk.parameters())
    return not _any_rank(bad, device)


def inject_nan_if_asked(model_chunks, step: int) -> None:
    """The test hook (see module doc)."""
    wanted = os.environ.get("DSV4_TEST_NAN_AT_STEP")
    if wanted is None or int(wanted) != step:
        return
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        _grad_buffers(model_chunks)[0].grad_data.view(-1)[0] = float("nan")


def expert_biases(model_chunks) -> List[torch.Tensor]:
    return [m.expert_bias for chunk in model_chunks for m in chunk.modules()
            if getattr(m, "expert_bias", None) is not None]


class NonFinitePolicy:
    """Counts skipped steps, decides when to stop, and watches for loss spikes."""

    def __init__(self, train_cfg, *, window: int = 20):
        self.mode = train_cfg.on_nonfinite
        self.max_skipped = train_cfg.max_skipped_steps
        self.spike_factor = train_cfg.spike_factor
        self.in_a_row = 0
        self.total = 0
        self._recent = deque(maxlen=window)

    def after_skip(self, step: int) -> None:
        self.in_a_row += 1
        self.total += 1
        if self.mode == "stop":
            raise NonFiniteStop(
                f"step {step}: the loss or a gradient is not finite; the step was not applied and the run stops "
                "(train.on_nonfinite=stop). Resume from the last checkpoint with a lower optim.lr, or skip the "
                f"batch with train.skip_steps=[{step}], or set train.on_nonfinite=skip."
            )
        if self.in_a_row > self.max_skipped:
            raise NonFiniteStop(
                f"step {step}: {self.in_a_row} steps in a row had a non-finite loss or gradient (more than "
                f"train.max_skipped_steps={self.max_skipped}); the run has diverged and stops. Resume from the "
                "last checkpoint with a lower optim.lr (or a longer optim.warmup_steps)."
            )

    def after_good_step(self, lm_loss: float) -> Optional[float]:
        """The running mean the loss spiked above (None when it did not)."""
        self.in_a_row = 0
        mean = sum(self._recent) / len(self._recent) if self._recent else None
        self._recent.append(lm_loss)
        if self.spike_factor > 0 and mean is not None and len(self._recent) > 5 and lm_loss > self.spike_factor * mean:
            return mean
        return None
