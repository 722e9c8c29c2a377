"""V4's clamped SwiGLU (spec §7) with the routing weight folded in, as one autograd node: the gate
is clamped to <= limit, the linear half to [-limit, limit] (Megatron-Core's
`activation_func_clamp_value` / `glu_linear_offset`, `transformer/mlp.py`).

    out = silu(min(gate, L)) * (clamp(up, -L, L) + offset) * prob        gate, up = chunk(gate_up, 2)

The forward keeps only its inputs for the backward (no clamped/activated intermediates: one
[tokens, 2f] tensor instead of ~5) and recomputes the rest there. The prob multiplies the
activation before fc2, in fp32 and cast back, exactly as Megatron's `MLP.forward` does with its
`per_token_scale`; the clamp gradients follow `torch.clamp` (pass where min <= x <= max).
"""

from __future__ import annotations

from typing import Optional

import torch


def _parts(gate_up: torch.Tensor, limit: Optional[float], offset: float):
    gate, up = torch.chunk(gate_up, 2, dim=-1)
    if limit is not None:
        gate_c, up_c = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    else:
        gate_c, up_c = gate, up
    return gate, up, gate_c, up_c + offset if offset else up_c


class ClampedSwiGLU(torch.autograd.Function):
    """gate_up [N, 2f], prob [N] (fp32) -> [N, f] in gate_up's dtype."""

    @staticmethod
    def forward(ctx, gate_up, prob, limit, offset):
        ctx.save_for_backward(gate_up, prob)
        ctx.limit, ctx.offset = limit, offset
        _, _, gate_c, up_c = _parts(gate_up, limit, offset)
        return (torch.nn.functional.silu(gate_c) * up_c * prob.unsqueeze(-1)).to(gate_up.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        gate_up, prob = ctx.saved_tensors
        limit, offset = ctx.limit, ctx.offset
        gate, up, gate_c, up_c = _parts(gate_up, limit, offset)
        sig = torch.sigmoid(gate_c)
        act = gate_c * sig
        grad_act_up = grad_out * prob.unsqueeze(-1)  # d(out)/d(silu * up), in fp32 when prob is
        grad_gate = grad_act_up * up_c * (sig * (1 + gate_c * (1 - sig)))
        grad_up = grad_act_up * act
        if limit is not None:
            grad_gate = grad_gate * (gate <= limit)
            grad_up = grad_up * ((up >= -limit) & (up <= limit))
        grad_gate_up = torch.cat([grad_gate, grad_up], dim=-1).to(gate_up.dtype)
        grad_prob = None
        if ctx.needs_input_grad[1]:
            grad_prob = (grad_out.float() * (act * up_c).float()).sum(-1).to(prob.dtype)
        return grad_gate_up, grad_prob, None, None


def clamped_swiglu(gate_up: torch.Tensor, prob: torch.Tensor, limit: Optional[float], offset: float = 0.0):
    return ClampedSwiGLU.apply(gate_up, prob, limit, offset)
