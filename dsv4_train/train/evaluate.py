"""Validation loss: the validation split through Megatron-Core's schedule, forward only.

Every evaluation reads the same `train.eval_iters` global batches from the start of the validation
split (each data-parallel rank its share, as in training), so values are comparable across
evaluations and layouts. The loss is the token-weighted mean LM loss over all of them (the same
(sum, count) reduction as the training loss, over every rank); the model runs in eval mode (no
indexer KL, no balance losses) under `torch.no_grad()`. The MTP loss of the same tokens is read from
Megatron's MTP tracker as in training.
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
    collect_aux: Callable[[int], dict],
) -> dict:
    """{"val_loss": mean validation LM loss over `eval_iters` global batches, "val_mtp_loss": the
    MTP loss over the same tokens (when the model has MTP)}, identical on every rank.
    collect_aux(num_microbatches): the loop's pooled reader of the MTP tracker and aux losses."""
    from dsv4_train.model import aux_losses

    data = make_iterator()
    outputs = []
    _track_mtp(model_chunks, True)
    for chunk in model_chunks:
        chunk.eval()
    try:
        with torch.no_grad():
            for _ in range(eval_iters):
                outputs += run_schedule(
                    data_iterator=data, model_chunks=model_chunks, num_microbatches=num_microbatches,
                    seq_length=seq_length, micro_batch_size=micro_batch_size, hc_mult=hc_mult, forward_only=True,
                ) or []
        aux = collect_aux(num_microbatches * eval_iters)  # also empties the trackers
    finally:
        _track_mtp(model_chunks, False)
        for chunk in model_chunks:
            chunk.train()
        aux_losses.drain()  # nothing of an evaluation reaches the next training step's metrics
    result = {"val_loss": mean_reported_loss(outputs, model_chunks)}
    if "mtp_loss" in aux:
        result["val_mtp_loss"] = aux["mtp_loss"]
    return result


def _track_mtp(model_chunks, on: bool) -> None:
    for chunk in model_chunks:
        for module in chunk.modules():
            if hasattr(module, "track_mtp_in_eval"):
                module.track_mtp_in_eval = on
