"""A tensor-parallel d_in -> d_out linear whose output keeps the layout of its input.

Why: V4's MTP `e_proj` / `h_proj` map hidden -> hidden inside a residual that is replicated over TP
ranks without sequence parallelism and split along the sequence with it. Megatron-Core's
`ColumnParallelLinear(gather_output=True)` is right only in the first case: under sequence
parallelism it returns the full sequence (and its input-gradient all-reduce would add gradients of
different tokens if the all-gather were skipped).

Weights are split by output columns exactly like `ColumnParallelLinear` (same checkpoint layout):
* TP without SP: input [s, b, d_in] (replicated) -> local columns -> gather over the last dim ->
  [s, b, d_out]; backward all-reduces the input gradient (Megatron's own path).
* TP with SP: input [s/tp, b, d_in] -> all-gather along the sequence -> local columns
  [s, b, d_out/tp] -> all-to-all to [s/tp, b, d_out] (`all_to_all_hp2sp`, a permutation: its
  backward is the inverse all-to-all); the sequence all-gather's backward reduce-scatters the
  partial input gradients, so every rank gets the complete gradient of its own tokens.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel


class SameLayoutColumnLinear(tensor_parallel.ColumnParallelLinear):
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
