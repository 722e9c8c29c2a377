"""Context parallelism (CP) for the V4 model: contiguous sequence slices (paper §3.4.3).

Each CP rank holds ONE contiguous slice of every sequence: rank r owns tokens
[r*L, (r+1)*L) with L = seq_length / cp. This is not Megatron's zigzag split: V4's sliding window
and compressor work on contiguous runs of tokens, and the paper's CP (paper §3.4.3) is contiguous too.

Load balance: causal attention work grows with the query position only through the compressed
entries (at most T/m per query, m = 4 or 128) and the top-k of CSA (fixed k); the sliding window is a
constant W keys per query. So per-token attention cost is nearly flat in the position and a contiguous
split is balanced up to the compressed-entry term: the last rank sees about T/m entries per query, the
first about L/m (for HCA, m = 128, that is a small share of the W + k keys; for the dense
[L, W+T/m] masked implementation used here the key count is identical on every rank).

What crosses ranks, per attention layer (see `HybridAttention`):
* a halo: the last `halo_size` rows of the previous rank's attention input (window keys and the
  previous compression block of overlapping CSA/indexer compressors are recomputed from it);
  gathered with one all-gather of [halo, B, d] (backward: reduce-scatter, so the previous rank gets
  its gradient);
* the compressed entries (main KV and indexer keys): each rank compresses its own complete blocks,
  then an all-gather builds every entry of the sequence in order (single 512-d head: cheap).
MTP shifts tokens left by one across the slice boundary (`roll_left`) instead of Megatron's
zigzag-aware `roll_tensor`, which is what made Megatron's CP + MTP gradients inexact.

Loss convention (Megatron's, see train/step.py): DDP averages gradients over DP x CP, so
each CP rank returns `cp * local_sum / global_count`; the CP-sum of the ranks' losses divided by cp
is the global mean.

Every function here that talks to other ranks runs eagerly under `model.compile`
(`@torch.compiler.disable`): a compiled block then holds local compute only and its collectives run
in program order on every rank (traced into graphs that split differently per rank, they deadlocked).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

from dsv4_train.model.blocking import context_parallel_halo


@dataclass
class ContextParallelSlice:
    """Where this rank's tokens sit in the full sequence, plus the group to talk to."""

    group: torch.distributed.ProcessGroup
    rank: int
    size: int
    local_len: int  # L: tokens per rank
    halo_positions: torch.Tensor  # [halo] RoPE positions of the previous rank's last `halo` tokens

    @property
    def offset(self) -> int:
        """Sequence index of this rank's first token."""
        return self.rank * self.local_len

    @property
    def seq_len(self) -> int:
        return self.size * self.local_len

    @property
    def halo(self) -> int:
        return int(self.halo_positions.numel())


def halo_size(model_cfg) -> int:
    """Rows of the previous rank an attention layer needs (model/blocking.py)."""
    return context_parallel_halo(model_cfg.sliding_window, model_cfg.compress_ratios)


@torch.compiler.disable
def gather_sequence(tensor: torch.Tensor, cp: ContextParallelSlice) -> torch.Tensor:
    """[b, L] of this rank -> [b, cp * L], the whole sequence on every rank (not differentiable)."""
    return _all_gather_first_dim(tensor.t().contiguous(), cp.group).t()


