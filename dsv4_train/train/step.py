"""One optimizer step through Megatron-Core's forward-backward schedule.

The schedule runs every micro-batch (and the pipeline when PP > 1); `finalize_model_grads` (set on
the TransformerConfig by `wire_model_config`) reduces gradients over DP/TP/CP, all-reduces
embedding grads between stages and applies the noaux_tc expert-bias update; then the optimizer
clips and steps, and the LR scheduler advances.

Pipeline parallel: the schedule calls `forward_step` on every stage and every model chunk; each
chunk reads the micro-batch from its own copy of the data stream (`itertools.tee`), so every stage
has the token ids (hash routing, MTP) and the last has labels; non-first stages take their streams
from `set_input_tensor`. The schedule's p2p shape is (seq/cp [/tp], micro_batch * hc_mult, hidden):
the mHC streams ride in the batch dimension (see model.py).
Context parallel: each CP rank feeds its contiguous slice of the micro-batch (parallel/context.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import partial
from typing import Dict, Iterator, List

import torch


@dataclass
class StepResult:
    lm_loss: float
    grad_norm: float
    lr: float
    num_tokens: int
    update_successful: bool
    aux: Dict[str, float]


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, cp_group=None):
    """Megatron 3-tuple convention: (sum of masked token losses, token count, values to report).

    The schedule divides the sum by the token count and the number of micro-batches, so the
    gradient is that of the mean token loss of the global batch. Under context parallelism the
    count is the micro-batch's CP-global count and the sum is scaled by cp: DDP averages gradients
    over CP, so the ranks' shares add up to the global mean exactly.
    The report holds the unscaled local (sum, count): summed over ranks they give the global mean.
    """
    from dsv4_train.parallel.context import sum_over_group

    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    loss_sum = torch.sum(losses * mask)
    report = torch.stack([loss_sum.detach().clone(), mask.sum().detach()])
    cp_size = cp_group.size() if cp_group is not None else 1
    num_tokens = sum_over_group(mask.sum(), cp_group).to(torch.int)
    return loss_sum * cp_size, num_tokens, {"lm_loss": report}


def forward_step(data_iterator: Iterator, model: torch.nn.Module):
    from megatron.core import parallel_state

    from dsv4_train.parallel.context import slice_batch

    cp_group = parallel_state.get_context_parallel_group()
    batch = slice_batch(next(data_iterator), rank=cp_group.rank(), size=cp_group.size())
    device = _module_device(model)
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    loss_mask = batch["loss_mask"].to(device, non_blocking=True)
    position_ids = batch["position_ids"].to(device, non_blocking=True)
    segment_ids = batch.get("segment_ids")  # packed documents (data.document_mask)
    if segment_ids is not None:
        segment_ids = segment_ids.to(device, non_blocking=True)
    output = model(tokens, position_ids, labels=labels, loss_mask=loss_mask, segment_ids=segment_ids)
    return output, partial(loss_func, loss_mask, cp_group=cp_group if cp_group.size() > 1 else None)


def _module_device(model: torch.nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def wire_model_config(model_chunks: List[torch.nn.Module], optimizer) -> None:
    """Point the schedule at our DDP hooks and Megatron's grad finalisation."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.utils import get_model_config

    config = get_model_config(model_chunks[0])
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    no_sync = [chunk.no_sync for chunk in model_chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if model_chunks[0].ddp_config.overlap_grad_reduce:
        # The schedule starts each chunk's grad reduction as soon as its last backward ends
        # (Megatron-LM's align_grad_reduce); finalize_model_grads waits for them.
        start = [chunk.start_grad_sync for chunk in model_chunks]
        config.grad_sync_func = start[0] if len(start) == 1 else start


def run_schedule(*, data_iterator, model_chunks, num_microbatches, seq_length, micro_batch_size, hc_mult,
                 forward_only: bool):
    """Megatron's forward(-backward) schedule over `num_microbatches` micro-batches of the stream;
    returns the per-micro-batch loss reports (last pipeline stage; empty elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from dsv4_train.model.model import pipeline_micro_batch_size

    # One copy of the micro-batch stream per chunk: every virtual stage reads every micro-batch.
    iterators = data_iterator if len(model_chunks) == 1 else list(itertools.tee(data_iterator, len(model_chunks)))
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators,
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=pipeline_micro_batch_size(micro_batch_size, hc_mult),  # folded streams (model.py)
        forward_only=forward_only,
    )


def mean_reported_loss(outputs, model_chunks) -> float:
    """Token-weighted mean of the reported (sum, count) pairs over every rank (identical everywhere).
    Every rank joins the reduction; non-last pipeline stages contribute zeros; TP/CP ranks each hold
    a copy of (a share of) the same tokens, so the ratio is the global mean."""
    totals = torch.zeros(2, dtype=torch.float64)
    for micro in outputs or []:
        totals += micro["lm_loss"].detach().to("cpu", torch.float64)
    totals = totals.to(_module_device(model_chunks[0]))
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    return (totals[0] / totals[1].clamp(min=1)).item()


def train_step(
    *,
    data_iterator: Iterator,
    model_chunks: List[torch.nn.Module],
    optimizer,
    scheduler,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    hc_mult: int = 1,
    drain_aux_losses,
    step: int = 0,
) -> StepResult:
    """hc_mult: the model's mHC stream count (the pipeline p2p carries streams in the batch dim).

    A step with a non-finite loss or gradient on any rank is not applied anywhere (train/nonfinite.py):
    no optimizer step, no LR step, expert biases restored; `update_successful` is then False."""
    from dsv4_train.train import nonfinite

    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    biases = [b.detach().clone() for b in nonfinite.expert_biases(model_chunks)]
    outputs = run_schedule(
        data_iterator=data_iterator, model_chunks=model_chunks, num_microbatches=num_microbatches,
        seq_length=seq_length, micro_batch_size=micro_batch_size, hc_mult=hc_mult, forward_only=False,
    )
    lm_loss = mean_reported_loss(outputs, model_chunks)
    nonfinite.inject_nan_if_asked(model_chunks, step)
    grad_norm, update_successful = float("nan"), False
    if nonfinite.step_is_finite(model_chunks, lm_loss, _module_device(model_chunks[0])):
        update_successful, norm, _ = optimizer.step()
        grad_norm = float(norm) if norm is not None else float("nan")
    else:
        with torch.no_grad():
            for bias, saved in zip(nonfinite.expert_biases(model_chunks), biases):
                bias.copy_(saved)  # the bias update ran inside the backward's grad finalisation
    if update_successful:
        scheduler.step(increment=1)
    lr = optimizer.param_groups[0]["lr"]
    return StepResult(
        lm_loss=lm_loss,
        grad_norm=grad_norm,
        lr=float(lr),
        num_tokens=int(num_microbatches * micro_batch_size * seq_length),
        update_successful=bool(update_successful),
        aux=drain_aux_losses(),
    )
