"""Auxiliary-loss tracker shared by the whole model (indexer KL, sequence balance, ...).

Why: an auxiliary loss must add its gradient to backward without being summed into the LM loss the
schedule reports and scales. Megatron-Core's `MoEAuxLossAutoScaler` does exactly that: it is an
identity on `output` in forward and, in backward, hands `loss` a gradient of
`MoEAuxLossAutoScaler.main_loss_backward_scale` (default 1.0). Megatron's pipeline schedule sets
that scale once per microbatch (`loss_scale / num_microbatches`, times the CP size) whenever
`TransformerConfig.num_moe_experts` is set, which is always true for V4, so aux-loss gradients are
scaled like the LM loss.

Usage (inside a module's forward):

    out = aux_losses.attach(out, indexer_kl, name="indexer_loss")

`out` must be a tensor that lies on the path to the final loss (the attached gradient fires when
`out`'s gradient is computed). The detached value of `loss` is recorded under `name`; `drain()`
returns, per name, the mean over all values recorded since the last drain (e.g. over layers and
microbatches) and resets the record.

Caveat: activation recompute re-runs forward and would record a value twice; the mean is
unaffected when every layer is recomputed the same number of times.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

_records: Dict[str, List[torch.Tensor]] = {}


@torch.compiler.disable  # bookkeeping on a module-level dict: eager inside a compiled block (model.compile)
def attach(output: torch.Tensor, loss: torch.Tensor, *, name: str) -> torch.Tensor:
    """Return `output` unchanged; backward through it also back-propagates `loss` (scaled)."""
    if loss.dim() != 0:
        raise ValueError(f"aux loss {name!r} must be a scalar tensor, got shape {tuple(loss.shape)}.")
    _records.setdefault(name, []).append(loss.detach().float())
    if torch.is_grad_enabled() and loss.requires_grad:
        return MoEAuxLossAutoScaler.apply(output, loss)
    return output


def drain(reset: bool = True) -> Dict[str, float]:
    """Mean recorded value per name since the last drain, on this rank (the training loop pools
    ranks itself: train/aux_metrics.py::collect_aux_metrics)."""
    names = sorted(_records)
    if not names:
        return {}
    sums = torch.stack([torch.stack(_records[n]).sum() for n in names])
    counts = torch.tensor([float(len(_records[n])) for n in names], device=sums.device)
    if reset:
        _records.clear()
    return {n: float(s / c) for n, s, c in zip(names, sums.tolist(), counts.tolist())}


def pending() -> Dict[str, int]:
    """How many values are recorded per name (for tests and debugging)."""
    return {n: len(v) for n, v in _records.items()}