class _SumOverRanks(torch.autograd.Function):
    """All-reduce sum whose backward is an all-reduce sum too: every rank's loss uses the sum."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        out = tensor.clone()
        torch.distributed.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


@torch.compiler.disable
def sum_entries(entries: torch.Tensor, cp: ContextParallelSlice) -> torch.Tensor:
    """[B, N, c] entries, each computed by exactly one rank (zeros elsewhere) -> all of them on every rank."""
    return _SumOverRanks.apply(entries, cp.group)


@torch.compiler.disable
def build_slice(positions: torch.Tensor, *, group, halo: int) -> Optional[ContextParallelSlice]:
    """positions: [L] this rank's RoPE positions. None when the CP group has one rank."""
    if group is None or group.size() == 1:
        return None
    size, rank = group.size(), group.rank()
    local_len = positions.shape[0]
    if halo > local_len:
        raise ValueError(
            f"context parallel: the attention needs {halo} tokens of the previous rank but each rank "
            f"holds only {local_len} (train.seq_length / parallel.cp); lower parallel.cp."
        )
    tails = _all_gather_first_dim(positions[local_len - halo :].contiguous(), group)
    previous = tails[(rank - 1) * halo : rank * halo] if rank > 0 else positions.new_zeros(halo)
    return ContextParallelSlice(group=group, rank=rank, size=size, local_len=local_len, halo_positions=previous)


@torch.compiler.disable
def previous_rows(x: torch.Tensor, cp: ContextParallelSlice) -> torch.Tensor:
    """x: [L, ...] -> the previous rank's last `cp.halo` rows [halo, ...] (zeros on rank 0).

    Differentiable: the gradient of the returned rows flows back to the previous rank's x.
    """
    h = cp.halo
    gathered = gather_from_sequence_parallel_region(x[x.shape[0] - h :], True, group=cp.group)
    if cp.rank == 0:
        return gathered[:h] * 0  # keeps the graph identical on every rank; values unused (masked)
    return gathered[(cp.rank - 1) * h : cp.rank * h]


@torch.compiler.disable
def gather_entries(entries: torch.Tensor, cp: ContextParallelSlice) -> torch.Tensor:
    """[B, n_local, c] compressed entries of this rank -> [B, cp * n_local, c] in sequence order.

    Backward reduce-scatters: every rank's queries may attend to any entry.
    """
    gathered = gather_from_sequence_parallel_region(entries.transpose(0, 1).contiguous(), True, group=cp.group)
    return gathered.transpose(0, 1)


def sum_over(value: torch.Tensor, cp: Optional[ContextParallelSlice]) -> torch.Tensor:
    """Non-differentiable CP sum of a count (e.g. loss tokens), for global normalisation."""
    return sum_over_group(value, cp.group if cp is not None else None)


@torch.compiler.disable
def sum_over_group(value: torch.Tensor, group) -> torch.Tensor:
    if group is None or group.size() == 1:
        return value
    value = value.detach().clone()
    torch.distributed.all_reduce(value, group=group)
    return value


@torch.compiler.disable
def roll_left(tensor: torch.Tensor, group) -> torch.Tensor:
    """Shift [b, L] left by one along the sequence, across contiguous CP slices.

    Position i takes element i+1; the last position of a rank takes the next rank's first element,
    the last position of the last rank (past the end of the sequence) is 0 (masked by the loss).
    """
    rolled = torch.roll(tensor, shifts=-1, dims=-1)
    if group is None or group.size() == 1:
        rolled[..., -1] = 0
        return rolled
    rank, size = group.rank(), group.size()
    heads = _all_gather_first_dim(tensor[..., :1].t().contiguous(), group)  # [size*1, b]
    rolled[..., -1] = heads[rank + 1] if rank + 1 < size else 0
    return rolled


def slice_batch(batch: Dict[str, torch.Tensor], *, rank: int, size: int) -> Dict[str, torch.Tensor]:
    """The contiguous CP slice [b, seq/size] of every [b, seq] tensor of a micro-batch."""
    if size == 1:
        return batch
    out = {}
    for key, value in batch.items():
        seq = value.shape[-1]
        assert seq % size == 0, (key, value.shape, size)
        local = seq // size
        out[key] = value[..., rank * local : (rank + 1) * local]
    return out


def _all_gather_first_dim(tensor: torch.Tensor, group) -> torch.Tensor:
    size = group.size()
    out = tensor.new_empty((size * tensor.shape[0],) + tuple(tensor.shape[1:]))
    torch.distributed.all_gather_into_tensor(out, tensor, group=group)
    return out
