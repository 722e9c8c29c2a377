"""Routed experts as two batched matmuls instead of one MLP per expert (the CPU path).

Megatron-Core's `SequentialMLP` runs every local expert through its own `MLP` (two autograd
linears, an activation and a scale each: ~10 Python-dispatched ops and 2 custom autograd nodes per
expert, forward and backward), and its grouped path (`TEGroupedMLP`) needs Transformer Engine,
which does not exist on CPU. At the sizes CPU runs use, that per-expert overhead is most of the
MoE's cost, so `BatchedSequentialMLP` keeps `SequentialMLP`'s modules, parameters and sharded
checkpoint layout (`local_experts.N.linear_fc1/fc2`, EP / expert-TP resharding unchanged) and
replaces only the forward:

    tokens (sorted by local expert by the dispatcher) -> zero-padded [experts, capacity, hidden]
    -> bmm with the stacked fc1 weights -> clamped SwiGLU (V4 §7) -> bmm with the stacked fc2
    weights -> the original token rows -> x routing prob.

The maths are `MLP.forward`'s on the unfused GLU path (the one V4's clamp takes): expert linears
never communicate (Megatron's `explicit_expert_comm`; the dispatcher does), so each expert's
output is its local fc2(glu(fc1(x))) * prob, and the padding rows (zero input) are dropped. The
prob multiplies the expert output as in the official code (`expert(x) * weight`); Megatron scales
the intermediate before fc2 instead (equal by linearity, rounded differently). Stacking copies all
local expert weights every step, which is cheap on CPU-sized models and wrong for large GPU ones,
hence `ModelConfig.moe_expert_compute` (model/grouped_experts.py stores the weights stacked instead).
"""

from __future__ import annotations

from typing import List

import torch
from megatron.core.transformer.moe.experts import SequentialMLP

from dsv4_train.model import recompute
from dsv4_train.model.swiglu import expert_activation


def padded_row_index(tokens_per_expert: List[int], capacity: int, device) -> torch.Tensor:
    """Row r of expert e's block (in the expert-sorted token order) -> row e * capacity + r of
    the padded batch. [num_tokens] int64."""
    counts = torch.tensor(tokens_per_expert, dtype=torch.long, device=device)
    starts = torch.cumsum(counts, 0) - counts
    shift = torch.arange(len(tokens_per_expert), device=device) * capacity - starts  # [experts]
    return torch.arange(int(sum(tokens_per_expert)), device=device) + torch.repeat_interleave(shift, counts)


class BatchedSequentialMLP(SequentialMLP):
    """`SequentialMLP` whose forward runs all local experts as one padded batch (see module doc)."""

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        """permuted_local_hidden_states [tokens, hidden] (grouped by local expert),
        tokens_per_expert [local experts], permuted_probs [tokens] -> ([tokens, hidden], None)."""
        config = self.config
        assert not (config.fp8 or config.fp4 or config.moe_apply_probs_on_input or config.add_bias_linear), (
            "BatchedSequentialMLP implements the bias-free, unquantised path V4 uses")
        assert config.gated_linear_unit and not config.use_te_activation_func and not config.bias_activation_fusion
        hidden = permuted_local_hidden_states
        counts = tokens_per_expert.tolist()
        num_experts, num_tokens = len(counts), hidden.shape[0]
        capacity = max(counts) if counts else 0
        if num_tokens == 0 or capacity == 0:
            # No tokens here: keep every expert weight in the graph so each still gets a (zero) grad.
            zero = sum(p.sum() for p in self.parameters()) * 0.0
            return hidden.new_zeros(hidden.shape) + zero.to(hidden.dtype), None

        rows = padded_row_index(counts, capacity, hidden.device)  # [tokens]
        padded = hidden.new_zeros(num_experts * capacity, hidden.shape[-1]).index_copy(0, rows, hidden)
        fc1 = torch.stack([expert.linear_fc1.weight for expert in self.local_experts])  # [E, 2f, d]
        fc2 = torch.stack([expert.linear_fc2.weight for expert in self.local_experts])  # [E, d, f]
        gate_up = torch.bmm(padded.view(num_experts, capacity, -1), fc1.transpose(1, 2))  # [E, C, 2f]

        intermediate, dropped = recompute.run_dropping_outputs(
            recompute.active(config, "moe_act"), self._activation, gate_up
        )  # [E, C, f]
        out = torch.bmm(intermediate, fc2.transpose(1, 2))  # [E, C, d]
        recompute.release(dropped, out)
        out = out.reshape(num_experts * capacity, -1).index_select(0, rows)  # [tokens, d]
        # The routing weight scales the expert's OUTPUT, as in the official code (and transformers);
        # Megatron's MLP scales the intermediate before fc2: equal by linearity, rounded differently.
        return (out * permuted_probs.unsqueeze(-1)).to(out.dtype), None

    def _activation(self, gate_up: torch.Tensor) -> torch.Tensor:
        """Megatron's unfused clamped GLU (`MLP.forward`), gate_up [E, C, 2f] -> [E, C, f]."""
        config = self.config
        gate, up = torch.chunk(gate_up, 2, dim=-1)
        limit = config.activation_func_clamp_value
        if limit is not None:
            gate = gate.clamp(min=None, max=limit)
            up = up.clamp(min=-limit, max=limit)
        if config.glu_linear_offset:
            up = up + config.glu_linear_offset
        return config.activation_func(gate) * up


class RecomputingSequentialMLP(SequentialMLP):
    """`SequentialMLP` (one MLP per expert); with selective `moe_act` each expert's clamped SwiGLU x
    prob runs under `CheckpointWithoutOutput` (model/recompute.py) between its own fc1 and fc2."""

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        if not recompute.active(self.config, "moe_act"):
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        config = self.config
        assert not (config.fp8 or config.fp4 or config.moe_apply_probs_on_input or config.add_bias_linear), (
            "moe_act recompute of sequential experts implements the bias-free, unquantised path V4 uses")
        activation = expert_activation(config)
        counts = tokens_per_expert.tolist()
        outputs = []
        for expert, tokens, probs in zip(self.local_experts, torch.split(permuted_local_hidden_states, counts),
                                         torch.split(permuted_probs, counts)):
            gate_up, _ = expert.linear_fc1(tokens)
            intermediate, dropped = recompute.run_dropping_outputs(True, activation, gate_up, probs)
            output, _ = expert.linear_fc2(intermediate)
            recompute.release(dropped, output)
            outputs.append(output)
        return torch.cat(outputs, dim=0), None
