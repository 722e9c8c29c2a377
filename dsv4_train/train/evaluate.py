"""Validation loss: the validation split through Megatron-Core's schedule, forward only.

Every evaluation reads the same `train.eval_iters` global batches from the start of the validation
split (each data-parallel rank its share, as in training), so values are comparable across
evaluations and layouts. The loss is the token-weighted mean LM loss over all of them (the same
(sum, count) reduction as the training loss, over every rank); the model runs in eval mode (no
indexer KL, no balance losses) under `torch.no_grad()`.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterator, List

import torch

from dsv4_train.train.step import _module_device, forward_step


def evaluate(
    *,
    make_iterator: Callable[[], Iterator],
    model_chunks: List[torch.nn.Module],
    eval_iters: int,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    hc_mult: int,
) -> float:
    """Mean validation LM loss over `eval_iters` global batches (identical on every rank)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from dsv4_train.model import aux_losses
    from dsv4_train.model.model import pipeline_micro_batch_size

    forward_backward = get_forward_backward_func()
    totals = torch.zeros(2, dtype=torch.float64)
    data = make_iterator()
    for chunk in model_chunks:
        chunk.eval()
    try:
        with torch.no_grad():
            for _ in range(eval_iters):
                iterators = data if len(model_chunks) == 1 else list(itertools.tee(data, len(model_chunks)))
                outputs = forward_backward(
                    forward_step_func=forward_step,
                    data_iterator=iterators,
                    model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
                    num_microbatches=num_microbatches,
                    seq_length=seq_length,
                    micro_batch_size=pipeline_micro_batch_size(micro_batch_size, hc_mult),
                    forward_only=True,
                )
                for micro in outputs or []:  # the last pipeline stage holds the reports
                    totals += micro["lm_loss"].detach().to("cpu", torch.float64)
    finally:
        for chunk in model_chunks:
            chunk.train()
        aux_losses.drain()  # nothing of an evaluation reaches the next training step's metrics
    totals = totals.to(_module_device(model_chunks[0]))
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    return (totals[0] / totals[1].clamp(min=1)).item()
