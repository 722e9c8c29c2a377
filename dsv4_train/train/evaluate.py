"""Validation loss: the validation split through Megatron-Core's schedule, forward only.

Every evaluation reads the same `train.eval_iters` global batches from the start of the validation
split (each data-parallel rank its share, as in training), so values are comparable across
evaluations and layouts. The loss is the token-weighted mean LM loss over all of them (the same
(sum, count) reduction as the training loss, over every rank); the model runs in eval mode (no
indexer KL, no balance losses) under `torch.no_grad()`.
"""

from __future__ import annotations

from typing import Callable, Iterator, List

import torch

from dsv4_train.train.step import mean_reported_loss, run_schedule


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
    from dsv4_train.model import aux_losses

    data = make_iterator()
    outputs = []
    for chunk in model_chunks:
        chunk.eval()
    try:
        with torch.no_grad():
            for _ in range(eval_iters):
                outputs += run_schedule(
                    data_iterator=data, model_chunks=model_chunks, num_microbatches=num_microbatches,
                    seq_length=seq_length, micro_batch_size=micro_batch_size, hc_mult=hc_mult, forward_only=True,
                ) or []
    finally:
        for chunk in model_chunks:
            chunk.train()
        aux_losses.drain()  # nothing of an evaluation reaches the next training step's metrics
    return mean_reported_loss(outputs, model_chunks)
