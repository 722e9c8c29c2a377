"""Megatron-Core's tensor-parallel linears, with a plain path on a single rank, and a TP linear
whose output keeps the layout of its input.

`ColumnParallelLinear` / `RowParallelLinear`: Megatron's classes (same parameters, init, sharded
checkpoints), except that when their TP group has ONE rank and none of Megatron's special
weight-gradient paths is on (gradient-accumulation fusion, deferred embedding wgrad, CPU
offloading), the forward is `F.linear`. Megatron's path then computes the same matmul through a
custom autograd Function plus identity copy/reduce/gather Functions (~70 us of Python per call
forward + backward, measured on CPU): pure overhead at TP size 1, the common V4 layout.

`SameLayoutColumnLinear`: V4's MTP `e_proj` / `h_proj` map hidden -> hidden inside a residual that
is replicated over TP ranks without sequence parallelism and split along the sequence with it.
Megatron-Core's `ColumnParallelLinear(gather_output=True)` is right only in the first case: under
sequence parallelism it returns the full sequence (and its input-gradient all-reduce would add
gradients of different tokens if the all-gather were skipped).

Weights are split by output columns exactly like `ColumnParallelLinear` (same checkpoint layout):
* TP without SP: input [s, b, d_in] (replicated) -> local columns -> gather over the last dim ->
  [s, b, d_out]; backward all-reduces the input gradient (Megatron's own path).
* TP with SP: input [s/tp, b, d_in] -> all-gather along the sequence -> local columns
  [s, b, d_out/tp] -> all-to-all to [s/tp, b, d_out] (`all_to_all_hp2sp`, a permutation: its
  backward is the inverse all-to-all); the sequence all-gather's backward reduce-scatters the
  partial input gradients, so every rank gets the complete gradient of its own tokens.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel


def _plain_on_single_rank(layer) -> bool:
    """True when Megatron's forward of `layer` reduces to F.linear (see the module docstring)."""
    config = layer.config
    return (
        layer.tp_group.size() == 1
        and not layer.gradient_accumulation_fusion
        and not config.defer_embedding_wgrad_compute
        and config._cpu_offloading_context is None
    )


def copy_to_tp_region(input_: torch.Tensor, group) -> torch.Tensor:
    """Megatron's `copy_to_tensor_model_parallel_region` (identity forward, all-reduce backward),
    skipped on a single-rank group where it is an identity both ways."""
    if group.size() == 1:
        return input_
    return tensor_parallel.copy_to_tensor_model_parallel_region(input_, group=group)


def reduce_from_tp_region(input_: torch.Tensor, group) -> torch.Tensor:
    """Megatron's `reduce_from_tensor_model_parallel_region`, skipped on a single-rank group."""
    if group.size() == 1:
        return input_
    return tensor_parallel.reduce_from_tensor_model_parallel_region(input_, group=group)


class ColumnParallelLinear(tensor_parallel.ColumnParallelLinear):
    def forward(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None,
                runtime_gather_output: Optional[bool] = None):
        if weight is not None or not _plain_on_single_rank(self):
            return super().forward(input_, weight, runtime_gather_output)
        if self.skip_bias_add:
            return F.linear(input_, self.weight), self.bias
        return F.linear(input_, self.weight, self.bias), None


class RowParallelLinear(tensor_parallel.RowParallelLinear):
    def forward(self, input_: torch.Tensor):
        if not _plain_on_single_rank(self):
            return super().forward(input_)
        if self.skip_bias_add:
            return F.linear(input_, self.weight), self.bias
        return F.linear(input_, self.weight, self.bias), None


class SameLayoutColumnLinear(ColumnParallelLinear):
    def __init__(self, input_size: int, output_size: int, *, config, init_method):
        super().__init__(
            input_size,
            output_size,
            config=config,
            init_method=init_method,
            bias=False,
            gather_output=not config.sequence_parallel,
        )

    def forward(self, input_: torch.Tensor):
        """input_ [s(/tp), b, d_in] -> ([s(/tp), b, d_out], None)."""
        output, bias = super().forward(input_)
        if self.sequence_parallel:
            seq_local, batch = input_.shape[:2]
            output = tensor_parallel.all_to_all_hp2sp(output, group=self.tp_group).view(seq_local, batch, -1)
        return output, bias
