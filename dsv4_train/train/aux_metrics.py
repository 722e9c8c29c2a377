"""Per-step auxiliary metrics pooled over every rank: the MTP loss and the model's aux losses."""

from __future__ import annotations

import torch


def collect_aux_metrics(num_microbatches: int) -> dict:
    """Per-step auxiliary values, identical on every rank: the MTP loss (Megatron's MTP tracker,
    averaged over micro-batches, depths and DP x CP ranks) and our aux losses (indexer KL), pooled
    as sum / count over every rank that recorded them.

    Only some ranks hold a value (MTP on the last pipeline stage; a stage may hold no CSA layer), so
    the union of names is agreed first and then ONE all-reduce carries every (sum, count): no rank
    waits on a reduction another rank skips. Under CP an aux-loss record is the rank's share (the
    CP sum is the loss), hence the factor cp.
    """
    from megatron.core import parallel_state
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    from dsv4_train.model import aux_losses

    pooled = {}  # name -> [sum, count] on this rank
    tracker = MTPLossLoggingHelper.tracker
    if "loss_values" in tracker and tracker.get("avg_group") is not None:
        MTPLossLoggingHelper.reduce_metrics_in_tracker()
        per_layer = tracker["loss_values"].detach().float().cpu()
        pooled["mtp_loss"] = [float(per_layer.sum()) / num_microbatches / max(len(per_layer), 1), 1.0]
        MTPLossLoggingHelper.clean_metrics_in_tracker()
    counts = aux_losses.pending()
    cp = parallel_state.get_context_parallel_world_size()
    for name, mean in aux_losses.drain().items():
        pooled[name] = [mean * counts[name] * cp, float(counts[name])]
    if not torch.distributed.is_initialized():
        return {name: s / c for name, (s, c) in pooled.items()}
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, sorted(pooled))
    names = sorted(set().union(*everyone))
    totals = torch.tensor([pooled.get(n, [0.0, 0.0]) for n in names], dtype=torch.float64).reshape(-1, 2)
    torch.distributed.all_reduce(totals)
    return {n: float(s / max(c, 1.0)) for n, (s, c) in zip(names, totals.tolist())}
